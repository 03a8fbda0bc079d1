"""A preference change inside vLLM: ours (merge + republish) against vLLM's reload of a merged checkpoint.

One process, three engines on the same model (each with its engine core in its own
process, so every RPC crosses a process boundary the same way), samples
alternating between the methods so all see the same machine:

    ours            SoupLLM.set_preference: coefficients, one RPC that merges the
                    k = n + 1 resident rows in place (one launch per dtype) and
                    republishes (vLLM's own post-load processing: CPU repacking),
                    prefix-cache reset
    ours (views)    the same with publish="views": the linear layers run F.linear
                    on the arena, so nothing is repacked
    reload          a plain vLLM engine: collective_rpc("reload_weights",
                    weights_path=<merged checkpoint written beforehand>) + prefix-cache reset
    write + reload  bonesoup.merge_checkpoints into a new directory, then the same reload

Then decode throughput (greedy, a batch of 4 x 64 new tokens) of the three
engines, alternated: what each publishing mode costs while serving.

Before timing, the engines' greedy tokens are checked to agree at a preference
(so the reload baseline really serves the merge). Models are Qwen2s made in code
(bonesoup.tasks.tiny_qwen2.make_tiny_qwen2): "tiny" (hidden 128, 2 layers, 1.6 MB fp32) and
"300mb" (hidden 1024, 7 layers, ~310 MB fp32). Run it in the vLLM environment:

    PYTHONPATH=. .venv-vllm/bin/python benchmarks/bench_vllm_remerge.py --model tiny --repeats 7
    PYTHONPATH=. .venv-vllm/bin/python benchmarks/bench_vllm_remerge.py --model 300mb --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
for key, value in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1",
                   "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_LOGGING_LEVEL": "WARNING",
                   "VLLM_CACHE_ROOT": str(_ROOT / ".vllm-cache" / "vllm"),
                   "TORCHINDUCTOR_CACHE_DIR": str(_ROOT / ".vllm-cache" / "inductor")}.items():
    os.environ.setdefault(key, value)

MODELS = {  # make_tiny_qwen2 keyword arguments
    "tiny": dict(hidden=128, layers=2, intermediate=256),
    "300mb": dict(hidden=1024, layers=7, intermediate=2816),
}
BETA = 0.7
PREFERENCES = ([0.3, 0.7], [0.8, 0.2])  # alternated, so every sample is a real change


def _greedy(llm, ids, sp):
    return [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)]


def run(model: str, repeats: int, n: int, workdir: Path) -> dict:
    from bonesoup.tasks.tiny_qwen2 import make_tiny_qwen2
    from vllm import LLM, SamplingParams

    from bonesoup import merge_checkpoints
    from bonesoup.vllm import SoupLLM

    t0 = time.perf_counter()
    sft, backbones = make_tiny_qwen2(workdir / "models", n, **MODELS[model])
    merged = [merge_checkpoints(backbones, workdir / f"merged-{i}", preference=p, beta=BETA, sft=sft,
                                progress=False) for i, p in enumerate(PREFERENCES)]
    print(f"[bench] {model}: models written in {time.perf_counter() - t0:.1f} s", flush=True)
    common = dict(dtype="float32", max_model_len=256, max_num_seqs=4, enforce_eager=True)
    ours = SoupLLM(sft, backbones, beta=BETA, **common)
    views = SoupLLM(sft, backbones, beta=BETA, publish="views", **common)
    plain = LLM(model=str(sft), **common)
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    ids = [279, 345, 342, 300, 84]

    # The baseline must serve the same weights: greedy tokens agree at both preferences.
    for p, path in zip(PREFERENCES, merged):
        ours.set_preference(p)
        plain.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        plain.reset_prefix_cache()
        views.set_preference(p)
        a, b, c = _greedy(ours, ids, sp), _greedy(plain, ids, sp), _greedy(views, ids, sp)
        if not a == b == c:
            raise AssertionError(f"at {p}: ours {a}, ours (views) {c}, vLLM's reload of the merged checkpoint {b}")

    samples = {"ours": [], "ours (views)": [], "reload": [], "write + reload": []}
    parts = {"merge_s": [], "publish_s": [], "views_merge_s": []}
    for r in range(repeats):
        i = r % 2
        t = time.perf_counter()
        info = ours.set_preference(PREFERENCES[i])
        samples["ours"].append(time.perf_counter() - t)
        parts["merge_s"].append(info["merge_s"])
        parts["publish_s"].append(info["publish_s"])

        t = time.perf_counter()
        info = views.set_preference(PREFERENCES[i])
        samples["ours (views)"].append(time.perf_counter() - t)
        parts["views_merge_s"].append(info["merge_s"])

        t = time.perf_counter()
        plain.collective_rpc("reload_weights", kwargs={"weights_path": str(merged[i])})
        plain.reset_prefix_cache()
        samples["reload"].append(time.perf_counter() - t)

        out = workdir / f"written-{r}"
        t = time.perf_counter()
        merge_checkpoints(backbones, out, preference=PREFERENCES[i], beta=BETA, sft=sft, progress=False)
        plain.collective_rpc("reload_weights", kwargs={"weights_path": str(out)})
        plain.reset_prefix_cache()
        samples["write + reload"].append(time.perf_counter() - t)
        shutil.rmtree(out)

    # Decode throughput: greedy, 4 prompts x 64 new tokens, engines alternated.
    dsp = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    batch = [{"prompt_token_ids": ids[: 2 + j]} for j in range(4)]
    tps = {"ours": [], "ours (views)": [], "plain vLLM": []}
    for _ in range(3):
        for name, llm in (("ours", ours), ("ours (views)", views), ("plain vLLM", plain)):
            t = time.perf_counter()
            outs = llm.generate(batch, dsp, use_tqdm=False)
            tps[name].append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t))
    param_bytes = ours.info()[0]["param_bytes"]
    del ours, views, plain
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"model": model, "n": n, "param_bytes": param_bytes, "repeats": repeats, "samples_s": samples,
            "median_s": med, "min_s": {k: min(v) for k, v in samples.items()},
            "ours_median_merge_s": statistics.median(parts["merge_s"]),
            "ours_median_publish_s": statistics.median(parts["publish_s"]),
            "views_median_merge_s": statistics.median(parts["views_merge_s"]),
            "reload_over_ours": med["reload"] / med["ours"],
            "write_reload_over_ours": med["write + reload"] / med["ours"],
            "reload_over_views": med["reload"] / med["ours (views)"],
            "decode_tokens_per_s": {k: statistics.median(v) for k, v in tps.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), action="append", help="repeatable; default: both")
    ap.add_argument("--n", type=int, default=2, help="backbones (plus the SFT model)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    import torch
    import vllm

    results = []
    for model in args.model or ["tiny", "300mb"]:
        with tempfile.TemporaryDirectory(prefix="bench-vllm-", dir=_ROOT) as tmp:
            results.append(run(model, args.repeats, args.n, Path(tmp)))
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor()
            or platform.machine(), "cpus": os.cpu_count(), "vllm": vllm.__version__, "torch": torch.__version__,
            "command": " ".join(sys.argv)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"\n{meta['date']}  vllm {meta['vllm']}  torch {meta['torch']}  {meta['cpus']} CPUs")
    print(f"{'model':>6} {'MB':>6} | {'ours ms':>8} ({'merge':>6} {'publish':>7}) {'views ms':>8} | {'reload ms':>9} "
          f"{'write+reload ms':>15} | {'reload/ours':>11} {'write+reload/ours':>17} {'reload/views':>12}")
    for r in results:
        m = r["median_s"]
        print(f"{r['model']:>6} {r['param_bytes'] / 1e6:6.1f} | {m['ours'] * 1e3:8.1f} "
              f"({r['ours_median_merge_s'] * 1e3:6.1f} {r['ours_median_publish_s'] * 1e3:7.1f}) "
              f"{m['ours (views)'] * 1e3:8.1f} | {m['reload'] * 1e3:9.1f} {m['write + reload'] * 1e3:15.1f} | "
              f"{r['reload_over_ours']:10.2f}x {r['write_reload_over_ours']:16.2f}x {r['reload_over_views']:11.2f}x")
    print("(medians over alternated samples; ours = merge + republish + prefix-cache reset, client wall time)")
    print(f"\n{'model':>6} | decode tokens/s (4 x 64 greedy):  {'ours':>8} {'ours (views)':>13} {'plain vLLM':>11}")
    for r in results:
        d = r["decode_tokens_per_s"]
        print(f"{r['model']:>6} | {'':33} {d['ours']:8.1f} {d['ours (views)']:13.1f} {d['plain vLLM']:11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
