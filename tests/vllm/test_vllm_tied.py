"""Tied embeddings: lm_head and embed_tokens are one tensor, stored and merged once, and the head follows."""

from __future__ import annotations

import pytest
from vllm_helpers import BETA, shutdown_engine, token_prompts

from bonesoup.vllm import SoupLLM


@pytest.fixture(scope="module")
def soup(tiny_tied):
    llm = SoupLLM(tiny_tied[0], tiny_tied[1], beta=BETA, dtype="float32", max_model_len=512, max_num_seqs=8)
    yield llm
    shutdown_engine(llm)


def test_tied_parameter_is_stored_once(soup, tiny_tied):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_tied[0])
    assert hf.config.tie_word_embeddings and hf.lm_head.weight is hf.model.embed_tokens.weight
    unique = sum(p.numel() for p in hf.parameters())  # parameters() lists a tied tensor once
    assert soup.info()[0]["numel"] == [unique]


@pytest.mark.parametrize("preference,alpha", [([1.0, 0.0], 0.0), ([0.3, 0.7], 0.3)])
def test_tied_head_follows_the_merge(soup, tiny_tied, prompts, reference, greedy, preference, alpha):
    soup.set_preference(preference, alpha=alpha)
    outs = soup.generate(token_prompts(prompts[:3]), greedy)
    assert [list(o.outputs[0].token_ids) for o in outs] == reference(tiny_tied, preference, alpha, prompts=prompts[:3])
    assert {o.weights_version for o in outs} == {soup.version}
