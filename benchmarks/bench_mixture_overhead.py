"""What the per-row adapter mixture costs a forward, against the model merged at one preference.

An :class:`~bonesoup.AdapterSoup` leaves the SFT weights alone and adds, in
every adapted linear layer, ``B_cat (col(c_r) * (A_cat x_r))``: two skinny
matmuls of rank ``R = n r`` (n backbones of rank r). The merged model
(``W + sum_j c_j D_j`` written into the weights) pays nothing extra but
holds one preference. This times one forward of a GPT-2-small-shaped model
(768 wide, 12 layers, 12 heads, vocabulary 50257, random weights; LoRA on
every block linear layer: c_attn, attn.c_proj, c_fc, mlp.c_proj) in three
forms, samples alternated (merged, then each mixture, the order rotated per
repeat), for ranks 8/16/64 and n = 2, 3:

- ``merged``: the plain model (its weights as a merge would leave them;
  the cost does not depend on their values);
- ``shared``: the soup at one shared preference ([n] coefficients);
- ``per-row``: the soup inside ``soup.rows(coefficients=[B, n])``, one
  preference per row (the serving case).

Each sample of a mixture (after one untimed forward at its coefficients:
steady state, as in decoding) is paired with a sample of the merged model
taken just before it; the ratio is the median of the per-pair ratios. The clock
is the process's CPU time by default (``--clock cpu``; one torch thread):
on a shared, loaded CPU the wall time of a forward mostly measures the
other processes, its CPU time the forward.

Two shapes, as ``guided_generate`` calls the model (``logits_to_keep=1``):
prefill (``--prefill-batch`` x ``--prefill-tokens``) and one decode step
(``--decode-batch`` rows, one new token over a KV cache of
``--decode-context`` tokens; the cache is cropped back after each step and
shared by every form, since the time does not depend on its values). FLOPs
are counted from the shapes (matmuls: linear layers, the head, causal
attention; the mixture adds ``2 R (in + out)`` per token per layer). Each
mixture is also checked against the model merged exactly at a row's
preference (max logit difference).

    python benchmarks/bench_mixture_overhead.py                 # GPT-2 small shape, ~2 minutes on 1 thread
    python benchmarks/bench_mixture_overhead.py --quick         # seconds (tiny model; a test runs this)
    python benchmarks/bench_mixture_overhead.py --json out/mixture.json
    python benchmarks/bench_mixture_overhead.py --model tiny --repeats 30   # the embedded server's model
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_merge import run_info, write_json  # noqa: E402

from bonesoup import merge_coefficients  # noqa: E402
from bonesoup.merge.adapter_soup import AdapterSoup  # noqa: E402
from bonesoup.tasks.tiny_models import random_gpt2_adapters  # noqa: E402

BETA = 0.7
CLOCK = time.process_time  # the timer of Forward (main: --clock)
SHAPES = {
    "small": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=384, n_positions=128),
}


def make_model(shape: dict, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = GPT2Config(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg).eval()


def adapted_layers(model) -> list[tuple[int, int]]:
    """(in, out) of every layer the adapters target (GPT-2's Conv1D weight is [in, out])."""
    return [tuple(m.weight.shape) for name, m in model.named_modules()
            if type(m).__name__ == "Conv1D" and name.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc")]


def flops(shape: dict, layers, rows: int, tokens: int, context: int, rank_total: int) -> tuple[float, float]:
    """(merged, mixture extra) matmul FLOPs of one forward of ``rows`` x ``tokens`` new tokens after ``context``."""
    d, L, V = shape["n_embd"], shape["n_layer"], shape["vocab_size"]
    linear = 2 * sum(i * o for i, o in layers) * rows * tokens
    head = 2 * d * V * rows  # logits_to_keep=1
    attended = sum(context + t + 1 for t in range(tokens))  # causal: query t sees context + t + 1 keys
    attention = L * 2 * 2 * d * attended * rows  # QK^T and AV
    extra = sum(2 * rank_total * (i + o) + rank_total for i, o in layers) * rows * tokens
    return float(linear + head + attention), float(extra)


class Forward:
    """One timed forward of a shape: prefill (fresh) or one decode step (over a cache cropped back each time)."""

    def __init__(self, model, kind: str, rows: int, tokens: int, context: int, vocab: int, gen):
        self.kind, self.rows = kind, rows
        if kind == "prefill":
            self.ids = torch.randint(1, vocab, (rows, tokens), generator=gen)
            self.mask = torch.ones_like(self.ids)
            self.cache = None
        else:
            ctx = torch.randint(1, vocab, (rows, context), generator=gen)
            with torch.inference_mode():
                self.cache = model(input_ids=ctx, use_cache=True, logits_to_keep=1).past_key_values
            self.context = context
            self.ids = torch.randint(1, vocab, (rows, 1), generator=gen)
            self.mask = torch.ones(rows, context + 1, dtype=torch.long)
            self.pos = torch.full((rows, 1), context, dtype=torch.long)

    def __call__(self, model) -> float:
        with torch.inference_mode():
            t0 = CLOCK()
            if self.cache is None:
                model(input_ids=self.ids, attention_mask=self.mask, use_cache=True, logits_to_keep=1)
            else:
                model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos,
                      past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            dt = CLOCK() - t0
            if self.cache is not None:
                self.cache.crop(-1)  # drop the token just appended: the next step sees the same context
        return dt


def check_exact(model, merged, adapters, soup, gen, vocab: int) -> float:
    """Max |logit difference| between per-row mixture rows and the model merged exactly at each row's preference,
    over the largest |logit| (fp32 rounding is ~1e-6 of it)."""
    n = len(adapters)
    prefs = np.random.default_rng(0).dirichlet(np.ones(n), size=2)
    ids = torch.randint(1, vocab, (2, 8), generator=gen)
    with torch.inference_mode(), soup.rows(preference=prefs):
        z = model(input_ids=ids).logits
    deltas = [a.weight_deltas() for a in adapters]
    base = {k: v.clone() for k, v in model.state_dict().items()}
    state = merged.state_dict()
    err = 0.0
    for b in range(2):
        c, _ = merge_coefficients(prefs[b], method="bone", beta=BETA)
        with torch.no_grad():
            for key in deltas[0]:
                src = base[key.replace(".weight", ".base_layer.weight")]
                state[key].copy_((src.double() + sum(cj * d[key] for cj, d in zip(c, deltas))).float())
        with torch.inference_mode():
            z_ref = merged(input_ids=ids[b:b + 1]).logits
        err = max(err, float((z[b] - z_ref[0]).abs().max() / z_ref.abs().max()))
    return err


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, ranks 2 4, n 2, 2 repeats (a test runs this)")
    p.add_argument("--model", choices=sorted(SHAPES), default="small", help="GPT-2 small's shape (default) or the "
                   "embedded server's tiny one")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--n", type=int, nargs="+", default=[2, 3])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prefill-batch", type=int, default=1)
    p.add_argument("--prefill-tokens", type=int, default=64)
    p.add_argument("--decode-batch", type=int, default=16)
    p.add_argument("--decode-context", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared CPU)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="process CPU time (default) or wall time")
    p.add_argument("--delta", type=float, default=0.02, help="std of the adapters' weight deltas")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.ranks, args.n, args.repeats = [2, 4], [2], 2
        args.prefill_tokens, args.decode_batch, args.decode_context = 16, 4, 8
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    shape = SHAPES["tiny" if args.quick else args.model]
    model = make_model(shape)
    merged = copy.deepcopy(model)
    layers = adapted_layers(model)
    gen = torch.Generator().manual_seed(1)
    info = run_info("cpu")
    print(f"# {info['date']}  torch {info['torch']} ({info['torch_threads']} threads)  model {shape}  "
          f"{len(layers)} adapted layers  repeats {args.repeats}  clock {args.clock}  load {os.getloadavg()[0]:.1f}")
    forwards = {
        "prefill": Forward(model, "prefill", args.prefill_batch, args.prefill_tokens, 0, shape["vocab_size"], gen),
        "decode": Forward(model, "decode", args.decode_batch, 1, args.decode_context, shape["vocab_size"], gen),
    }
    configs = list(itertools.product(args.n, args.ranks))
    adapters = {(n, r): random_gpt2_adapters(model, n, r, seed=r, delta=args.delta) for n, r in configs}
    checks = {}
    for n, r in configs:  # correctness first, outside the timing
        soup = AdapterSoup(model, adapters[(n, r)], beta=BETA)
        checks[(n, r)] = check_exact(model, merged, adapters[(n, r)], soup, gen, shape["vocab_size"])
        soup.remove()
    del merged
    variants = [(mode, n, r) for n, r in configs for mode in ("shared", "per-row")]
    times = {(v, k): [] for v in variants for k in forwards}  # (mixture seconds, merged seconds) pairs
    rng = np.random.default_rng(2)
    for rep in range(args.repeats + 1):  # repeat 0 warms up and is not kept
        order = variants[rep % len(variants):] + variants[: rep % len(variants)]
        for v in order:
            mode, n, r = v
            for kind, fwd in forwards.items():
                merged_dt = fwd(model)  # the pair's merged sample, just before
                soup = AdapterSoup(model, adapters[(n, r)], beta=BETA)
                # One untimed forward first: the layers' coefficient caches (per-row columns; the shared
                # coefficients folded into B) are built once per change, not per forward.
                if mode == "per-row":
                    coeffs = np.stack([merge_coefficients(pref, method="bone", beta=BETA)[0]
                                       for pref in rng.dirichlet(np.ones(n), size=fwd.rows)])
                    with soup.rows(coefficients=coeffs):
                        fwd(model)
                        dt = fwd(model)
                else:
                    fwd(model)
                    dt = fwd(model)
                soup.remove()
                if rep:
                    times[(v, kind)].append((dt, merged_dt))

    rows = []
    for kind, fwd in forwards.items():
        tokens = 1 if kind == "decode" else args.prefill_tokens
        context = args.decode_context if kind == "decode" else 0
        merged_all = [m for v in variants for _, m in times[(v, kind)]]
        f_base, _ = flops(shape, layers, fwd.rows, tokens, context, 0)
        rows.append({"shape": kind, "mode": "merged", "n": None, "rank": None, "rank_total": None,
                     "median_ms": 1e3 * statistics.median(merged_all), "best_ms": 1e3 * min(merged_all),
                     "time_over_merged": 1.0, "flops": f_base, "flops_over_merged": 1.0,
                     "max_rel_logit_diff": None})
        for v in variants:
            mode, n, r = v
            f_base, f_extra = flops(shape, layers, fwd.rows, tokens, context, n * r)
            pairs = times[(v, kind)]
            t = [a for a, _ in pairs]
            rows.append({"shape": kind, "mode": mode, "n": n, "rank": r, "rank_total": n * r,
                         "median_ms": 1e3 * statistics.median(t), "best_ms": 1e3 * min(t),
                         "time_over_merged": statistics.median(a / b for a, b in pairs),
                         "flops": f_base + f_extra, "flops_over_merged": (f_base + f_extra) / f_base,
                         "max_rel_logit_diff": checks[(n, r)]})
    print(f"{'shape':8} {'mode':8} {'n':>2} {'r':>3} {'R':>4} {'median ms':>10} {'GFLOP':>7} "
          f"{'FLOPs/merged':>13} {'time/merged':>12} {'rel |dz|':>9}")
    for x in rows:
        diff = "" if x["max_rel_logit_diff"] is None else f"{x['max_rel_logit_diff']:.1e}"
        print(f"{x['shape']:8} {x['mode']:8} {x['n'] or '':>2} {x['rank'] or '':>3} {x['rank_total'] or '':>4} "
              f"{x['median_ms']:10.2f} {x['flops'] / 1e9:7.2f} {x['flops_over_merged']:12.3f}x "
              f"{x['time_over_merged']:11.3f}x {diff:>9}")
    result = {**info, "shape": shape, "adapted_layers": len(layers), "repeats": args.repeats, "clock": args.clock,
              "prefill": [args.prefill_batch, args.prefill_tokens], "decode": [args.decode_batch, args.decode_context],
              "load_avg": os.getloadavg(), "rows": rows}
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
