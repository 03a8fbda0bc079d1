"""Load test of ``bonesoup serve``: concurrent clients at interleaved preferences, plus re-merges.

One process starts the server in a thread on 127.0.0.1 (an ephemeral port;
loopback only) and runs ``--concurrency`` client threads for ``--duration``
seconds (and at most ``--max-requests`` requests). Each client sends
``/v1/completions`` requests whose preference is drawn from a fixed set, so
consecutive requests at the server interleave preferences and force
re-merges; one more client calls ``/v1/preference`` every
``--remerge-every`` seconds. It then reports client-side latency
percentiles (overall, per preference, /v1/preference), the server's re-merge
times (from the engine's log), generate calls and rows per call, errors, and
two correctness checks: every response's weights_version names one
preference only, and (``--verify``, default for the embedded model with
greedy decoding) every text equals the greedy output of ``guided_generate`` (the
one decode loop) on the model merged offline by ``bonesoup.merge_checkpoints``
at that preference.

    python benchmarks/bench_serve_load.py                       # 20 s, 8 clients, embedded tiny GPT-2
    python benchmarks/bench_serve_load.py --quick               # 3 s, 4 clients
    python benchmarks/bench_serve_load.py --duration 60 --concurrency 16 --json out/serve-load.json
    python benchmarks/bench_serve_load.py --backbones B1 B2 --sft S --beta 0.7 --device cuda --no-verify

Exit status 1 when any request failed or any check did not hold.
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import random
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from bonesoup.merge.methods import merge_method_names
from bonesoup.serve import ServerThread, build_embedded_default, create_app, load_live_soup
from bonesoup.tasks.tiny_models import TINY_CORPUS


def default_targets(n: int) -> list[list[float]]:
    """Corners, the uniform preference and one lopsided mix: 4 preferences for n = 2."""
    first = [1.0] + [0.0] * (n - 1)
    last = [0.0] * (n - 1) + [1.0]
    uniform = [1.0 / n] * n
    mix = [0.8] + [0.2 / (n - 1)] * (n - 1)
    out = []
    for t in (first, uniform, last, mix):
        if t not in out:
            out.append(t)
    return out


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else float("nan")


def summary(xs) -> dict:
    return {"count": len(xs), "p50_ms": pct(xs, 50) * 1e3, "p90_ms": pct(xs, 90) * 1e3,
            "p99_ms": pct(xs, 99) * 1e3, "max_ms": (max(xs) * 1e3) if xs else float("nan"),
            "mean_ms": (sum(xs) / len(xs) * 1e3) if xs else float("nan")}


class Client:
    def __init__(self, host: str, port: int, key: str | None, timeout: float = 120.0):
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"

    def post(self, path: str, body: dict):
        self.conn.request("POST", path, body=json.dumps(body).encode(), headers=self.headers)
        resp = self.conn.getresponse()
        return resp.status, json.loads(resp.read().decode() or "null")

    def close(self):
        self.conn.close()


def reference_texts(backbones, sft, beta, method, targets, alpha, prompts, max_tokens, tokenizer, workdir):
    """Greedy texts of offline merges (one per target), one prompt per guided_generate call."""
    from transformers import AutoModelForCausalLM

    from bonesoup import merge_checkpoints
    from bonesoup.decode.guided import guided_generate

    refs = {}
    for i, pref in enumerate(targets):
        out = merge_checkpoints(backbones, Path(workdir) / f"ref-{i}", preference=pref, beta=beta, alpha=alpha,
                                sft=sft, method=method, force=True, progress=False)
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        eos = tokenizer.eos_token_id
        texts = {}
        for p in prompts:
            ids = torch.tensor([tokenizer(p)["input_ids"] or [eos]])
            g = guided_generate(model, [], [1.0], ids, temperature=0.0, max_new_tokens=max_tokens)
            new = g.new_tokens[0, : int(g.lengths[0])].tolist()
            if new and new[-1] == eos:
                new = new[:-1]
            texts[p] = tokenizer.decode(new, skip_special_tokens=True)
        refs[tuple(pref)] = texts
        del model
    return refs


def run(args) -> dict:
    import transformers

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    embedded = not args.backbones
    if embedded:
        sft, backbones = build_embedded_default(args.workdir)
        beta, model_dir = 0.7 if args.beta is None else args.beta, sft
    else:
        if args.method == "bone" and args.beta is None:
            raise SystemExit("--beta is required with --backbones (method bone)")
        sft, backbones, beta, model_dir = args.sft, args.backbones, args.beta, args.model_dir
    soup, model, tok = load_live_soup(backbones, beta=beta, sft=sft, model_dir=model_dir, method=args.method,
                                      device=args.device, dtype=args.dtype)
    targets = [list(t) for t in args.preference] if args.preference else default_targets(soup.n)
    prompts = args.prompt or list(TINY_CORPUS)
    greedy = args.temperature == 0
    verify = greedy and (args.verify if args.verify is not None else embedded)
    refs = {}
    if verify:
        print(f"[bench] references: {len(targets)} offline merges x {len(prompts)} prompts ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-serve-refs-") as tmp:
            refs = reference_texts(backbones, sft, beta, args.method, targets, args.alpha, prompts, args.max_tokens,
                                   tok, tmp)
    soup.set_preference(targets[0], alpha=args.alpha)
    key = "bench-key"
    app = create_app(soup, model, tok, api_key=key, max_tokens_limit=max(args.max_tokens, 1),
                     default_alpha=args.alpha, batch_greedy=args.batch_greedy, max_batch_size=args.max_batch_size)
    engine = app.state.engine

    lock = threading.Lock()
    records = []  # (target index, latency s, status, body, prompts)
    pref_records = []  # (target index, latency s, status, body)
    issued = [0]
    stop = threading.Event()

    with ServerThread(app) as srv:
        start = time.monotonic()
        deadline = start + args.duration

        def take() -> bool:
            with lock:
                if issued[0] >= args.max_requests or time.monotonic() >= deadline:
                    return False
                issued[0] += 1
                return True

        def client(t: int) -> None:
            rng = random.Random(args.seed * 7919 + t)
            c = Client(srv.host, srv.port, key)
            try:
                while not stop.is_set() and take():
                    ti = rng.randrange(len(targets))
                    ps = [prompts[rng.randrange(len(prompts))] for _ in range(args.prompts_per_request)]
                    body = {"prompt": ps if len(ps) > 1 else ps[0], "max_tokens": args.max_tokens,
                            "temperature": args.temperature, "preference": targets[ti], "alpha": args.alpha}
                    t0 = time.perf_counter()
                    try:
                        status, resp = c.post("/v1/completions", body)
                    except Exception as exc:  # noqa: BLE001 - a failed request is an error, not a crash
                        status, resp = -1, {"error": repr(exc)}
                        c.close()
                        c = Client(srv.host, srv.port, key)
                    with lock:
                        records.append((ti, time.perf_counter() - t0, status, resp, ps))
            finally:
                c.close()

        def remerger() -> None:
            c = Client(srv.host, srv.port, key)
            i = 0
            try:
                while not stop.wait(args.remerge_every) and time.monotonic() < deadline:
                    ti = i % len(targets)
                    i += 1
                    t0 = time.perf_counter()
                    try:
                        status, resp = c.post("/v1/preference", {"preference": targets[ti], "alpha": args.alpha})
                    except Exception as exc:  # noqa: BLE001
                        status, resp = -1, {"error": repr(exc)}
                    with lock:
                        pref_records.append((ti, time.perf_counter() - t0, status, resp))
            finally:
                c.close()

        remerges_before = len(engine.remerges)
        threads = [threading.Thread(target=client, args=(t,), daemon=True) for t in range(args.concurrency)]
        if args.remerge_every > 0:
            threads.append(threading.Thread(target=remerger, daemon=True))
        for th in threads:
            th.start()
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()) + args.drain_timeout)
        stop.set()
        hung = sum(th.is_alive() for th in threads)
        elapsed = time.monotonic() - start
        remerges = list(engine.remerges)[remerges_before:]
        m = engine.metrics
        gen_calls, gen_rows = m.totals("bonesoup_generation_batch_rows")
        gen_calls = int(gen_calls)
        gen_seconds = m.totals("bonesoup_generation_seconds")[1]

    # Checks.
    ok = [r for r in records if r[2] == 200]
    errors: dict[str, int] = {}
    for r in records + pref_records:
        if r[2] != 200:
            errors[str(r[2])] = errors.get(str(r[2]), 0) + 1
    version_target: dict[int, tuple] = {}
    inconsistent = 0
    for ti, _, _, body, _ in ok:
        tgt = (tuple(body["preference"]), body["alpha"])
        if tgt != (tuple(targets[ti]), args.alpha):
            inconsistent += 1
        if version_target.setdefault(body["weights_version"], tgt) != tgt:
            inconsistent += 1
    log = {info.version: (tuple(info.preference), info.alpha) for _, info in remerges}
    for v, tgt in version_target.items():
        if v in log and log[v] != tgt:
            inconsistent += 1
    mismatches = 0
    if verify:
        for ti, _, _, body, ps in ok:
            want = [refs[tuple(targets[ti])][p] for p in ps]
            mismatches += sum(ch["text"] != w for ch, w in zip(body["choices"], want))
    tokens = sum(b["usage"]["completion_tokens"] for _, _, _, b, _ in ok)

    result = {
        "bench": "serve_load",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "device": str(soup.device)},
        "model": "embedded tiny GPT-2" if embedded else str(model_dir),
        "param_bytes": soup.param_bytes,
        "config": {"duration_s": args.duration, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                   "prompts_per_request": args.prompts_per_request, "temperature": args.temperature,
                   "targets": targets, "alpha": args.alpha, "remerge_every_s": args.remerge_every,
                   "batch_greedy": args.batch_greedy, "max_batch_size": args.max_batch_size},
        "elapsed_s": elapsed,
        "requests": len(records), "ok": len(ok), "errors": errors, "hung_clients": hung,
        "requests_per_s": len(ok) / elapsed if elapsed else float("nan"),
        "completion_tokens_per_s": tokens / elapsed if elapsed else float("nan"),
        "latency": {
            "completion": summary([r[1] for r in ok]),
            **{f"completion@{targets[i]}": summary([r[1] for r in ok if r[0] == i]) for i in range(len(targets))},
            "/v1/preference": summary([r[1] for r in pref_records if r[2] == 200]),
        },
        "remerge": {**summary([info.seconds for _, info in remerges]),
                    "by_reason": {k: sum(1 for r, _ in remerges if r == k) for k in ("request", "api")},
                    "bytes_moved_each": remerges[0][1].bytes_moved if remerges else 0},
        "generate": {"calls": gen_calls, "rows_per_call": gen_rows / gen_calls if gen_calls else float("nan"),
                     "mean_ms": gen_seconds / gen_calls * 1e3 if gen_calls else float("nan")},
        "versions_seen": len(version_target),
        "inconsistent_versions": inconsistent,
        "verified": verify, "text_mismatches": mismatches if verify else None,
    }
    return result


def print_table(r: dict) -> None:
    c = r["config"]
    print(f"\nbonesoup serve load: {r['elapsed_s']:.1f} s, {c['concurrency']} clients, {len(c['targets'])} "
          f"preferences, max_tokens {c['max_tokens']}, temperature {c['temperature']}, "
          f"{'batched greedy' if c['batch_greedy'] else 'exact greedy'}, {r['machine']['device']}, "
          f"model {r['model']} ({r['param_bytes'] / 2**20:.1f} MiB)")
    print(f"{r['ok']} ok / {r['requests']} completions ({r['requests_per_s']:.1f} req/s, "
          f"{r['completion_tokens_per_s']:.0f} tok/s); generate calls {r['generate']['calls']} "
          f"({r['generate']['rows_per_call']:.2f} prompts each, {r['generate']['mean_ms']:.2f} ms mean); "
          f"re-merges {r['remerge']['count']} ({r['remerge']['by_reason']['request']} for requests, "
          f"{r['remerge']['by_reason']['api']} via /v1/preference)")
    print(f"checks: versions seen {r['versions_seen']}, inconsistent {r['inconsistent_versions']}; texts "
          + (f"verified against offline merges, mismatches {r['text_mismatches']}" if r["verified"] else
             "not verified") + f"; errors {r['errors'] or 0}; hung clients {r['hung_clients']}\n")
    head = f"{'what':<34}{'count':>8}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}"
    print(head)
    print("-" * len(head))
    rows = [*r["latency"].items(), ("re-merge (server, set_preference)", r["remerge"])]
    for name, s in rows:
        print(f"{name:<34}{s['count']:>8}{s['p50_ms']:>10.2f}{s['p90_ms']:>10.2f}{s['p99_ms']:>10.2f}"
              f"{s['max_ms']:>10.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, help="seconds of load (default 20; --quick 3)")
    ap.add_argument("--concurrency", type=int, help="client threads (default 8; --quick 4)")
    ap.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many completions")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--prompts-per-request", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default; verifiable)")
    ap.add_argument("--preference", type=float, nargs="+", action="append",
                    help="a preference to draw from (repeat the flag; default: corners, uniform, 0.8/0.2)")
    ap.add_argument("--alpha", type=float, default=0.0)
    ap.add_argument("--remerge-every", type=float, help="seconds between /v1/preference calls (0: none; "
                    "default 1, --quick 0.5)")
    ap.add_argument("--batch-greedy", action="store_true", help="server batches greedy prompts too")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--prompt", action="append", help="prompts to draw from (default: the tiny corpus)")
    ap.add_argument("--verify", dest="verify", action="store_true", default=None,
                    help="check greedy texts against offline merges (default: on for the embedded model)")
    ap.add_argument("--no-verify", dest="verify", action="store_false")
    ap.add_argument("--backbones", nargs="+", type=Path)
    ap.add_argument("--sft", type=Path)
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--beta", type=float)
    ap.add_argument("--method", choices=merge_method_names(), default="bone")
    ap.add_argument("--device", help="default: cuda when available")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--workdir", type=Path, default=Path("out") / "serve-bench",
                    help="embedded model: where its tiny checkpoints go")
    ap.add_argument("--seed", type=int, default=0, help="seeds the clients' choices")
    ap.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to wait for in-flight requests")
    ap.add_argument("--quick", action="store_true", help="defaults --duration 3 --concurrency 4 --remerge-every 0.5")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    for name, normal, quick in (("duration", 20.0, 3.0), ("concurrency", 8, 4), ("remerge_every", 1.0, 0.5)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else normal)
    if args.duration <= 0 or args.concurrency < 1 or args.max_tokens < 1 or args.prompts_per_request < 1:
        ap.error("--duration, --concurrency, --max-tokens and --prompts-per-request must be positive")
    r = run(args)
    print_table(r)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    bad = r["errors"] or r["hung_clients"] or r["inconsistent_versions"] or (r["text_mismatches"] or 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
