"""Fixtures shared by the server tests: a tiny GPT-2 soup, offline merges as references, an HTTP client.

Import into a test module: ``from serve_fixtures import Client, serve_tiny, ...``.
References are computed by the one decode loop on a model merged offline by
``bonesoup.merge_checkpoints`` (never by the server's own LiveSoup), one
prompt per ``guided_generate`` call.
"""

from __future__ import annotations

import http.client
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bonesoup import merge_checkpoints
from bonesoup.decode.guided import guided_generate
from bonesoup.merge.live import LiveSoup
from bonesoup.tasks.tiny_models import make_tiny_backbones

KEY = "test-key-123"
MAX_TOKENS = 8
LIMIT = 32
BETA = 0.7
#: (preference, alpha) values the tests interleave; delta=0.3 backbones make their texts differ.
TARGETS = [((1.0, 0.0), 0.0), ((0.5, 0.5), 0.0), ((0.0, 1.0), 0.0), ((0.8, 0.2), 0.2)]
PROMPTS = ["The user asks", "A helpful answer", "Waves roll in", "Hi", "Numbers like 1, 2, 3",
           "Bone soup merges backbone models with preference weights."]


class Tiny:
    """The soup's inputs and one offline-merged reference model per target."""

    def __init__(self, root):
        self.root = root
        self.sft, self.backbones = make_tiny_backbones(root, 2, seed=5, delta=0.3)
        self.tok = AutoTokenizer.from_pretrained(self.sft)
        self.tok.padding_side = "left"
        self._models = {}
        self.greedy = {t: {p: self.reference(t, p)[0] for p in PROMPTS} for t in TARGETS}
        # The tests mean something only if the preferences generate different text.
        assert len({tuple(r.values()) for r in self.greedy.values()}) == len(TARGETS)

    def merged(self, target):
        """The model merged offline at ``target`` = (preference, alpha)."""
        if target not in self._models:
            pref, alpha = target
            out = merge_checkpoints(self.backbones, self.root / f"ref-{len(self._models)}", preference=list(pref),
                                    beta=BETA, alpha=alpha, sft=self.sft, progress=False)
            self._models[target] = AutoModelForCausalLM.from_pretrained(out).eval()
        return self._models[target]

    def reference(self, target, prompt, *, max_tokens=MAX_TOKENS, temperature=0.0, seed=0, **kw):
        """(text, token count) of ``guided_generate`` on the offline merge: the server's contract."""
        ids = torch.tensor([self.tok(prompt)["input_ids"]])
        out = guided_generate(self.merged(target), [], [1.0], ids, seed=seed, temperature=temperature,
                              max_new_tokens=max_tokens, **kw)
        toks = out.new_tokens[0, : int(out.lengths[0])].tolist()
        if toks and toks[-1] == self.tok.eos_token_id:
            toks = toks[:-1]
        return self.tok.decode(toks, skip_special_tokens=True), len(toks)

    def live(self):
        """(soup, model, tokenizer): a fresh live model over the backbones."""
        model = AutoModelForCausalLM.from_pretrained(self.sft).eval()
        return LiveSoup(model, self.backbones, beta=BETA, sft=self.sft), model, self.tok


_TINY: dict = {}  # one Tiny per session: each importing module gets its own copy of the fixture


@pytest.fixture(scope="session")
def serve_tiny(tmp_path_factory):
    import transformers

    key = str(tmp_path_factory.getbasetemp())
    if key not in _TINY:
        transformers.logging.disable_progress_bar()
        with torch.random.fork_rng(devices=[]):
            _TINY[key] = Tiny(tmp_path_factory.mktemp("serve"))
    return _TINY[key]


def start_server(tiny: Tiny, **kw):
    """A ServerThread (not yet started) over a fresh live soup at (0.5, 0.5)."""
    from bonesoup.serve import ServerThread, create_app

    soup, model, tok = tiny.live()
    soup.set_preference([0.5, 0.5])
    kw.setdefault("api_key", KEY)
    kw.setdefault("max_tokens_limit", LIMIT)
    app = create_app(soup, model, tok, backbones=tiny.backbones, sft=tiny.sft, **kw)
    return ServerThread(app), app, soup


class Client:
    """A keep-alive HTTP/1.1 connection to the test server (one per thread)."""

    def __init__(self, srv, key=KEY, timeout=60.0):
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


def complete(client, prompt, target=None, **extra):
    body = {"model": "bonesoup", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    if target is not None:
        body["preference"], body["alpha"] = list(target[0]), target[1]
    return client.post("/v1/completions", body)


def metric_value(text: str, sample: str, **labels) -> float | None:
    """The value of ``sample`` with exactly ``labels`` in Prometheus exposition ``text`` (None if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and s.labels == labels:
                return s.value
    return None
