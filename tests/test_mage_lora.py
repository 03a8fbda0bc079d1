"""MAGE with LoRA backbones: base and guidance models are adapter soups, each row at its own preference.

The reference of row b is MAGE on models merged exactly from the adapters at
row b's preference (tests/test_lora_mixture.py's ``_merged_model``), one row
per call: the base at Bone Soup coefficients, the implicit value's tuned
policy at Rewarded Soup coefficients (mu itself), the SFT model as reference.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
from test_lora_mixture import _gpt2, _merged_model, _save_adapters  # noqa: E402

from bonesoup import merge_coefficients  # noqa: E402
from bonesoup.decode.batching import row_seeds  # noqa: E402
from bonesoup.decode.mage import ChunkSearch, mage_generate  # noqa: E402
from bonesoup.decode.values import implicit_guidance  # noqa: E402
from bonesoup.lora import AdapterSoup  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BETA = 0.7
B = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = _gpt2()
    dirs = _save_adapters(base, tmp_path_factory.mktemp("mage-lora"), [4, 4], seed=11)
    soups = {}
    for name, method in (("base", "bone"), ("tuned", "rewarded"), ("value", "rewarded")):
        model = copy.deepcopy(base)
        soups[name] = (model, AdapterSoup(model, dirs, beta=BETA if method == "bone" else None, method=method))
    m1 = np.random.default_rng(2).uniform(0, 1, B)
    prefs = np.stack([m1, 1 - m1], 1)
    ids = torch.randint(1, 61, (B, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[::2, :2] = 0  # left padding on some rows
    return base, dirs, soups, prefs, ids, mask


def _reference_models(base, dirs, pref):
    c_bone, _ = merge_coefficients(pref, method="bone", beta=BETA)
    return _merged_model(base, dirs, c_bone), _merged_model(base, dirs, list(pref))


@pytest.mark.parametrize("sampled", [False, True])
def test_mage_rows_equal_mage_on_the_models_merged_at_each_rows_preference(setup, sampled):
    base, dirs, soups, prefs, ids, mask = setup
    kw = dict(w=1.5, max_new_tokens=6, stop_token_ids=[], temperature=0.8 if sampled else 0.0, top_k=20)
    guidance = implicit_guidance(soups["tuned"][0], base)
    out = mage_generate(soups["base"][0], guidance, ids, mask, seed=7, preference=prefs, **kw)
    keys = row_seeds(7, B)
    for b in range(B):
        merged_base, merged_tuned = _reference_models(base, dirs, prefs[b])
        ref = mage_generate(merged_base, implicit_guidance(merged_tuned, base), ids[b:b + 1], mask[b:b + 1],
                            seed=keys[b:b + 1], **kw)
        assert torch.equal(out.new_tokens[b], ref.new_tokens[0]), b
    # Without per-row preferences every row decodes at the soups' shared (uniform) preference: different text.
    shared = mage_generate(soups["base"][0], guidance, ids, mask, seed=7, **kw)
    assert not torch.equal(shared.new_tokens, out.new_tokens)
    assert all(s._coeffs.c.dim() == 1 for _, s in soups.values())  # the shared coefficients are back


def test_chunk_search_scores_with_the_value_soup_at_each_rows_preference(setup):
    base, dirs, soups, prefs, ids, mask = setup
    kw = dict(w=1.0, max_new_tokens=6, stop_token_ids=[], temperature=1.0)
    guidance = implicit_guidance(soups["tuned"][0], base)
    out = mage_generate(soups["base"][0], guidance, ids, mask, seed=3, preference=prefs,
                        search=ChunkSearch(soups["value"][0], num_candidates=3, chunk_tokens=2), **kw)
    keys = row_seeds(3, B)
    for b in range(B):
        merged_base, merged_tuned = _reference_models(base, dirs, prefs[b])
        value = _merged_model(base, dirs, list(prefs[b]))
        ref = mage_generate(merged_base, implicit_guidance(merged_tuned, base), ids[b:b + 1], mask[b:b + 1],
                            seed=keys[b:b + 1], search=ChunkSearch(value, num_candidates=3, chunk_tokens=2), **kw)
        assert torch.equal(out.new_tokens[b], ref.new_tokens[0]), b


def test_preference_needs_an_adapter_soup_and_one_row_per_prompt(setup):
    base, _, soups, prefs, ids, mask = setup
    with pytest.raises(ValueError, match="LoRA adapters"):
        mage_generate(base, None, ids, mask, max_new_tokens=1, preference=prefs)
    with pytest.raises(ValueError, match=r"B = 6"):
        mage_generate(soups["base"][0], None, ids, mask, max_new_tokens=1, preference=prefs[:3],
                      search=ChunkSearch(base, 2, 2))
