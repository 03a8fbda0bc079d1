"""``bonesoup serve --engine vllm`` on the embedded default (tiny Qwen2 + 2 LoRA backbones, per-request adapters).

One server per module (vLLM's AsyncLLM start-up is the slow part). Every greedy
reply is checked against transformers on the exact merge at the served
preference (vllm_helpers.MixtureReference), under concurrent load with
more distinct preferences than adapter slots (so requests wait for slots, and
adapters are evicted and re-created while others decode).
"""

from __future__ import annotations

import functools
import json
import random

import pytest
from serve_fixtures import KEY, Client, complete
from vllm_helpers import BETA, PROMPTS, MixtureReference, concurrently, serving

MAX_TOKENS = 10
LIMIT = 24
MAX_LORAS = 4
_complete = functools.partial(complete, max_tokens=MAX_TOKENS)  # -> (status, body, response)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving(["--workdir", tmp_path_factory.mktemp("serve-vllm"), "--api-key", KEY, "--max-tokens-limit", LIMIT,
                  "--dtype", "float32", "--max-model-len", 256, "--max-loras", MAX_LORAS]) as s:
        yield s


@pytest.fixture(scope="module")
def reference(server):
    _, _, soup = server
    return MixtureReference(soup.sft, soup.backbones, beta=BETA)


def test_health_models_and_the_embedded_default(server):
    srv, _, soup = server
    c = Client(srv)
    assert c.get("/health", key="")[:2] == (200, {"status": "ok"})
    status, body, _ = c.get("/v1/models")
    assert status == 200
    m = body["data"][0]
    assert (m["n_objectives"], m["method"], m["beta"]) == (2, "bone", BETA)
    assert m["backbones"] == [str(b) for b in soup.backbones] and m["sft"] == soup.sft
    assert m["preference"] == [0.5, 0.5] and m["context_length"] == 256
    assert soup.mode == "adapters"


def test_interleaved_preferences_under_concurrent_load_equal_the_offline_merge(server, reference):
    srv, app, soup = server
    rng = random.Random(0)
    targets = [([1.0, 0.0], 0.0), ([0.0, 1.0], 0.0), ([0.3, 0.7], 0.0), ([0.6, 0.4], 0.5)]
    while len(targets) < 12:  # more distinct preferences than adapter slots (MAX_LORAS)
        a = rng.randrange(0, 10001)
        targets.append(([a / 1e4, 1 - a / 1e4], 0.0))
    jobs = [(targets[i % len(targets)], PROMPTS[i % len(PROMPTS)]) for i in range(36)]
    rng.shuffle(jobs)
    created_before = soup.backend.cache.created

    results = concurrently(srv, jobs, 12, MAX_TOKENS)
    errors = [(s, b) for _, _, s, b in results if s != 200]
    assert errors == []
    versions: dict = {}
    for (pref, alpha), prompt, _, body in results:
        served = body["preference"]
        assert served == pytest.approx(pref, abs=1e-12) and body["alpha"] == pytest.approx(alpha, abs=1e-12)
        assert body["choices"][0]["text"] == reference.text(served, body["alpha"], prompt, MAX_TOKENS), (pref, prompt)
        versions.setdefault(tuple(pref), set()).add(body["weights_version"])
    # The texts differ between preferences (the equality above would catch a mixture that did nothing).
    per_pref = {t: tuple(reference.text(t[0], t[1], p, MAX_TOKENS) for p in PROMPTS) for t in map(
        lambda x: (tuple(x[0]), x[1]), targets[:4])}
    assert len(set(per_pref.values())) == 4
    cache = soup.backend.cache
    assert cache.created - created_before >= len(targets)  # each distinct preference got its adapter ...
    assert len(cache.cached()) <= MAX_LORAS  # ... in at most max_loras slots, the rest evicted from disk
    assert len(list(cache.cache_dir.glob("mix-*"))) == len(cache.cached())
    status, text, _ = Client(srv).get("/metrics")
    assert status == 200 and 'code="500"' not in text


def test_preference_endpoint_sets_the_default(server, reference):
    srv, _, soup = server
    c = Client(srv)
    status, body, _ = c.post("/v1/preference", {"preference": [0.2, 0.8], "alpha": 0.25})
    assert status == 200, body
    assert body["preference"] == pytest.approx([0.2, 0.8]) and body["alpha"] == 0.25
    assert body["coefficients"] == pytest.approx(soup.coefficients([0.2, 0.8], 0.25))
    status, out, _ = _complete(c, PROMPTS[0])  # no preference: the default
    assert status == 200
    assert out["weights_version"] == body["weights_version"] and out["preference"] == pytest.approx([0.2, 0.8])
    assert out["choices"][0]["text"] == reference.text([0.2, 0.8], 0.25, PROMPTS[0], MAX_TOKENS)
    assert c.get("/v1/models")[1]["data"][0]["preference"] == pytest.approx([0.2, 0.8])


def test_preferences_are_rounded_to_the_stated_precision(server):
    srv, _, _ = server
    c = Client(srv)
    a = _complete(c, PROMPTS[1], ([0.3, 0.7], 0.0))[1]
    b = _complete(c, PROMPTS[1], ([0.300004, 0.699996], 0.0))[1]
    assert b["preference"] == a["preference"] == pytest.approx([0.3, 0.7], abs=1e-12)
    assert b["weights_version"] == a["weights_version"] and b["choices"] == a["choices"]


@pytest.mark.parametrize("body,param", [
    ({"preference": [0.5, 0.6]}, "preference"),
    ({"preference": [1.0]}, "preference"),
    ({"preference": [1.5, -0.5]}, "preference"),
    ({"max_tokens": LIMIT + 1}, "max_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"alpha": 1e39, "preference": [0.5, 0.5]}, "alpha"),
    ({"prompt": []}, "prompt"),
    ({"frobnicate": 1}, "frobnicate"),
])
def test_bad_requests_get_4xx_naming_the_field(server, body, param):
    srv, _, _ = server
    c = Client(srv)
    status, out, _ = c.post("/v1/completions", {"prompt": "Hi", "max_tokens": 4, **body})
    assert 400 <= status < 500 and out["error"]["param"] == param, (status, out)
    assert param in out["error"]["message"]
    assert _complete(c, "Hi")[0] == 200  # still serving


def test_malformed_json_and_nan_get_400(server):
    srv, _, _ = server
    c = Client(srv)
    status, out, _ = c.post("/v1/completions", raw=b'{"prompt": "Hi", ')
    assert status == 400 and out["error"]["param"] == "body"
    status, out, _ = c.post("/v1/completions", raw=b'{"prompt": "Hi", "preference": [NaN, 1.0]}')
    assert status == 400 and out["error"]["param"] == "preference"
    status, out, _ = c.post("/v1/preference", {"preference": [0.7, 0.7]})
    assert status == 400 and out["error"]["param"] == "preference"


def test_auth_as_the_hf_engine(server):
    srv, _, _ = server
    c = Client(srv)
    for path, method in (("/v1/completions", "POST"), ("/v1/preference", "POST"), ("/v1/models", "GET"),
                         ("/metrics", "GET")):
        status, out, _ = c.request(method, path, {"prompt": "Hi"} if method == "POST" else None, key="")
        assert status == 401 and out["error"]["type"] == "authentication_error", path
        assert c.request(method, path, None, key="wrong")[0] == 401
    assert c.get("/health", key="")[0] == 200
    assert json.loads(json.dumps(_complete(Client(srv), "Hi")[1]))["object"] == "text_completion"
