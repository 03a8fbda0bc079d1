"""Per-request preferences in vLLM (bonesoup.vllm.adapters): mixture adapters in one batch, the LRU of adapters.

One offline engine per module (vLLM's ``LLM`` in process). Tokens are checked
against transformers on the exact merge (vllm_helpers.MixtureReference),
greedy, float32, on a tiny Qwen2 with 2 LoRA backbones made in code.
"""

from __future__ import annotations

import pytest
from vllm_helpers import BETA, PROMPTS, MixtureReference, shutdown_engine

from bonesoup.merge.coefficients import merge_coefficients
from bonesoup.tasks.tiny_qwen2 import make_tiny_qwen2_adapters
from bonesoup.vllm.adapters import AdapterSoupLLM, MixtureCache, round_target

MAX_TOKENS = 12
#: one-hot (lambda = (1.75, -0.75) at beta 0.7), mixed, extrapolated away from the SFT model
TARGETS = [([1.0, 0.0], 0.0), ([0.3, 0.7], 0.0), ([0.6, 0.4], 0.5)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_qwen2_adapters(tmp_path_factory.mktemp("qwen2-lora"), 2, rank=4)


@pytest.fixture(scope="module")
def reference(tiny):
    return MixtureReference(*tiny, beta=BETA)


@pytest.fixture(scope="module")
def llm(tiny, tmp_path_factory):
    soup = AdapterSoupLLM(tiny[0], tiny[1], beta=BETA, max_loras=2, cache_dir=tmp_path_factory.mktemp("mixtures"),
                          dtype="float32", max_model_len=256, max_num_seqs=16)
    yield soup
    soup.close()
    shutdown_engine(soup)


@pytest.fixture(scope="module")
def prompts(reference):
    return [reference.tok(p)["input_ids"] for p in PROMPTS[:3]]


@pytest.fixture(scope="module")
def greedy():
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def _rows(prompts, targets):
    rows = [(p, t) for t in targets for p in prompts]
    return [{"prompt_token_ids": list(p)} for p, _ in rows], [t for _, t in rows]


def test_engine_is_plain_vllm_with_lora_slots_for_the_mixture_rank(llm):
    cfg = llm.llm.llm_engine.vllm_config.lora_config
    assert llm.cache.rank == 8  # two rank-4 backbones
    assert cfg.max_lora_rank == 8 and cfg.max_loras == 2 == cfg.max_cpu_loras


def test_rows_at_different_preferences_in_one_batch_equal_the_offline_merge(llm, reference, prompts, greedy):
    rows, targets = _rows(prompts, TARGETS[:2])  # two targets: one generate call (2 slots)
    outs = llm.generate(rows, greedy, preference=[t[0] for t in targets], alpha=[t[1] for t in targets])
    for row, (pref, alpha), out in zip(rows, targets, outs):
        assert list(out.outputs[0].token_ids) == reference.tokens(pref, alpha, row["prompt_token_ids"], MAX_TOKENS)
        assert out.mixture.preference == pytest.approx(pref, abs=1e-12) and out.mixture.alpha == alpha
        c, _ = merge_coefficients(pref, method="bone", beta=BETA, alpha=alpha, n=2)
        assert out.mixture.coefficients == pytest.approx(list(c), abs=1e-12)
    assert len({o.weights_version for o in outs}) == 2
    created = llm.cache.created
    again = llm.generate(rows[::-1], greedy, preference=[t[0] for t in targets[::-1]])  # the same 2 targets
    assert llm.cache.created == created  # cached ones are pinned before anything is made: no thrash
    assert [o.weights_version for o in again] == [o.weights_version for o in outs][::-1]
    refs = {tuple(map(tuple, (reference.tokens(*t, p, MAX_TOKENS) for p in prompts))) for t in TARGETS}
    assert len(refs) == len(TARGETS)  # the preferences generate different tokens: the equality means something


def test_the_lru_evicts_from_vllm_and_disk_and_recreates(llm, reference, prompts, greedy):
    cache = llm.cache
    ids = []
    for pref, alpha in TARGETS + [TARGETS[0]]:  # 3 targets through 2 slots, then the first (evicted) again
        outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], greedy, preference=pref, alpha=alpha)
        for p, out in zip(prompts, outs):
            assert list(out.outputs[0].token_ids) == reference.tokens(pref, alpha, p, MAX_TOKENS)
        ids.append(outs[0].weights_version)
        cached = cache.cached()
        assert len(cached) <= 2 and cached[-1].id == ids[-1]  # the newest is the most recently used
        assert sorted(d.name for d in cache.cache_dir.iterdir()) == sorted(m.path.name for m in cached)
        assert set(llm.llm.llm_engine.list_loras()) <= {m.id for m in cached}
    assert ids[3] not in ids[:3]  # re-created under a fresh id (vLLM caches adapters by id), same target
    assert cache.cached()[-1].preference == TARGETS[0][0] and cache.cached()[-1].alpha == TARGETS[0][1]
    assert cache.evicted >= 2


def test_more_distinct_preferences_than_slots_in_one_call(llm, reference, prompts, greedy):
    targets = [([a, 1 - a], 0.0) for a in (0.1, 0.45, 0.9)] + [TARGETS[2]]
    rows, per_row = _rows(prompts[:2], targets)
    outs = llm.generate(rows, greedy, preference=[t[0] for t in per_row], alpha=[t[1] for t in per_row])
    assert len(outs) == len(rows)
    for row, (pref, alpha), out in zip(rows, per_row, outs):
        assert list(out.outputs[0].token_ids) == reference.tokens(pref, alpha, row["prompt_token_ids"], MAX_TOKENS)
        assert out.mixture.preference == pytest.approx(pref, abs=1e-12)
    assert all(m.refs == 0 for m in llm.cache.cached())  # nothing stays pinned after the call


def test_rounding_shares_one_adapter_within_the_precision(llm, prompts, greedy):
    a = llm.generate([{"prompt_token_ids": prompts[0]}], greedy, preference=[0.25, 0.75])[0]
    b = llm.generate([{"prompt_token_ids": prompts[0]}], greedy, preference=[0.250004, 0.749996])[0]
    assert a.weights_version == b.weights_version and b.mixture.preference == [0.25, 0.75]
    assert round_target([0.250004, 0.749996]) == ((2500, 7500), 0) != round_target([0.25006, 0.74994])


@pytest.mark.parametrize("bad,match", [([0.5, 0.6], "sum to 1"), ([1.0], "2 entries"), ([1.5, -0.5], "non-negative"),
                                       ([float("nan"), 1.0], "finite")])
def test_bad_preference_is_refused_before_anything_runs(llm, prompts, greedy, bad, match):
    created = llm.cache.created
    with pytest.raises(ValueError, match=match):
        llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], greedy, preference=[[0.5, 0.5], bad])
    assert llm.cache.created == created
    with pytest.raises(ValueError, match="alpha"):
        llm.generate([{"prompt_token_ids": prompts[0]}], greedy, preference=[0.5, 0.5], alpha=float("inf"))


def test_cache_refuses_bad_arguments_naming_them(tiny, tmp_path):
    sft, dirs = tiny
    with pytest.raises(ValueError, match="beta is required"):
        MixtureCache(dirs, sft=sft, method="bone", capacity=2, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="capacity"):
        MixtureCache(dirs, sft=sft, beta=BETA, capacity=0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="at least 2"):
        MixtureCache(dirs[:1], sft=sft, beta=BETA, capacity=2, cache_dir=tmp_path)
    cache = MixtureCache(dirs, sft=sft, beta=BETA, capacity=1, cache_dir=tmp_path)
    first, _ = cache.acquire([1.0, 0.0])
    from bonesoup.vllm.adapters import SlotsBusy

    with pytest.raises(SlotsBusy):  # the one slot is pinned: nothing is evicted under a request in flight
        cache.acquire([0.0, 1.0])
    cache.release(first)
    second, evicted = cache.acquire([0.0, 1.0])
    assert evicted == [first] and second.id == first.id + 1
