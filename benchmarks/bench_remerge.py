"""Live re-merge latency: ``LiveSoup.set_preference`` against its floor and the naive way.

For a model of a given shape with n backbones + the SFT model held resident,
one process measures, with samples alternating so all see the same machine:

    set_preference   LiveSoup.set_preference (validation, coefficients, lock,
                     one fused merge per dtype)
    bare kernel      sk.merge over the same arenas with the same coefficients
                     (the floor set_preference should approach)
    copy             a dst.copy_(src) of the same total bytes: (inputs + 1) x model
    state-dict loop  {k: sum(c * sd[k] for ...)} then model.load_state_dict(...)

    python benchmarks/bench_remerge.py                       # GPT-2 small (124M), fp32, CPU
    python benchmarks/bench_remerge.py --shape llama-7b --dtype bf16 --n 3 --device cuda
    python benchmarks/bench_remerge.py --quick               # a small model, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Mapping
from datetime import datetime, timezone

import torch

import soupkernels as sk
from bonesoup.merge.live import LiveSoup

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def llama_shapes(d: int, layers: int, ffn: int, vocab: int = 32000) -> list[tuple[int, ...]]:
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(ffn, d), (ffn, d), (d, ffn), (d,), (d,)]
    return shapes + [(d,), (vocab, d)]


def gpt2_shapes(d: int = 768, layers: int = 12, vocab: int = 50257, positions: int = 1024) -> list[tuple[int, ...]]:
    shapes = [(vocab, d), (positions, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


SHAPES = {
    "gpt2-small": gpt2_shapes,  # 124M parameters (tied head: counted once)
    "tiny": lambda: gpt2_shapes(d=128, layers=2, vocab=5000, positions=128),
    "llama-1b": lambda: llama_shapes(2048, 16, 8192, 128256),
    "llama-7b": lambda: llama_shapes(4096, 32, 11008),
}


class ShapedModel(torch.nn.Module):
    """Parameters of the given shapes and nothing else (random weights are fine for timing)."""

    def __init__(self, shapes, dtype, device, gen):
        super().__init__()
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(s, generator=gen, device=device).to(dtype), requires_grad=False)
            for s in shapes
        )


class LazyRandomState(Mapping):
    """A state dict whose tensors are generated on demand (seeded per key).

    LiveSoup copies each source tensor into its arena once, so a 7B model's
    backbones never need to exist as whole state dicts next to the arenas
    (5 x 13.5 GB would not fit twice in 80 GB).
    """

    def __init__(self, shapes: dict, dtype, device, seed: int, base: "LazyRandomState | None" = None):
        self.shapes, self.dtype, self.device, self.seed, self.base = shapes, dtype, device, seed, base

    def __getitem__(self, key):
        i = list(self.shapes).index(key)
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + i)
        x = torch.randn(self.shapes[key], generator=gen, device=self.device)
        if self.base is not None:  # a backbone: the SFT weights plus a small delta
            x = self.base[key].float() + 0.01 * x
        return x.to(self.dtype)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def _t(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-small")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--n", type=int, default=2, help="backbones (plus the SFT model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-naive", action="store_true", help="skip the state-dict loop (it needs 2+ more model copies)")
    ap.add_argument("--lazy", action="store_true",
                    help="generate backbones on demand instead of holding state dicts (implies --no-naive; "
                    "default for llama shapes on CUDA, where resident state dicts would not fit)")
    ap.add_argument("--quick", action="store_true", help="--shape tiny --repeats 3")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.shape, args.repeats = "tiny", 3
    dtype, device = DTYPES[args.dtype], args.device
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = SHAPES[args.shape]()

    print(f"[bench] building {args.shape} ({args.dtype}) with {args.n} backbones + SFT on {device} ...",
          file=sys.stderr, flush=True)
    if device.startswith("cuda") and args.shape.startswith("llama"):
        args.lazy = True
    if args.lazy:
        args.no_naive = True
    model = ShapedModel(shapes, dtype, device, gen)
    if args.lazy:
        sft = LazyRandomState({k: tuple(v.shape) for k, v in model.state_dict().items()}, dtype, device, seed=1)
        backbones = [LazyRandomState(sft.shapes, dtype, device, seed=2 + j, base=sft) for j in range(args.n)]
    else:
        sft = {k: v.detach().clone() for k, v in model.state_dict().items()}
        backbones = [{k: v + (0.01 * torch.randn(v.shape, generator=gen, device=device)).to(dtype)
                      for k, v in sft.items()} for _ in range(args.n)]
    soup = LiveSoup(model, backbones, beta=0.7, sft=sft, device=device)
    params = sum(p.numel() for p in model.parameters())
    prefs = [[1.0] + [0.0] * (args.n - 1), [1.0 / args.n] * args.n, [0.0] * (args.n - 1) + [1.0]]
    prefs[1][-1] = 1.0 - sum(prefs[1][:-1])
    coeffs = soup.coefficients(prefs[1], 0.1)
    arenas = soup._arenas  # the bare kernel runs on exactly the bytes set_preference moves
    nbytes = soup.param_bytes * (len(coeffs) + 1)
    # copy of the same bytes: half read, half written (capped at 8 GiB a side on small GPUs)
    half = min(nbytes // 2, 8 << 30) if device.startswith("cuda") else nbytes // 2
    src = torch.empty(half // 4, dtype=torch.float32, device=device).normal_(generator=gen)
    dst = torch.empty_like(src)
    copy_bytes = 2 * src.numel() * 4

    def naive():
        merged = {k: sum(c * sd[k] for c, sd in zip(coeffs, backbones + [sft])) for k in sft}
        model.load_state_dict(merged)  # copies into the live parameters (views into the arena)

    samples = {"set_preference": [], "bare_kernel": [], "copy": [], "state_dict_loop": []}
    for i in range(args.repeats + 1):  # the first round warms up and is dropped
        s = {
            "set_preference": _t(lambda: soup.set_preference(prefs[i % 3], alpha=0.1), device),
            "bare_kernel": _t(lambda: [sk.merge(list(a.inputs.unbind(0)), coeffs, out=a.live) for a in arenas],
                              device),
            "copy": _t(lambda: dst.copy_(src), device) * nbytes / copy_bytes,  # scaled to the same bytes
        }
        if not args.no_naive:
            s["state_dict_loop"] = _t(naive, device)
        if i:
            for k, v in s.items():
                samples[k].append(v)
        print(f"  round {i}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in s.items()), file=sys.stderr)

    # What the run can know exactly: the live weights after set_preference are sum_k c_k x_k (float64
    # reference from the same inputs), and the state-dict loop computes the same model.
    check = None
    if not args.lazy:
        soup.set_preference(prefs[1], alpha=0.1)
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ref = {k: sum(c * sd[k].double() for c, sd in zip(coeffs, backbones + [sft])) for k in sft}
        check = {"max_abs_err_vs_fp64": max(float((live[k].double() - ref[k]).abs().max()) for k in ref),
                 "max_abs_ref": max(float(ref[k].abs().max()) for k in ref)}
        if not args.no_naive:
            naive()
            check["max_abs_diff_loop_vs_ours"] = max(float((v.double() - live[k].double()).abs().max())
                                                     for k, v in model.state_dict().items())
    best = {k: min(v) for k, v in samples.items() if v}
    med = {k: statistics.median(v) for k, v in samples.items() if v}
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.machine(),
        "cpu": sk.cpu_info(), "torch": torch.__version__, "command": " ".join(sys.argv),
        "shape": args.shape, "dtype": args.dtype, "n": args.n, "parameters": params,
        "param_bytes": soup.param_bytes, "bytes_moved": nbytes, "launches": len(arenas),
        "coefficients": coeffs, "preference": prefs[1], "alpha": 0.1, "check": check,
        "samples": {k: len(v) for k, v in samples.items() if v},
        "best_s": best, "median_s": med,
        "set_preference_over_bare": best["set_preference"] / best["bare_kernel"],
        "set_preference_over_copy": best["set_preference"] / best["copy"],
    }
    if "state_dict_loop" in best:
        result["loop_over_set_preference"] = best["state_dict_loop"] / best["set_preference"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)

    print(f"\n# bench_remerge {result['date']} device={result['device']} cpu={result['cpu']} torch={result['torch']}")
    print(f"# {args.shape}: {params / 1e6:.1f}M parameters, {args.dtype}, {args.n} backbones + SFT; "
          f"{nbytes / 1e9:.2f} GB moved per re-merge, {len(arenas)} kernel call(s)")
    print(f"{'':>18} {'best ms':>9} {'median ms':>10} {'GB/s':>7} {'x bare':>7}")
    for k in ("set_preference", "bare_kernel", "copy", "state_dict_loop"):
        if k in best:
            print(f"{k:>18} {best[k] * 1e3:9.2f} {med[k] * 1e3:10.2f} {nbytes / best[k] / 1e9:7.2f} "
                  f"{best[k] / best['bare_kernel']:6.2f}x")
    if "state_dict_loop" in best:
        print(f"set_preference is {result['loop_over_set_preference']:.1f}x faster than the state-dict loop "
              f"+ load_state_dict, at {result['set_preference_over_bare']:.3f}x the bare kernel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
