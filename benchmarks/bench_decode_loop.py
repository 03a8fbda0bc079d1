"""The one decode loop against transformers' ``generate``: what the fused sampler costs a decode step.

Every decoding path of the project (PPO rollouts, evaluation, MAGE, MOD, the
server's engine) runs ``bonesoup.guided_generate``: one KV-cached forward per
model per step plus one ``sk.guided_sample`` (combination, filters and a
Philox draw fused). This times it against ``model.generate`` on the same
random-initialised GPT-2 and prompts, greedy and sampled (temperature 1,
top-k 50, top-p 0.9), no early stop, samples alternated A B A B in one
process. Greedy outputs are checked equal (the loops must agree token for
token there); sampled ones cannot be (different generators).

    python benchmarks/bench_decode_loop.py                 # small GPT-2 (27M), B 1 and 8, 32 new tokens
    python benchmarks/bench_decode_loop.py --quick         # seconds (tiny model)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_guidance import PRESETS, make_model  # noqa: E402
from bench_merge import run_info  # noqa: E402

from bonesoup.decode.guided import guided_generate  # noqa: E402

SAMPLED = dict(temperature=1.0, top_k=50, top_p=0.9)


def hf_generate(model, ids, new_tokens: int, sampled: bool):
    from transformers import GenerationConfig

    kw = dict(do_sample=True, **SAMPLED) if sampled else dict(do_sample=False)
    cfg = GenerationConfig(num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                           eos_token_id=None, **kw)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)[:, ids.shape[1]:]


def ours(model, ids, new_tokens: int, sampled: bool):
    kw = dict(SAMPLED, seed=0) if sampled else dict(temperature=0.0)
    return guided_generate(model, [], [1.0], ids, max_new_tokens=new_tokens, stop_token_ids=[], **kw).new_tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few repeats (a test runs this)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    preset = PRESETS["tiny" if args.quick else "small"]
    repeats = 2 if args.quick else args.repeats
    new_tokens = 8 if args.quick else args.new_tokens
    model = make_model(preset, 0)
    info = run_info("cpu")
    print(f"# {info['date']}  torch {info['torch']} ({info['torch_threads']} threads)  model {preset}  "
          f"new tokens {new_tokens}  repeats {repeats}")
    rows = []
    gen = torch.Generator().manual_seed(0)
    for B in args.batch:
        ids = torch.randint(1, preset["vocab_size"], (B, args.prompt_tokens), generator=gen)
        for sampled in (False, True):
            a, b = hf_generate(model, ids, new_tokens, sampled), ours(model, ids, new_tokens, sampled)  # warm-up
            agree = None if sampled else bool(torch.equal(a, b))
            ta, tb = [], []
            for _ in range(repeats):
                for fn, acc in ((hf_generate, ta), (ours, tb)):
                    t0 = time.perf_counter()
                    fn(model, ids, new_tokens, sampled)
                    acc.append(time.perf_counter() - t0)
            # Pairwise ratios: the machine's speed drifts between pairs, not within one.
            ratio = statistics.median(x / y for x, y in zip(ta, tb))
            rows.append(dict(B=B, mode="sampled" if sampled else "greedy", generate_ms=statistics.median(ta) * 1e3,
                             guided_generate_ms=statistics.median(tb) * 1e3, speedup=ratio, greedy_equal=agree,
                             tokens=B * new_tokens))
    print(f"{'B':>3} {'mode':8} {'generate ms':>12} {'ours ms':>9} {'generate/ours':>14} {'greedy tokens equal':>20}")
    for r in rows:
        eq = "" if r["greedy_equal"] is None else str(r["greedy_equal"])
        print(f"{r['B']:>3} {r['mode']:8} {r['generate_ms']:12.2f} {r['guided_generate_ms']:9.2f} "
              f"{r['speedup']:13.2f}x {eq:>20}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
