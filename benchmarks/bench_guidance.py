"""Decode cost of MAGE (ONE merged guidance model) against MOD (n experts' logits), n = 2, 3, 4.

Every method decodes the same prompts (batch B, T new tokens, temperature 1,
fixed seed, no early stop) with ``bonesoup.guided_generate``: one forward per
model per step and one fused ``sk.guided_sample`` over the models' logits.

    MOD              [expert_1..expert_n], coeffs mu                       n forwards / step
    guidance ens.    [base, expert_1..expert_n, ref], [1, w mu_1.., -w]    n + 2 forwards / step
    MAGE implicit    [base, merged tuned, ref], [1, w, -w]                 3 forwards / step, any n
    MAGE explicit    [base, merged value], [1, w]                          2 forwards / step, any n

"merged tuned" = sum_i mu_i expert_i and "merged value" = sum_i mu_i value_i,
both merged in weight space by ``sk.merge_many`` (timed separately: a merge
runs once per preference change, not per token). A value model has the
base's architecture with an untied head. Models are random-initialised
GPT-2s built in code (no download).

Columns: forwards per step; aten ops per decode step that compute (views
left out; counted on this device: roughly the kernel launches a GPU step
would make, the fused sampler's own launch not included); decode tokens/s
(B * T / wall time of guided_generate, prefill included; median of
alternated repeats after a warm-up); the speed ratio to MOD at the same n
(median over rounds of MOD's time / the method's time, each round's samples
taken back to back); weights read per step (bytes of the distinct models in
the forward list); resident weights in two accountings -- "resident" (the
models decoding holds) and "+ re-merge inputs" (plus the n stored experts /
value models MAGE's guide is re-merged from when the preference changes,
assumed kept on the same device; MOD and the guidance ensemble need none: a
preference change only changes their coefficients; the base's own Bone Soup
inputs are the same for every method with a base and left out); and "RSS
growth", the "+ re-merge inputs" set measured: the growth of the process's
resident set (CPU: psutil or /proc/self/statm, read right after glibc's
malloc_trim(0), without which freed pages stay resident and the growth means
nothing; CUDA: torch.cuda.memory_allocated) when each of those models was
built, summed. Where malloc_trim is missing the column is left empty.

    python benchmarks/bench_guidance.py                 # n = 2, 3, 4; small GPT-2 (27M params), B 8, T 32, 3 repeats
    python benchmarks/bench_guidance.py --quick         # seconds (tiny models)
    python benchmarks/bench_guidance.py --device cuda --dtype bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_merge import run_info  # noqa: E402

import soupkernels as sk  # noqa: E402

METHODS = ("mod", "guidance_ensemble", "mage_implicit", "mage_explicit")
PRESETS = {
    # 27.3M parameters (16384 x 512 embedding, tied head), 104.7 MiB fp32; the value model 136.7 MiB.
    "small": dict(n_embd=512, n_layer=6, n_head=8, vocab_size=16384, n_positions=256),
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=64),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    named = [dict(m.named_parameters()) for m in models]
    outs, groups = [], []
    for name, p in out.named_parameters():
        outs.append(p.data)
        groups.append([d[name].data for d in named])
    with torch.no_grad():
        sk.merge_many(groups, coeffs, outs=outs)
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _seconds(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def resident_meter(device: str):
    """A function returning the bytes a device holds now, or None when that cannot be measured."""
    if device.startswith("cuda"):
        return lambda: (torch.cuda.synchronize(), torch.cuda.memory_allocated())[1]
    trim = _malloc_trim()
    if trim is None:  # freed pages stay resident: RSS growth would not measure what was built
        return lambda: None
    try:
        import psutil

        proc = psutil.Process()

        def rss():
            return proc.memory_info().rss
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")

        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

    def measure():
        trim(0)  # gc.collect() is left to the caller: 0.2 s a call with transformers loaded
        return rss()

    return measure


class Models:
    """Every model of one n, each with its bytes and the resident growth measured when it was built."""

    def __init__(self, n, preset, device, dtype, meter):
        self.models, self.bytes, self.grown = {}, {}, {}
        self.device, self.meter = device, meter
        self.mu = [1.0 / n] * n
        self.experts = [f"expert_{i + 1}" for i in range(n)]
        self.values = [f"value_{i + 1}" for i in range(n)]
        spec = [("base", 1, True), ("ref", 2, True), ("merged_tuned", 3, True), ("merged_value", 4, False)]
        spec += [(e, 10 + i, True) for i, e in enumerate(self.experts)]
        spec += [(v, 20 + i, False) for i, v in enumerate(self.values)]
        gc.collect()  # the previous n's models, should any sit in a reference cycle
        for name, seed, tied in spec:
            before = meter()
            self.models[name] = make_model(preset, seed, tied=tied, device=device, dtype=dtype)
            after = meter()
            self.grown[name] = None if before is None else after - before
            self.bytes[name] = param_bytes(self.models[name])
        self.merge_seconds = {
            "mage_implicit": self._merge(self.experts, "merged_tuned"),
            "mage_explicit": self._merge(self.values, "merged_value"),
        }

    def _merge(self, inputs, out) -> float:
        """Merge ``inputs`` with mu into ``out``; the best of 3 timings."""
        ins = [self.models[x] for x in inputs]
        return min(_seconds(lambda: merge_models(ins, self.mu, self.models[out]), self.device) for _ in range(3))

    def config(self, method: str, w: float):
        """(forward list, coefficients, names of the stored models the guide is re-merged from)."""
        mu, ex = self.mu, self.experts
        return {
            "mod": (ex, mu, []),
            "guidance_ensemble": (["base", *ex, "ref"], [1.0, *(w * m for m in mu), -w], []),
            "mage_implicit": (["base", "merged_tuned", "ref"], [1.0, w, -w], ex),
            "mage_explicit": (["base", "merged_value"], [1.0, w], self.values),
        }[method]


def _is_view(func) -> bool:
    """An aten op whose result aliases an input without writing it (no kernel on a GPU)."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def ops_per_step(decode) -> int:
    """Aten ops that compute in one decode step: ops of a 2-step decode minus those of a 1-step one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += not _is_view(func)
            return func(*args, **(kwargs or {}))

    counts = []
    for tokens in (1, 2):
        with Count() as c:
            decode(tokens)
        counts.append(c.ops)
    return counts[1] - counts[0]


def check_merged(models: Models, dtype) -> None:
    """The merged guides ARE the mu-weighted sums of their inputs (to fp32 rounding; bf16/fp16: output rounding)."""
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for out, inputs in (("merged_tuned", models.experts), ("merged_value", models.values)):
        named = [dict(models.models[x].named_parameters()) for x in inputs]
        for name, p in models.models[out].named_parameters():
            want = torch.zeros_like(p, dtype=torch.float32)
            for m, d in zip(models.mu, named):
                want.add_(d[name].float(), alpha=m)
            torch.testing.assert_close(p.float(), want, **tol, msg=lambda s: f"{out}.{name}: {s}")


def _decode(models: Models, names, coeffs, ids, mask, tokens):
    from bonesoup.decode.guided import guided_generate

    ms = [models.models[x] for x in names]
    return guided_generate(ms[0], ms[1:], coeffs, ids, mask, max_new_tokens=tokens, temperature=1.0, seed=123,
                           stop_token_ids=[])


def measure(n: int, preset: dict, dtype, ids, mask, meter, args) -> tuple[list, dict]:
    """The rows of the four methods at n objectives, and the merge times."""
    models = Models(n, preset, args.device, dtype, meter)
    check_merged(models, dtype)
    configs = {m: models.config(m, args.w) for m in METHODS}

    def decode(m, tokens):
        names, coeffs, _ = configs[m]
        return _decode(models, names, coeffs, ids, mask, tokens)

    forwards, ops = {}, {}
    for m in METHODS:  # warm-up (short decodes: the time is the repeats'), forwards and ops per step
        t = min(args.tokens, 4)
        g = decode(m, t)
        assert g.steps == t and g.forwards % t == 0, (m, g.steps, g.forwards)
        forwards[m] = g.forwards // t
        ops[m] = ops_per_step(lambda k: decode(m, k))
    samples = {m: [] for m in METHODS}
    for r in range(args.repeats):  # alternate the methods: a shared machine drifts
        for m in (METHODS if r % 2 == 0 else METHODS[::-1]):
            samples[m].append(_seconds(lambda: decode(m, args.tokens), args.device))
    tps = {m: args.batch * args.tokens / statistics.median(samples[m]) for m in METHODS}
    # The ratio pairs the samples of one round (taken minutes apart at most), then takes the median.
    vs_mod = {m: statistics.median(a / b for a, b in zip(samples["mod"], samples[m])) for m in METHODS}
    rows = []
    for m in METHODS:
        names, _, inputs = configs[m]
        read = sum(models.bytes[x] for x in set(names))
        held = set(names) | set(inputs)
        grown = [models.grown[x] for x in held]
        assert len(samples[m]) == args.repeats
        rows.append({
            "method": m, "n": n, "models": names, "remerge_inputs": inputs,
            "forwards_per_step": forwards[m], "ops_per_step": ops[m],
            "tokens_per_s": tps[m], "speed_vs_mod": vs_mod[m],
            "read_mib_per_step": read / 2**20, "resident_decode_mib": read / 2**20,
            "resident_with_inputs_mib": sum(models.bytes[x] for x in held) / 2**20,
            "rss_growth_mib": None if None in grown else sum(grown) / 2**20,
            "merge_seconds": models.merge_seconds.get(m), "seconds": samples[m],
        })
    return rows, models.merge_seconds


def run(args) -> dict:
    preset = PRESETS["tiny" if args.quick else args.preset]
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, preset["vocab_size"], (args.batch, args.prompt), generator=gen).to(args.device)
    mask = torch.ones_like(ids)
    meter = resident_meter(args.device)
    t0 = time.perf_counter()
    make_model(preset, 0, device=args.device, dtype=dtype)  # first build: one-time allocations, not a model's
    rows, merges = [], {}
    for n in args.n:  # one n at a time: its models are freed before the next n's are built
        r, merges[n] = measure(n, preset, dtype, ids, mask, meter, args)
        rows += r
    return {"info": run_info(args.device), "preset": preset, "dtype": args.dtype, "batch": args.batch,
            "prompt": args.prompt, "tokens": args.tokens, "repeats": args.repeats, "w": args.w,
            "merge_seconds": merges, "rows": rows, "wall_s": time.perf_counter() - t0}


def table(res: dict) -> str:
    head = (f"{'method':<18}{'n':>3}{'fwd/step':>9}{'ops/step':>9}{'tokens/s':>10}{'vs MOD':>8}"
            f"{'read MiB/step':>14}{'resident MiB':>13}{'+ re-merge inputs':>18}{'RSS growth':>11}")
    lines = [head, "-" * len(head)]
    for r in res["rows"]:
        rss = "-" if r["rss_growth_mib"] is None else f"{r['rss_growth_mib']:.1f}"
        lines.append(f"{r['method']:<18}{r['n']:>3}{r['forwards_per_step']:>9}{r['ops_per_step']:>9}"
                     f"{r['tokens_per_s']:>10.1f}{r['speed_vs_mod']:>7.2f}x{r['read_mib_per_step']:>14.1f}"
                     f"{r['resident_decode_mib']:>13.1f}{r['resident_with_inputs_mib']:>18.1f}{rss:>11}")
    merges = "; ".join(f"n={n}: tuned {1e3 * s['mage_implicit']:.1f} ms, value {1e3 * s['mage_explicit']:.1f} ms"
                       for n, s in res["merge_seconds"].items())
    lines.append(f"sk.merge_many of the n models into MAGE's guide (once per preference change): {merges}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[2, 3, 4], help="numbers of objectives / experts")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per sequence")
    p.add_argument("--repeats", type=int, default=3, help="timed decodes per method and n (alternated)")
    p.add_argument("--w", type=float, default=1.0, help="guidance strength")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--quick", action="store_true", help="tiny models, B 2, prompt 4, T 4, 1 repeat")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.n):
        p.error("--n values must be >= 1")
    if args.quick:
        args.batch, args.tokens, args.repeats, args.prompt = 2, 4, 1, 4
    res = run(args)
    info = res["info"]
    print(f"# {info['date']}  {info['device']}  torch {info['torch']} ({info['torch_threads']} threads)  "
          f"{res['dtype']}  B={res['batch']} prompt={res['prompt']} T={res['tokens']}  "
          f"repeats={res['repeats']}  model {res['preset']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
