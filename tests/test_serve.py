"""`bonesoup serve`: OpenAI-compatible completions over a LiveSoup, on loopback only.

One in-process uvicorn server (127.0.0.1, ephemeral port) serves a tiny GPT-2
soup for the module. Every greedy text is compared with ``guided_generate``
on a model merged offline by ``bonesoup.merge_checkpoints`` at the same
preference (serve_fixtures.py). Sampling and hostile input: test_serve_sampling.py,
test_serve_hostile.py.
"""

import argparse
import json
import threading
import time

import pytest
from transformers import AutoModelForCausalLM

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_fixtures import (  # noqa: E402,F401 (serve_tiny: a fixture)
    KEY,
    LIMIT,
    MAX_TOKENS,
    PROMPTS,
    TARGETS,
    Client,
    complete,
    metric_value,
    serve_tiny,
    start_server,
)

from bonesoup.merge.live import LiveSoup  # noqa: E402
from bonesoup.merge.methods import merge_method_names  # noqa: E402
from bonesoup.serve import Engine, ServerThread, add_serve_parser, build_from_args, create_app  # noqa: E402

_complete = complete


@pytest.fixture(scope="module")
def tiny(serve_tiny):
    return serve_tiny


@pytest.fixture(scope="module")
def server(tiny):
    srv, app, soup = start_server(tiny)
    srv.tiny = tiny
    with srv:
        yield srv, app, soup


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
    # Enough to rebuild what the client talks to: the inputs, the method and the current weights.
    tiny = srv.tiny
    assert m["backbones"] == [str(b) for b in tiny.backbones] and m["sft"] == str(tiny.sft)
    assert m["method"] == "bone" and m["method"] in merge_method_names() and m["beta"] == 0.7
    assert m["weights_version"] == soup.version and m["preference"] == soup.preference
    assert m["alpha"] == soup.alpha and m["context_length"] == 128 and m["max_prompt_tokens"] == 127
    status, text, resp = c.get("/metrics")
    assert status == 200 and resp.getheader("content-type").startswith("text/plain")
    for needle in ("# TYPE bonesoup_remerge_seconds histogram", "# TYPE bonesoup_generation_seconds histogram",
                   "# TYPE bonesoup_requests_total counter", "# TYPE bonesoup_request_errors_total counter",
                   "# TYPE bonesoup_completion_tokens_total counter", 'bonesoup_remerge_seconds_bucket{le="+Inf"}',
                   f"bonesoup_weights_version {float(soup.version)}"):
        assert needle in text, needle
    assert metric_value(text, "bonesoup_requests_total", endpoint="/v1/models", code="200") >= 1
    # The exposition format parses (prometheus_client's own parser).
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"bonesoup_remerge_seconds", "bonesoup_requests", "bonesoup_prompt_tokens"} <= set(families)
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
    refs = tiny.greedy
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


# ----------------------------------------------------------------------------- the load test


def test_load_interleaved_preferences_match_offline_merges(server, tiny):
    """~200 greedy requests from 4 threads at 4 interleaved targets, plus /v1/preference calls."""
    srv, app, soup = server
    refs = tiny.greedy
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
    model = AutoModelForCausalLM.from_pretrained(tiny.sft).eval()
    app = create_app(LiveSoup(model, tiny.backbones, beta=0.7), model, tiny.tok)
    with ServerThread(app) as srv:
        c = Client(srv, key="")
        got, resp, _ = c.post("/v1/completions", {"prompt": "x", "preference": [0.5, 0.5], "alpha": 0.3})
        assert got == 400 and resp["error"]["param"] == "alpha", resp
        assert c.post("/v1/completions", {"prompt": "x", "preference": [0.5, 0.5], "max_tokens": 2})[0] == 200
        c.close()


def test_still_serves_after_bad_requests(server, tiny):
    srv, app, _ = server
    refs = tiny.greedy
    c = Client(srv)
    c.post("/v1/completions", raw=b"{{{{")
    status, body, _ = _complete(c, PROMPTS[0], TARGETS[0])
    assert status == 200 and body["choices"][0]["text"] == refs[TARGETS[0]][PROMPTS[0]]
    assert app.state.engine.alive
    _, text, _ = c.get("/metrics")
    assert metric_value(text, "bonesoup_request_errors_total", endpoint="/v1/completions", code="400") >= 1
    c.close()


# ----------------------------------------------------------------------------- the engine, without HTTP


def test_engine_groups_by_preference_and_batched_greedy_matches(tiny):
    refs = tiny.greedy
    soup, model, tok = tiny.live()
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
    assert engine.metrics.totals("bonesoup_generation_batch_rows") == (4, len(jobs) * len(PROMPTS))


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


def test_stop_strings_cut_at_the_earliest_occurrence(server, tiny):
    # OpenAI's `stop`: the text ends before the first stop sequence to appear, whatever its place in the
    # list; a later-listed one that starts earlier (and overlaps the other) still wins.
    srv, _, _ = server
    c = Client(srv)
    target = TARGETS[3]
    text = next(t for t in (tiny.greedy[target][p] for p in PROMPTS) if len(t) >= 4 and t[0:2] != t[1:3])
    prompt = next(p for p in PROMPTS if tiny.greedy[target][p] == text)
    stops = [text[2:4], text[1:3]]
    want = text[:min(text.find(s) for s in stops)]
    status, body, _ = _complete(c, prompt, target, stop=stops)
    assert status == 200, body
    assert body["choices"][0]["text"] == want and body["choices"][0]["finish_reason"] == "stop"
    c.close()
