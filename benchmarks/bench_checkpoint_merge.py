"""End-to-end ``bonesoup merge`` against the naive per-tensor state-dict loop, as whole processes.

What users actually run is a process: Python start-up, imports, reading the
shards, the weighted sum, writing the shards. This script times exactly that,
in one run, for both ways of doing it, on the same checkpoints and the same
coefficients:

- ours: ``python -m bonesoup merge B1 B2 B3 --sft SFT --out OUT --preference
  0.5 0.3 0.2 --beta 0.7 --alpha 0.1 --force --no-progress``;
- the loop people write: ``safetensors.torch.load_file`` every shard of every
  checkpoint into memory, ``sum(c * sd[key].float() for ...)`` per key, back
  to the input dtype, ``save_file`` per shard following the first input's
  index (plus the index, config and tokenizer files). It runs as a worker mode
  of this same file (``--naive-worker``), so it needs nothing but the venv.

The checkpoints are an SFT GPT-2 and n = 3 backbones (bf16, sharded) made by
``bonesoup.tasks.tiny_models.make_tiny_backbones`` with a larger width and depth,
built once and cached under ``--workdir`` (default ``bench-out/ckpt``).

Reported per case (min and median over ``--repeats``, runs interleaved): wall
time of the whole process, its peak RSS (also as a multiple of ONE model's
weight bytes), "ideal bytes / time" (the bytes a one-pass merge must move:
every input read once, the output written once) and that as a share of the
copy bandwidth measured in this process, speed-up over the loop, plus two
"python + imports" rows (the start-up floor each process pays) and the
in-process times each reports (bonesoup-merge.json ``seconds``; the worker's
own load/compute/save split).

Checks (the run fails if one fails): the two outputs agree within bf16
rounding, both agree with a float64 reference within one bf16 ulp (plus fp32
accumulation slack), the merged output loads with
``transformers.AutoModelForCausalLM``; and a crash check: ``bonesoup merge``
is SIGKILLed while it writes into its temporary directory, the target must not
exist afterwards, and a re-run must remove the stale temporary directory and
produce an output byte-identical to the timed runs' output.

    python benchmarks/bench_checkpoint_merge.py                 # ~194 MB per checkpoint
    python benchmarks/bench_checkpoint_merge.py --preset large  # ~806 MB per checkpoint, shards > one merge batch
    python benchmarks/bench_checkpoint_merge.py --quick         # ~30 MB per checkpoint, < 1 minute
    python benchmarks/bench_checkpoint_merge.py --json bench-out/ckpt-merge.json

Page cache: the inputs are read once before timing, so every timed run reads
them from memory (the warm-cache case; a cold-cache run measures the disk).
``os.sync()`` runs before each timed run so one run's dirty pages are not
flushed during the next. Note ours fsyncs every shard it writes (the output
is durable when the command returns); the loop, like ``save_file``, does not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Model shapes. Parameters ~ 12 * n_embd^2 * n_layer (vocabulary 384, 128 positions).
PRESETS = {
    # ~806 MB per checkpoint in bf16, 2 shards of <= 500 MB: shards larger than a
    # merge batch, so peak memory is set by the batch, not the shard or model.
    "large": dict(n_embd=2048, n_layer=8, n_head=16, shard_size="500MB"),
    # ~194 MB per checkpoint in bf16, 5 shards of <= 50 MB.
    "full": dict(n_embd=1024, n_layer=8, n_head=16, shard_size="50MB"),
    # ~32 MB per checkpoint, 4 shards.
    "quick": dict(n_embd=512, n_layer=5, n_head=8, shard_size="10MB"),
    # ~1 MB per checkpoint, several shards: for the test suite.
    "tiny": dict(n_embd=128, n_layer=2, n_head=4, shard_size="200KB"),
}

MODEL_MARKER = "bench-model.json"
WEIGHT_SUFFIX = ".safetensors"
INDEX_NAME = "model.safetensors.index.json"


# --------------------------------------------------------------------------- the naive loop (worker)


def naive_worker(argv: list[str]) -> int:
    """The per-tensor state-dict loop, as people write it. Prints its phase times as JSON."""
    t0 = time.perf_counter()
    p = argparse.ArgumentParser(prog="bench_checkpoint_merge.py --naive-worker")
    p.add_argument("--inputs", nargs="+", required=True)
    p.add_argument("--coeffs", nargs="+", type=float, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch
    from safetensors.torch import load_file, save_file

    t_import = time.perf_counter()

    def shards_of(d: Path) -> dict[str, list[str]] | None:
        index = d / INDEX_NAME
        if not index.is_file():
            return None
        files: dict[str, list[str]] = {}
        for key, shard in json.loads(index.read_text())["weight_map"].items():
            files.setdefault(shard, []).append(key)
        return files

    def load_state_dict(d: Path) -> dict:
        shards = shards_of(d)
        if shards is None:
            return load_file(d / "model.safetensors")
        sd = {}
        for shard in sorted(shards):
            sd.update(load_file(d / shard))
        return sd

    inputs = [Path(x) for x in args.inputs]
    sds = [load_state_dict(d) for d in inputs]
    t_load = time.perf_counter()

    merged = {}
    with torch.no_grad():
        for key, ref in sds[0].items():
            if ref.is_floating_point():
                merged[key] = sum(c * sd[key].float() for c, sd in zip(args.coeffs, sds)).to(ref.dtype)
            else:
                merged[key] = ref
    t_compute = time.perf_counter()

    out = Path(args.out)
    out.mkdir(parents=True)
    layout = shards_of(inputs[0])
    if layout is None:
        save_file(merged, out / "model.safetensors", metadata={"format": "pt"})
    else:
        for shard, keys in layout.items():
            save_file({k: merged[k] for k in keys}, out / shard, metadata={"format": "pt"})
        index = json.loads((inputs[0] / INDEX_NAME).read_text())
        index.setdefault("metadata", {})["total_size"] = sum(t.numel() * t.element_size() for t in merged.values())
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2))
    for f in inputs[0].iterdir():  # config, generation config, tokenizer files
        if f.is_file() and not f.name.endswith((WEIGHT_SUFFIX, ".index.json")) and not f.name.startswith("."):
            shutil.copyfile(f, out / f.name)
    t_save = time.perf_counter()
    print(json.dumps({"import_s": t_import - t0, "load_s": t_load - t_import, "compute_s": t_compute - t_load,
                      "save_s": t_save - t_compute, "in_process_s": t_save - t_import}))
    return 0


# --------------------------------------------------------------------------- processes


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TQDM_DISABLE", "1")
    return env


# Run by ``python -S -c`` as the parent of each measured command; prints nothing, writes its result file.
_WRAPPER = r"""
import json, os, sys, time
result, argv = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.posix_spawn(argv[0], argv, os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(result, "w") as f:
    json.dump({"wall_s": wall, "maxrss_kib": usage.ru_maxrss, "rc": os.waitstatus_to_exitcode(status)}, f)
"""


def run_measured(cmd: list[str], log_path: Path) -> dict:
    """Run ``cmd`` in a fresh process; return its wall time, peak RSS and output.

    Peak RSS: ``cmd`` is started by a minimal wrapper (``python -S``, ~10 MiB)
    that ``posix_spawn``s it and reads ``os.wait4(pid)``'s rusage, which
    belongs to that one child. Two traps this avoids: (1)
    ``getrusage(RUSAGE_CHILDREN)`` is the maximum over every child reaped so
    far, so a later, smaller run would report an earlier, larger one; (2) on
    Linux a child's ``ru_maxrss`` starts from the RSS of the process image it
    replaced at exec (the kernel folds the old mm's high-water mark into it),
    and subprocess forks/vforks from *this* process, which holds torch and the
    checkpoints (>1 GiB) - every child would then report at least that. The
    wrapper's own image is tiny, so the number is the command's own peak.
    Wall time is taken in the wrapper around spawn + wait (it excludes the
    wrapper's own ~20 ms start). psutil polling is not used: it can miss a
    short peak.
    """
    result = log_path.with_suffix(".rusage.json")
    remove(result)
    with open(log_path, "wb") as log:
        subprocess.run([sys.executable, "-S", "-c", _WRAPPER, str(result), *cmd], stdout=log,
                       stderr=subprocess.STDOUT, cwd=REPO, env=child_env(), check=True)
    meas = json.loads(result.read_text())
    text = log_path.read_text(errors="replace")
    if meas["rc"] != 0:
        raise RuntimeError(f"command failed with exit status {meas['rc']}: {' '.join(cmd)}\n{text[-4000:]}")
    return {"wall_s": meas["wall_s"], "max_rss_bytes": meas["maxrss_kib"] * 1024, "output": text}  # KiB on Linux


def ours_cmd(backbones, sft, out, args) -> list[str]:
    cmd = [sys.executable, "-m", "bonesoup", "merge", *map(str, backbones), "--sft", str(sft), "--out", str(out),
           "--preference", *map(repr, args.preference), "--beta", repr(args.beta), "--alpha", repr(args.alpha),
           "--force", "--no-progress"]
    return cmd


def naive_cmd(inputs, coeffs, out) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--naive-worker", "--inputs", *map(str, inputs),
            "--coeffs", *map(repr, coeffs), "--out", str(out)]


def last_json_object(text: str) -> dict:
    """The last top-level JSON object printed in ``text`` (the worker's timings, ours' report)."""
    starts = [m.start() for m in re.finditer(r"^\{", text, flags=re.M)]
    for s in reversed(starts):
        try:
            return json.JSONDecoder().raw_decode(text[s:])[0]
        except ValueError:
            continue
    return {}


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# --------------------------------------------------------------------------- inputs


def build_models(workdir: Path, preset: str, n: int, rebuild: bool) -> tuple[Path, list[Path], dict]:
    """Build (or reuse) SFT + n bf16 sharded backbones for ``preset`` under ``workdir/models``."""
    import torch

    shape = PRESETS[preset]
    spec = {"builder": "bonesoup.tasks.tiny_models.make_tiny_backbones", "n": n, "seed": 0, "dtype": "bfloat16", **shape}
    root = workdir / "models" / f"{preset}-n{n}-e{shape['n_embd']}-l{shape['n_layer']}-s{shape['shard_size']}"
    marker = root / MODEL_MARKER
    sft, backbones = root / "sft", [root / f"backbone-{j}" for j in range(n)]
    if not rebuild and marker.is_file() and json.loads(marker.read_text()) == spec:
        print(f"[bench] reusing checkpoints in {root}")
        return sft, backbones, {"cached": True, "build_s": None}
    remove(root)
    print(f"[bench] building SFT + {n} backbones ({preset}: {shape}) under {root} ...", flush=True)
    import transformers

    from bonesoup.tasks.tiny_models import make_tiny_backbones

    transformers.logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    t0 = time.perf_counter()
    sft_built, built = make_tiny_backbones(root, n, seed=0, dtype=torch.bfloat16, shard_size=shape["shard_size"],
                                           n_embd=shape["n_embd"], n_layer=shape["n_layer"],
                                           n_head=shape["n_head"])
    assert Path(sft_built) == sft and [Path(b) for b in built] == backbones, (sft_built, built)
    build_s = time.perf_counter() - t0
    marker.write_text(json.dumps(spec, indent=2) + "\n")  # last: a half-built set is rebuilt next time
    print(f"[bench] built in {build_s:.1f} s")
    return sft, backbones, {"cached": False, "build_s": build_s}


def weight_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.name.endswith(WEIGHT_SUFFIX))


def data_bytes(d: Path) -> int:
    """Tensor bytes in a checkpoint directory (from the safetensors headers)."""
    from bonesoup.merge.checkpoint import CheckpointDir

    return CheckpointDir(d).total_bytes


def warm_page_cache(dirs) -> int:
    total = 0
    for d in dirs:
        for f in weight_files(d):
            with open(f, "rb", buffering=0) as fh:
                while chunk := fh.read(16 * 2**20):
                    total += len(chunk)
    return total


def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 10) -> float:
    """Read + write bytes per second of a large preallocated CPU copy (torch, all threads)."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.2345)
    dst = torch.empty_like(src).fill_(-1.0)
    dst.copy_(src)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


# --------------------------------------------------------------------------- coefficients


def coefficients(preference, beta, alpha) -> tuple[list[float], float]:
    """Folded Bone Soup coefficients from DESIGN.md's closed form, cross-checked against bonesoup's."""
    n = len(preference)
    g = (1.0 - beta) / (n - 1)
    lam = [(m - g) / (beta - g) for m in preference]
    c = [(1.0 + alpha) * x for x in lam]
    c_sft = -alpha
    from bonesoup.merge.coefficients import bone_coefficients, fold_extrapolation

    theirs, theirs_sft = fold_extrapolation(bone_coefficients(preference, beta), alpha)
    if max(abs(a - b) for a, b in zip(c, theirs)) > 1e-12 or abs(c_sft - theirs_sft) > 1e-12:
        raise AssertionError(f"bonesoup coefficients {list(theirs)}, {theirs_sft} differ from the closed form "
                             f"{c}, {c_sft}")
    return c, c_sft


# --------------------------------------------------------------------------- checks


def verify_outputs(ours: Path, naive: Path, inputs: list[Path], coeffs: list[float], load_check: bool) -> dict:
    """Compare ours and the loop per key, and both against a float64 reference.

    Both compute the sum in fp32 and round once to the output dtype, but in a
    different order (ours may fuse multiply-adds), so an element may land one
    output ulp apart, and where the terms cancel to near zero the fp32
    accumulation error (not the output rounding) dominates. Tolerance per
    element: one output ulp of the larger of the two (relative eps 2^-7 for
    bf16) plus fp32 slack 8 * 2^-24 * sum_k |c_k x_k|; against the float64
    reference the same with the reference's magnitude. Counting ulps alone
    would flag harmless sign flips around zero.
    """
    import torch
    from safetensors import safe_open

    from bonesoup.merge.checkpoint import CheckpointDir

    a, b = CheckpointDir(ours), CheckpointDir(naive)
    ins = [CheckpointDir(d) for d in inputs]
    res = {"keys": len(a.tensors), "same_keys": set(a.tensors) == set(b.tensors) == set(ins[0].tensors),
           "same_weight_map": a.weight_map == b.weight_map == ins[0].weight_map,
           "max_abs_diff": 0.0, "worst_pair_in_tolerances": 0.0, "elements": 0, "elements_differing": 0,
           "worst_vs_fp64_in_tolerances": 0.0, "dtype_mismatches": 0}
    if not res["same_keys"]:
        res["ok"] = False
        return res
    for key, info in a.tensors.items():
        with safe_open(str(ours / info.file), "pt") as fa, safe_open(str(naive / b.tensors[key].file), "pt") as fb:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
        if x.dtype != y.dtype or x.shape != y.shape:
            res["dtype_mismatches"] += 1
            continue
        if not x.is_floating_point():
            res["elements_differing"] += int((x != y).sum())
            res["elements"] += x.numel()
            continue
        xd, yd = x.double(), y.double()
        d = (xd - yd).abs()
        res["max_abs_diff"] = max(res["max_abs_diff"], float(d.max()) if d.numel() else 0.0)
        res["elements"] += x.numel()
        res["elements_differing"] += int((d > 0).sum())
        ref = torch.zeros(x.shape, dtype=torch.float64)
        mag = torch.zeros(x.shape, dtype=torch.float64)
        for ck, c in zip(ins, coeffs):
            with safe_open(str(ck.path / ck.tensors[key].file), "pt") as f:
                t = f.get_tensor(key).double()
            ref += c * t
            mag += abs(c) * t.abs()
        unit_eps = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}[x.dtype]
        slack = 8 * 2.0**-24 * mag + 1e-30
        if not x.numel():
            continue
        pair_tol = unit_eps * torch.maximum(xd.abs(), yd.abs()) + slack
        res["worst_pair_in_tolerances"] = max(res["worst_pair_in_tolerances"], float((d / pair_tol).max()))
        tol = unit_eps * ref.abs() + slack
        for z in (xd, yd):
            res["worst_vs_fp64_in_tolerances"] = max(res["worst_vs_fp64_in_tolerances"],
                                                     float(((z - ref).abs() / tol).max()))
    res["ok"] = (res["same_weight_map"] and res["dtype_mismatches"] == 0 and res["worst_pair_in_tolerances"] <= 1.0
                 and res["worst_vs_fp64_in_tolerances"] <= 1.0)
    if load_check:
        res["loads_with_transformers"] = _load_check(ours)
        res["ok"] = res["ok"] and res["loads_with_transformers"]
    return res


def _load_check(out: Path) -> bool:
    """The merged directory loads with AutoModelForCausalLM and holds exactly the file's weights."""
    import torch
    import transformers
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    transformers.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    state = model.state_dict()
    from bonesoup.merge.checkpoint import CheckpointDir

    ck = CheckpointDir(out)
    for key, info in ck.tensors.items():
        with safe_open(str(out / info.file), "pt") as f:
            if key in state and not torch.equal(state[key], f.get_tensor(key)):
                return False
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3, 4]])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return bool(torch.isfinite(logits).all())


def _same_files(a: Path, b: Path, names) -> bool:
    import filecmp

    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def crash_check(cmd_for, out: Path, reference: Path, log_dir: Path, attempts: int = 8) -> dict:
    """SIGKILL ``bonesoup merge`` while it writes; then check nothing is at ``out`` and a re-run recovers.

    The temporary directory is ``.{out.name}.bonesoup-tmp-{pid}.{start}-{hex}`` beside
    ``out`` (bonesoup.merge.checkpoint.atomic_output_dir). We poll for the one with the
    child's pid and kill once a shard file in it has data (the writer is
    mid-shard); if the child finishes first, that attempt is retried (the
    second half of the attempts kill as soon as the directory appears).
    """
    parent, name = out.parent, out.name
    tmp_re = re.compile(rf"\.{re.escape(name)}\.bonesoup-tmp-(\d+)(?:\.\d+)?-[0-9a-f]+")
    any_re = re.compile(rf"\.{re.escape(name)}\.bonesoup-(tmp|old)-\d+-[0-9a-f]+")
    parent.mkdir(parents=True, exist_ok=True)

    def leftovers() -> list[Path]:
        return sorted(p for p in parent.iterdir() if any_re.fullmatch(p.name))

    for p in [out, *leftovers()]:
        remove(p)
    res = {"passed": False, "attempts": 0}
    killed = None
    for attempt in range(attempts):
        res["attempts"] = attempt + 1
        with open(log_dir / f"crash-kill-{attempt}.log", "wb") as log:
            proc = subprocess.Popen(cmd_for(out), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=child_env())
            eager = attempt >= attempts // 2
            tmp = None
            while proc.poll() is None:
                try:
                    if tmp is None:
                        for entry in os.scandir(parent):
                            m = tmp_re.fullmatch(entry.name)
                            if m and int(m.group(1)) == proc.pid:
                                tmp = Path(entry.path)
                                break
                    if tmp is not None and (eager or any(f.name.endswith(WEIGHT_SUFFIX) and f.stat().st_size > 0
                                                         for f in os.scandir(tmp))):
                        os.kill(proc.pid, signal.SIGKILL)
                        proc.wait()
                        killed = tmp
                        break
                except FileNotFoundError:  # renamed into place between two looks: finished
                    pass
                time.sleep(0.0002)
            proc.wait()
        if killed is not None:
            res["killed_returncode"] = proc.returncode
            break
        for p in [out, *leftovers()]:  # finished before we could kill it: try again
            remove(p)
    if killed is None:
        res["error"] = f"the merge finished before it could be killed mid-write in {attempts} attempts"
        return res

    files = sorted(killed.iterdir()) if killed.exists() else []
    res["temp_dir_name"] = killed.name
    res["temp_dir_at_kill"] = {f.name: f.stat().st_size for f in files}
    res["shards_complete_at_kill"] = sum(
        1 for f in files if f.name.endswith(WEIGHT_SUFFIX) and (reference / f.name).is_file()
        and f.stat().st_size == (reference / f.name).stat().st_size)
    res["shards_total"] = len(weight_files(reference))
    res["target_absent_after_kill"] = not out.exists()
    res["stale_temp_dir_left"] = killed.exists()

    rerun = run_measured(cmd_for(out), log_dir / "crash-rerun.log")
    res["rerun_wall_s"] = rerun["wall_s"]
    res["stale_temp_dir_removed"] = not killed.exists()
    res["no_temp_dirs_left"] = not leftovers()
    res["rerun_logged_cleanup"] = "stale temporary directory" in rerun["output"]
    names = sorted(f.name for f in weight_files(reference)) + ([INDEX_NAME] if (reference / INDEX_NAME).exists() else [])
    res["output_complete"] = out.is_dir() and all((out / n).is_file() for n in names)
    res["output_identical_to_timed_runs"] = res["output_complete"] and _same_files(out, reference, names)
    res["passed"] = (res["killed_returncode"] == -signal.SIGKILL and res["target_absent_after_kill"]
                     and res["stale_temp_dir_left"] and res["stale_temp_dir_removed"] and res["no_temp_dirs_left"]
                     and res["output_identical_to_timed_runs"])
    return res


# --------------------------------------------------------------------------- report


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def format_table(rows: list[dict], headers: list[str]) -> str:
    cells = [headers] + [[str(r.get(h, "")) for h in headers] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    lines = []
    for i, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summarise(walls: list[float]) -> dict:
    return {"min_s": min(walls), "median_s": statistics.median(walls), "all_s": walls}


# --------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("bench-out/ckpt"),
                   help="cache for the checkpoints, outputs and logs (default bench-out/ckpt)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full",
                   help="model size: large (~806 MB/checkpoint), full (~194 MB), quick (~32 MB), tiny (~1 MB, for tests)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--preference", type=float, nargs="+", default=[0.5, 0.3, 0.2])
    p.add_argument("--beta", type=float, default=0.7)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--crash-check", action=argparse.BooleanOptionalAction, default=True,
                   help="SIGKILL a merge mid-write and check recovery (default on)")
    p.add_argument("--import-floor", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the bare 'python + imports' of each process (default on)")
    p.add_argument("--load-check", action=argparse.BooleanOptionalAction, default=True,
                   help="load the merged output with AutoModelForCausalLM (default on)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached checkpoints")
    p.add_argument("--keep-outputs", action="store_true", help="keep the merged outputs (deleted by default)")
    args = p.parse_args(argv)
    if args.quick:
        args.preset = "quick"
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--naive-worker"]:
        return naive_worker(argv[1:])
    args = parse_args(argv)
    if str(REPO) not in sys.path:  # bonesoup is imported from the checkout, as the children do
        sys.path.insert(0, str(REPO))
    import torch

    workdir = args.workdir if args.workdir.is_absolute() else Path.cwd() / args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    n = len(args.preference)
    sft, backbones, build = build_models(workdir, args.preset, n, args.rebuild)
    inputs = [*backbones, sft]
    c, c_sft = coefficients(args.preference, args.beta, args.alpha)
    coeffs = [*c, c_sft]

    runs_dir, log_dir = workdir / "out", workdir / "logs"
    runs_dir.mkdir(exist_ok=True)
    log_dir.mkdir(exist_ok=True)
    out_ours, out_naive, out_crash = runs_dir / "ours", runs_dir / "naive", runs_dir / "crash"

    model_bytes = data_bytes(sft)
    in_bytes = sum(data_bytes(d) for d, k in zip(inputs, coeffs) if k != 0.0)
    ideal = in_bytes + model_bytes  # every input read once, the output written once
    file_bytes = sum(f.stat().st_size for f in weight_files(sft))
    print(f"[bench] {n} backbones + SFT, {model_bytes / 1e6:.1f} MB of weights each "
          f"({len(weight_files(sft))} shards); ideal bytes per merge {ideal / 1e6:.1f} MB")
    print(f"[bench] coefficients: backbones {[round(x, 6) for x in c]}, sft {c_sft:+.6f}")
    copy_bw = copy_bandwidth(128 * 2**20 if args.preset == "tiny" else 512 * 2**20)
    print(f"[bench] copy bandwidth (read + write, torch, {torch.get_num_threads()} threads): {copy_bw / 1e9:.2f} GB/s")
    warm_page_cache(inputs)

    def cmd_ours(out):
        return ours_cmd(backbones, sft, out, args)

    cases = {"ours": [], "naive": [], "import_ours": [], "import_naive": []}
    if args.import_floor:
        for r in range(args.repeats):
            cases["import_ours"].append(run_measured(
                [sys.executable, "-c", "import bonesoup.cli, bonesoup.merge.offline"], log_dir / "import-ours.log"))
            cases["import_naive"].append(run_measured(
                [sys.executable, "-c", "import torch, safetensors.torch"], log_dir / "import-naive.log"))
    for r in range(args.repeats):  # interleaved, so drift hits both alike
        for case, out, cmd in (("ours", out_ours, cmd_ours(out_ours)), ("naive", out_naive,
                                                                          naive_cmd(inputs, coeffs, out_naive))):
            remove(out)
            os.sync()
            res = run_measured(cmd, log_dir / f"{case}-{r}.log")
            res["report"] = last_json_object(res.pop("output"))
            cases[case].append(res)
            print(f"[bench] {case} run {r + 1}/{args.repeats}: {res['wall_s']:.2f} s, "
                  f"peak RSS {_mib(res['max_rss_bytes'])} MiB", flush=True)
    for case in ("import_ours", "import_naive"):
        for res in cases[case]:
            res.pop("output", None)

    print("[bench] verifying outputs (ours vs loop vs float64 reference) ...", flush=True)
    verify = verify_outputs(out_ours, out_naive, inputs, coeffs, args.load_check)
    print(f"[bench] verify: {json.dumps(verify)}")
    crash = None
    if args.crash_check:
        print("[bench] crash check: SIGKILL bonesoup merge mid-write, then re-run ...", flush=True)
        crash = crash_check(cmd_ours, out_crash, out_ours, log_dir)
        print(f"[bench] crash check: {json.dumps(crash)}")

    # ---- results
    s = {k: summarise([r["wall_s"] for r in v]) for k, v in cases.items() if v}
    rss = {k: max(r["max_rss_bytes"] for r in v) for k, v in cases.items() if v}
    ours_in = [r["report"].get("seconds") for r in cases["ours"] if r["report"].get("seconds") is not None]
    naive_in = [r["report"] for r in cases["naive"] if r["report"]]
    speedup_median = s["naive"]["median_s"] / s["ours"]["median_s"]
    speedup_min = s["naive"]["min_s"] / s["ours"]["min_s"]

    def row(label, key, **extra):
        r = {"case": label, "runs": len(cases[key]), "min s": f"{s[key]['min_s']:.2f}",
             "median s": f"{s[key]['median_s']:.2f}", "peak RSS MiB": _mib(rss[key]),
             "RSS/model": f"{rss[key] / model_bytes:.2f}x"}
        r.update(extra)
        return r

    def bw(seconds):
        return {"ideal GB/s": f"{ideal / seconds / 1e9:.3g}", "% copy bw": f"{100 * ideal / seconds / copy_bw:.3g}"}

    rows = []
    if args.import_floor:
        rows.append(row("python + imports (bonesoup)", "import_ours"))
        rows.append(row("python + imports (loop)", "import_naive"))
    rows.append(row("bonesoup merge (ours)", "ours", **bw(s["ours"]["min_s"]),
                    **{"vs loop (median)": f"{speedup_median:.2f}x"}))
    rows.append(row("naive per-tensor loop", "naive", **bw(s["naive"]["min_s"]), **{"vs loop (median)": "1.00x"}))
    tot = [r["in_process_s"] for r in naive_in]
    if ours_in:
        vs = {"vs loop (median)": f"{statistics.median(tot) / statistics.median(ours_in):.2f}x"} if tot else {}
        rows.append({"case": "  ours in-process (merge_checkpoints)", "runs": len(ours_in),
                     "min s": f"{min(ours_in):.2f}", "median s": f"{statistics.median(ours_in):.2f}",
                     **bw(min(ours_in)), **vs})
    if naive_in:
        rows.append({"case": "  loop in-process (load+sum+save)", "runs": len(tot), "min s": f"{min(tot):.2f}",
                     "median s": f"{statistics.median(tot):.2f}", **bw(min(tot)), "vs loop (median)": "1.00x"})
        for ph in ("load_s", "compute_s", "save_s"):
            v = [r[ph] for r in naive_in]
            rows.append({"case": f"    loop {ph[:-2]}", "runs": len(v), "min s": f"{min(v):.2f}",
                         "median s": f"{statistics.median(v):.2f}"})
    headers = ["case", "runs", "min s", "median s", "peak RSS MiB", "RSS/model", "ideal GB/s", "% copy bw",
               "vs loop (median)"]

    ok = verify["ok"] and (crash is None or crash["passed"])
    results = {
        "benchmark": "bench_checkpoint_merge",
        "preset": args.preset, "model": {**PRESETS[args.preset], "n_backbones": n, "dtype": "bfloat16",
                                         "weight_bytes_per_checkpoint": model_bytes,
                                         "file_bytes_per_checkpoint": file_bytes,
                                         "shards": len(weight_files(sft)), **build},
        "preference": args.preference, "beta": args.beta, "alpha": args.alpha, "coefficients": coeffs,
        "ideal_bytes": ideal, "copy_bandwidth_Bps": copy_bw, "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
                    "torch": torch.__version__,
                    "env": {k: os.environ[k] for k in ("SOUPKERNELS_BACKEND", "SOUPKERNELS_SIMD", "OMP_NUM_THREADS")
                            if k in os.environ}},
        "commands": {"ours": cmd_ours(out_ours), "naive": naive_cmd(inputs, coeffs, out_naive)},
        "cases": {k: {**s[k], "max_rss_bytes": rss[k], "runs": v} for k, v in cases.items() if v},
        "speedup_median": speedup_median, "speedup_min": speedup_min,
        "ours_ideal_Bps": ideal / s["ours"]["min_s"],
        "ours_in_process_s": ours_in,
        "verify": verify, "crash_check": crash, "ok": ok,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep_outputs:
        for p in (out_ours, out_naive, out_crash):
            remove(p)

    print()
    print(f"bonesoup merge vs naive per-tensor loop: SFT + {n} backbones, GPT-2 {PRESETS[args.preset]['n_embd']}x"
          f"{PRESETS[args.preset]['n_layer']} bf16, {model_bytes / 1e6:.1f} MB/checkpoint in "
          f"{len(weight_files(sft))} shards; ideal bytes {ideal / 1e6:.0f} MB; copy bw {copy_bw / 1e9:.2f} GB/s; "
          f"{os.cpu_count()} CPUs; whole processes, warm page cache")
    print(f"outputs agree: {'yes' if verify['ok'] else 'NO'} (max |ours - loop| = {verify['max_abs_diff']:.3g} = "
          f"{verify['worst_pair_in_tolerances']:.2f} of (1 bf16 ulp + fp32 slack); "
          f"{verify['elements_differing']}/{verify['elements']} elements differ; worst vs float64 = "
          f"{verify['worst_vs_fp64_in_tolerances']:.2f} of tolerance"
          + (f"; loads with AutoModelForCausalLM: {verify.get('loads_with_transformers')}" if args.load_check else "")
          + ")")
    if crash is not None:
        print(f"crash check: {'PASSED' if crash['passed'] else 'FAILED'} (SIGKILL with "
              f"{len(crash.get('temp_dir_at_kill', {}))} files in the temp dir; target absent: "
              f"{crash.get('target_absent_after_kill')}; stale temp dir removed by re-run: "
              f"{crash.get('stale_temp_dir_removed')}; re-run output identical: "
              f"{crash.get('output_identical_to_timed_runs')})" + (f" {crash['error']}" if "error" in crash else ""))
    print("ours fsyncs each shard; the loop does not. RSS/model = peak RSS / one checkpoint's weight bytes.")
    print(format_table(rows, headers))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
