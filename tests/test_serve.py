"""`bonesoup serve`: OpenAI-compatible completions over a LiveSoup, on loopback only.

One in-process uvicorn server (127.0.0.1, ephemeral port) serves a tiny GPT-2
soup for the module. Every greedy text is compared with the greedy output of
a model merged offline by ``bonesoup.merge_checkpoints`` at the same
preference and loaded with ``AutoModelForCausalLM``.
"""

import argparse
import http.client
import json
import re
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from bonesoup import merge_checkpoints  # noqa: E402
from bonesoup.merge.live import LiveSoup  # noqa: E402
from bonesoup.serve.server import (  # noqa: E402
    Engine,
    ServerThread,
    _RowSampler,
    _Row,
    add_serve_parser,
    build_from_args,
    create_app,
)
from bonesoup.tasks.tiny_models import make_tiny_backbones  # noqa: E402

KEY = "test-key-123"
MAX_TOKENS = 8
LIMIT = 32
#: (preference, alpha) values the load test interleaves; delta=0.3 backbones make their texts differ.
TARGETS = [((1.0, 0.0), 0.0), ((0.5, 0.5), 0.0), ((0.0, 1.0), 0.0), ((0.8, 0.2), 0.2)]
PROMPTS = ["The user asks", "A helpful answer", "Waves roll in", "Hi", "Numbers like 1, 2, 3",
           "Bone soup merges backbone models with preference weights."]


# ----------------------------------------------------------------------------- fixtures and helpers


def _greedy_texts(model, tok, prompts, max_tokens=MAX_TOKENS):
    """Reference: one prompt per generate call, cut at EOS, special tokens skipped."""
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        with torch.no_grad():
            g = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        new = g[0, ids["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        out.append(tok.decode(new, skip_special_tokens=True))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    sft, bbs = make_tiny_backbones(root, 2, seed=5, delta=0.3)
    tok = AutoTokenizer.from_pretrained(sft)
    refs = {}
    for i, (pref, alpha) in enumerate(TARGETS):
        out = merge_checkpoints(bbs, root / f"ref-{i}", preference=list(pref), beta=0.7, alpha=alpha, sft=sft,
                                progress=False)
        ref_model = AutoModelForCausalLM.from_pretrained(out).eval()
        refs[(pref, alpha)] = dict(zip(PROMPTS, _greedy_texts(ref_model, tok, PROMPTS)))
    # The test means something only if the preferences generate different text.
    assert len({tuple(r.values()) for r in refs.values()}) == len(TARGETS)
    return root, sft, bbs, tok, refs


def _live(tiny):
    _, sft, bbs, tok, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(sft).eval()
    soup = LiveSoup(model, bbs, beta=0.7, sft=sft)
    return soup, model, tok


@pytest.fixture(scope="module")
def server(tiny):
    soup, model, tok = _live(tiny)
    soup.set_preference([0.5, 0.5])
    app = create_app(soup, model, tok, api_key=KEY, max_tokens_limit=LIMIT)
    with ServerThread(app) as srv:
        yield srv, app, soup


class Client:
    """A keep-alive HTTP/1.1 connection to the test server (one per thread)."""

    def __init__(self, srv, key=KEY, timeout=30.0):
        self.conn = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
        self.key = key

    def request(self, method, path, body=None, key=None, raw=None):
        headers = {"Content-Type": "application/json"}
        key = self.key if key is None else key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        self.conn.request(method, path, body=data, headers=headers)
        resp = self.conn.getresponse()
        text = resp.read().decode()
        ctype = resp.getheader("content-type", "")
        return resp.status, (json.loads(text) if ctype.startswith("application/json") else text), resp

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def close(self):
        self.conn.close()


def _complete(client, prompt, target=None, **extra):
    body = {"model": "bonesoup", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    if target is not None:
        body["preference"], body["alpha"] = list(target[0]), target[1]
    return client.post("/v1/completions", body)


# ----------------------------------------------------------------------------- endpoints


def test_health_models_metrics(server):
    srv, _, soup = server
    c = Client(srv)
    status, body, _ = c.get("/health", key="")
    assert status == 200 and body["status"] == "ok"
    status, body, _ = c.get("/v1/models")
    assert status == 200 and body["object"] == "list"
    (m,) = body["data"]
    assert m["id"] == "bonesoup" and m["n_objectives"] == 2 and m["max_tokens_limit"] == LIMIT
    status, text, resp = c.get("/metrics")
    assert status == 200 and resp.getheader("content-type").startswith("text/plain")
    for needle in ("# TYPE bonesoup_remerge_seconds histogram", "# TYPE bonesoup_generation_seconds histogram",
                   "# TYPE bonesoup_requests_total counter", "# TYPE bonesoup_request_errors_total counter",
                   'bonesoup_remerge_seconds_bucket{le="+Inf"}', "bonesoup_weights_version"):
        assert needle in text, needle
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]+="[^"]*",?)*\})? -?[0-9.e+Inf-]+$')
    for line in text.splitlines():
        assert line.startswith("# ") or sample.match(line), line
    c.close()


def test_auth(server):
    srv, _, _ = server
    c = Client(srv)
    for path, method in (("/v1/models", "GET"), ("/metrics", "GET"), ("/v1/completions", "POST"),
                         ("/v1/preference", "POST")):
        for key in ("", "wrong-key"):
            status, body, resp = c.request(method, path, {"prompt": "x"}, key=key)
            assert status == 401, (path, key)
            assert body["error"]["type"] == "authentication_error"
            assert resp.getheader("www-authenticate") == "Bearer"
    for key in (KEY[:-1], KEY + "x", KEY.upper()):
        assert c.request("GET", "/v1/models", key=key)[0] == 401
    for header in (KEY, f"Basic {KEY}", f"Bearer{KEY}"):
        c.conn.request("GET", "/v1/models", headers={"Authorization": header})
        resp = c.conn.getresponse()
        resp.read()
        assert resp.status == 401, header
    c.conn.request("GET", "/v1/models", headers={"Authorization": f"bearer {KEY}"})  # the scheme is case-blind
    resp = c.conn.getresponse()
    resp.read()
    assert resp.status == 200
    assert c.get("/health", key="")[0] == 200
    assert c.get("/health", key="wrong")[0] == 200
    assert c.get("/v1/models")[0] == 200
    c.close()


def test_completion_response_shape(server, tiny):
    srv, _, _ = server
    refs = tiny[4]
    c = Client(srv)
    target = TARGETS[3]
    status, body, _ = _complete(c, PROMPTS[:3], target)
    assert status == 200, body
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "bonesoup"
    assert [ch["index"] for ch in body["choices"]] == [0, 1, 2]
    assert [ch["text"] for ch in body["choices"]] == [refs[target][p] for p in PROMPTS[:3]]
    assert all(ch["finish_reason"] in ("length", "stop") for ch in body["choices"])
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] <= 3 * 8
    assert body["preference"] == list(target[0]) and body["alpha"] == target[1]
    assert isinstance(body["weights_version"], int)
    # Omitted preference: generated at the current weights, and says which.
    status, body2, _ = c.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0})
    assert status == 200
    cur = (tuple(body2["preference"]), body2["alpha"])
    assert body2["choices"][0]["text"] == refs[cur][PROMPTS[0]]
    # /v1/preference re-merges now and reports it.
    status, info, _ = c.post("/v1/preference", {"preference": [0.0, 1.0]})
    assert status == 200 and info["weights_version"] > body2["weights_version"]
    assert info["preference"] == [0.0, 1.0] and info["alpha"] == 0.0 and info["remerge_seconds"] >= 0
    status, body3, _ = c.post("/v1/completions", {"prompt": PROMPTS[1], "max_tokens": MAX_TOKENS, "temperature": 0})
    assert body3["weights_version"] == info["weights_version"] and body3["preference"] == [0.0, 1.0]
    assert body3["choices"][0]["text"] == refs[((0.0, 1.0), 0.0)][PROMPTS[1]]
    c.close()


def test_sampling(server, tiny):
    srv, _, _ = server
    refs = tiny[4]
    c = Client(srv)
    target = TARGETS[1]
    extra = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 1234}
    a = _complete(c, PROMPTS[:2], target, **extra)[1]
    b = _complete(c, PROMPTS[:2], target, **extra)[1]
    assert [ch["text"] for ch in a["choices"]] == [ch["text"] for ch in b["choices"]]  # same seed, same text
    # top_k = 1 goes through the sampler but can only pick the argmax: the greedy text.
    g = _complete(c, PROMPTS[2], target, temperature=1.5, top_k=1, seed=7)[1]
    assert g["choices"][0]["text"] == refs[target][PROMPTS[2]]
    # It does sample: different seeds, different texts; none needs to be the greedy one.
    texts = {_complete(c, PROMPTS[0], target, temperature=1.0, seed=s)[1]["choices"][0]["text"] for s in range(5)}
    assert len(texts) >= 3
    # Unseeded sampled requests are batched; they all succeed.
    results = []

    def fire():
        cl = Client(srv)
        results.append(_complete(cl, PROMPTS[3], target, temperature=1.0)[0])
        cl.close()

    threads = [threading.Thread(target=fire) for _ in range(6)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert results == [200] * 6
    c.close()


# ----------------------------------------------------------------------------- the load test


def test_load_interleaved_preferences_match_offline_merges(server, tiny):
    """~200 greedy requests from 4 threads at 4 interleaved targets, plus /v1/preference calls."""
    srv, app, soup = server
    refs = tiny[4]
    n_threads, per_thread, deadline = 4, 50, time.monotonic() + 60.0
    records, errors, pref_calls = [], [], []
    lock = threading.Lock()

    def worker(t):
        c = Client(srv)
        try:
            for i in range(per_thread):
                if time.monotonic() > deadline:
                    errors.append((t, i, "deadline"))
                    return
                target = TARGETS[(t * 3 + i * (t + 1)) % len(TARGETS)]
                if t == 0 and i % 10 == 5:  # a few explicit re-merges, interleaved with the others
                    status, body, _ = c.post("/v1/preference", {"preference": list(target[0]), "alpha": target[1]})
                    with lock:
                        (pref_calls if status == 200 else errors).append((target, status, body))
                    continue
                prompts = PROMPTS[(t + i) % len(PROMPTS)] if i % 4 else PROMPTS[i % 3: i % 3 + 2]
                status, body, _ = _complete(c, prompts, target)
                with lock:
                    (records if status == 200 else errors).append((target, prompts, status, body))
        except Exception as exc:  # noqa: BLE001 - counted as an error
            errors.append((t, repr(exc)))
        finally:
            c.close()

    engine = app.state.engine
    remerges_before = len(engine.remerges)
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    t0 = time.perf_counter()
    [t.start() for t in threads]
    [t.join(90) for t in threads]
    elapsed = time.perf_counter() - t0
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(records) + len(pref_calls) == n_threads * per_thread and len(pref_calls) == 5

    # Every text is the offline merge's greedy text at the requested preference.
    version_target = {}
    for target, prompts, _, body in records:
        want = [refs[target][p] for p in ([prompts] if isinstance(prompts, str) else prompts)]
        assert [ch["text"] for ch in body["choices"]] == want, (target, prompts, body)
        assert (tuple(body["preference"]), body["alpha"]) == target
        # A version names one set of weights: never two targets for one version.
        assert version_target.setdefault(body["weights_version"], target) == target
    for target, _, body in pref_calls:
        assert version_target.setdefault(body["weights_version"], target) == target
    # ... and the engine's own log of re-merges agrees with what clients saw.
    log = {info.version: (tuple(info.preference), info.alpha) for _, info in list(engine.remerges)}
    for v, target in version_target.items():
        assert log[v] == target, v
    n_remerges = len(engine.remerges) - remerges_before
    assert soup.version == max(log)
    # Same-preference requests are served together: far fewer re-merges than requests.
    assert n_remerges < len(records)
    print(f"\n{len(records)} completions + {len(pref_calls)} /v1/preference in {elapsed:.2f} s, "
          f"{n_remerges} re-merges, {len(version_target)} versions seen")


# ----------------------------------------------------------------------------- bad input

BAD = [
    ({"prompt": "x", "preference": [0.5, 0.3, 0.2]}, 400, "preference"),
    ({"prompt": "x", "preference": [1.5, -0.5]}, 400, "preference"),
    (b'{"prompt": "x", "preference": [NaN, 1.0]}', 400, "preference"),
    (b'{"prompt": "x", "preference": [Infinity, 0]}', 400, "preference"),
    ({"prompt": "x", "preference": [0.5, 0.6]}, 400, "preference"),
    ({"prompt": "x", "preference": "0.5,0.5"}, 400, "preference"),
    ({"prompt": "x", "preference": ["0.5", "0.5"]}, 400, "preference"),
    ({"prompt": "x", "preference": [True, False]}, 400, "preference"),
    (b'{"prompt": "x", "max_tokens": ', 400, "body"),
    (b"[1, 2]", 400, "body"),
    (b"\xff\xfe", 400, "body"),
    ({"prompt": "x", "max_tokens": LIMIT + 1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 8.5}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "top_k": 2.5}, 400, "top_k"),
    ({"prompt": "x", "seed": "abc"}, 400, "seed"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 2, 3]}, 400, "prompt"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": "x", "alpha": "a"}, 400, "alpha"),
    (b'{"prompt": "x", "preference": [0.5, 0.5], "alpha": NaN}', 400, "alpha"),
    ({"prompt": "x", "stop": 5}, 400, "stop"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "stream": True}, 400, "stream"),
    ({"prompt": "x", "preferance": [0.5, 0.5]}, 400, "preferance"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x " * 200}, 400, "prompt"),
]


@pytest.mark.parametrize("body, status, field", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_completion_requests_name_the_field(server, body, status, field):
    srv, _, _ = server
    c = Client(srv)
    raw = body if isinstance(body, bytes) else None
    got, resp, _ = c.post("/v1/completions", None if raw else body, raw=raw)
    assert got == status, resp
    assert resp["error"]["param"] == field and field in resp["error"]["message"], resp
    c.close()


@pytest.mark.parametrize("body, field", [
    ({}, "preference"),
    ({"preference": [1.0]}, "preference"),
    ({"preference": [0.2, 0.2]}, "preference"),
    ({"preference": [0.5, 0.5], "alpha": "x"}, "alpha"),
    ({"preference": [0.5, 0.5], "beta": 0.8}, "beta"),
])
def test_bad_preference_requests_name_the_field(server, body, field):
    srv, _, _ = server
    c = Client(srv)
    got, resp, _ = c.post("/v1/preference", body)
    assert got == 400 and resp["error"]["param"] == field and field in resp["error"]["message"], resp
    c.close()


def test_alpha_without_sft_is_refused(tiny):
    _, sft, bbs, tok, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(sft).eval()
    app = create_app(LiveSoup(model, bbs, beta=0.7), model, tok)
    with ServerThread(app) as srv:
        c = Client(srv, key="")
        got, resp, _ = c.post("/v1/completions", {"prompt": "x", "preference": [0.5, 0.5], "alpha": 0.3})
        assert got == 400 and resp["error"]["param"] == "alpha", resp
        assert c.post("/v1/completions", {"prompt": "x", "preference": [0.5, 0.5], "max_tokens": 2})[0] == 200
        c.close()


def test_still_serves_after_bad_requests(server, tiny):
    srv, app, _ = server
    refs = tiny[4]
    c = Client(srv)
    c.post("/v1/completions", raw=b"{{{{")
    status, body, _ = _complete(c, PROMPTS[0], TARGETS[0])
    assert status == 200 and body["choices"][0]["text"] == refs[TARGETS[0]][PROMPTS[0]]
    assert app.state.engine.alive
    _, text, _ = c.get("/metrics")
    assert re.search(r'bonesoup_request_errors_total\{endpoint="/v1/completions",code="400"\} [1-9]', text)
    c.close()


# ----------------------------------------------------------------------------- the engine, without HTTP


def test_engine_groups_by_preference_and_batched_greedy_matches(tiny):
    _, _, _, tok, refs = tiny
    soup, model, tok = _live(tiny)
    soup.set_preference(list(TARGETS[0][0]), alpha=TARGETS[0][1])
    engine = Engine(soup, model, tok, autostart=False, batch_greedy=True)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    order = [TARGETS[1], TARGETS[2], TARGETS[1], None, TARGETS[2], TARGETS[3]]
    jobs = [engine.make_job(ids, t, max_tokens=MAX_TOKENS) for t in order]
    for j in jobs:
        engine.submit(j)
    v0 = soup.version
    assert engine.step() == len(jobs)
    assert soup.version == v0 + 3  # one re-merge per distinct new target, not per request
    results = [j.future.result(0) for j in jobs]
    for t, r in zip(order, results):
        t = TARGETS[0] if t is None else t
        # All six prompts (different lengths) in ONE padded generate call give the unbatched greedy texts.
        assert [text for text, _, _ in r["rows"]] == [refs[t][p] for p in PROMPTS]
        assert (tuple(r["preference"]), r["alpha"]) == t
    versions = [r["weights_version"] for r in results]
    assert versions[3] == v0  # the current weights go first, without a re-merge
    assert versions[0] == versions[2] == v0 + 1 and versions[1] == versions[4] == v0 + 2
    assert versions[5] == v0 + 3
    assert engine.metrics.batch_rows.sum == len(jobs) * len(PROMPTS) and engine.metrics.batch_rows.count == 4


@pytest.mark.parametrize("temperature, top_k, top_p, want", [
    (1.0, 0, 1.0, [0.4, 0.3, 0.15, 0.1, 0.05]),
    (0.5, 0, 1.0, [16 / 28.5, 9 / 28.5, 2.25 / 28.5, 1 / 28.5, 0.25 / 28.5]),  # p ** 2, renormalised
    (1.0, 2, 1.0, [4 / 7, 3 / 7, 0, 0, 0]),
    (1.0, 0, 0.7, [4 / 7, 3 / 7, 0, 0, 0]),  # the smallest set whose mass reaches 0.7
    (1.0, 0, 0.71, [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0]),
    (1.0, 3, 0.5, [4 / 7, 3 / 7, 0, 0, 0]),
])
def test_row_sampler_distribution(temperature, top_k, top_p, want):
    """Per-row generators draw from the filtered distribution (fixed seeds: deterministic, no flake)."""
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    draws = 2000
    rows = [_Row([1], 1, temperature, top_p, top_k, seed, [], exact=False) for seed in range(draws)]
    scores = p.log().expand(draws, 5).clone()
    out = _RowSampler(rows, torch.device("cpu"))(None, scores)
    assert torch.isfinite(out).sum(1).eq(1).all()  # exactly one token left per row
    freq = torch.bincount(out.argmax(1), minlength=5).double() / draws
    assert freq.tolist() == pytest.approx(want, abs=0.04)
    for w, f in zip(want, freq.tolist()):
        assert w > 0 or f == 0  # filtered tokens are never drawn
    # A row's draw depends on its own seed only, not on the rows beside it.
    alone = _RowSampler(rows[7:8], torch.device("cpu"))(None, scores[7:8])
    assert alone.argmax(1).item() == out[7].argmax().item()
    # Greedy rows pass through untouched.
    greedy = _Row([1], 1, 0.0, 1.0, 0, None, [], exact=True)
    kept = _RowSampler([greedy, rows[0]], torch.device("cpu"))(None, scores[:2])
    assert torch.equal(kept[0], scores[0])


# ----------------------------------------------------------------------------- the command line


def test_cli_parser_and_embedded_default(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser(prog="bonesoup")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    args = parser.parse_args(["serve", "--workdir", str(tmp_path), "--max-tokens-limit", "4", "--device", "cpu"])
    assert args.host == "127.0.0.1" and args.port == 8000 and callable(args.func)
    monkeypatch.setenv("BONESOUP_API_KEY", "env-key")
    app, soup, api_key = build_from_args(args)
    assert api_key == "env-key" and soup.n == 2 and soup.version == 1 and soup.preference == [0.5, 0.5]
    with ServerThread(app) as srv:
        c = Client(srv, key="env-key")
        assert c.get("/v1/models", key="")[0] == 401
        status, body, _ = c.post("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "temperature": 0,
                                                     "preference": [1.0, 0.0]})
        assert status == 200 and body["weights_version"] == 2
        assert c.post("/v1/completions", {"prompt": "Hi", "max_tokens": 5})[0] == 400
        c.close()
    bad = parser.parse_args(["serve", "--backbones", str(tmp_path / "nope"), str(tmp_path / "nope2")])
    with pytest.raises(ValueError, match="--beta"):
        build_from_args(bad)


# ----------------------------------------------------------------------------- the benchmark script


def test_bench_serve_load_quick(tmp_path, capsys, load_benchmark):
    mod = load_benchmark("bench_serve_load")
    out = tmp_path / "r.json"
    rc = mod.main(["--quick", "--duration", "1.0", "--concurrency", "3", "--remerge-every", "0.3",
                   "--prompt", "Hi", "--prompt", "The user asks", "--workdir", str(tmp_path / "w"),
                   "--device", "cpu", "--json", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0, r
    assert r["ok"] == r["requests"] > 0 and r["errors"] == {} and r["hung_clients"] == 0
    assert r["verified"] and r["text_mismatches"] == 0 and r["inconsistent_versions"] == 0
    assert r["remerge"]["count"] >= 1 and r["latency"]["completion"]["p99_ms"] > 0
    assert "re-merge (server, set_preference)" in capsys.readouterr().out
