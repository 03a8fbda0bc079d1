"""SoupLLM (vLLM's offline LLM) re-merging in place: outputs equal transformers on the offline merge."""

from __future__ import annotations

import numpy as np
import pytest
from vllm_helpers import BETA, shutdown_engine, token_prompts

from bonesoup.merge.coefficients import merge_coefficients
from bonesoup.vllm import SoupLLM

# (preference, alpha): one-hot (lambda = (1.75, -0.75) at beta 0.7), mixed, extrapolated away from the SFT model
PREFERENCES = [([1.0, 0.0], 0.0), ([0.3, 0.7], 0.0), ([0.6, 0.4], 0.5), ([0.0, 1.0], 0.0)]


@pytest.fixture(scope="module")
def soup(tiny):
    llm = SoupLLM(tiny[0], tiny[1], beta=BETA, dtype="float32", max_model_len=512, max_num_seqs=8)
    yield llm
    shutdown_engine(llm)


def _generate(soup, prompts, greedy):
    outs = soup.generate(token_prompts(prompts), greedy)
    return [list(o.outputs[0].token_ids) for o in outs], [o.weights_version for o in outs]


def test_version_0_serves_the_sft_model(soup, tiny, prompts, reference, greedy):
    if soup.version != 0:
        pytest.skip("runs first: the module's engine has already re-merged")  # pytest keeps file order
    tokens, versions = _generate(soup, prompts[:3], greedy)
    assert versions == [0, 0, 0]
    assert tokens == reference(tiny, None, prompts=prompts[:3])
    assert soup.info()[0]["coefficients"] == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("preference,alpha", PREFERENCES)
def test_remerge_equals_offline_merge(soup, tiny, prompts, reference, greedy, preference, alpha):
    before = soup.version
    info = soup.set_preference(preference, alpha=alpha)
    c, c_sft = merge_coefficients(preference, method="bone", beta=BETA, alpha=alpha, n=2)
    assert info["version"] == before + 1 == soup.version
    np.testing.assert_allclose(info["coefficients"], [*c, c_sft], rtol=0, atol=0)
    assert info["launches"] == 1 and info["ranks"] == 1  # one fp32 arena, one launch
    assert info["merge_s"] > 0 and info["publish_s"] > 0
    tokens, versions = _generate(soup, prompts[:3], greedy)
    assert versions == [soup.version] * 3
    assert tokens == reference(tiny, preference, alpha, prompts=prompts[:3])
    assert soup.info()[0]["version"] == soup.version


def test_preferences_change_the_output(tiny, prompts, reference):
    """The references differ between preferences: the equality above would catch a merge that did nothing."""
    seen = {tuple(map(tuple, reference(tiny, p, a, prompts=prompts[:3]))) for p, a in PREFERENCES}
    assert len(seen) == len(PREFERENCES)


def test_long_prompt_after_a_preference_change_is_not_served_from_a_stale_prefix_cache(
        soup, tiny, prompts, reference, greedy):
    long = prompts[3:]
    soup.set_preference([1.0, 0.0])
    first, _ = _generate(soup, long, greedy)  # fills the prefix cache with this prompt's blocks
    assert first == reference(tiny, [1.0, 0.0], prompts=long)
    soup.set_preference([0.2, 0.8])
    second, versions = _generate(soup, long, greedy)
    assert versions == [soup.version]
    assert second == reference(tiny, [0.2, 0.8], prompts=long)
    assert second != first


@pytest.mark.parametrize("bad,match", [([0.5, 0.6], "sum to 1"), ([1.0], "2 entries"), ([1.5, -0.5], "non-negative"),
                                       ([float("nan"), 1.0], "finite")])
def test_bad_preference_is_refused_before_anything_changes(soup, tiny, prompts, reference, greedy, bad, match):
    version, coeffs = soup.version, soup.info()[0]["coefficients"]
    with pytest.raises(ValueError, match=match):
        soup.set_preference(bad)
    assert soup.version == version and soup.info()[0]["coefficients"] == coeffs


def test_failing_rpc_leaves_the_engine_serving_the_old_weights(soup, tiny, prompts, reference, greedy):
    soup.set_preference([0.3, 0.7])
    before, _ = _generate(soup, prompts[:3], greedy)
    version = soup.version
    # raw coefficients are checked in the workers: the RPC fails there
    with pytest.raises(ValueError, match="rank 0: coefficients must hold 3 finite numbers"):
        soup.set_coefficients([1.0, 0.0])
    with pytest.raises(ValueError, match="rank 0: coefficients must hold 3 finite numbers"):
        soup.set_coefficients([float("inf"), 0.0, 0.0])
    assert soup.version == version
    after, versions = _generate(soup, prompts[:3], greedy)
    assert after == before == reference(tiny, [0.3, 0.7], prompts=prompts[:3])
    assert versions == [soup.version] * 3
    assert soup.info()[0]["version"] == soup.version
    soup.set_preference([0.0, 1.0])  # and it still re-merges
    assert _generate(soup, prompts[:3], greedy)[0] == reference(tiny, [0.0, 1.0], prompts=prompts[:3])


def test_engine_arguments_are_checked_before_start(tiny):
    with pytest.raises(ValueError, match="beta is required"):
        SoupLLM(tiny[0], tiny[1], beta=None)
    with pytest.raises(ValueError, match="method must be one of"):
        SoupLLM(tiny[0], tiny[1], beta=BETA, method="nope")
    with pytest.raises(FileNotFoundError, match=r"backbones\[1\]"):
        SoupLLM(tiny[0], [tiny[1][0], tiny[0].parent / "missing"], beta=BETA)
    with pytest.raises(ValueError, match="load_format"):
        SoupLLM(tiny[0], tiny[1], beta=BETA, load_format="auto")


def test_raw_coefficients_serve_one_stored_model_as_is(soup, tiny, prompts, reference, greedy):
    info = soup.set_coefficients([0.0, 0.0, 1.0])  # the SFT row alone: 1 * x + 0 * y is exact in fp32
    assert info["preference"] is None and info["version"] == soup.version
    assert _generate(soup, prompts[:3], greedy)[0] == reference(tiny, None, prompts=prompts[:3])


def test_a_failure_after_the_merge_puts_the_served_weights_back(soup, tiny, prompts, reference, greedy, monkeypatch):
    soup.set_preference([0.3, 0.7])
    version, coeffs = soup.version, soup.info()[0]["coefficients"]
    monkeypatch.setattr(soup.llm, "reset_prefix_cache", lambda *a, **k: False)  # every rank merged, then this
    with pytest.raises(RuntimeError, match="prefix cache"):
        soup.set_preference([1.0, 0.0])
    monkeypatch.undo()
    assert soup.version == version and soup.info()[0]["coefficients"] == coeffs
    tokens, versions = _generate(soup, prompts[:3], greedy)
    assert versions == [version] * 3 and tokens == reference(tiny, [0.3, 0.7], prompts=prompts[:3])
