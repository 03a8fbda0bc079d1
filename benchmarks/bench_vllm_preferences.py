"""Decode tokens/s in vLLM with 1 and with 16 distinct preferences: mixture adapters vs pause/re-merge per group.

Run in the vLLM environment (scripts/setup-vllm-env.sh), with the repository on PYTHONPATH:

    PYTHONPATH=. .venv-vllm/bin/python benchmarks/bench_vllm_preferences.py            # hidden 512, 4 layers
    PYTHONPATH=. .venv-vllm/bin/python benchmarks/bench_vllm_preferences.py --quick    # tiny, a minute

One batch of ``--prompts`` requests, ``--max-tokens`` new tokens each (EOS
ignored, greedy), on a Qwen2 made in code (random weights) with 2 LoRA
backbones of rank ``--rank`` (mixture rank 2 x rank):

    mix x1       AdapterSoupLLM, every request at one preference (one mixture adapter)
    mix x16      AdapterSoupLLM, 16 distinct preferences in the same batch (16 adapters, one batch)
    merged x1    SoupLLM (full-weight backbones, the same models), one preference: no LoRA at all
    remerge x16  SoupLLM, 16 groups: set_preference (pause, re-merge, prefix-cache reset) then the group's requests

Samples alternate between the two modes of one engine (mix x1 / mix x16, then
merged x1 / remerge x16), after a warm-up that makes and loads every adapter;
the median of ``--repeats`` is reported. Tokens/s counts generated tokens over
the wall time of the whole batch (prefill included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

for _key, _value in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                     "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING",
                     "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

BETA = 0.7


def _prefs(k: int) -> list[list[float]]:
    return [[1.0 - i / max(1, k - 1), i / max(1, k - 1)] for i in range(k)] if k > 1 else [[0.5, 0.5]]


def _free(llm) -> None:
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def _timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - t0, tokens


def _count(outs) -> int:
    return sum(len(o.outputs[0].token_ids) for o in outs)


def run(args) -> dict:
    from vllm import SamplingParams

    from bonesoup.tasks.tiny_qwen2 import make_tiny_qwen2_adapters, materialise_backbones
    from bonesoup.vllm.adapters import AdapterSoupLLM

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-vllm-prefs-"))
    sft, adapters = make_tiny_qwen2_adapters(root / "lora", 2, rank=args.rank, hidden=args.hidden,
                                             layers=args.layers, intermediate=4 * args.hidden)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft)
    base = tok("Bone soup merges backbone models with preference weights.")["input_ids"]
    prompts = [{"prompt_token_ids": base[: 4 + i % 8]} for i in range(args.prompts)]
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    engine_kw = dict(dtype="float32", max_model_len=256, max_num_seqs=max(16, args.prompts))
    results: dict = {"samples": {}}

    def record(name, seconds, tokens):
        results["samples"].setdefault(name, []).append(tokens / seconds)

    # -- mixture adapters: one engine, 1 vs 16 distinct preferences
    t0 = time.perf_counter()
    llm = AdapterSoupLLM(sft, adapters, beta=BETA, max_loras=16, **engine_kw)
    results["start_lora_s"] = time.perf_counter() - t0
    one = [_prefs(16)[0]] * args.prompts  # one of the 16: 16 adapters in 16 slots, nothing evicted when timed
    many = [_prefs(16)[i % 16] for i in range(args.prompts)]
    t0 = time.perf_counter()
    llm.generate(prompts, sp, preference=many)  # warm-up: makes and loads 16 adapters
    results["make_and_load_16_adapters_s"] = time.perf_counter() - t0
    llm.generate(prompts, sp, preference=one)
    for _ in range(args.repeats):
        record("mix x1", *_timed(lambda: _count(llm.generate(prompts, sp, preference=one))))
        record("mix x16", *_timed(lambda: _count(llm.generate(prompts, sp, preference=many))))
    results["adapters_made"] = llm.cache.created  # 16 when nothing was evicted
    llm.close()
    _free(llm)

    # -- full-weight backbones: pause / re-merge / resume per group
    try:
        from bonesoup.vllm import SoupLLM
    except ImportError as exc:
        results["remerge_unavailable"] = str(exc)
        return results
    full = materialise_backbones(sft, adapters, root / "full")
    soup = SoupLLM(sft, full, beta=BETA, **engine_kw)
    groups = _prefs(16)

    def remerge_16() -> int:
        tokens = 0
        for g, pref in enumerate(groups):
            soup.set_preference(pref)
            tokens += _count(soup.generate([p for i, p in enumerate(prompts) if i % 16 == g], sp))
        return tokens

    def merged_1() -> int:
        return _count(soup.generate(prompts, sp))

    soup.set_preference(_prefs(16)[0])
    merged_1()
    remerge_16()
    for _ in range(args.repeats):
        soup.set_preference(_prefs(16)[0])
        record("merged x1", *_timed(merged_1))
        record("remerge x16", *_timed(remerge_16))
    _free(soup)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=8, help="rank of each LoRA backbone (the mixture's is twice it)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", help="where the models go (default: a temporary directory)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--quick", action="store_true", help="hidden 128, 2 layers, 16 prompts x 16 tokens, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.prompts, args.max_tokens, args.repeats = 128, 2, 16, 16, 1
    res = run(args)
    med = {k: statistics.median(v) for k, v in res["samples"].items()}
    s = res["samples"]  # samples alternate: the ratio of each pair sees the same machine
    pairs = {"mix x16 / mix x1": ("mix x16", "mix x1"), "remerge x16 / merged x1": ("remerge x16", "merged x1")}
    res["median_pair_ratios"] = {name: statistics.median(x / y for x, y in zip(s[a], s[b]))
                                 for name, (a, b) in pairs.items() if a in s and b in s}
    res.update(median_tokens_per_s=med, args=vars(args), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               machine=f"{platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
               python=sys.version.split()[0])
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nQwen2 hidden {args.hidden} x {args.layers} layers, 2 LoRA backbones of rank {args.rank}; "
          f"{args.prompts} prompts x {args.max_tokens} tokens; median of {args.repeats}; {res['machine']}")
    print(f"start-up (LoRA engine) {res['start_lora_s']:.1f} s; making + loading 16 adapters "
          f"{res['make_and_load_16_adapters_s']:.2f} s (inside the warm-up batch)")
    print(f"{'mode':<14}{'tokens/s':>10}{'vs mix x1':>11}")
    for k in ("mix x1", "mix x16", "merged x1", "remerge x16"):
        if k in med:
            print(f"{k:<14}{med[k]:>10.1f}{med[k] / med['mix x1']:>10.2f}x")
    for name, r in res["median_pair_ratios"].items():
        print(f"{name:<24}{r:>7.2f}x (median of the ratios of alternated pairs, one engine)")
    print(f"adapters made: {res['adapters_made']}")
    if "remerge_unavailable" in res:
        print(f"pause/re-merge not measured: {res['remerge_unavailable']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
