"""`bonesoup serve` with LoRA backbones: every request's preference in one batch, no re-merge.

The server holds an AdapterSoup over tiny rank-4 adapters made in code
(``build_embedded_adapters``). Every reply is compared with the one decode
loop on a model merged exactly from the adapters at that request's
preference (``_merged_model``: the SFT weights plus ``sum_j c_j D_j`` in
float64, as tests/test_lora_mixture.py builds it), one prompt per
``guided_generate`` call. A greedy row may differ from its reference only at
a near-tie: the reference's two candidate logits within 1e-4.
"""

from __future__ import annotations

import argparse
import copy
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_fixtures import KEY, Client, metric_value  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import bonesoup.serve.engine as engine_module  # noqa: E402
from bonesoup import merge_coefficients  # noqa: E402
from bonesoup.decode.batching import row_seeds  # noqa: E402
from bonesoup.decode.guided import guided_generate  # noqa: E402
from bonesoup.lora import AdapterSoup, load_adapter  # noqa: E402
from bonesoup.serve import ServerThread, add_serve_parser, build_from_args, create_app  # noqa: E402
from bonesoup.serve.cli import build_embedded_adapters  # noqa: E402
from bonesoup.tasks.tiny_models import TINY_CORPUS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BETA = 0.7
MAX_TOKENS = 8
NEAR_TIE = 1e-4
PROMPTS = ["The user asks", "Hi", "Waves roll in", "Numbers like 1, 2, 3", *TINY_CORPUS[:12]]  # 16 distinct


class LoraTiny:
    """Adapters, the SFT model, and exact full-weight references at any (preference, alpha)."""

    def __init__(self, root):
        self.sft, self.adapters = build_embedded_adapters(root, n=2, rank=4, seed=3)
        self.tok = AutoTokenizer.from_pretrained(self.sft)
        self.base = AutoModelForCausalLM.from_pretrained(self.sft).eval()
        self.deltas = [load_adapter(d).weight_deltas() for d in self.adapters]
        self._models = {}

    def merged(self, pref, alpha=0.0):
        """The model merged at (pref, alpha): W + sum_j c_j D_j in float64, rounded once."""
        key = (tuple(pref), alpha)
        if key not in self._models:
            c, _ = merge_coefficients(list(pref), method="bone", beta=BETA, alpha=alpha)
            model = copy.deepcopy(self.base)
            state = model.state_dict()
            with torch.no_grad():
                for k in self.deltas[0]:
                    state[k].copy_((state[k].double() + sum(cj * d[k] for cj, d in zip(c, self.deltas))).float())
            self._models[key] = model
        return self._models[key]

    def reference(self, prompt, pref, alpha=0.0, **kw):
        ids = torch.tensor([self.tok(prompt)["input_ids"]])
        out = guided_generate(self.merged(pref, alpha), [], [1.0], ids, max_new_tokens=MAX_TOKENS, **kw)
        return out.new_tokens[0, : int(out.lengths[0])].tolist()

    def text(self, toks):
        if toks and toks[-1] == self.tok.eos_token_id:
            toks = toks[:-1]
        return self.tok.decode(toks, skip_special_tokens=True)

    def live(self):
        model = AutoModelForCausalLM.from_pretrained(self.sft).eval()
        soup = AdapterSoup(model, self.adapters, beta=BETA)
        return soup, model, self.tok


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    import transformers

    transformers.logging.disable_progress_bar()
    return LoraTiny(tmp_path_factory.mktemp("serve-lora"))


@pytest.fixture
def server(lora):
    soup, model, tok = lora.live()
    app = create_app(soup, model, tok, api_key=KEY, max_tokens_limit=32, backbones=lora.adapters, sft=lora.sft)
    with ServerThread(app) as srv:
        yield srv, app, soup


def _paused(app):
    """Stop the engine's worker so that concurrent requests queue up and are served in one round."""
    engine = app.state.engine
    engine.stop()
    engine.autostart = False
    return engine


def _record_calls(monkeypatch):
    """Record every guided_generate call the engine makes: (prompt ids per row, seeds, new tokens)."""
    calls = []

    def recording(*args, **kw):
        out = guided_generate(*args, **kw)
        ids, mask = args[3], args[4]
        rows = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]
        calls.append((rows, kw["seed"].tolist(),
                      [out.new_tokens[b, : int(out.lengths[b])].tolist() for b in range(ids.shape[0])]))
        return out

    monkeypatch.setattr(engine_module, "guided_generate", recording)
    return calls


def _post_concurrently(srv, engine, bodies):
    """POST every body from its own thread while the engine is paused; then serve them in one round."""
    results = [None] * len(bodies)

    def send(i):
        c = Client(srv)
        results[i] = c.post("/v1/completions", bodies[i])[:2]
        c.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while engine.queue_depth < len(bodies):
        assert time.monotonic() < deadline, "the requests did not all reach the engine"
        time.sleep(0.01)
    engine.start()
    for t in threads:
        t.join(120)
    return results


def _served_tokens(calls, prompt_ids):
    """The tokens the engine decoded for the row whose prompt is ``prompt_ids`` (unique in the test)."""
    found = [(seeds[b], toks[b]) for rows, seeds, toks in calls for b, r in enumerate(rows) if r == prompt_ids]
    assert len(found) == 1, f"prompt {prompt_ids} decoded {len(found)} times"
    return found[0]


def _random_targets(n, seed):
    rng = np.random.default_rng(seed)
    m1 = rng.uniform(0, 1, n)
    alphas = np.where(rng.uniform(size=n) < 0.5, 0.0, rng.uniform(0, 0.3, n))
    return [([float(m), float(1 - m)], float(a)) for m, a in zip(m1, alphas)]


def test_16_preferences_in_one_batch_give_each_rows_merged_greedy_text(server, lora, monkeypatch):
    srv, app, soup = server
    engine = _paused(app)
    calls = _record_calls(monkeypatch)
    targets = _random_targets(16, seed=0)
    bodies = [{"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "preference": pref, "alpha": alpha}
              for p, (pref, alpha) in zip(PROMPTS, targets)]
    v0 = soup.version
    results = _post_concurrently(srv, engine, bodies)
    # One guided_generate call for all 16 preferences; nothing re-merged, the base weights untouched.
    assert [len(rows) for rows, _, _ in calls] == [16]
    assert engine.metrics.totals("bonesoup_generation_batch_rows") == (1, 16)
    assert soup.version == v0 and len(engine.remerges) == 0
    for (k, v), w in zip(soup.model.state_dict().items(), lora.base.state_dict().values()):
        assert torch.equal(v, w), k
    texts = set()
    near_ties = 0
    for prompt, (pref, alpha), (status, body) in zip(PROMPTS, targets, results):
        assert status == 200, body
        assert body["preference"] == pref and body["alpha"] == alpha and body["weights_version"] == v0
        served = _served_tokens(calls, lora.tok(prompt)["input_ids"])[1]
        ref = lora.reference(prompt, pref, alpha, temperature=0.0)
        assert body["choices"][0]["text"] == lora.text(served)
        texts.add(body["choices"][0]["text"])
        if served != ref:  # allowed only at a near-tie of the reference model itself
            t = next(i for i, (a, b) in enumerate(zip(served, ref)) if a != b)
            seq = torch.tensor([lora.tok(prompt)["input_ids"] + ref[:t]])
            with torch.no_grad():
                z = lora.merged(pref, alpha)(input_ids=seq).logits[0, -1].double()
            gap = float(z[ref[t]] - z[served[t]])
            assert 0 <= gap < NEAR_TIE, (prompt, pref, alpha, t, gap)
            near_ties += 1
    assert near_ties <= 2, near_ties  # padding moves logits by ~1e-6: a near-tie is rare, not the rule
    assert len(texts) >= 12  # the preferences (and prompts) generate different text: the test can fail


def test_seeded_rows_keep_their_row_seeds_keys_in_the_mixed_batch(server, lora, monkeypatch):
    srv, app, _ = server
    engine = _paused(app)
    calls = _record_calls(monkeypatch)
    targets = _random_targets(8, seed=1)
    sampling = {"temperature": 0.9, "top_k": 40, "top_p": 0.95}
    # 8 requests of 2 prompts each: prompt i of a request with seed s samples with row_seeds(s, 2)[i].
    bodies = [{"prompt": PROMPTS[2 * i: 2 * i + 2], "max_tokens": MAX_TOKENS, "seed": 1000 + i,
               "preference": pref, "alpha": alpha, **sampling} for i, (pref, alpha) in enumerate(targets)]
    results = _post_concurrently(srv, engine, bodies)
    assert [len(rows) for rows, _, _ in calls] == [16]
    for i, ((pref, alpha), (status, body)) in enumerate(zip(targets, results)):
        assert status == 200, body
        keys = row_seeds(1000 + i, 2).tolist()
        for j, prompt in enumerate(PROMPTS[2 * i: 2 * i + 2]):
            key, served = _served_tokens(calls, lora.tok(prompt)["input_ids"])
            assert key == keys[j]
            ref = lora.reference(prompt, pref, alpha, seed=torch.tensor([key]), **sampling)
            assert served == ref, (i, j)
            assert body["choices"][j]["text"] == lora.text(ref)


def test_a_round_waits_for_requests_in_the_door_then_batches_them(lora, monkeypatch):
    from bonesoup.serve import Engine

    calls = _record_calls(monkeypatch)
    soup, model, tok = lora.live()
    engine = Engine(soup, model, tok, batch_wait_s=30.0)
    jobs = [engine.make_job([tok(p)["input_ids"]], ((0.3 + 0.1 * i, 0.7 - 0.1 * i), 0.0), max_tokens=2)
            for i, p in enumerate(PROMPTS[:2])]
    try:
        with engine.arriving():  # a second request is still being tokenised
            engine.submit(jobs[0])
            time.sleep(0.3)
            assert not jobs[0].future.done() and calls == []  # the round waits for it
            engine.submit(jobs[1])
        for j in jobs:
            j.future.result(60)
        assert [len(rows) for rows, _, _ in calls] == [2]  # one batch, two preferences
        engine.batch_wait_s = 0.05
        with engine.arriving():  # bounded: a request that never arrives holds the round up 50 ms at most
            job = engine.make_job([tok("Hi")["input_ids"]], None, max_tokens=2)
            engine.submit(job)
            job.future.result(60)
    finally:
        engine.stop()


def test_shared_preference_models_and_metrics(server, lora):
    srv, app, soup = server
    c = Client(srv)
    status, body, _ = c.get("/v1/models")
    (m,) = body["data"]
    assert m["backbone_kind"] == "lora" and m["backbones"] == [str(a) for a in lora.adapters]
    assert m["adapters"] == [{"path": str(a), "rank": 4} for a in lora.adapters] and m["sft"] == str(lora.sft)
    assert m["preference"] == [0.5, 0.5] and m["weights_version"] == soup.version
    # /v1/preference: the shared default changes; no weight is written, nothing is re-merged.
    status, info, _ = c.post("/v1/preference", {"preference": [0.9, 0.1], "alpha": 0.1})
    assert status == 200 and info["weights_version"] == m["weights_version"] + 1 and info["bytes_moved"] == 0
    c_ref, _ = merge_coefficients([0.9, 0.1], method="bone", beta=BETA, alpha=0.1)
    assert info["coefficients"] == pytest.approx(list(c_ref), abs=1e-12)
    status, body, _ = c.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0})
    assert status == 200 and body["preference"] == [0.9, 0.1] and body["alpha"] == 0.1
    assert body["weights_version"] == info["weights_version"]
    assert body["choices"][0]["text"] == lora.text(lora.reference(PROMPTS[0], [0.9, 0.1], 0.1, temperature=0.0))
    assert c.get("/v1/models")[1]["data"][0]["preference"] == [0.9, 0.1]
    status, text, _ = c.get("/metrics")
    assert metric_value(text, "bonesoup_weights_version") == info["weights_version"]
    assert metric_value(text, "bonesoup_remerges_total", reason="api") is None  # no re-merge was counted
    # Bad preferences are refused as with full-weight backbones, naming the field.
    status, body, _ = c.post("/v1/completions", {"prompt": "Hi", "preference": [0.9, 0.3]})
    assert status == 400 and body["error"]["param"] == "preference"
    c.close()


def test_embedded_adapters_load_in_peft_as_the_deltas_we_mix(lora):
    peft = pytest.importorskip("peft")
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(lora.base), lora.adapters[1]).merge_and_unload()
    state, base = merged.state_dict(), lora.base.state_dict()
    assert len(lora.deltas[1]) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks
    for key, d in lora.deltas[1].items():
        torch.testing.assert_close(state[key].double() - base[key].double(), d, rtol=0, atol=1e-6)
    assert 0.2 < float(torch.cat([d.flatten() for d in lora.deltas[1].values()]).std()) < 0.4  # delta = 0.3


def test_cli_adapters_and_embedded_lora_default(tmp_path, lora):
    parser = argparse.ArgumentParser(prog="bonesoup")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--lora-rank", "2", "--workdir", str(tmp_path), "--device", "cpu"])
    app, soup, _ = build_from_args(args)
    assert isinstance(soup, AdapterSoup) and [a.rank for a in soup.adapters] == [2, 2] and app.state.engine.adapters
    assert app.state.engine.batch_greedy  # adapters batch greedy rows by default
    args = parser.parse_args(["serve", "--adapters", *map(str, lora.adapters), "--sft", str(lora.sft), "--beta",
                              "0.7", "--no-batch-greedy", "--device", "cpu"])
    app, soup, _ = build_from_args(args)
    assert isinstance(soup, AdapterSoup) and not app.state.engine.batch_greedy
    with pytest.raises(ValueError, match="--sft"):
        build_from_args(parser.parse_args(["serve", "--adapters", *map(str, lora.adapters), "--beta", "0.7"]))
    with pytest.raises(ValueError, match="not on the SFT model"):
        build_from_args(parser.parse_args(["serve", "--adapters", *map(str, lora.adapters), "--sft", str(tmp_path),
                                           "--beta", "0.7", "--device", "cpu"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--adapters", "a", "--backbones", "b"])


def test_cli_backbones_of_adapter_dirs_serve_as_adapters(lora, monkeypatch):
    # As `bonesoup merge` and --engine vllm: adapter directories are told apart by adapter_config.json.
    parser = argparse.ArgumentParser(prog="bonesoup")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--backbones", *map(str, lora.adapters), "--sft", str(lora.sft), "--beta",
                              "0.7", "--device", "cpu"])
    app, soup, _ = build_from_args(args)
    assert isinstance(soup, AdapterSoup) and app.state.engine.adapters
    assert args.backbones == list(lora.adapters)  # the caller's namespace is not changed
    with pytest.raises(ValueError, match="mixes LoRA adapter directories"):
        build_from_args(parser.parse_args(["serve", "--backbones", str(lora.adapters[0]), str(lora.sft), "--sft",
                                           str(lora.sft), "--beta", "0.7", "--device", "cpu"]))
    # --engine vllm reads --backbones: --adapters reaches it there (not the embedded default), --lora-rank is refused.
    import bonesoup.serve.vllm_engine as vllm_engine

    seen = []
    monkeypatch.setattr(vllm_engine, "build_vllm_app", lambda a: seen.append(a.backbones) or "app")
    assert build_from_args(parser.parse_args(["serve", "--engine", "vllm", "--adapters", *map(str, lora.adapters),
                                              "--sft", str(lora.sft), "--beta", "0.7"])) == "app"
    assert seen == [list(lora.adapters)]
    with pytest.raises(ValueError, match="--lora-rank"):
        build_from_args(parser.parse_args(["serve", "--engine", "vllm", "--lora-rank", "4"]))
