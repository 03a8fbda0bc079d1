"""The server samples through the one decode loop: the seeded contract, the distribution, per-row isolation.

Contract (DESIGN.md, "Serving API"): a completion request with one prompt,
``seed: s``, ``temperature``, ``top_k``, ``top_p``, ``max_tokens: N`` at
preference mu returns exactly the tokens of ``guided_generate(model merged
at mu, [], [1.0], ids, seed=s, ...)``, whatever else is being served.
"""

import threading

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from sampling_checks import chi_square_pvalue, warped_probs  # noqa: E402
from serve_fixtures import MAX_TOKENS, PROMPTS, TARGETS, Client, complete, serve_tiny, start_server  # noqa: E402,F401

from bonesoup.decode.batching import row_seeds  # noqa: E402
from bonesoup.serve import Engine, RequestError  # noqa: E402

#: (prompt, target, temperature, top_k, top_p, min_p, seed, max_tokens)
CONTRACT = [
    (PROMPTS[0], TARGETS[0], 1.0, 0, 1.0, 0.0, 0, MAX_TOKENS),
    (PROMPTS[1], TARGETS[1], 0.7, 20, 1.0, 0.0, 1234, MAX_TOKENS),
    (PROMPTS[2], TARGETS[2], 1.3, 0, 0.9, 0.0, 2**63 + 5, 12),
    (PROMPTS[3], TARGETS[3], 0.9, 50, 0.95, 0.0, -7, MAX_TOKENS),
    (PROMPTS[4], TARGETS[1], 1.0, 0, 1.0, 0.05, 99, 5),
    (PROMPTS[5], TARGETS[0], 2.0, 5, 0.8, 0.0, 31337, 16),
]


@pytest.fixture(scope="module")
def server(serve_tiny):
    srv, app, soup = start_server(serve_tiny)
    with srv:
        yield srv, app, soup


def test_seeded_requests_return_guided_generate_tokens_under_load(server, serve_tiny):
    srv, _, _ = server
    tiny = serve_tiny
    want = {i: tiny.reference(t, p, max_tokens=n, temperature=T, top_k=k, top_p=tp, min_p=mp, seed=s)
            for i, (p, t, T, k, tp, mp, s, n) in enumerate(CONTRACT)}
    # The test means something only if it samples: not every reply is the greedy text.
    assert sum(want[i][0] != tiny.greedy[c[1]].get(c[0]) for i, c in enumerate(CONTRACT)) >= 3
    got, stop = {}, threading.Event()

    def noise(t):  # other preferences, unseeded batched sampling, greedy: all at once
        c = Client(srv)
        for i in range(40):
            if stop.is_set():
                break
            complete(c, PROMPTS[(t + i) % len(PROMPTS)], TARGETS[(t * 3 + i) % len(TARGETS)],
                     temperature=[0.0, 1.0][i % 2], max_tokens=4)
        c.close()

    def contract(i):
        p, t, T, k, tp, mp, s, n = CONTRACT[i]
        c = Client(srv)
        for _ in range(2):  # twice: the second lands among other load too
            status, body, _ = complete(c, p, t, temperature=T, top_k=k, top_p=tp, min_p=mp, seed=s, max_tokens=n)
            assert status == 200, body
            got.setdefault(i, []).append((body["choices"][0]["text"], body["usage"]["completion_tokens"]))
        c.close()

    noisy = [threading.Thread(target=noise, args=(t,)) for t in range(3)]
    workers = [threading.Thread(target=contract, args=(i,)) for i in range(len(CONTRACT))]
    [t.start() for t in noisy + workers]
    [t.join(120) for t in workers]
    stop.set()
    [t.join(120) for t in noisy]
    assert not any(t.is_alive() for t in noisy + workers)
    for i in range(len(CONTRACT)):
        assert got[i] == [want[i], want[i]], (CONTRACT[i], got[i], want[i])


def test_prompt_i_of_a_seeded_request_uses_row_seeds(server, serve_tiny):
    """k prompts with seed s: prompt i samples with key row_seeds(s, k)[i], exactly."""
    srv, _, _ = server
    c = Client(srv)
    s, target, prompts = 4242, TARGETS[1], PROMPTS[:4]
    status, body, _ = complete(c, prompts, target, temperature=1.0, seed=s)
    assert status == 200, body
    keys = row_seeds(s, len(prompts))
    for i, p in enumerate(prompts):
        text, n = serve_tiny.reference(target, p, temperature=1.0, seed=keys[i: i + 1])
        assert body["choices"][i]["text"] == text, i
    # row_seeds(s, 1)[0] == row_seeds(s, k)[0]: prompt 0 alone with seed s gets prompt 0's reply.
    alone = complete(c, prompts[0], target, temperature=1.0, seed=s)[1]
    assert alone["choices"][0]["text"] == body["choices"][0]["text"]
    c.close()


# ----------------------------------------------------------------------------- the sampled distribution

DIST_PROMPT = "The user asks"
#: (temperature, top_k, top_p, min_p)
DIST_SETTINGS = [(1.0, 0, 1.0, 0.0), (0.7, 20, 1.0, 0.0), (1.3, 0, 0.9, 0.0), (1.0, 0, 1.0, 0.05)]


@pytest.fixture(scope="module")
def batched_server(serve_tiny):
    # batch_greedy: the seeded draws go 64 to a guided_generate call (fast); the prompt is the same
    # in every row, so there is no padding and the logits are the unbatched ones.
    srv, app, soup = start_server(serve_tiny, batch_greedy=True, max_batch_size=64)
    with srv:
        yield srv, app, soup


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", DIST_SETTINGS)
def test_sampled_token_distribution_chi_square(batched_server, serve_tiny, temperature, top_k, top_p, min_p):
    srv, _, _ = batched_server
    tiny, target = serve_tiny, TARGETS[1]
    ids = torch.tensor([tiny.tok(DIST_PROMPT)["input_ids"]])
    with torch.no_grad():
        z = tiny.merged(target)(ids).logits[:, -1].float()
    probs = warped_probs(z, temperature, top_k, top_p, min_p)[0]
    # The reply is text: tokens that decode to the same text form one cell (EOS: its own, "<stop>").
    eos = tiny.tok.eos_token_id
    cell_of, cell_idx = {}, []
    for v in range(probs.numel()):
        key = "<stop>" if v == eos else tiny.tok.decode([v], skip_special_tokens=True)
        cell_idx.append(cell_of.setdefault(key, len(cell_of)))
    cell_idx = torch.tensor(cell_idx)
    cells = torch.zeros(len(cell_of), dtype=torch.float64).index_add_(0, cell_idx, probs)
    counts = torch.zeros(len(cell_of), dtype=torch.float64)
    c = Client(srv)
    for r in range(32):  # 32 requests x 64 prompts = 2048 draws, fixed seeds: deterministic
        status, body, _ = complete(c, [DIST_PROMPT] * 64, target, temperature=temperature, top_k=top_k,
                                   top_p=top_p, min_p=min_p, seed=1000 * r + 17, max_tokens=1)
        assert status == 200, body
        for ch in body["choices"]:
            counts[cell_of["<stop>" if ch["finish_reason"] == "stop" else ch["text"]]] += 1
    c.close()
    assert counts.sum() == 2048
    p, df = chi_square_pvalue(counts, cells)
    assert df >= 3 and p > 1e-3, (p, df)
    if (temperature, top_k, top_p, min_p) != (1.0, 0, 1.0, 0.0):
        # Power: at the same threshold the same draws reject the unfiltered softmax.
        plain = torch.zeros_like(cells).index_add_(0, cell_idx, warped_probs(z, 1.0, 0, 1.0, 0.0)[0])
        assert chi_square_pvalue(counts, plain)[0] < 1e-3


# ----------------------------------------------------------------------------- per-row isolation


class _NaNForMarkedRows(torch.nn.Module):
    """The served model, but rows whose prompt holds ``marker`` get NaN logits at the prefill step."""

    def __init__(self, inner, marker: int):
        super().__init__()
        self.inner, self.marker = inner, marker
        self.config, self.generation_config = inner.config, inner.generation_config

    def forward(self, input_ids=None, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        if input_ids.shape[1] > 1:
            rows = (input_ids == self.marker).any(-1)
            out.logits[rows] = float("nan")
        return out


def test_an_invalid_row_fails_its_request_only(serve_tiny):
    """A row the sampler cannot sample (NaN logits) fails its own request (422); the rest of the batch is exact."""
    tiny = serve_tiny
    soup, model, tok = tiny.live()
    target = TARGETS[1]
    soup.set_preference(list(target[0]), alpha=target[1])
    enc = lambda p: tok(p)["input_ids"]  # noqa: E731
    marker = enc(PROMPTS[3])[0]
    assert all(marker not in enc(p) for p in PROMPTS[:3] + PROMPTS[5:6]), "pick prompts without the marker"
    engine = Engine(soup, _NaNForMarkedRows(model, marker), tok, autostart=False, batch_greedy=True)  # one batch
    greedy = engine.make_job([enc(p) for p in PROMPTS[:3]], target, max_tokens=MAX_TOKENS)
    bad = engine.make_job([enc(PROMPTS[3])], target, max_tokens=MAX_TOKENS, temperature=0.7)
    sampled = engine.make_job([enc(PROMPTS[5])], target, max_tokens=MAX_TOKENS, temperature=1.0, top_k=1, seed=3)
    for j in (greedy, bad, sampled):
        engine.submit(j)
    assert engine.step() == 3
    with pytest.raises(RequestError) as err:
        bad.future.result(0)
    # The logits (not the temperature) are at fault here; TARGETS[1] has alpha 0.
    assert err.value.status == 422 and err.value.param == "preference" and "step 0" in err.value.message
    assert [t for t, _, _ in greedy.future.result(0)["rows"]] == [tiny.greedy[target][p] for p in PROMPTS[:3]]
    assert sampled.future.result(0)["rows"][0][0] == tiny.greedy[target][PROMPTS[5]]  # top_k=1: the argmax


def test_an_invalid_row_over_http(server, serve_tiny):
    """Unseeded sampled requests are batched; the one with a subnormal temperature gets a 4xx naming it, the others 200."""
    srv, app, _ = server
    target, results = TARGETS[1], {}
    barrier = threading.Barrier(6)

    def fire(i):
        c = Client(srv)
        barrier.wait(30)
        results[i] = complete(c, PROMPTS[i % len(PROMPTS)], target, temperature=1e-45 if i == 0 else 1.0)[:2]
        c.close()

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    status, body = results[0]
    assert status in (400, 422) and body["error"]["param"] == "temperature", body
    for i in range(1, 6):
        assert results[i][0] == 200 and results[i][1]["usage"]["completion_tokens"] >= 1, results[i]
    assert app.state.engine.alive
