"""Guided decoding: guided_generate and GuidanceLogitsProcessor against transformers' generate."""

from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2LMHeadModel

import soupkernels as sk
from bonesoup import GuidanceLogitsProcessor, guided_generate
from bonesoup.decode.batching import derive_seed, position_ids_from_mask, row_seeds
from bonesoup.tasks.tiny_models import make_tiny_tokenizer, tiny_gpt2_config

PROMPTS = ["The user asks", "Waves roll in, grey and slow", "Hi", "Thank you for the clear"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def models(tok):
    """base, guide, reference: tiny GPT-2s with a wide init, so logits are peaked and context-dependent."""
    config = tiny_gpt2_config(tok)
    config.initializer_range = 0.2  # default 0.02 gives near-uniform logits: greedy repeats one token

    def make(seed):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config).eval()

    return make(0), make(1), make(2)


@pytest.fixture(scope="module")
def batch(tok):
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    lengths = enc.attention_mask.sum(-1)
    assert enc.attention_mask[:, 0].min() == 0 and len(set(lengths.tolist())) == len(PROMPTS)  # left pads, all differ
    return enc.input_ids, enc.attention_mask


def encode(tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def full_recompute_logprobs(models, coeffs, sequences, mask, prompt_len, temperature):
    """Log-probs of the new tokens from one no-cache forward per model over the whole sequence."""
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], sequences.shape[1] - prompt_len, dtype=mask.dtype)], -1)
    pos = position_ids_from_mask(full_mask)
    with torch.no_grad():
        z = sum(c * m(input_ids=sequences, attention_mask=full_mask, position_ids=pos).logits.float()
                for c, m in zip(coeffs, models))
    logp = torch.log_softmax(z[:, prompt_len - 1:-1] / temperature, dim=-1)
    return logp.gather(-1, sequences[:, prompt_len:, None])[..., 0]


# (a) --------------------------------------------------------------------------------------------


def test_greedy_with_zero_guide_equals_generate_left_padded(models, batch):
    base, guide, _ = models
    ids, mask = batch
    out = guided_generate(base, [guide], [1.0, 0.0], ids, mask, max_new_tokens=12, temperature=0.0)
    want = base.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
    assert out.sequences.shape == want.shape == (4, ids.shape[1] + 12)
    assert torch.equal(out.sequences, want)
    assert torch.equal(out.new_tokens, want[:, ids.shape[1]:])
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    # the rows decode different, non-constant continuations, so positions and caches matter
    assert all(len(set(row.tolist())) > 2 for row in out.new_tokens)
    # padding honoured: each row alone (no padding) decodes the same tokens
    for b in range(ids.shape[0]):
        alone = ids[b : b + 1, mask[b].bool()]
        one = guided_generate(base, [guide], [1.0, 0.0], alone, max_new_tokens=12, temperature=0.0)
        assert torch.equal(one.new_tokens[0], out.new_tokens[b]), b


# (b) --------------------------------------------------------------------------------------------


def test_one_forward_per_model_per_step(models, batch):
    ids, mask = batch
    calls = {id(m): [] for m in models}

    def hook(module, args, kwargs):
        calls[id(module)].append(tuple(kwargs["input_ids"].shape))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in models]
    try:
        out = guided_generate(models[0], list(models[1:]), [1.0, 0.5, -0.5], ids, mask, max_new_tokens=7,
                              temperature=0.8, seed=1, stop_token_ids=[])
    finally:
        for h in handles:
            h.remove()
    assert out.steps == 7 and out.forwards == 3 * 7
    B, P = ids.shape
    for m in models:  # the prompt once, then one token per step, never the whole sequence again
        assert calls[id(m)] == [(B, P)] + [(B, 1)] * 6
    empty = guided_generate(models[0], [models[1]], [1.0, 0.5], ids, mask, max_new_tokens=0)
    assert empty.forwards == 0 and empty.steps == 0 and torch.equal(empty.sequences, ids)


# (c) --------------------------------------------------------------------------------------------


def test_processor_in_generate_equals_guided_generate_greedy(models, batch):
    base, tuned, ref = models
    ids, mask = batch
    coeffs = [1.0, 1.5, -1.5]  # implicit guidance: base + w (log pi_tuned - log pi_ref)
    proc = GuidanceLogitsProcessor([tuned, ref], coeffs, attention_mask=mask)
    got = base.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10,
                        logits_processor=[proc])
    out = guided_generate(base, [tuned, ref], coeffs, ids, mask, max_new_tokens=10, temperature=0.0)
    assert torch.equal(got, out.sequences)
    assert proc.forwards == 2 * 10
    plain = base.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    assert not torch.equal(plain, got)  # the guidance changed the output, so the comparison means something


def test_processor_in_generate_sampling_toward_guide(models, batch):
    # coeffs [0, 1] inside generate(do_sample=True) draw from the guide's logits with generate's own
    # sampler: the same torch seed gives the guide's own generate output.
    base, guide, _ = models
    ids, mask = batch
    proc = GuidanceLogitsProcessor([guide], [0.0, 1.0], attention_mask=mask)
    torch.manual_seed(123)
    got = base.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=10,
                        logits_processor=[proc])
    torch.manual_seed(123)
    want = guide.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=10)
    assert torch.equal(got, want)
    torch.manual_seed(123)
    unguided = base.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=10)
    assert not torch.equal(unguided, want)


def test_processor_refuses_input_that_does_not_extend_its_cache(models, batch):
    base, guide, _ = models
    ids, mask = batch
    proc = GuidanceLogitsProcessor([guide], [1.0, 1.0], attention_mask=mask)
    scores = torch.zeros(ids.shape[0], base.config.vocab_size)
    proc(ids, scores)
    with pytest.raises(RuntimeError, match="do not extend the previous call"):
        proc(ids, scores)  # a second generate call (or beam search) without reset
    proc.reset(attention_mask=mask)
    first = proc(ids, scores)
    nxt = torch.cat([ids, first.argmax(-1, keepdim=True)], dim=-1)
    assert proc(nxt, scores).shape == scores.shape
    with pytest.raises(ValueError, match="coeffs has 3 entries; expected 1 \\+ len\\(guide_models\\) = 2"):
        GuidanceLogitsProcessor([guide], [1.0, 1.0, 1.0])
    with pytest.raises(TypeError, match="pass \\[model\\]"):
        GuidanceLogitsProcessor(guide, [1.0, 1.0])


# (d) --------------------------------------------------------------------------------------------


def test_guiding_fully_toward_a_model_is_that_model(models, batch):
    base, guide, _ = models
    ids, mask = batch
    out = guided_generate(base, [guide], [0.0, 1.0], ids, mask, max_new_tokens=10, temperature=0.0)
    want = guide.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    assert torch.equal(out.sequences, want)
    # sampled: [0, 1] over (base, guide) draws what the guide alone (no guides) draws, log-probs too
    kw = dict(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=5, return_logprobs=True)
    toward = guided_generate(base, [guide], [0.0, 1.0], ids, mask, **kw)
    alone = guided_generate(guide, [], [1.0], ids, mask, **kw)
    assert torch.equal(toward.sequences, alone.sequences)
    torch.testing.assert_close(toward.logprobs, alone.logprobs)
    assert alone.forwards == alone.steps
    base_alone = guided_generate(base, [], [1.0], ids, mask, **kw)
    assert not torch.equal(base_alone.sequences, alone.sequences)


# (e) --------------------------------------------------------------------------------------------


def test_row_output_does_not_depend_on_other_rows(models, tok):
    base, guide, _ = models
    kw = dict(max_new_tokens=12, temperature=1.0, seed=7)
    ids1, mask1 = encode(tok, ["Waves roll in, grey and slow", "Hi", "The user asks"])
    ids2, mask2 = encode(tok, ["Waves roll in, grey and slow", "Summarise the article", "A harmless"])
    out1 = guided_generate(base, [guide], [1.0, 0.7], ids1, mask1, **kw)
    out2 = guided_generate(base, [guide], [1.0, 0.7], ids2, mask2, **kw)
    assert torch.equal(out1.new_tokens[0], out2.new_tokens[0])
    # a different batch size and more left padding for the row: still the same tokens
    longer = "Preferences change: sometimes we want humour, sometimes we want facts."
    ids3, mask3 = encode(tok, ["Waves roll in, grey and slow", longer])
    out3 = guided_generate(base, [guide], [1.0, 0.7], ids3, mask3, **kw)
    assert mask3[0, 0] == 0 and torch.equal(out3.new_tokens[0], out1.new_tokens[0])
    # rows are independent draws (per-row keys): the same prompt twice draws differently; the seed matters
    twice = guided_generate(base, [guide], [1.0, 0.7], ids1[[0, 0]], mask1[[0, 0]], **kw)
    assert torch.equal(twice.new_tokens[0], out1.new_tokens[0])
    assert not torch.equal(twice.new_tokens[0], twice.new_tokens[1])
    other = guided_generate(base, [guide], [1.0, 0.7], ids1, mask1, **{**kw, "seed": 8})
    assert not torch.equal(other.new_tokens[0], out1.new_tokens[0])
    assert torch.equal(row_seeds(7, 3)[:2], row_seeds(7, 2))  # a row's key depends on (seed, row) only
    assert len(set(row_seeds(7, 64).tolist())) == 64


def test_one_seeding_scheme_derive_seed():
    # row_seeds is derive_seed(seed, b); keys are int64 (Philox keys travel as int64 tensors), distinct
    # over nearby tuples (no seed + b collisions), and negative or huge inputs are taken mod 2^64.
    assert row_seeds(7, 5).tolist() == [derive_seed(7, b) for b in range(5)]
    grid = [derive_seed(s, t, i) for s in range(4) for t in range(4) for i in range(16)]
    assert len(set(grid)) == len(grid) and all(-(2**63) <= k < 2**63 for k in grid)
    assert derive_seed(1, 2) != derive_seed(2, 1) and derive_seed(3, 0) != derive_seed(2, 1)
    assert derive_seed(-1, 5) == derive_seed(2**64 - 1, 5)
    assert torch.tensor(grid, dtype=torch.int64).shape == (len(grid),)
    with pytest.raises(ValueError, match="at least one integer"):
        derive_seed()


class ConstantLM(torch.nn.Module):
    """A stand-in causal LM (no transformers) whose next-token logits are always ``logits``."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, past_key_values=None, **kwargs):
        cache = (past_key_values or 0) + input_ids.shape[1]  # tokens seen: enough of a cache for the loop
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1), past_key_values=cache)


def test_draw_keys_are_row_seed_and_step(models, batch):
    # With the same distribution at every step, the tokens are exactly the op's draws for key
    # row_seeds(seed, B)[b] and offset t: a fresh uniform per step, a different one per row.
    base, _, _ = models
    ids, mask = batch
    V = base.config.vocab_size
    flat = ConstantLM(torch.linspace(-1.0, 1.0, V))
    out = guided_generate(base, [flat], [0.0, 1.0], ids, mask, max_new_tokens=6, seed=99, stop_token_ids=[])
    keys = row_seeds(99, ids.shape[0])
    for t in range(6):
        want = sk.guided_sample([flat.logits.expand(ids.shape[0], V)], [1.0], seed=keys, offset=t)
        assert torch.equal(out.new_tokens[:, t], want), t
    assert all(len(set(row)) > 3 for row in out.new_tokens.tolist())


def test_per_row_sampling_parameters(models, batch):
    base, guide, _ = models
    ids, mask = batch
    out = guided_generate(base, [guide], [1.0, 0.5], ids, mask, max_new_tokens=8, temperature=[0.0, 1.0, 0.0, 0.7],
                          top_k=[0, 5, 0, 0], top_p=[1.0, 1.0, 1.0, 0.9], seed=3, return_logprobs=True)
    greedy = guided_generate(base, [guide], [1.0, 0.5], ids, mask, max_new_tokens=8, temperature=0.0)
    assert torch.equal(out.new_tokens[[0, 2]], greedy.new_tokens[[0, 2]])
    assert torch.all(out.logprobs[[0, 2]] == 0)  # greedy rows
    assert torch.all(out.logprobs[[1, 3]] <= 0) and torch.all(out.logprobs[1] < 0)  # top-k 5 at T = 1: never sure
    assert not torch.equal(out.new_tokens[1], greedy.new_tokens[1])


def test_logprobs_match_a_full_recompute_and_seed_none_follows_torch_seed(models, batch):
    base, tuned, ref = models
    ids, mask = batch
    coeffs = [1.0, 0.8, -0.8]
    torch.manual_seed(0)
    out = guided_generate(base, [tuned, ref], coeffs, ids, mask, max_new_tokens=9, temperature=0.7,
                          stop_token_ids=[], return_logprobs=True)
    want = full_recompute_logprobs(models, coeffs, out.sequences, mask, ids.shape[1], 0.7)
    torch.testing.assert_close(out.logprobs, want, atol=2e-4, rtol=1e-4)
    torch.manual_seed(0)
    again = guided_generate(base, [tuned, ref], coeffs, ids, mask, max_new_tokens=9, temperature=0.7,
                            stop_token_ids=[])
    assert torch.equal(again.sequences, out.sequences) and again.logprobs is None
    # outputs are ordinary tensors: usable in autograd code (a PPO update) and in place
    assert not out.sequences.is_inference() and not out.logprobs.is_inference()
    out.sequences[0, 0] = 0


# (f) --------------------------------------------------------------------------------------------


def test_stop_tokens_finish_rows_and_pad_the_rest(models, batch):
    base, guide, _ = models
    ids, mask = batch
    kw = dict(max_new_tokens=12, temperature=1.0, seed=4, return_logprobs=True)
    free = guided_generate(base, [guide], [1.0, 0.3], ids, mask, stop_token_ids=[], **kw)
    row0 = free.new_tokens[0].tolist()
    j = next(j for j in range(2, 12) if row0[j] not in row0[:j])  # a token row 0 first emits at step j
    stop, pad = row0[j], 1
    out = guided_generate(base, [guide], [1.0, 0.3], ids, mask, stop_token_ids=stop, pad_token_id=pad, **kw)
    assert out.lengths[0] == j + 1 and out.finished[0]
    for b, row in enumerate(free.new_tokens.tolist()):
        n = row.index(stop) + 1 if stop in row else len(row)
        assert out.lengths[b] == n and bool(out.finished[b]) == (stop in row)
        assert out.new_tokens[b, :n].tolist() == row[:n]  # same keys, same draws up to the stop
        assert out.new_tokens[b, n:].tolist() == [pad] * (out.steps - n)
        assert torch.equal(out.logprobs[b, :n], free.logprobs[b, :n])
        assert torch.all(out.logprobs[b, n:] == 0) and torch.all(free.logprobs[b, n:] < 0)
    # when every row stops, decoding ends early: exactly one forward per model per step run
    stops = {row[1] for row in free.new_tokens.tolist()}
    early = guided_generate(base, [guide], [1.0, 0.3], ids, mask, stop_token_ids=sorted(stops), pad_token_id=pad,
                            **kw)
    assert early.finished.all() and early.steps == int(early.lengths.max()) <= 2
    assert early.forwards == 2 * early.steps and early.sequences.shape[1] == ids.shape[1] + early.steps


def test_default_stop_is_eos_and_pad_is_pad(models, batch):
    base, guide, _ = models
    ids, mask = batch
    eos = base.config.eos_token_id
    # steer toward eos: a large bias on the eos logit through a guide that only returns that bias
    bias = torch.zeros(base.config.vocab_size)
    bias[eos] = 50.0

    coeffs = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    out = guided_generate(base, [ConstantLM(bias)], coeffs, ids, mask, max_new_tokens=5, temperature=0.0)
    assert out.new_tokens[1].tolist() == [eos] + [base.config.pad_token_id] * 4
    assert out.lengths.tolist()[1] == 1 and out.finished.tolist() == [False, True, False, False]


# (g) --------------------------------------------------------------------------------------------


def test_per_row_coefficients_equal_each_row_alone(models, batch):
    base, tuned, ref = models
    ids, mask = batch
    coeffs = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, -2.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5]])
    seeds = [11, 22, 33, 44]
    kw = dict(max_new_tokens=10, temperature=0.9, return_logprobs=True)
    out = guided_generate(base, [tuned, ref], coeffs, ids, mask, seed=seeds, **kw)
    for b in range(4):
        one = guided_generate(base, [tuned, ref], coeffs[b], ids[b : b + 1], mask[b : b + 1], seed=[seeds[b]], **kw)
        assert torch.equal(one.new_tokens[0], out.new_tokens[b]), b
        torch.testing.assert_close(one.logprobs[0], out.logprobs[b])
    assert len({tuple(r) for r in out.new_tokens.tolist()}) == 4
    shared = guided_generate(base, [tuned, ref], coeffs[1], ids, mask, seed=seeds, **kw)
    assert torch.equal(shared.new_tokens[1], out.new_tokens[1])
    assert not torch.equal(shared.new_tokens[0], out.new_tokens[0])


# (h) --------------------------------------------------------------------------------------------


def _bad_calls(models, ids, mask, tok):
    base, guide, _ = models
    right = torch.ones_like(mask)
    right[0, -1] = 0
    wide = tiny_gpt2_config(tok)
    wide.vocab_size += 16
    torch.manual_seed(0)
    wide_model = GPT2LMHeadModel(wide).eval()

    class Narrow(torch.nn.Module):  # no config: only the logits' width tells
        def forward(self, **kwargs):
            out = base(**kwargs)
            return SimpleNamespace(logits=out.logits[..., :-1], past_key_values=out.past_key_values)

    g, V = [guide], base.config.vocab_size
    return [
        (dict(coeffs=[1.0]), ValueError, r"coeffs has 1 entries; expected 1 \+ len\(guide_models\) = 2"),
        (dict(coeffs=torch.ones(3, 2)), ValueError, r"one row per sequence \(B = 4\)"),
        (dict(coeffs=[1.0, float("nan")]), ValueError, "coeffs must be finite"),
        (dict(guide_models=guide), TypeError, r"guide_models must be a list of models \(pass \[model\]"),
        (dict(guide_models=[wide_model]), ValueError,
         rf"guide_models\[0\] has vocab_size {V + 16} but base_model has {V}"),
        (dict(guide_models=[Narrow()]), ValueError, rf"guide_models\[0\] returns {V - 1} logits per token"),
        (dict(attention_mask=right), ValueError, "left-padded"),
        (dict(attention_mask=mask[:, 1:]), ValueError, "attention_mask has shape"),
        (dict(attention_mask=mask * 0), ValueError, "all padding"),
        (dict(input_ids=ids[0]), ValueError, r"input_ids must have shape \[B, P\]"),
        (dict(input_ids=ids.float()), TypeError, "input_ids must hold integer token ids"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be an integer >= 0"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(top_p=[0.9, 0.9]), ValueError, "top_p has 2 entries"),
        (dict(top_k=2.5), TypeError, "top_k"),
        (dict(seed=[1, 2]), ValueError, "seed has 2 entries"),
        (dict(stop_token_ids="eos"), ValueError, "stop_token_ids"),
        (dict(pad_token_id=-3), ValueError, "pad_token_id"),
    ], g


def test_bad_arguments_are_refused_with_the_argument_named(models, batch, tok):
    ids, mask = batch
    cases, g = _bad_calls(models, ids, mask, tok)
    for override, exc, pattern in cases:
        args = dict(base_model=models[0], guide_models=g, coeffs=[1.0, 0.5], input_ids=ids, attention_mask=mask,
                    max_new_tokens=2)
        args.update(override)
        with pytest.raises(exc, match=pattern):
            guided_generate(**args)


# (i) --------------------------------------------------------------------------------------------


class NaNRowGuide(torch.nn.Module):
    """Zero logits, except row ``row`` from decoding step ``from_step`` on: NaN (a model gone bad)."""

    def __init__(self, vocab, row, from_step):
        super().__init__()
        self.vocab, self.row, self.from_step = vocab, row, from_step

    def forward(self, input_ids, past_key_values=None, **kwargs):
        step = past_key_values or 0  # forwards run before this one: the decoding step
        logits = torch.zeros(*input_ids.shape, self.vocab)
        if step >= self.from_step:
            logits[self.row] = float("nan")
        return SimpleNamespace(logits=logits, past_key_values=step + 1)


@pytest.mark.parametrize("from_step", [0, 3])
def test_on_invalid_stop_finishes_the_bad_row_only(models, batch, from_step):
    base, _, _ = models
    ids, mask = batch
    V = base.config.vocab_size
    kw = dict(max_new_tokens=8, temperature=0.9, seed=21, stop_token_ids=[], pad_token_id=1, return_logprobs=True)
    # The clean run: a zero guide adds exactly 0 to the base's logits.
    clean = guided_generate(base, [NaNRowGuide(V, 1, from_step=10**9)], [1.0, 1.0], ids, mask, **kw)
    out = guided_generate(base, [NaNRowGuide(V, 1, from_step)], [1.0, 1.0], ids, mask, on_invalid="stop", **kw)
    assert out.invalid.tolist() == [False, True, False, False] and not clean.invalid.any()
    assert out.finished[1] and int(out.lengths[1]) == from_step
    # The bad row keeps the tokens it had before, then pad (log-prob 0); the others are untouched.
    assert torch.equal(out.new_tokens[1, :from_step], clean.new_tokens[1, :from_step])
    assert out.new_tokens[1, from_step:].tolist() == [1] * (out.steps - from_step)
    assert torch.all(out.logprobs[1, from_step:] == 0)
    others = [0, 2, 3]
    assert out.steps == clean.steps == 8
    assert torch.equal(out.new_tokens[others], clean.new_tokens[others])
    assert torch.equal(out.logprobs[others], clean.logprobs[others])
    assert torch.equal(out.lengths[others], clean.lengths[others]) and not out.finished[others].any()
    # The default, on_invalid="raise", names the step and the row instead.
    with pytest.raises(ValueError, match=rf"step {from_step}: rows \[1\] of the combined logits hold a NaN"):
        guided_generate(base, [NaNRowGuide(V, 1, from_step)], [1.0, 1.0], ids, mask, **kw)
    with pytest.raises(ValueError, match="on_invalid must be 'raise' or 'stop'"):
        guided_generate(base, [], [1.0], ids, mask, on_invalid="skip")
