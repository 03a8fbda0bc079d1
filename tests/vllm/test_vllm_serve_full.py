"""``bonesoup serve --engine vllm`` with full-weight backbones: pause, re-merge in place (AsyncSoup), resume.

The backbones are the embedded default's LoRA backbones merged into full
checkpoints; references are transformers on ``bonesoup.merge_checkpoints``.
Needs ``bonesoup.vllm.AsyncSoup`` (the full-weight vLLM integration).
"""

from __future__ import annotations

import functools
import random

import pytest
from serve_fixtures import KEY, Client, complete
from vllm_helpers import BETA, PROMPTS, MergeReference, concurrently, serving

from bonesoup.tasks.tiny_qwen2 import make_tiny_qwen2_adapters, materialise_backbones

MAX_TOKENS = 10
TARGETS = [([1.0, 0.0], 0.0), ([0.3, 0.7], 0.0), ([0.6, 0.4], 0.5)]
_complete = functools.partial(complete, max_tokens=MAX_TOKENS)  # -> (status, body, response)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    sft, adapters = make_tiny_qwen2_adapters(root / "lora", 2)
    return sft, materialise_backbones(sft, adapters, root / "full"), root


@pytest.fixture(scope="module")
def server(models):
    sft, backbones, _ = models
    with serving(["--backbones", *backbones, "--sft", sft, "--beta", BETA, "--api-key", KEY, "--dtype", "float32",
                  "--max-model-len", 256]) as s:
        yield s


@pytest.fixture(scope="module")
def reference(models):
    sft, backbones, root = models
    return MergeReference(sft, backbones, root / "merged", beta=BETA)


def test_interleaved_preferences_under_concurrent_load_equal_the_offline_merge(server, reference):
    srv, app, soup = server
    assert soup.mode == "full" and soup.version == 1  # the initial (uniform) merge
    jobs = [(TARGETS[i % 3], PROMPTS[i % len(PROMPTS)]) for i in range(24)]
    random.Random(1).shuffle(jobs)

    results = concurrently(srv, jobs, 8, MAX_TOKENS)
    assert [(s, b) for *_, s, b in results if s != 200] == []
    version_target = {}
    for (pref, alpha), prompt, _, body in results:
        assert body["preference"] == pref and body["alpha"] == alpha
        assert body["choices"][0]["text"] == reference.text(pref, alpha, prompt, MAX_TOKENS), (pref, prompt)
        assert version_target.setdefault(body["weights_version"], (tuple(pref), alpha)) == (tuple(pref), alpha)
    remerges = app.state.engine.remerges
    assert 3 <= len(remerges) - 1 <= len(jobs)  # grouped: at most one re-merge per request, at least one per target
    assert len({tuple(map(tuple, (reference.text(*t, p, MAX_TOKENS) for p in PROMPTS))) for t in TARGETS}) == 3


def test_preference_endpoint_remerges_now(server, reference):
    srv, _, soup = server
    c = Client(srv)
    before = soup.version
    status, body, _ = c.post("/v1/preference", {"preference": [0.2, 0.8]})
    assert status == 200 and body["weights_version"] == before + 1 and body["remerge_seconds"] > 0
    status, out, _ = _complete(c, PROMPTS[0])
    assert status == 200 and out["weights_version"] == before + 1 and out["preference"] == [0.2, 0.8]
    assert out["choices"][0]["text"] == reference.text([0.2, 0.8], 0.0, PROMPTS[0], MAX_TOKENS)
    status, out, _ = c.post("/v1/completions", {"prompt": "Hi", "preference": [0.2, 0.9]})
    assert status == 400 and out["error"]["param"] == "preference"
    assert soup.version == before + 1  # a bad request re-merges nothing
