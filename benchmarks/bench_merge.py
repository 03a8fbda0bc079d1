"""Fused n-way merge against naive torch and against the copy-bandwidth floor.

One process measures, for each (n, dtype, size): the copy bandwidth of the
machine (a large preallocated ``dst.copy_(src)``, read + write), the fused
kernel ``sk.merge`` over n backbones + the SFT model, and the ways people do
it in torch:

    naive    sum(c * t for c, t in zip(coeffs, tensors))        (temporaries, bf16 math)
    chain    out.copy_(x0).mul_(c0); out.add_(x, alpha=c) ...    (best in-place torch)
    foreach  torch._foreach_* of the chain over a whole model's parameter list,
             against sk.merge_many over the same list

Bytes moved by the ideal merge: (n_inputs + 1) * P * element_size. Achieved
bandwidth = those bytes / time; the ratio to copy bandwidth is the figure of
merit (1.0 = as fast as a memcpy of the same traffic). Every figure is a ratio
measured in this run; absolute times are only printed for context.

    python benchmarks/bench_merge.py                # CPU: n = 2,3,4; bf16, fp32; 1M..256M elements
    python benchmarks/bench_merge.py --quick        # small sizes, seconds
    python benchmarks/bench_merge.py --device cuda  # GPU: up to 1G elements, CUDA events
    python benchmarks/bench_merge.py --device cuda --n 3 --dtypes bf16 --sizes 268435456 1073741824 \
        --many-shape llama-7b                       # what scripts/gpu-check.sh runs
    python benchmarks/bench_merge.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

import soupkernels as sk
from soupkernels.reference import merge_inplace_chain, merge_naive

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, device: str, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call, ``repeats`` samples after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return samples


def run_info(device: str) -> dict:
    """When, where and how a benchmark ran (printed and written with its results)."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine(),
        "cpu": sk.cpu_info(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }


def write_json(path, result: dict) -> None:
    """Write a benchmark's result as JSON to ``path`` (its folder made if missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


class CopyBandwidth:
    """Bytes/s of a large preallocated copy ``dst.copy_(src)``, counting read + write."""

    def __init__(self, device: str, nbytes: int):
        self.device, self.nbytes = device, nbytes
        self.src = torch.randn(nbytes // 4, device=device)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # first touch of dst's pages, outside any timing

    def sample(self) -> float:
        return 2 * self.nbytes / timeit(lambda: self.dst.copy_(self.src), self.device, 1, warmup=0)[0]

    def best(self, repeats: int) -> float:
        return max(self.sample() for _ in range(repeats))


def model_shapes(total: int) -> list[int]:
    """Tensor sizes of a Llama-like model scaled so they sum to about ``total``."""
    # one layer: q, k, v, o (d x d), gate, up, down (2.7 d x d), two norms (d)
    layers, d = 16, 1
    while True:
        per_layer = 4 * d * d + 3 * int(2.7 * d) * d + 2 * d
        if layers * per_layer + 2 * 8 * d * d > total:
            break
        d += 1
    d = max(1, d - 1)
    sizes = [8 * d * d]
    for _ in range(layers):
        sizes += [d * d] * 4 + [int(2.7 * d) * d] * 3 + [d, d]
    return sizes + [d, 8 * d * d]


def llama_7b_shapes() -> list[int]:
    """Tensor sizes of Llama-2 7B (291 tensors, 6.74e9 parameters): embedding, 32 layers, norm, head."""
    d, ffn, vocab = 4096, 11008, 32000
    layer = [d * d] * 4 + [ffn * d] * 3 + [d, d]
    return [vocab * d] + layer * 32 + [d, vocab * d]


def bench_one(n: int, dtype: torch.dtype, size: int, device: str, repeats: int, copy: "CopyBandwidth",
              skip_naive: bool):
    gen = torch.Generator(device=device).manual_seed(n * 1000 + size % 997)
    n_in = n + 1  # n backbones + the SFT model
    xs = [torch.randn(size, generator=gen, device=device).to(dtype) for _ in range(n_in)]
    coeffs = [1.4, -0.55, 0.35, 0.2, -0.1][:n] + [-0.2]
    out = torch.empty(size, dtype=dtype, device=device)
    esize = out.element_size()
    ideal = (n_in + 1) * size * esize
    row = {"n": n, "inputs": n_in, "dtype": str(dtype).removeprefix("torch."), "elements": size, "ideal_bytes": ideal}

    # Ours and the copy alternate, sample by sample, so both see the same
    # machine (a shared VM drifts by tens of percent over a minute).
    ours, copies = [], []
    for _ in range(repeats):
        copies.append(copy.sample())
        ours += timeit(lambda: sk.merge(xs, coeffs, out=out), device, 1, warmup=0 if ours else 1)
    copy_bw = max(copies)
    row["copy_bw"] = copy_bw
    row["ours_s"] = min(ours)
    row["ours_median_s"] = statistics.median(ours)
    row["ours_bw"] = ideal / row["ours_s"]
    row["ours_over_copy"] = row["ours_bw"] / copy_bw

    t_chain = timeit(lambda: merge_inplace_chain(xs, coeffs, out), device, repeats)
    row["chain_s"] = min(t_chain)
    row["speedup_vs_chain"] = row["chain_s"] / row["ours_s"]
    if not skip_naive:
        t_naive = timeit(lambda: merge_naive(xs, coeffs), device, max(1, repeats // 2))
        row["naive_s"] = min(t_naive)
        row["speedup_vs_naive"] = row["naive_s"] / row["ours_s"]
    del xs, out
    return row


def bench_nontemporal(dtype, size, n, repeats):
    """CPU only: the same merge with streaming stores forced on and off."""
    from soupkernels.cpp_merge import merge_group_cpp

    xs = [torch.randn(size).to(dtype) for _ in range(n + 1)]
    coeffs = [1.4, -0.55, 0.35, 0.2][:n] + [-0.2]
    out = torch.empty(size, dtype=dtype)
    res = {}
    for nt in (False, True):
        res[nt] = min(timeit(lambda: merge_group_cpp([out], [xs], coeffs, nontemporal=nt), "cpu", repeats))
    return {"dtype": str(dtype).removeprefix("torch."), "elements": size, "n": n,
            "regular_s": res[False], "streaming_s": res[True], "streaming_speedup": res[False] / res[True]}


def bench_many(n: int, dtype: torch.dtype, total: int, device: str, repeats: int, copy: "CopyBandwidth",
               shape: str = "scaled"):
    """A whole model's parameter list: sk.merge_many vs torch._foreach_ chain and one flat buffer.

    ``shape="scaled"``: a Llama-like list of about ``total`` elements, each
    tensor its own allocation, plus separate flat buffers of the same size.
    ``shape="llama-7b"``: Llama-2 7B's 291 tensors as views into one flat
    buffer per model (5 copies of a 7B model are 67 GB in bf16; a second set
    for the flat comparison would not fit on one GPU), so merge_many and the
    flat merge move exactly the same bytes.
    """
    gen = torch.Generator(device=device).manual_seed(7)
    coeffs = [1.4, -0.55, 0.35, 0.2][:n] + [-0.2]
    if shape == "llama-7b":
        sizes = llama_7b_shapes()
        P = sum(sizes)
        flat = [torch.empty(P, dtype=dtype, device=device).normal_(generator=gen) for _ in range(n + 1)]
        flat_out = torch.empty(P, dtype=dtype, device=device)
        models = [list(torch.split(x, sizes)) for x in flat]
        outs = list(torch.split(flat_out, sizes))
    else:
        sizes = model_shapes(total)
        models = [[torch.randn(s, generator=gen, device=device).to(dtype) for s in sizes] for _ in range(n + 1)]
        outs = [torch.empty(s, dtype=dtype, device=device) for s in sizes]
        P = sum(sizes)
        # the same bytes as one flat buffer: what merge_many should approach
        flat = [torch.randn(P, generator=gen, device=device).to(dtype) for _ in range(n + 1)]
        flat_out = torch.empty(P, dtype=dtype, device=device)
    groups = [list(g) for g in zip(*models)]
    ideal = (n + 2) * P * outs[0].element_size()

    def foreach():
        torch._foreach_copy_(outs, models[0])
        torch._foreach_mul_(outs, coeffs[0])
        for m, c in zip(models[1:], coeffs[1:]):
            torch._foreach_add_(outs, m, alpha=c)

    many, flat_t, copies = [], [], []
    for i in range(repeats):  # interleaved, as in bench_one
        copies.append(copy.sample())
        many += timeit(lambda: sk.merge_many(groups, coeffs, outs=outs), device, 1, warmup=int(i == 0))
        flat_t += timeit(lambda: sk.merge(flat, coeffs, out=flat_out), device, 1, warmup=int(i == 0))
    t_ours, t_flat = min(many), min(flat_t)
    t_fe = min(timeit(foreach, device, repeats))
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "shape": shape, "tensors": len(sizes), "elements": P,
            "merge_many_s": t_ours, "foreach_s": t_fe, "flat_merge_s": t_flat, "copy_bw": max(copies),
            "speedup_vs_foreach": t_fe / t_ours, "many_over_flat": t_ours / t_flat,
            "merge_many_over_copy": ideal / t_ours / max(copies)}


def fmt_size(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div:
            return f"{n / div:g}{unit}"
    return str(n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, nargs="+", default=[2, 3, 4], help="backbones (plus one SFT input)")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--sizes", type=int, nargs="+", help="elements per tensor")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small sizes only (seconds)")
    ap.add_argument("--skip-naive-above", type=int, default=1 << 30, help="skip the naive expression above this size")
    ap.add_argument("--many-shape", choices=["scaled", "llama-7b"], default="scaled",
                    help="merge_many's parameter list: Llama-like scaled to 64M elements (4M with --quick), "
                    "or Llama-2 7B's 291 tensors (67 GB with n=3 in bf16: a GPU with 80 GB or more)")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)

    device = args.device
    if args.sizes:
        sizes = args.sizes
    elif args.quick:
        sizes = [1 << 20, 1 << 22]
    elif device.startswith("cuda"):
        sizes = [1 << 20, 1 << 24, 1 << 28, 1 << 30]
    else:
        sizes = [1 << 20, 1 << 24, 1 << 26, 1 << 28]
    copy_bytes = (256 << 20) if args.quick else (1 << 30)
    copy = CopyBandwidth(device, copy_bytes)
    info = run_info(device)
    rows = []
    for dt_name in args.dtypes:
        for n in args.n:
            for size in sizes:
                rows.append(bench_one(n, DTYPES[dt_name], size, device, args.repeats, copy,
                                      skip_naive=size > args.skip_naive_above))
                print(f"  done n={n} {dt_name} {fmt_size(size)}", file=sys.stderr, flush=True)
    many = []
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the 1G-element rows' buffers: room for a 7B list
    total = (1 << 22) if args.quick else (1 << 26)
    for dt_name in args.dtypes:
        many.append(bench_many(3, DTYPES[dt_name], total, device, args.repeats, copy, shape=args.many_shape))
        print(f"  done merge_many {args.many_shape} {dt_name}", file=sys.stderr, flush=True)
    nt_rows = []
    if device == "cpu" and sk.cpu_info().get("cpp"):
        for size in ([1 << 22] if args.quick else [1 << 22, 1 << 26, 1 << 28]):
            nt_rows.append(bench_nontemporal(torch.bfloat16, size, 3, args.repeats))

    best_copy = max([r["copy_bw"] for r in rows + many] + [copy.best(args.repeats)])
    info["copy_bw_GBps_best"] = best_copy / 1e9
    result = {"info": info, "merge": rows, "merge_many": many, "nontemporal": nt_rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)

    print(f"\n# bench_merge  {info['date']}  device={info['device']}  cpu={info['cpu']}  torch={info['torch']}")
    print(f"# copy bandwidth: dst.copy_(src) of {fmt_size(copy_bytes)}B, read+write counted; each row's ratio uses the\n"
          f"# best copy sampled alternately with that row's own samples (best of the whole run: {best_copy / 1e9:.2f} GB/s)")
    if nt_rows:
        print("\nstreaming (non-temporal) stores, n=3+SFT bf16:")
        for r in nt_rows:
            print(f"  {fmt_size(r['elements']):>6} elements: regular {r['regular_s'] * 1e3:8.2f} ms, "
                  f"streaming {r['streaming_s'] * 1e3:8.2f} ms  -> streaming is {r['streaming_speedup']:.2f}x")
    print("\nmerge_many over a Llama-shaped parameter list (n=3+SFT):")
    for r in many:
        print(f"  {r['dtype']:>8} {r['tensors']} tensors, {fmt_size(r['elements'])} elements: "
              f"{r['merge_many_over_copy']:.2f}x copy bw, {r['speedup_vs_foreach']:.2f}x vs torch._foreach_ chain, "
              f"{r['many_over_flat']:.2f}x the time of one flat buffer")
    hdr = f"{'n+sft':>6} {'dtype':>8} {'elements':>9} {'ours ms':>9} {'GB/s':>7} {'/copy':>6} {'vs chain':>9} {'vs naive':>9}"
    print("\n" + hdr)
    print("-" * len(hdr))
    for r in rows:
        naive = f"{r['speedup_vs_naive']:8.1f}x" if "speedup_vs_naive" in r else f"{'-':>9}"
        print(f"{r['n']:>4}+1 {r['dtype']:>8} {fmt_size(r['elements']):>9} {r['ours_s'] * 1e3:9.2f} "
              f"{r['ours_bw'] / 1e9:7.2f} {r['ours_over_copy']:6.2f} {r['speedup_vs_chain']:8.2f}x {naive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
