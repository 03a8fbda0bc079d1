"""``bonesoup`` command line.

    bonesoup merge B1 B2 ... --out DIR --preference 0.3 0.7 --beta 0.7 [--alpha A --sft DIR]
    bonesoup merge A1 A2 ... --sft DIR --out DIR --preference ... [--as-adapter]   # LoRA adapter backbones
    bonesoup merge --config merge.yaml --out DIR   # a mergekit config (linear, task_arithmetic, bone_soup)
    bonesoup merge            # embedded default: tiny checkpoints made in code
    bonesoup extract-lora BACKBONE --sft SFT --rank 16 --out DIR   # a full fine-tune as a LoRA adapter
    bonesoup bench merge --quick
    bonesoup serve            # OpenAI-compatible completions over a LiveSoup (embedded default)
    bonesoup serve --adapters A1 A2 --sft DIR --beta 0.7   # LoRA backbones: per-request preferences, one batch

Errors in the user's input (bad arguments, malformed or hostile checkpoints,
an existing output) print one line naming what was wrong, and the file, key
or argument, and exit 2; any other error prints one line too and exits 1.
``--debug`` (or ``BONESOUP_DEBUG=1``) prints the traceback as well.

``bonesoup merge`` on the CPU (and its ``--help``) imports no torch: the merge
runs on memory-mapped files through ``soupkernels._C``
(:mod:`bonesoup.merge.cpu_merge`); torch comes in only for ``--device cuda``
and the embedded demo's reload check.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import traceback
from pathlib import Path

from bonesoup.merge.methods import MERGE_METHODS, get_merge_method, merge_method_names

DEMO_DIR = Path("out") / "demo"
_DEBUG_HELP = "print the traceback of an error, not only its one-line message (also BONESOUP_DEBUG=1)"


def _add_merge(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge checkpoint directories at a preference (no directories: run the embedded demo)",
        description="Merge Hugging Face checkpoints with Bone Soup (lambda = B^-1 mu) or Rewarded Soup "
        "(lambda = mu) coefficients, optionally extrapolating away from the SFT model, in one fused "
        "pass per batch of tensors. With no BACKBONE directories it builds tiny checkpoints in code "
        f"(under --workdir, default {DEMO_DIR}) and merges those.",
    )
    p.add_argument("backbones", nargs="*", metavar="BACKBONE",
                   help="checkpoint directories, one per objective; or peft LoRA adapter directories (detected by "
                   "adapter_config.json; with --sft, the model they were trained on): the output is then "
                   "W_sft + sum_j c_j D_j (or, with --as-adapter, that one mixture adapter)")
    p.add_argument("--config", type=Path, help="a mergekit YAML config (merge_method linear, task_arithmetic or "
                   "bone_soup; models (checkpoints, BASE+ADAPTER or adapter directories), base_model, parameters, "
                   "dtype, out_dtype, tokenizer_source) instead of BACKBONE directories and --preference; other "
                   "methods and slices are refused")
    p.add_argument("--out", type=Path, help="output directory (default for the demo: WORKDIR/merged)")
    p.add_argument("--preference", type=float, nargs="+", help="mu, one weight per backbone, summing to 1")
    p.add_argument("--beta", type=float, help="backbone mixing strength in (0.5, 1) (method bone)")
    p.add_argument("--alpha", type=float, help="extrapolation strength (needs --sft when non-zero; default 0, "
                   "demo 0.1)")
    p.add_argument("--sft", type=Path, help="SFT checkpoint directory (for --alpha; the adapters' base model)")
    p.add_argument("--as-adapter", action="store_true",
                   help="adapter backbones only: write the merge as ONE peft adapter of rank sum_j r_j (exact) "
                   "instead of a full checkpoint")
    p.add_argument("--method", choices=merge_method_names(), default="bone",
                   help="; ".join(f"{m.name}: {m.description}" for m in MERGE_METHODS.values()))
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="output dtype (default: as input)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (streams through the GPU)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-fsync", action="store_true",
                   help="full-checkpoint and --config merges on the CPU: do not fsync the output (still renamed into "
                   "place only when complete, but a power loss soon after may leave it incomplete; mergekit does "
                   "not fsync either)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--workdir", type=Path, default=DEMO_DIR, help="demo only: where the tiny checkpoints go")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args) -> int:
    from bonesoup.merge.adapter_merge import is_adapter_dir

    if args.config is not None:
        if args.as_adapter:
            raise ValueError("--as-adapter takes adapter directories as arguments, not --config")
        return _merge_config(args)
    if not args.backbones:
        if args.as_adapter:
            raise ValueError("--as-adapter needs adapter directories as BACKBONE arguments")
        return _demo(args)
    adapters = [b for b in args.backbones if is_adapter_dir(b)]
    if adapters and len(adapters) < len(args.backbones):
        full = [b for b in args.backbones if not is_adapter_dir(b)]
        raise ValueError(f"BACKBONE arguments mix LoRA adapters ({', '.join(adapters)}) and full checkpoints "
                         f"({', '.join(full)}); give all of one kind (bonesoup extract-lora turns a full "
                         "fine-tune into an adapter)")
    if adapters:
        return _merge_adapters(args)
    if args.as_adapter:
        raise ValueError("--as-adapter needs adapter directories (with adapter_config.json); "
                         f"{args.backbones[0]} is a full checkpoint")
    kwargs = dict(_preference_merge_args(args, "backbone directories"), sft=args.sft, dtype=args.dtype,
                  progress=not args.no_progress)
    if _is_cpu(args.device):
        from bonesoup.merge import cpu_merge

        out = cpu_merge.merge_checkpoints_cpu(args.backbones, args.out, fsync=not args.no_fsync, **kwargs)
    else:
        if args.no_fsync:
            raise ValueError("--no-fsync applies to CPU merges; the --device path always fsyncs")
        from bonesoup.merge import offline

        out = offline.merge_checkpoints(args.backbones, args.out, device=args.device, **kwargs)
    print(json.dumps(json.loads((out / "bonesoup-merge.json").read_text()), indent=2))
    return 0


def _preference_merge_args(args, inputs: str) -> dict:
    """The flags every preference merge needs, checked: --out, --preference, --beta (when the method needs it)."""
    if args.out is None:
        raise ValueError(f"--out is required when {inputs} are given")
    if args.preference is None:
        raise ValueError("--preference is required (one weight per backbone, summing to 1)")
    if get_merge_method(args.method).needs_beta and args.beta is None:
        raise ValueError(f"--beta is required for --method {args.method}")
    return dict(preference=args.preference, beta=args.beta, alpha=args.alpha or 0.0, method=args.method,
                force=args.force)


def _merge_adapters(args) -> int:
    """Adapter backbones: the full checkpoint W_sft + sum_j c_j D_j, or (--as-adapter) the mixture adapter."""
    from bonesoup.merge import adapter_merge

    kwargs = _preference_merge_args(args, "adapter directories")
    if not _is_cpu(args.device):
        raise ValueError(f"adapter merges run on the CPU; --device {args.device} is not supported with them")
    if args.as_adapter:
        if args.dtype is not None:
            raise ValueError("--dtype sets a checkpoint's dtype; --as-adapter keeps the adapters' dtype")
        out = adapter_merge.merge_as_adapter(args.backbones, args.out, sft=args.sft, **kwargs)
        print(json.dumps(adapter_merge.read_mixture_report(out), indent=2))
        return 0
    if args.sft is None:
        raise ValueError("--sft is required with adapter directories (the model they were trained on: the merge "
                         "is W_sft + sum_j c_j D_j); or pass --as-adapter for the mixture adapter")
    out = adapter_merge.merge_adapters_cpu(args.backbones, args.out, sft=args.sft, dtype=args.dtype,
                                           progress=not args.no_progress, **kwargs)
    print(json.dumps(json.loads((out / "bonesoup-merge.json").read_text()), indent=2))
    return 0


def _is_cpu(device: str) -> bool:
    return device.strip().lower() == "cpu"


def _merge_config(args) -> int:
    """``--config merge.yaml``: a mergekit config, validated whole before any checkpoint is read."""
    from bonesoup.merge.cpu_merge import MergeInput, merge_weighted_cpu
    from bonesoup.merge.mergekit_config import load_mergekit_config, plan_from_config

    given = [flag for flag, value in (("BACKBONE directories", args.backbones), ("--preference", args.preference),
                                      ("--beta", args.beta), ("--alpha", args.alpha), ("--sft", args.sft))
             if value not in (None, [])]
    if given:
        raise ValueError(f"--config describes the whole merge; drop {', '.join(given)}")
    if args.out is None:
        raise ValueError("--out is required with --config")
    if not _is_cpu(args.device):
        raise ValueError(f"--config merges run on the CPU; --device {args.device} is not supported with it")
    plan = plan_from_config(load_mergekit_config(args.config), str(args.config))
    dtype = args.dtype or plan.out_dtype
    deltas = None
    if plan.adapters:  # LoRA models: their deltas come in through torch (the rest of the merge stays torch-free)
        from bonesoup.merge.adapter_merge import AdapterDeltas

        deltas = AdapterDeltas(plan.adapters)
        plan.report["adapters"] = deltas.report()
    out = merge_weighted_cpu([MergeInput(p, c, role) for p, c, role in plan.inputs], args.out, dtype=dtype,
                             force=args.force, progress=not args.no_progress, report=plan.report,
                             tokenizer_from=plan.tokenizer_dir, deltas=deltas, fsync=not args.no_fsync)
    print(json.dumps(json.loads((out / "bonesoup-merge.json").read_text()), indent=2))
    return 0


def _demo(args) -> int:
    """Embedded default: tiny backbones, a Bone Soup merge, a reload and a generation."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import soupkernels as sk
    from bonesoup.merge.coefficients import merge_coefficients, rewarded_soup_coefficients
    from bonesoup.merge.offline import merge_checkpoints
    from bonesoup.tasks.tiny_models import make_tiny_backbones

    transformers.logging.disable_progress_bar()
    pref = args.preference or [0.8, 0.2]
    beta = 0.7 if args.beta is None else args.beta
    alpha = 0.1 if args.alpha is None else args.alpha
    n = len(pref)
    work = args.workdir
    print(f"[demo] building {n} tiny GPT-2 backbones + SFT under {work} (sharded safetensors, made in code)")
    sft, backbones = make_tiny_backbones(work / f"inputs-n{n}", n, seed=0, shard_size="200KB")
    out = args.out or work / "merged"
    force = args.force or args.out is None  # the demo's own default output is always rebuilt
    lam, _ = merge_coefficients(pref, method=args.method, beta=beta)
    c, c_sft = merge_coefficients(pref, method=args.method, beta=beta, alpha=alpha)
    print(f"[demo] preference mu = {pref}, beta = {beta}, alpha = {alpha}, method = {args.method}")
    print(f"[demo] Rewarded Soup coefficients: {rewarded_soup_coefficients(pref).round(4).tolist()}")
    print(f"[demo] {args.method} coefficients lambda: {lam.round(4).tolist()} -> folded: backbones "
          f"{c.round(4).tolist()}, sft {c_sft:+.4f}")
    t0 = time.perf_counter()
    merge_checkpoints(backbones, out, preference=pref, beta=beta, alpha=alpha, sft=sft, method=args.method,
                      dtype=args.dtype, device=args.device, force=force, progress=not args.no_progress)
    print(f"[demo] merged into {out} in {time.perf_counter() - t0:.2f} s "
          f"(cpu kernels: {sk.cpu_info()}, backend {sk.backend_for(torch.empty(0))})")

    # Check the files against the float64 reference, then load and generate.
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    inputs = [AutoModelForCausalLM.from_pretrained(p).eval() for p in [*backbones, sft]]
    coeffs = [*c.tolist(), c_sft]
    worst = 0.0
    for name, w in merged.state_dict().items():
        ref = sum(k * m.state_dict()[name].double() for k, m in zip(coeffs, inputs))
        worst = max(worst, (w.double() - ref).abs().max().item())
    print(f"[demo] max |merged - float64 reference| over all weights: {worst:.3g}")
    tok = AutoTokenizer.from_pretrained(out)
    prompt = "The user asks"
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = merged.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    new_ids = gen[0][ids["input_ids"].shape[1]:].tolist()
    # Random tiny weights: the tokens are arbitrary and may be partial UTF-8 bytes, so show the ids too.
    print(f"[demo] greedy continuation of {prompt!r} (random tiny weights, so gibberish): token ids {new_ids}, "
          f"text {tok.decode(new_ids, errors='replace')!r}")
    print(f"[demo] report: {out / 'bonesoup-merge.json'}")
    return 0


def _add_extract(sub) -> None:
    p = sub.add_parser(
        "extract-lora",
        help="a full fine-tune as a LoRA adapter on its SFT model (truncated SVD of each linear layer's delta)",
        description="Write BACKBONE - SFT as a peft LoRA adapter of rank R: per linear layer (nn.Linear, Conv1D) "
        "the truncated SVD of its delta (float64, optimal), B = U sqrt(S), A = sqrt(S) V^T, scaling 1. Prints "
        "the relative error ||D - D_r||_F / ||D||_F per layer and overall (also in OUT/bonesoup-extract.json). "
        "Parameters that are not linear layers (norms, embeddings, biases, a tied lm_head) cannot be carried "
        "by a LoRA: extraction is refused when they differ from the SFT, unless --allow-dense-drift.",
    )
    p.add_argument("backbone", type=Path, metavar="BACKBONE", help="the full fine-tune's checkpoint directory")
    p.add_argument("--sft", type=Path, required=True, help="the SFT checkpoint it was fine-tuned from")
    p.add_argument("--rank", type=int, required=True, help="LoRA rank R")
    p.add_argument("--out", type=Path, required=True, help="output adapter directory (peft format)")
    p.add_argument("--svd", choices=["full", "lowrank"], default="full",
                   help="full: torch.linalg.svd in float64 (optimal); lowrank: torch.svd_lowrank (randomized, "
                   "float32, for large layers)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the saved LoRA factors")
    p.add_argument("--allow-dense-drift", action="store_true",
                   help="extract although norms / embeddings / biases differ from the SFT (they stay at the "
                   "SFT's values; their relative change is reported)")
    p.add_argument("--dense-tolerance", type=float, default=1e-6,
                   help="relative change ||p - p_sft|| / ||p_sft|| of such a parameter that counts as none")
    p.add_argument("--exclude-modules", nargs="+", default=[], metavar="MODULE",
                   help="linear modules (names or dotted suffixes, e.g. lm_head) to leave out of the adapter")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    p.set_defaults(func=_cmd_extract)


def _cmd_extract(args) -> int:
    from bonesoup.merge.extract import EXTRACT_REPORT_NAME, extract_lora, format_report

    result = extract_lora(args.backbone, args.sft, args.rank, args.out, svd=args.svd, dtype=args.dtype,
                          allow_dense_drift=args.allow_dense_drift, dense_tolerance=args.dense_tolerance,
                          exclude_modules=args.exclude_modules, force=args.force, progress=not args.no_progress)
    print(format_report(result.report))
    print(f"adapter: {args.out} (report: {args.out / EXTRACT_REPORT_NAME})")
    return 0


_BENCHES = {"merge": "bench_merge.py", "checkpoint": "bench_checkpoint_merge.py", "remerge": "bench_remerge.py",
            "serve": "bench_serve_load.py", "sampling": "bench_sampling.py", "guidance": "bench_guidance.py"}


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark from the source tree's benchmarks/ folder",
        description="Run benchmarks/bench_merge.py (kernel vs torch vs copy bandwidth) or "
        "benchmarks/bench_checkpoint_merge.py (bonesoup merge end to end vs a state-dict loop). "
        "Arguments after the name go to the script, e.g. `bonesoup bench merge --quick`.",
    )
    p.add_argument("which", choices=sorted(_BENCHES))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    import runpy

    script = Path(__file__).resolve().parent.parent / "benchmarks" / _BENCHES[args.which]
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: the benchmarks ship with the source tree, not the wheel")
    sys.argv = [str(script), *args.rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


# Commands whose parsers import nothing heavy: `bonesoup merge ...` builds only these, because the
# other commands' parser modules import torch (serve, experiment) at module level (extract-lora imports
# torch only when it runs).
_LIGHT_COMMANDS = ("merge", "extract-lora", "bench")


def build_parser(light: bool = False) -> argparse.ArgumentParser:
    """The whole command line; ``light`` registers only :data:`_LIGHT_COMMANDS` (imports no torch)."""
    parser = argparse.ArgumentParser(prog="bonesoup", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_merge(sub)
    _add_extract(sub)
    _add_bench(sub)
    if light:
        return parser
    from bonesoup.serve import add_serve_parser  # needs fastapi/uvicorn only when it runs

    add_serve_parser(sub)
    from bonesoup.train.cli import add_train_parsers

    add_train_parsers(sub)
    from bonesoup.eval.experiment import add_experiment_parser

    add_experiment_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(light=command in _LIGHT_COMMANDS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    debug = args.debug or os.environ.get("BONESOUP_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"bonesoup {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every error becomes one line; the traceback only when asked
        if debug:
            traceback.print_exc()
        print(f"bonesoup {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, _USER_ERRORS) else 1


# Errors that describe the user's input: arguments, files (missing, malformed,
# hostile), an existing output, ENOSPC. Anything else is ours: exit 1.
_USER_ERRORS = (ValueError, TypeError, OSError)


def error_line(exc: BaseException) -> str:
    """``exc`` as one line: its message with newlines folded, prefixed by its type unless a user error."""
    msg = re.sub(r"\s*\n\s*", "; ", str(exc).strip()) or type(exc).__name__
    if not isinstance(exc, _USER_ERRORS):
        msg = f"{type(exc).__name__}: {msg} (run with --debug for the traceback)"
    return msg


if __name__ == "__main__":
    sys.exit(main())
