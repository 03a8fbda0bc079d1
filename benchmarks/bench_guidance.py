"""Decode cost of MAGE (ONE merged guidance model) against MOD (n experts' logits), n = 2, 3, 4.

Every method decodes the same prompts (batch B, T new tokens, no early
stop) with ``bonesoup.guided_generate``: one forward per model per step and
one fused ``sk.guided_sample`` over the models' logits.

    MOD              [expert_1..expert_n], coeffs mu                       n forwards / step
    guidance ens.    [base, expert_1..expert_n, ref], [1, w mu_1.., -w]    n + 2 forwards / step
    MAGE implicit    [base, merged tuned, ref], [1, w, -w]                 3 forwards / step, any n
    MAGE explicit    [base, merged value model], [1, w]                    2 forwards / step, any n

"merged tuned" is sum_i mu_i expert_i merged in weight space by
``sk.merge_many`` (timed separately: it runs once per preference change, not
per token); the explicit value model has the base's architecture with an
untied head. Models are random-initialised GPT-2s built in code (no download).

Columns: forwards per step; decode tokens/s (B * T / wall time, median of
alternated repeats after a warm-up) and its ratio to MOD at the same n;
weights read per step (bytes of the models in the forward list); resident
weights in two honest accountings -- "decode" (the models decoding holds)
and "+ re-merge inputs" (plus the n stored models MAGE's guide is re-merged
from when the preference changes, if they stay on the same device; MOD needs
none; the base's own re-merge inputs are the same for every method with a
base and left out). The process RSS is not reported: the allocator keeps
freed pages, so its growth does not measure what a configuration holds.

    python benchmarks/bench_guidance.py                 # n = 2, 3, 4; small GPT-2 (27M params), B 8, T 32
    python benchmarks/bench_guidance.py --quick         # seconds (tiny models)
    python benchmarks/bench_guidance.py --device cuda --dtype bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_merge import run_info  # noqa: E402

import soupkernels as sk  # noqa: E402

METHODS = ("mod", "guidance_ensemble", "mage_implicit", "mage_explicit")
PRESETS = {
    "small": dict(n_embd=512, n_layer=6, n_head=8, vocab_size=16384, n_positions=256),
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=64),
}


def make_model(preset: dict, seed: int, *, tied: bool = True, device="cpu", dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**preset, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()


def param_bytes(model) -> int:
    """Bytes of a model's distinct parameter tensors (a tied head counts once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def merge_models(models, coeffs, out):
    """``out``'s parameters = sum_k coeffs[k] * models[k]'s, one fused launch per dtype (sk.merge_many)."""
    outs = [p.data for p in out.parameters()]
    groups = [[dict(m.named_parameters())[name].data for m in models] for name, _ in out.named_parameters()]
    sk.merge_many(groups, coeffs, outs=outs)
    return out


def build(n: int, preset: dict, device: str, dtype: torch.dtype, w: float):
    """The models and (forward list, coefficients) of every method at n objectives."""
    base, ref = make_model(preset, 1, device=device, dtype=dtype), make_model(preset, 2, device=device, dtype=dtype)
    experts = [make_model(preset, 10 + i, device=device, dtype=dtype) for i in range(n)]
    value = make_model(preset, 3, tied=False, device=device, dtype=dtype)
    mu = [1.0 / n] * n
    merged = make_model(preset, 4, device=device, dtype=dtype)
    with torch.no_grad():
        t_merge = min(_seconds(lambda: merge_models(experts, mu, merged), device) for _ in range(3))
    configs = {
        "mod": (experts, mu, 0),
        "guidance_ensemble": ([base, *experts, ref], [1.0, *(w * m for m in mu), -w], 0),
        "mage_implicit": ([base, merged, ref], [1.0, w, -w], n),
        "mage_explicit": ([base, value], [1.0, w], n),
    }
    return configs, t_merge, experts, merged, mu


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _seconds(fn, device: str) -> float:
    import time

    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def run(args) -> dict:
    from bonesoup.guided import guided_generate

    preset = PRESETS["tiny" if args.quick else args.preset]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, preset["vocab_size"], (args.batch, args.prompt), generator=gen).to(args.device)
    mask = torch.ones_like(ids)
    rows, merges = [], {}
    for n in args.n:
        configs, t_merge, experts, merged, mu = build(n, preset, args.device, dtype, args.w)
        merges[n] = t_merge
        one = param_bytes(experts[0])
        # Guards that keep the comparison honest: the merged guide IS the weighted sum of the experts.
        for name, p in merged.named_parameters():
            want = sum(m * dict(e.named_parameters())[name].float() for m, e in zip(mu, experts))
            torch.testing.assert_close(p.float(), want, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-2)

        def decode(method):
            models, coeffs, _ = configs[method]
            return guided_generate(models[0], models[1:], coeffs, ids, mask, max_new_tokens=args.tokens,
                                   temperature=1.0, seed=123, stop_token_ids=[])

        forwards = {}
        for m in METHODS:  # warm-up, and the forward count check
            g = decode(m)
            assert g.steps == args.tokens
            forwards[m] = g.forwards // args.tokens
        samples = {m: [] for m in METHODS}
        with torch.no_grad():
            for r in range(args.repeats):  # alternate the methods: a shared machine drifts
                order = METHODS if r % 2 == 0 else METHODS[::-1]
                for m in order:
                    samples[m].append(_seconds(lambda: decode(m), args.device))
        tps = {m: args.batch * args.tokens / statistics.median(samples[m]) for m in METHODS}
        for m in METHODS:
            models, _, stored = configs[m]
            read = sum(param_bytes(x) for x in models)
            rows.append({"method": m, "n": n, "forwards_per_step": forwards[m], "tokens_per_s": tps[m],
                         "speed_vs_mod": tps[m] / tps["mod"], "read_mib_per_step": read / 2**20,
                         "resident_decode_mib": read / 2**20, "resident_with_inputs_mib": (read + stored * one) / 2**20,
                         "seconds": samples[m]})
    return {"info": run_info(args.device), "preset": preset, "dtype": args.dtype, "batch": args.batch,
            "prompt": args.prompt, "tokens": args.tokens, "w": args.w, "merge_seconds": merges, "rows": rows}


def table(res: dict) -> str:
    head = (f"{'method':<18}{'n':>3}{'fwd/step':>10}{'tokens/s':>11}{'vs MOD':>8}{'read MiB/step':>15}"
            f"{'resident MiB':>14}{'+ re-merge inputs':>19}")
    lines = [head, "-" * len(head)]
    for r in res["rows"]:
        lines.append(f"{r['method']:<18}{r['n']:>3}{r['forwards_per_step']:>10}{r['tokens_per_s']:>11.1f}"
                     f"{r['speed_vs_mod']:>7.2f}x{r['read_mib_per_step']:>15.1f}{r['resident_decode_mib']:>14.1f}"
                     f"{r['resident_with_inputs_mib']:>19.1f}")
    merges = ", ".join(f"n={n}: {1e3 * s:.1f} ms" for n, s in res["merge_seconds"].items())
    lines.append(f"merge of the n experts into MAGE's guide (once per preference change): {merges}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[2, 3, 4], help="numbers of objectives / experts")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per sequence")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--w", type=float, default=1.0, help="guidance strength")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--quick", action="store_true", help="tiny models, B 2, T 4, 1 repeat")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.tokens, args.repeats, args.prompt = 2, 4, 1, 4
    res = run(args)
    info = res["info"]
    print(f"# {info['date']}  {info['device']}  torch {info['torch']} ({info['torch_threads']} threads)  "
          f"{res['dtype']}  B={res['batch']} prompt={res['prompt']} T={res['tokens']}  model {res['preset']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
