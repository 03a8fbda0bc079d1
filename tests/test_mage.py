"""MAGE: merged value models as ONE guidance proxy, mage_generate, chunk search, MOD."""

import copy
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from bonesoup.decode.batching import position_ids_from_mask
from bonesoup.decode.mage import ChunkSearch, mage_generate, mod_generate
from bonesoup.decode.guided import guided_generate
from bonesoup.tasks.tiny_models import make_tiny_tokenizer, tiny_gpt2_config
from bonesoup.decode.values import ValueSoup, explicit_guidance, guidance_logits, implicit_guidance

PROMPTS = ["The user asks", "Waves roll in, grey and slow", "Hi", "Thank you for the clear"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def _make(tok, seed, *, tied=True):
    config = tiny_gpt2_config(tok)
    config.initializer_range = 0.2  # peaked, context-dependent logits (default init: near-uniform)
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def models(tok):
    return SimpleNamespace(base=_make(tok, 0), tuned=_make(tok, 1), ref=_make(tok, 2))


@pytest.fixture(scope="module")
def value_dirs(tok, tmp_path_factory):
    """Two explicit value models (untied heads) saved as Hugging Face checkpoints."""
    root = tmp_path_factory.mktemp("values")
    out = []
    for i in range(2):
        m = _make(tok, 10 + i, tied=False)
        assert m.lm_head.weight.data_ptr() != m.transformer.wte.weight.data_ptr()
        m.save_pretrained(root / f"value{i}")
        out.append(root / f"value{i}")
    return out


@pytest.fixture(scope="module")
def batch(tok):
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def _greedy(model, ids, mask, T=10):
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=T)


@pytest.mark.parametrize("kind", ["implicit", "explicit"])
def test_w0_reproduces_the_base_greedy_output(models, value_dirs, batch, kind):
    ids, mask = batch
    if kind == "implicit":
        guide = implicit_guidance(models.tuned, models.ref)
    else:
        guide = ValueSoup(value_dirs, kind="explicit").guidance
    out = mage_generate(models.base, guide, ids, mask, w=0.0, max_new_tokens=10, temperature=0.0)
    assert torch.equal(out.sequences, _greedy(models.base, ids, mask))
    assert out.forwards == 10 * (1 + len(guide.models))
    # The guidance does change the output when w != 0 (the test above is not blind).
    strong = mage_generate(models.base, guide, ids, mask, w=5.0, max_new_tokens=10, temperature=0.0)
    assert not torch.equal(strong.sequences, out.sequences)


def test_w0_sampling_equals_the_base_alone(models, batch):
    ids, mask = batch
    guide = implicit_guidance(models.tuned, models.ref)
    a = mage_generate(models.base, guide, ids, mask, w=0.0, max_new_tokens=12, temperature=1.0, seed=7,
                      return_logprobs=True)
    b = mage_generate(models.base, None, ids, mask, max_new_tokens=12, temperature=1.0, seed=7, return_logprobs=True)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-6)


def test_implicit_guidance_with_tuned_equal_ref_is_exactly_zero(models, batch):
    ids, mask = batch
    ref_copy = copy.deepcopy(models.ref)
    z = guidance_logits(implicit_guidance(ref_copy, models.ref), ids, mask)
    assert z.shape == (4, ids.shape[1], models.ref.config.vocab_size)
    assert torch.count_nonzero(z) == 0
    # ... so guiding with it at any strength leaves the base's greedy output as it is,
    out = mage_generate(models.base, implicit_guidance(ref_copy, models.ref), ids, mask, w=3.0, max_new_tokens=10,
                        temperature=0.0)
    assert torch.equal(out.sequences, _greedy(models.base, ids, mask))
    # while a different tuned model gives a non-zero guidance.
    assert torch.count_nonzero(guidance_logits(implicit_guidance(models.tuned, models.ref), ids, mask)) > 0


def test_merging_value_models_one_hot_gives_each_bit_for_bit(value_dirs):
    soup = ValueSoup(value_dirs, kind="explicit")
    for i, path in enumerate(value_dirs):
        want = load_file(path / "model.safetensors")
        for setter in (lambda: soup.set_coefficients([float(i == 0), float(i == 1)]),
                       lambda: soup.set_preference([float(i == 0), float(i == 1)])):
            setter()
            got = soup.model.state_dict()
            assert "lm_head.weight" in want  # untied: the head is its own tensor
            for key, w in want.items():
                assert torch.equal(got[key], w), (i, key)
    # A real mixture is the weighted sum of the two (fp32 accumulation).
    soup.set_preference([0.3, 0.7])
    a, b = (load_file(p / "model.safetensors") for p in value_dirs)
    for key in a:
        torch.testing.assert_close(soup.model.state_dict()[key], 0.3 * a[key] + 0.7 * b[key], rtol=1e-6, atol=1e-6)


def test_implicit_value_soup_merges_the_tuned_policies_and_keeps_the_reference(models, tok, tmp_path, batch):
    dirs = []
    for i, m in enumerate([models.tuned, _make(tok, 5)]):
        m.save_pretrained(tmp_path / f"tuned{i}")
        dirs.append(tmp_path / f"tuned{i}")
    soup = ValueSoup(dirs, kind="implicit", ref=models.ref)
    assert soup.guidance.models[1] is models.ref and soup.guidance.unit == (1.0, -1.0)
    soup.set_preference([1.0, 0.0])
    ids, mask = batch
    torch.testing.assert_close(guidance_logits(soup.guidance, ids, mask),
                               guidance_logits(implicit_guidance(models.tuned, models.ref), ids, mask),
                               rtol=0, atol=0)
    torch.testing.assert_close(soup.guidance.coefficients(2.0), torch.tensor([1.0, 2.0, -2.0], dtype=torch.float64))
    per_row = soup.guidance.coefficients([0.0, 1.0])
    assert per_row.shape == (2, 3) and per_row[1].tolist() == [1.0, 1.0, -1.0]


def test_guided_sampling_matches_the_combined_logits(models, value_dirs, batch):
    """mage_generate samples from z_base + w * Q: greedy equals the argmax of that sum, step by step."""
    ids, mask = batch
    soup = ValueSoup(value_dirs, kind="explicit")
    soup.set_preference([0.5, 0.5])
    w = 2.5
    out = mage_generate(models.base, soup.guidance, ids, mask, w=w, max_new_tokens=6, temperature=0.0)
    seq, P = out.sequences, ids.shape[1]
    full = torch.cat([mask, torch.ones(4, 6, dtype=mask.dtype)], 1)
    pos = position_ids_from_mask(full)
    with torch.no_grad():
        z = sum(c * m(input_ids=seq, attention_mask=full, position_ids=pos).logits
                for c, m in ((1.0, models.base), (w, soup.model)))
    assert torch.equal(z[:, P - 1:-1].argmax(-1), out.new_tokens)


def test_mod_is_the_experts_logits_mixed_with_the_preference(models, batch):
    ids, mask = batch
    experts = [models.tuned, models.ref]
    a = mod_generate(experts, [0.3, 0.7], ids, mask, max_new_tokens=8, temperature=1.0, seed=3)
    b = guided_generate(models.tuned, [models.ref], [0.3, 0.7], ids, mask, max_new_tokens=8, temperature=1.0, seed=3)
    assert torch.equal(a.sequences, b.sequences) and a.forwards == 16
    one_hot = mod_generate(experts, [1.0, 0.0], ids, mask, max_new_tokens=8, temperature=0.0)
    assert torch.equal(one_hot.sequences, _greedy(models.tuned, ids, mask, 8))
    with pytest.raises(ValueError, match="experts"):
        mod_generate([], [1.0], ids, mask)


class _TokenValue(torch.nn.Module):
    """A fake explicit value model: Q(s, v) = sign * v (prefers high or low token ids)."""

    def __init__(self, vocab, sign=1.0):
        super().__init__()
        self.vocab, self.sign, self.calls = vocab, sign, 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        self.calls += 1
        q = self.sign * torch.arange(self.vocab, dtype=torch.float32)
        return SimpleNamespace(logits=q.expand(*input_ids.shape, self.vocab))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_chunk_search_keeps_the_best_candidate_by_value(models, batch, sign):
    ids, mask = batch
    V = models.base.config.vocab_size
    kw = dict(max_new_tokens=1, temperature=1.5, seed=11, stop_token_ids=[])
    # Candidate 0 of a row is the same draw whatever K (its key derive_seed(row key, t, 0) does not depend on K),
    # so the best of 16 by Q is never worse than the single candidate, and better somewhere.
    one = mage_generate(models.base, None, ids, mask, search=ChunkSearch(_TokenValue(V, sign), 1, 1), **kw)
    best = mage_generate(models.base, None, ids, mask, search=ChunkSearch(_TokenValue(V, sign), 16, 1), **kw)
    d = sign * (best.new_tokens[:, 0] - one.new_tokens[:, 0])
    assert bool((d >= 0).all()) and bool((d > 0).any()), (one.new_tokens, best.new_tokens)


def test_chunk_search_greedy_with_one_candidate_equals_plain_decoding(models, value_dirs, batch):
    ids, mask = batch
    soup = ValueSoup(value_dirs, kind="explicit")
    soup.set_preference([0.5, 0.5])
    plain = mage_generate(models.base, soup.guidance, ids, mask, w=1.0, max_new_tokens=10, temperature=0.0,
                          stop_token_ids=[])
    value = _TokenValue(models.base.config.vocab_size)
    chunked = mage_generate(models.base, soup.guidance, ids, mask, w=1.0, max_new_tokens=10, temperature=0.0,
                            stop_token_ids=[], search=ChunkSearch(value, 1, 3))
    assert torch.equal(plain.sequences, chunked.sequences)
    assert chunked.steps == 10 and value.calls == 4  # chunks of 3, 3, 3, 1
    assert chunked.forwards == 2 * 10 + 4


def test_bad_arguments(models, value_dirs, batch):
    ids, mask = batch
    with pytest.raises(ValueError, match="kind must be"):
        ValueSoup(value_dirs, kind="both")
    with pytest.raises(ValueError, match="needs ref="):
        ValueSoup(value_dirs, kind="implicit")
    with pytest.raises(ValueError, match="ref= applies"):
        ValueSoup(value_dirs, kind="explicit", ref=models.ref)
    with pytest.raises(TypeError, match="values must be"):
        ValueSoup(value_dirs[0], kind="explicit")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ValueSoup([value_dirs[0].parent], kind="explicit")
    with pytest.raises(ValueError, match="w must be"):
        mage_generate(models.base, explicit_guidance(models.tuned), ids, mask, w=float("nan"))
    with pytest.raises(ValueError, match="num_candidates"):
        ChunkSearch(models.tuned, 0, 2)
    with pytest.raises(ValueError, match="chunk_tokens"):
        ChunkSearch(models.tuned, 2, 0)
