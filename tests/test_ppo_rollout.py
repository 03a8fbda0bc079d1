"""Rollout details: pad != EOS, left padding with explicit position ids, EOS truncation, sampling, log-probs."""

import pytest
import torch

from bonesoup.train.ppo.rollout import (
    check_special_tokens,
    generate,
    left_pad_prompts,
    logprobs_from_logits,
    position_ids_from_mask,
    response_logits,
    sample_from_uniform,
    sample_uniforms,
    truncate_after_eos,
)

PROMPTS = ["The user asks", "A", "Waves roll in, grey and slow, and"]


@pytest.fixture(scope="module")
def tiny():
    from transformers import GPT2LMHeadModel

    from bonesoup.tasks.tiny_models import make_tiny_tokenizer, tiny_gpt2_config

    tok = make_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(tiny_gpt2_config(tok)).eval()
    return model, tok


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
    wide, _ = left_pad_prompts(tok, PROMPTS, width=P + 3)
    assert wide.shape == (3, P + 3)
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


def test_kv_cache_generation_matches_full_forward_and_unpadded_rows(tiny):
    model, tok = tiny
    ids, mask = left_pad_prompts(tok, PROMPTS)
    T = 8
    u = sample_uniforms([11, 22, 33], T)
    r = generate(model, ids, mask, max_new_tokens=T, temperature=1.0, uniforms=u, eos_id=tok.eos_token_id,
                 pad_id=tok.pad_token_id)
    # Each row alone (no padding at all) draws the same tokens: padding and batch-mates change nothing.
    for i, p in enumerate(PROMPTS):
        q, m = left_pad_prompts(tok, [p])
        alone = generate(model, q, m, max_new_tokens=T, temperature=1.0, uniforms=u[i:i + 1],
                         eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        assert alone.response[0].tolist() == r.response[i].tolist()
    # The cached step-by-step logits equal one full forward over prompt + response.
    full_ids, full_mask, pos = r.full()
    with torch.no_grad():
        logits = response_logits(model(input_ids=full_ids, attention_mask=full_mask, position_ids=pos).logits,
                                 ids.shape[1])
    greedy = generate(model, ids, mask, max_new_tokens=T, temperature=0.0, uniforms=u, eos_id=tok.eos_token_id,
                      pad_id=tok.pad_token_id)
    g_ids, g_mask, g_pos = greedy.full()
    with torch.no_grad():
        g_logits = response_logits(model(input_ids=g_ids, attention_mask=g_mask, position_ids=g_pos).logits,
                                   ids.shape[1])
    m = greedy.response_mask.bool()
    assert torch.equal(g_logits.argmax(-1)[m], greedy.response[m])
    assert logits.shape == (3, T, len(tok))


def test_truncation_after_first_eos_and_masks():
    eos, pad = 0, 1
    tokens = torch.tensor([[5, 6, 0, 7, 0, 8], [5, 6, 7, 8, 9, 10], [0, 5, 5, 5, 5, 5]])
    out, mask = truncate_after_eos(tokens, eos, pad)
    assert out.tolist() == [[5, 6, 0, 1, 1, 1], [5, 6, 7, 8, 9, 10], [0, 1, 1, 1, 1, 1]]
    # The EOS itself counts (the score lands on it); nothing after it does.
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]]


def test_generate_pads_after_eos_and_flags_missing_eos(tiny):
    model, tok = tiny
    ids, mask = left_pad_prompts(tok, PROMPTS)
    # A model whose EOS logit is huge: every row ends at its first token, the rest is pad.
    T = 5
    u = sample_uniforms([1, 2, 3], T)

    class EOSModel(torch.nn.Module):
        def __init__(self, inner, eos):
            super().__init__()
            self.inner, self.eos = inner, eos

        def forward(self, **kw):
            out = self.inner(**kw)
            out.logits[..., self.eos] += 100.0
            return out

    r = generate(EOSModel(model, tok.eos_token_id), ids, mask, max_new_tokens=T, temperature=1.0, uniforms=u,
                 eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    assert r.response[:, 0].tolist() == [tok.eos_token_id] * 3
    assert torch.all(r.response[:, 1:] == tok.pad_token_id)
    assert r.response_mask.tolist() == [[1, 0, 0, 0, 0]] * 3 and r.has_eos.all()
    r2 = generate(model, ids, mask, max_new_tokens=T, temperature=1.0, uniforms=u, eos_id=tok.eos_token_id,
                  pad_id=tok.pad_token_id)
    assert r2.has_eos.tolist() == (r2.response == tok.eos_token_id).any(1).tolist()
    with pytest.raises(ValueError, match="uniforms must have shape"):
        generate(model, ids, mask, max_new_tokens=T + 1, temperature=1.0, uniforms=u, eos_id=0, pad_id=1)


def test_inverse_cdf_sampling():
    logits = torch.log(torch.tensor([[0.2, 0.0, 0.3, 0.5]]))
    picks = [sample_from_uniform(logits, torch.tensor([u]), 1.0).item() for u in (0.0, 0.19, 0.21, 0.49, 0.51, 0.999)]
    assert picks == [0, 0, 2, 2, 3, 3]  # the zero-probability token 1 is never drawn
    # Temperature: T = 0.5 squares and renormalises the probabilities.
    p = torch.tensor([0.2, 0.0, 0.3, 0.5]) ** 2
    cdf = (p / p.sum()).cumsum(0)
    u = (cdf[0] + cdf[2]) / 2  # between the 1st and 3rd token's CDF
    assert sample_from_uniform(logits, u[None], 0.5).item() == 2
    assert sample_from_uniform(logits, torch.tensor([0.3]), 0.0).item() == 3  # greedy
    # Empirical frequencies over many uniforms match the distribution (deterministic seed).
    many = sample_from_uniform(logits.expand(20000, 4), torch.rand(20000, generator=torch.Generator().manual_seed(0)),
                               1.0)
    freq = torch.bincount(many, minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.0, 0.3, 0.5]), atol=0.015, rtol=0)


def test_sample_uniforms_are_per_sample():
    a = sample_uniforms([7, 8, 9], 4)
    b = sample_uniforms([9, 7], 4)
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1]) and not torch.equal(a[0], a[1])


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
