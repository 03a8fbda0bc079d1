"""Hostile input (issue 13): every refusal is a 4xx naming the field or the body, and the server keeps serving.

A fuzz test of the protocol (hypothesis, derandomised), a fixed list of
hostile bodies (deep nesting, overflowing numbers, lone surrogates, huge
prompts and bodies, coefficients past float32), a concurrent burst that mixes
them with well-formed requests, and /health while a prompt is being tokenised.
"""

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from serve_fixtures import PROMPTS, TARGETS, Client, complete, serve_tiny, start_server  # noqa: E402,F401

from bonesoup.serve import CompletionRequest, PreferenceRequest, ServerThread, create_app  # noqa: E402

BODY_LIMIT = 2**20


@pytest.fixture(scope="module")
def server(serve_tiny):
    srv, app, soup = start_server(serve_tiny, api_key=None, max_body_bytes=BODY_LIMIT)
    with srv:
        yield srv, app, soup


def _nested(depth: int) -> bytes:
    return b'{"prompt": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"


#: (raw body or dict, status, param)
HOSTILE = [
    (b"[" * 100_000, 400, "body"),  # RecursionError in the parser
    (_nested(600), 400, "prompt"),  # parses; deep, but the wrong type at the top
    (b'{"prompt": "x", "temperature": 1e400}', 400, "temperature"),  # parses to inf
    (b'{"prompt": "x", "top_p": -1e400}', 400, "top_p"),
    (b'{"prompt": "x", "top_k": 1e400}', 400, "top_k"),
    (b'{"prompt": "x", "seed": 1' + b"0" * 30 + b"}", 400, "seed"),  # over 64 bits
    (b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}", 400, "body"),  # over Python's int-digits limit
    (b'{"prompt": "x", "max_tokens": 99999999999999999999999999}', 400, "max_tokens"),
    (b'{"prompt": "x", "temperature": 10000000000000000000000000000000000000000000000}', 400, "temperature"),
    (b'{"prompt": "x", "preference": [1e400, 0]}', 400, "preference"),
    (b'{"prompt": "\\ud800 lone surrogate"}', 400, "prompt"),
    (b'{"prompt": ["ok", "a\\udfffb"]}', 400, "prompt"),
    (b'{"prompt": "x", "stop": ["\\ud83d"]}', 400, "stop"),
    (b'{"prompt": "x", "user": "\\udc00"}', 400, "user"),
    ({"prompt": "x", "preference": [0.5, 0.5], "alpha": 1e39}, 400, "alpha"),  # coefficients overflow float32
    ({"prompt": "x", "preference": [1.0, 0.0], "alpha": -3e38}, 400, "alpha"),
    ({"prompt": "x", "temperature": 1e-45}, 400, "temperature"),  # subnormal in float32: 1 / T is inf
    ({"prompt": "x", "temperature": 1e-50}, 400, "temperature"),  # rounds to 0 in float32
    ({"prompt": "x", "temperature": 1e39}, 400, "temperature"),  # inf in float32
    ({"prompt": "x", "top_p": 1e-50}, 400, "top_p"),
    ({"prompt": "x", "min_p": 2}, 400, "min_p"),
    ({"prompt": "x " * 5000}, 400, "prompt"),  # over the prompt-token limit
    ({"prompt": ["x"] * 65}, 400, "prompt"),
    ({"prompt": [["x"]]}, 400, "prompt"),
    ({"prompt": "x", "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"prompt": "x", "preference": {"a": 1}}, 400, "preference"),
    (b'{"prompt": "' + b"x" * (BODY_LIMIT + 1) + b'"}', 413, "body"),
    (b'{"prompt": "x"', 400, "body"),
    (b"null", 400, "body"),
    (b'"just a string"', 400, "body"),
]


def _post(c, body, path="/v1/completions"):
    raw = body if isinstance(body, bytes) else None
    return c.post(path, None if raw else body, raw=raw)


def _check_error(status, resp, want_status, want_param):
    assert status == want_status, resp
    err = resp["error"]
    assert err["param"] == want_param and err["message"].startswith(want_param), resp
    assert err["code"] == want_status and err["type"]


@pytest.mark.parametrize("body, status, param", HOSTILE, ids=[f"{i}-{h[2]}" for i, h in enumerate(HOSTILE)])
def test_hostile_bodies_get_a_4xx_naming_the_field(server, body, status, param):
    srv, app, _ = server
    c = Client(srv)
    got, resp, _ = _post(c, body)
    _check_error(got, resp, status, param)
    c.close()
    assert app.state.engine.alive


def test_prompt_plus_max_tokens_must_fit_the_context(server, serve_tiny):
    srv, _, _ = server
    c = Client(srv)
    prompt = "x " * 50
    n = len(serve_tiny.tok(prompt)["input_ids"])
    assert n + 32 > 128 > n  # the tiny model's context is 128 tokens
    got, resp, _ = c.post("/v1/completions", {"prompt": prompt, "max_tokens": 32})
    _check_error(got, resp, 400, "max_tokens")
    assert c.post("/v1/completions", {"prompt": prompt, "max_tokens": 128 - n, "temperature": 0})[0] == 200
    c.close()


@pytest.mark.parametrize("body, param", [
    ({"preference": [0.5, 0.5], "alpha": 1e39}, "alpha"),
    (b'{"preference": [0.5, 0.5], "alpha": 1e400}', "alpha"),
    (b'{"preference": [NaN, 0.5]}', "preference"),
    (b'{"preference": "\\ud800"}', "preference"),
    (b'{"preference": [0.5, 0.5], "extra": {"deep": [[[[[]]]]]}}', "extra"),
])
def test_hostile_preference_bodies(server, body, param):
    srv, _, soup = server
    before = soup.version
    c = Client(srv)
    got, resp, _ = _post(c, body, "/v1/preference")
    _check_error(got, resp, 400, param)
    assert soup.version == before  # refused before anything was queued
    c.close()


# ----------------------------------------------------------------------------- fuzz

FIELDS = sorted(CompletionRequest.model_fields)
_leaf = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
         | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
         | st.sampled_from(["\ud800", "a\udfffb", "NaN", "Infinity", "-inf", "1e400", "\x00", "\U0001f4a5", ""]))
_json = st.recursive(_leaf, lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=6), ch,
                                                                                   max_size=4), max_leaves=12)
_key = st.sampled_from(FIELDS) | st.text(max_size=8)
_bodies = (st.builds(lambda extra: {"prompt": "Hi", "max_tokens": 2, **extra},
                     st.dictionaries(_key, _json, max_size=4))
           | st.dictionaries(_key, _json, max_size=6) | _json)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_bodies, preference_endpoint=st.booleans())
def test_fuzz_never_a_5xx_and_every_4xx_names_a_field(server, body, preference_endpoint):
    srv, _, _ = server
    path = "/v1/preference" if preference_endpoint else "/v1/completions"
    fields = PreferenceRequest.model_fields if preference_endpoint else CompletionRequest.model_fields
    c = Client(srv)
    try:
        status, resp, _ = c.post(path, raw=json.dumps(body).encode())  # NaN/Infinity as JSON extensions
    finally:
        c.close()
    assert status < 500, (body, resp)
    if status >= 400:
        param = resp["error"]["param"]
        assert isinstance(param, str) and resp["error"]["message"].startswith(param), resp
        named = set(body) if isinstance(body, dict) else set()
        assert param == "body" or param in named or param in fields, (param, body)
    else:
        assert status == 200 and ("choices" in resp or "weights_version" in resp), resp


# ----------------------------------------------------------------------------- a burst under load


def test_burst_with_hostile_requests_well_formed_ones_still_exact(server, serve_tiny):
    srv, app, _ = server
    refs = serve_tiny.greedy
    results, lock = [], threading.Lock()
    barrier = threading.Barrier(6)

    def worker(t):
        c = Client(srv)
        barrier.wait(30)
        try:
            for i in range(12):
                if (t + i) % 3 == 0:
                    body, status, param = HOSTILE[(t * 5 + i) % len(HOSTILE)]
                    got, resp, _ = _post(c, body)
                    if got == 413:  # the server closes a connection whose body it did not read
                        c.close()
                        c = Client(srv)
                    with lock:
                        results.append(("hostile", (status, param), (got, resp)))
                else:
                    target = TARGETS[(t + i) % len(TARGETS)]
                    prompt = PROMPTS[(t * 7 + i) % len(PROMPTS)]
                    got, resp, _ = complete(c, prompt, target)
                    with lock:
                        results.append(("good", refs[target][prompt], (got, resp)))
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not any(t.is_alive() for t in threads) and len(results) == 72
    for kind, want, (got, resp) in results:
        if kind == "good":
            assert got == 200 and resp["choices"][0]["text"] == want, resp
        else:
            _check_error(got, resp, *want)
    assert app.state.engine.alive


# ----------------------------------------------------------------------------- the event loop stays free


class _GatedTokenizer:
    """A tokenizer that blocks on prompts over 100 kB until released: a long tokenisation, made certain."""

    def __init__(self, tok):
        object.__setattr__(self, "_tok", tok)
        object.__setattr__(self, "entered", threading.Event())
        object.__setattr__(self, "release", threading.Event())

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __setattr__(self, name, value):
        setattr(self._tok, name, value)

    def __call__(self, texts, **kw):
        if any(len(t) > 100_000 for t in texts):
            self.entered.set()
            self.release.wait(60)
        return self._tok(texts, **kw)


def test_health_answers_while_a_huge_prompt_is_tokenised(serve_tiny):
    soup, model, tok = serve_tiny.live()
    soup.set_preference([0.5, 0.5])
    gated = _GatedTokenizer(tok)
    app = create_app(soup, model, gated)
    with ServerThread(app) as srv:
        big = {}

        def send_big():
            c = Client(srv, key="", timeout=120)
            big["reply"] = c.post("/v1/completions", {"prompt": "word " * 200_000})[:2]  # 1 MB of text
            c.close()

        th = threading.Thread(target=send_big)
        th.start()
        try:
            assert gated.entered.wait(30)
            c = Client(srv, key="", timeout=5)
            for _ in range(5):  # the tokeniser is busy in its thread; the loop is not
                t0 = time.perf_counter()
                status, body, _ = c.get("/health")
                assert status == 200 and body["status"] == "ok" and time.perf_counter() - t0 < 2.0
            status, body, _ = c.get("/v1/models")
            assert status == 200 and body["data"][0]["weights_version"] == soup.version
            c.close()
        finally:
            gated.release.set()
            th.join(120)
        _check_error(*big["reply"], 400, "prompt")  # then refused as too long, before any work is queued
