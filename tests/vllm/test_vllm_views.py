"""publish="views": the linear layers compute on the arena itself, so a merge is the whole preference change."""

from __future__ import annotations

import pytest
from vllm_helpers import BETA, shutdown_engine, token_prompts

from bonesoup.vllm import SoupLLM


@pytest.fixture(scope="module")
def soup(tiny):
    llm = SoupLLM(tiny[0], tiny[1], beta=BETA, dtype="float32", max_model_len=512, max_num_seqs=8, publish="views")
    yield llm
    shutdown_engine(llm)


@pytest.mark.parametrize("preference,alpha", [([1.0, 0.0], 0.0), ([0.3, 0.7], 0.5)])
def test_views_equal_the_offline_merge(soup, tiny, prompts, reference, greedy, preference, alpha):
    info = soup.set_preference(preference, alpha=alpha)
    assert soup.info()[0]["publish"] == "views"
    assert info["publish_s"] < info["merge_s"] + 1e-3  # nothing re-packed
    outs = soup.generate(token_prompts(prompts), greedy)
    assert [list(o.outputs[0].token_ids) for o in outs] == reference(tiny, preference, alpha, prompts=prompts)


def test_bad_publish_mode_is_refused(tiny):
    with pytest.raises(ValueError, match="publish must be 'repack' or 'views'"):
        SoupLLM(tiny[0], tiny[1], beta=BETA, dtype="float32", max_model_len=512, publish="copy")
