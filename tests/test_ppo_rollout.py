"""Rollout details: pad != EOS, left padding with explicit position ids, rollouts through the one decode
loop (per-sample keys, EOS truncation, greedy == generate, the tempered distribution), log-probs."""

from types import SimpleNamespace

import pytest
import torch

from bonesoup.decode.batching import derive_seed, left_pad_prompts, position_ids_from_mask
from bonesoup.train.ppo.rollout import (
    check_special_tokens,
    generate_rollout,
    logprobs_from_logits,
    response_logits,
    sample_rollouts,
)

PROMPTS = ["The user asks", "A", "Waves roll in, grey and slow, and"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def tiny():
    """A tiny GPT-2 with a wide init: peaked, context-dependent logits (greedy is not a tie-break)."""
    from transformers import GPT2LMHeadModel

    from bonesoup.tasks.tiny_models import make_tiny_tokenizer, tiny_gpt2_config

    tok = make_tiny_tokenizer()
    config = tiny_gpt2_config(tok)
    config.initializer_range = 0.2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).eval()
    return model, tok


def _keys(*indices, seed=5):
    return torch.tensor([derive_seed(seed, 0, i) for i in indices], dtype=torch.int64)


def _rollout(model, tok, ids, mask, keys, T, temperature=1.0, eos_id=None):
    return generate_rollout(model, ids, mask, seeds=keys, max_new_tokens=T, temperature=temperature,
                            eos_id=tok.eos_token_id if eos_id is None else eos_id, pad_id=tok.pad_token_id)


def test_pad_must_differ_from_eos(tiny):
    _, tok = tiny
    assert check_special_tokens(tok) == (tok.pad_token_id, tok.eos_token_id)

    class Tok:
        eos_token_id, pad_token_id = 5, 5

    with pytest.raises(ValueError, match="pad_token_id equals eos_token_id"):
        check_special_tokens(Tok())
    Tok.pad_token_id = None
    with pytest.raises(ValueError, match="no pad_token_id"):
        check_special_tokens(Tok())


def test_left_padding_and_position_ids(tiny):
    _, tok = tiny
    ids, mask = left_pad_prompts(tok, PROMPTS)
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    P = max(lengths)
    assert ids.shape == (3, P) and mask.sum(1).tolist() == lengths
    for i, L in enumerate(lengths):
        assert torch.all(ids[i, :P - L] == tok.pad_token_id) and torch.all(mask[i, :P - L] == 0)
        assert ids[i, P - L:].tolist() == tok(PROMPTS[i], add_special_tokens=False)["input_ids"]
    pos = position_ids_from_mask(mask)
    assert pos[1].tolist() == [0] * (P - 1) + [0]
    assert pos[0, -1].item() == lengths[0] - 1
    assert pos[2].tolist() == list(range(P))
    wide, _ = left_pad_prompts(tok, PROMPTS, width=P + 3)
    assert wide.shape == (3, P + 3)
    cut, cut_mask = left_pad_prompts(tok, PROMPTS, max_prompt_tokens=2)
    assert cut.shape == (3, 2) and cut[2].tolist() == ids[2, -2:].tolist() and cut_mask[1].tolist() == [0, 1]
    with pytest.raises(ValueError, match="prompts must be"):
        left_pad_prompts(tok, "one string")


def test_left_padded_logits_match_unpadded(tiny):
    model, tok = tiny
    ids, mask = left_pad_prompts(tok, PROMPTS)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        # Without explicit position ids the pads would count as positions: the logits differ (the trap).
        naive = model(input_ids=ids, attention_mask=mask).logits
        for i, p in enumerate(PROMPTS):
            alone = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
            ref = model(input_ids=alone).logits[0]
            L = alone.shape[1]
            torch.testing.assert_close(padded[i, -L:], ref, rtol=1e-5, atol=1e-5)
            if L < ids.shape[1]:
                assert not torch.allclose(naive[i, -L:], ref, atol=1e-3)


def test_rollout_tokens_depend_on_the_key_not_on_the_batch(tiny):
    model, tok = tiny
    ids, mask = left_pad_prompts(tok, PROMPTS)
    T = 8
    r = _rollout(model, tok, ids, mask, _keys(0, 1, 2), T)
    assert r.response.shape == r.response_mask.shape == (3, T)
    # Each row alone (no padding at all) with its key draws the same tokens: padding and batch-mates
    # change nothing.
    for i, p in enumerate(PROMPTS):
        q, m = left_pad_prompts(tok, [p])
        alone = _rollout(model, tok, q, m, _keys(i), T)
        assert alone.response[0].tolist() == r.response[i].tolist(), i
    # Another batch composition (rows reordered, one twice with two keys): the keys decide, not positions.
    order = [2, 0, 2]
    shuffled = _rollout(model, tok, ids[order], mask[order], _keys(2, 0, 7), T)
    assert shuffled.response[0].tolist() == r.response[2].tolist()
    assert shuffled.response[1].tolist() == r.response[0].tolist()
    assert shuffled.response[2].tolist() != r.response[2].tolist()  # same prompt, another key
    # sample_rollouts: response i draws with derive_seed(seed, i), whatever the chunking.
    prompts = PROMPTS * 2
    one = sample_rollouts(model, tok, prompts, max_new_tokens=T, seed=3, batch_size=6)
    two = sample_rollouts(model, tok, prompts, max_new_tokens=T, seed=3, batch_size=4)
    assert len(one) == 1 and len(two) == 2
    assert one[0].response.tolist() == torch.cat([two[0].response, two[1].response]).tolist()
    assert one[0].response[0].tolist() != one[0].response[3].tolist()  # the same prompt, another index


def test_greedy_rollout_equals_generate_and_a_full_forward(tiny):
    model, tok = tiny
    ids, mask = left_pad_prompts(tok, PROMPTS)
    T = 10
    greedy = _rollout(model, tok, ids, mask, _keys(0, 1, 2), T, temperature=0.0)
    want = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=T,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    want = torch.nn.functional.pad(want[:, ids.shape[1]:], (0, T - (want.shape[1] - ids.shape[1])),
                                   value=tok.pad_token_id)
    assert torch.equal(greedy.response, want)
    assert all(len(set(row.tolist())) > 2 for row in greedy.response)  # non-constant: caches matter
    # The cached step-by-step logits equal one full forward over prompt + response.
    g_ids, g_mask, g_pos = greedy.full()
    with torch.no_grad():
        g_logits = response_logits(model(input_ids=g_ids, attention_mask=g_mask, position_ids=g_pos).logits,
                                   ids.shape[1])
    m = greedy.response_mask.bool()
    assert g_logits.shape == (3, T, len(tok))
    assert torch.equal(g_logits.argmax(-1)[m], greedy.response[m])


def test_rollout_stops_at_eos_pads_after_it_and_masks_up_to_it(tiny):
    model, tok = tiny
    ids, mask = left_pad_prompts(tok, PROMPTS)
    T, keys = 10, _keys(0, 1, 2)
    # A free run (EOS = a token id the vocabulary never samples here), then the same keys with EOS =
    # a token row 0 first emits at step j: every row is the free run cut after its first EOS.
    free = _rollout(model, tok, ids, mask, keys, T, eos_id=len(tok) + 5)
    assert free.response_mask.all() and not free.has_eos.any()
    row0 = free.response[0].tolist()
    j = next(j for j in range(2, T) if row0[j] not in row0[:j])
    eos = row0[j]
    r = _rollout(model, tok, ids, mask, keys, T, eos_id=eos)
    for b, row in enumerate(free.response.tolist()):
        n = row.index(eos) + 1 if eos in row else T
        assert r.response[b, :n].tolist() == row[:n], b
        assert r.response[b, n:].tolist() == [tok.pad_token_id] * (T - n)
        assert r.response_mask[b].tolist() == [1] * n + [0] * (T - n)  # the EOS itself counts
        assert bool(r.has_eos[b]) == (eos in row)
    assert r.response_mask[0].sum() == j + 1 and r.has_eos[0]

    class EOSModel(torch.nn.Module):  # EOS logit huge: every row ends at its first token
        def __init__(self, inner, eos):
            super().__init__()
            self.inner, self.eos = inner, eos

        def forward(self, **kw):
            out = self.inner(**kw)
            out.logits[..., self.eos] += 100.0
            return out

    early = _rollout(EOSModel(model, tok.eos_token_id), tok, ids, mask, keys, T)
    # Decoding ended after one step, yet the rollout has its T columns (pad after the EOS).
    assert early.response.shape == (3, T)
    assert early.response[:, 0].tolist() == [tok.eos_token_id] * 3
    assert torch.all(early.response[:, 1:] == tok.pad_token_id)
    assert early.response_mask.tolist() == [[1] + [0] * (T - 1)] * 3 and early.has_eos.all()


class _ConstantLM(torch.nn.Module):
    """Next-token logits ``logits`` [V] at every position; a token count as its KV cache."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, past_key_values=None, **kwargs):
        cache = (past_key_values or 0) + input_ids.shape[1]
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1), past_key_values=cache)


def test_rollouts_draw_from_the_tempered_distribution():
    # 6000 rollouts of one token from fixed logits at T = 0.5: the frequencies are softmax(z / 0.5)
    # (p^2 renormalised), the distribution whose log-probs PPO's ratio and KL use. The zero-probability
    # token is never drawn. Keys are fixed, so the check is deterministic; the tolerance is ~5 sigma.
    p = torch.tensor([0.2, 0.0, 0.3, 0.5])
    lm = _ConstantLM(torch.log(p))
    n = 6000
    ids = torch.ones(n, 1, dtype=torch.long)
    r = generate_rollout(lm, ids, torch.ones_like(ids), seeds=_keys(*range(n)), max_new_tokens=1, temperature=0.5,
                         eos_id=9, pad_id=8)
    freq = torch.bincount(r.response[:, 0], minlength=4).float() / n
    want = p**2 / (p**2).sum()
    assert freq[1] == 0
    torch.testing.assert_close(freq, want, atol=0.03, rtol=0)
    assert float((freq - p).abs().max()) > 0.1  # temperature 1 would be told apart
    want_logp = logprobs_from_logits(torch.log(p).expand(n, 1, 4), r.response, 0.5)
    torch.testing.assert_close(want_logp[:, 0], torch.log(want)[r.response[:, 0]])


def test_logprobs_use_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=g)
    tokens = torch.randint(11, (2, 3), generator=g)
    for T in (0.7, 1.0, 1.3):
        expected = torch.log_softmax(logits / T, -1).gather(-1, tokens[..., None])[..., 0]
        torch.testing.assert_close(logprobs_from_logits(logits, tokens, T), expected)
    assert not torch.allclose(logprobs_from_logits(logits, tokens, 0.7), logprobs_from_logits(logits, tokens, 1.0))
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, tokens, 0.0)
