"""Serving many preferences at once: per-row adapter mixtures in one batch vs group + re-merge vs one at a time.

16 clients each send one ``/v1/completions`` request at the same moment,
each with its own preference (16 distinct ones, drawn afresh per sample),
to the embedded server (tiny GPT-2, n = 2 LoRA backbones of rank
``--rank`` made in code, ``build_embedded_adapters``), served three ways in
one process:

- ``mixture``: an AdapterSoup server: every request's preference is its
  rows' own coefficients in the same ``guided_generate`` batch, nothing
  re-merged (a round waits up to ``--batch-wait-ms``, default 20, for
  requests still being parsed and tokenised; 0: the first request may run
  alone, the rest together);
- ``group+remerge``: a LiveSoup server over full-weight backbones that are
  the same adapters merged into the SFT weights (``W + D_j``): one re-merge
  and one ``guided_generate`` call per distinct preference, in sequence;
- ``one-at-a-time``: the mixture server with the 16 requests sent one after
  another by one client;
- ``mixture, no wait``: a second AdapterSoup server with ``batch_wait_s`` 0
  (what the wait buys).

Greedy, ``--max-tokens`` new tokens (a row may stop early at EOS; tokens
are counted from ``usage``). A sample is the wall time from releasing the
16 requests to the last reply; modes alternate within each repeat (order
rotated). Reported: requests/s and tokens/s (median over repeats), the
ratio mixture / group+remerge (median of per-repeat ratios, so drift
between repeats cancels; also in process CPU time, which a loaded machine
disturbs less than the wall clock), generate calls, rows per call and re-merges per
sample, and whether the two concurrent modes returned the same texts (they
serve the same merges; a difference can only be a near-tie).

    python benchmarks/bench_serve_preferences.py                # 16 requests, 32 tokens, 5 repeats
    python benchmarks/bench_serve_preferences.py --quick        # seconds (a test runs this)
    python benchmarks/bench_serve_preferences.py --json out/serve-prefs.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_merge import run_info, write_json  # noqa: E402

from transformers import AutoModelForCausalLM  # noqa: E402

from bonesoup.merge.live import LiveSoup  # noqa: E402
from bonesoup.merge.lora import load_adapters  # noqa: E402
from bonesoup.serve import ServerThread, create_app  # noqa: E402
from bonesoup.serve.cli import build_embedded_adapters, load_adapter_soup  # noqa: E402
from bonesoup.tasks.tiny_models import TINY_CORPUS  # noqa: E402

BETA = 0.7
KEY = "bench-key"
MODES = ("mixture", "group+remerge", "one-at-a-time", "mixture, no wait")


class Client:
    def __init__(self, srv):
        self.conn = http.client.HTTPConnection(srv.host, srv.port, timeout=300)
        self.conn.connect()  # outside the timing

    def post(self, body: dict):
        self.conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                          headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        resp = self.conn.getresponse()
        return resp.status, json.loads(resp.read().decode())

    def close(self):
        self.conn.close()


def full_backbones(model, adapters) -> list[dict]:
    """The adapters merged into the SFT weights: backbone j = W + D_j (float64 sum, rounded once)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = []
    for a in adapters:
        b = dict(state)
        for key, d in a.weight_deltas().items():
            b[key] = (state[key].double() + d).to(state[key].dtype)
        out.append(b)
    return out


def concurrent(srv, bodies) -> tuple[float, float, list]:
    """All bodies at once, one connection per request; (wall s, process CPU s, [(status, reply)])."""
    clients = [Client(srv) for _ in bodies]
    results = [None] * len(bodies)
    go = threading.Barrier(len(bodies) + 1)

    def send(i):
        go.wait()
        results[i] = clients[i].post(bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    go.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    for c in clients:
        c.close()
    return wall, cpu, results


def sequential(srv, bodies) -> tuple[float, float, list]:
    c = Client(srv)
    t0, c0 = time.perf_counter(), time.process_time()
    results = [c.post(b) for b in bodies]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    c.close()
    return wall, cpu, results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 tokens, 1 repeat (a test runs this)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--batch-wait-ms", type=float, help="the mixture server's wait for requests still in the door "
                   "(default: the engine's, 20 ms)")
    p.add_argument("--workdir", type=Path, help="where the tiny checkpoints go (default: a temporary directory)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.max_tokens, args.repeats = 4, 1
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-serve-prefs-")
        args.workdir = Path(tmp.name)
    sft, adapter_dirs = build_embedded_adapters(args.workdir, rank=args.rank)
    mix_soup, mix_model, tok = load_adapter_soup(adapter_dirs, sft=sft, beta=BETA, device="cpu")
    mix_soup.set_preference([0.5, 0.5])
    now_soup, now_model, _ = load_adapter_soup(adapter_dirs, sft=sft, beta=BETA, device="cpu")
    now_soup.set_preference([0.5, 0.5])
    live_model = AutoModelForCausalLM.from_pretrained(sft).eval()
    live = LiveSoup(live_model, full_backbones(live_model, load_adapters(adapter_dirs)), beta=BETA)
    live.set_preference([0.5, 0.5])
    wait = None if args.batch_wait_ms is None else args.batch_wait_ms / 1e3
    apps = {"mixture": create_app(mix_soup, mix_model, tok, api_key=KEY, max_tokens_limit=args.max_tokens,
                                  batch_wait_s=wait),
            "group+remerge": create_app(live, live_model, tok, api_key=KEY, max_tokens_limit=args.max_tokens),
            "mixture, no wait": create_app(now_soup, now_model, tok, api_key=KEY, max_tokens_limit=args.max_tokens,
                                           batch_wait_s=0.0)}
    info = run_info("cpu")
    print(f"# {info['date']}  torch {info['torch']} ({info['torch_threads']} threads)  {args.requests} requests x "
          f"{args.max_tokens} tokens, n 2 adapters of rank {args.rank}, repeats {args.repeats}  "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    prompts = [TINY_CORPUS[i % len(TINY_CORPUS)] for i in range(args.requests)]
    samples = {m: [] for m in MODES}
    mismatches, compared = 0, 0
    rng = np.random.default_rng(0)
    with ServerThread(apps["mixture"]) as mix_srv, ServerThread(apps["group+remerge"]) as live_srv, \
            ServerThread(apps["mixture, no wait"]) as now_srv:
        servers = {"mixture": mix_srv, "group+remerge": live_srv, "one-at-a-time": mix_srv,
                   "mixture, no wait": now_srv}
        for rep in range(args.repeats + 1):  # repeat 0 warms up and is not kept
            m1 = rng.permutation(np.linspace(0.02, 0.98, args.requests))  # distinct preferences
            bodies = [{"prompt": pr, "max_tokens": args.max_tokens, "temperature": 0,
                       "preference": [float(m), float(1 - m)]} for pr, m in zip(prompts, m1)]
            texts = {}
            for mode in MODES[rep % len(MODES):] + MODES[: rep % len(MODES)]:
                app = apps["mixture" if mode == "one-at-a-time" else mode]
                engine, metrics = app.state.engine, app.state.metrics
                calls0, rows0 = metrics.totals("bonesoup_generation_batch_rows")
                remerges0 = len(engine.remerges)
                wall, cpu, results = (sequential if mode == "one-at-a-time" else concurrent)(servers[mode], bodies)
                bad = [r for r in results if r[0] != 200]
                if bad:
                    print(f"[bench] {mode}: {len(bad)} requests failed: {bad[0]}", file=sys.stderr)
                    return 1
                calls, rows = metrics.totals("bonesoup_generation_batch_rows")
                texts[mode] = [r[1]["choices"][0]["text"] for r in results]
                if rep:
                    tokens = sum(r[1]["usage"]["completion_tokens"] for r in results)
                    samples[mode].append({"seconds": wall, "cpu_seconds": cpu, "tokens": tokens,
                                          "generate_calls": calls - calls0, "rows": rows - rows0,
                                          "remerges": len(engine.remerges) - remerges0})
            if rep:
                compared += len(bodies)
                mismatches += sum(a != b for a, b in zip(texts["mixture"], texts["group+remerge"]))
    if tmp is not None:
        tmp.cleanup()

    def med(mode, key):
        return statistics.median(s[key] for s in samples[mode])

    table = []
    for mode in MODES:
        rps = statistics.median(args.requests / s["seconds"] for s in samples[mode])
        tps = statistics.median(s["tokens"] / s["seconds"] for s in samples[mode])
        table.append({"mode": mode, "requests_per_s": rps, "tokens_per_s": tps, "median_s": med(mode, "seconds"),
                      "generate_calls": med(mode, "generate_calls"), "rows_per_call":
                      med(mode, "rows") / max(med(mode, "generate_calls"), 1), "remerges": med(mode, "remerges"),
                      "cpu_seconds": med(mode, "cpu_seconds")})
    ratio = {other: statistics.median(b["seconds"] / a["seconds"] for a, b in zip(samples["mixture"],
                                                                                  samples[other]))
             for other in MODES[1:]}
    cpu_ratio = {other: statistics.median(b["cpu_seconds"] / a["cpu_seconds"]
                                          for a, b in zip(samples["mixture"], samples[other])) for other in MODES[1:]}
    print(f"{'mode':17} {'req/s':>8} {'tok/s':>8} {'median s':>9} {'generate calls':>15} {'rows/call':>10} "
          f"{'re-merges':>10} {'CPU s':>7}")
    for x in table:
        print(f"{x['mode']:17} {x['requests_per_s']:8.1f} {x['tokens_per_s']:8.1f} {x['median_s']:9.3f} "
              f"{x['generate_calls']:15.0f} {x['rows_per_call']:10.1f} {x['remerges']:10.0f} {x['cpu_seconds']:7.3f}")
    print(f"mixture / group+remerge requests/s: {ratio['group+remerge']:.2f}x (bar: >= 4x); mixture / one-at-a-time: "
          f"{ratio['one-at-a-time']:.2f}x; mixture / no wait: {ratio['mixture, no wait']:.2f}x; in process CPU "
          f"time: {cpu_ratio['group+remerge']:.2f}x, {cpu_ratio['one-at-a-time']:.2f}x, "
          f"{cpu_ratio['mixture, no wait']:.2f}x; texts differing between mixture and group+remerge: {mismatches} of "
          f"{compared}")
    result = {**info, "requests": args.requests, "max_tokens": args.max_tokens, "rank": args.rank,
              "repeats": args.repeats, "load_avg": os.getloadavg(), "table": table, "samples": samples,
              "speedup_over": ratio, "cpu_speedup_over": cpu_ratio, "text_mismatches": mismatches,
              "texts_compared": compared, "batch_wait_s": apps["mixture"].state.engine.batch_wait_s}
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
