"""Fused guided sampling against the PyTorch sampling path and the input-read floor.

For each (B, V, M, filters) one process measures, sample by sample in
alternation (a shared VM drifts over a minute):

    ours    sk.guided_sample(logits, coeffs, temperature, top_k, top_p, seed)
    torch   the path transformers and vLLM's fallback take: z = sum_m c_m * x_m
            (fp32), TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
            (transformers' own; the same ops written out where transformers is
            not installed), softmax, torch.multinomial
    floor   reading the M inputs once: a preallocated copy of the same bytes
            (read + write), of which reading is half -> floor = copy time / 2

Figures of merit, all ratios from this run: speed-up over the torch path, and
ours / floor (1.0 would be as fast as merely reading the inputs).

    python benchmarks/bench_sampling.py                  # CPU grid: B 1,8,64; V 32000,128256; M 2,4
    python benchmarks/bench_sampling.py --quick          # seconds
    python benchmarks/bench_sampling.py --acceptance     # B=8, V=128256, M=3 rows only
    python benchmarks/bench_sampling.py --device cuda    # GPU: CUDA events
    python benchmarks/bench_sampling.py --device cuda --B 1 8 64 --V 128256 --M 2 4 --repeats 5
                                                         # what scripts/gpu-check.sh runs
    python benchmarks/bench_sampling.py --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_merge import run_info, timeit  # noqa: E402  (same timing rules: CUDA events on GPU)

import soupkernels as sk  # noqa: E402

FILTERS = {
    "temp": dict(temperature=0.8),
    "topk+topp": dict(temperature=0.8, top_k=50, top_p=0.9),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def torch_combine(xs, coeffs):
    """z = sum_m c_m * x_m in fp32, the way the reference path combines."""
    z = coeffs[0] * xs[0].float()
    for c, x in zip(coeffs[1:], xs[1:]):
        z = z + c * x.float()
    return z


def _warp_plain(z, temperature, top_k, top_p):
    """transformers' Temperature/TopK/TopP warpers, op for op, for machines without transformers."""
    z = z / temperature
    if top_k:
        kth = torch.topk(z, min(top_k, z.shape[-1]))[0][..., -1, None]
        z = z.masked_fill(z < kth, -float("inf"))
    if top_p < 1.0:
        sz, idx = torch.sort(z, descending=False)
        cum = sz.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - top_p)
        drop[..., -1:] = False
        z = z.masked_fill(drop.scatter(1, idx, drop), -float("inf"))
    return z


def torch_warp(z, temperature, top_k=0, top_p=1.0):
    """transformers' own warpers (or the same ops written out where transformers is missing): -inf = filtered."""
    if TORCH_PATH != "transformers":
        return _warp_plain(z, temperature, top_k, top_p)
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = [TemperatureLogitsWarper(temperature)]
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList(procs)(None, z)


def torch_path(xs, coeffs, temperature, top_k=0, top_p=1.0, gen=None):
    """The reference path people run: combine, transformers' warpers, softmax, multinomial."""
    z = torch_warp(torch_combine(xs, coeffs), temperature, top_k, top_p)
    return torch.multinomial(torch.softmax(z, dim=-1), 1, generator=gen).squeeze(1)


# A GPU machine may have torch and triton but not transformers: the same ops written out then.
TORCH_PATH = "transformers" if importlib.util.find_spec("transformers") else "plain"


def bench_row(B, V, M, filt, dtype, device, repeats):
    gen = torch.Generator(device=device).manual_seed(B * 7 + V + M)
    # Realistic spread: logits of a real LM span ~20 nats; randn * 3 gives a
    # softmax with a few hundred tokens of mass, so top-p has work to do.
    xs = [(torch.randn(B, V, generator=gen, device=device) * 3).to(dtype) for _ in range(M)]
    coeffs = [1.0] + [0.5 / (M - 1) * (-1) ** m for m in range(1, M)]
    kw = FILTERS[filt]
    in_bytes = sum(x.numel() * x.element_size() for x in xs)
    src = torch.cat([x.reshape(-1) for x in xs])
    dst = torch.empty_like(src)
    dst.copy_(src)
    seeds = torch.arange(B, dtype=torch.int64, device=device)
    tgen = torch.Generator(device=device).manual_seed(0)
    ours, ref, floor = [], [], []
    for i in range(repeats):
        floor += timeit(lambda: dst.copy_(src), device, 1, warmup=1 if i == 0 else 0)
        ours += timeit(lambda: sk.guided_sample(xs, coeffs, seed=seeds, offset=i, **kw), device, 1,
                       warmup=1 if i == 0 else 0)
        ref += timeit(lambda: torch_path(xs, coeffs, gen=tgen, **kw), device, 1, warmup=1 if i == 0 else 0)
    floor_s = min(floor) / 2
    # What the run can know exactly: the fused combination is the fp32 one, and every token ours drew lies
    # in the support transformers' warpers leave (a timing of a wrong kernel would be worthless).
    z_ref = torch_combine(xs, coeffs)
    combine_err = float((sk.guided_logits(xs, coeffs) - z_ref).abs().max()) / float(z_ref.abs().max())
    tok = sk.guided_sample(xs, coeffs, seed=seeds, offset=0, **kw)
    kept = torch.isfinite(torch_warp(z_ref, **kw))
    outside = int((~kept.gather(1, tok[:, None])).sum())
    row = {
        "B": B, "V": V, "M": M, "filters": filt, "dtype": str(dtype).removeprefix("torch."),
        "input_bytes": in_bytes, "ours_s": min(ours), "ours_median_s": statistics.median(ours),
        "torch_s": min(ref), "torch_median_s": statistics.median(ref), "floor_s": floor_s,
        "samples": {"ours": len(ours), "torch": len(ref), "floor": len(floor)},
        "combine_rel_err": combine_err, "ours_outside_support": outside,
        "support_tokens": int(kept.sum()),
    }
    row["speedup_vs_torch"] = row["torch_s"] / row["ours_s"]
    row["speedup_vs_torch_median"] = row["torch_median_s"] / row["ours_median_s"]
    row["ours_over_floor"] = row["ours_s"] / floor_s
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--B", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--V", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--M", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--filters", nargs="+", default=list(FILTERS), choices=list(FILTERS))
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="B 1,8; V 4096; M 2 (seconds)")
    ap.add_argument("--acceptance", action="store_true", help="only B=8, V=128256, M=3 (issue 5's bars)")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.B, args.V, args.M, args.repeats = [1, 8], [4096], [2], min(args.repeats, 3)
    if args.acceptance:
        args.B, args.V, args.M = [8], [128256], [3]
    device = args.device
    info = run_info(device)
    rows = []
    for B, V, M, filt in itertools.product(args.B, args.V, args.M, args.filters):
        rows.append(bench_row(B, V, M, filt, DTYPES[args.dtype], device, args.repeats))
        print(f"  done B={B} V={V} M={M} {filt}", file=sys.stderr, flush=True)
    info["torch_path"] = TORCH_PATH
    result = {"info": info, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(f"\n# bench_sampling  {info['date']}  device={info['device']}  cpu={info['cpu']}  torch={info['torch']}")
    print("# torch = combine + transformers warpers + softmax + multinomial; floor = reading the M inputs once\n"
          "# (half of a copy of the same bytes, sampled alternately); min of the samples, speed-up of medians too")
    hdr = (f"{'B':>4} {'V':>7} {'M':>2} {'filters':>10} {'ours ms':>9} {'torch ms':>9} {'vs torch':>9} "
           f"{'(median)':>9} {'floor ms':>9} {'/floor':>7}")
    print("\n" + hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['B']:>4} {r['V']:>7} {r['M']:>2} {r['filters']:>10} {r['ours_s'] * 1e3:9.3f} "
              f"{r['torch_s'] * 1e3:9.3f} {r['speedup_vs_torch']:8.1f}x {r['speedup_vs_torch_median']:8.1f}x "
              f"{r['floor_s'] * 1e3:9.3f} {r['ours_over_floor']:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
