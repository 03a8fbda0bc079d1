"""bfloat16: SoupLLM after a re-merge serves exactly what vLLM itself serves from the merged checkpoint.

The peer here is vLLM (same kernels, same packing) on ``bonesoup.merge_checkpoints``'s
bf16 output, reloaded in place for the second preference: the merged bits are the
same (fp32 accumulation, one rounding), so greedy tokens must match exactly, where
transformers' bf16 matmuls could legitimately differ.
"""

from __future__ import annotations

import pytest
from vllm_helpers import BETA, shutdown_engine, token_prompts

PREFERENCES = ([0.3, 0.7], [1.0, 0.0])


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory):
    import torch
    from bonesoup.tasks.tiny_qwen2 import make_tiny_qwen2

    return make_tiny_qwen2(tmp_path_factory.mktemp("qwen2-bf16"), 2, dtype=torch.bfloat16, seed=2)


@pytest.fixture(scope="module")
def vllm_on_merged(bf16_models, prompts, greedy, tmp_path_factory):
    """vLLM's own greedy tokens on the merged bf16 checkpoints, one per preference."""
    from vllm import LLM

    from bonesoup import merge_checkpoints

    sft, backbones = bf16_models
    root = tmp_path_factory.mktemp("merged-bf16")
    merged = [merge_checkpoints(backbones, root / f"m{i}", preference=p, beta=BETA, sft=sft, progress=False)
              for i, p in enumerate(PREFERENCES)]
    llm = LLM(model=str(merged[0]), dtype="bfloat16", enforce_eager=True, max_model_len=512, max_num_seqs=8)
    tokens = []
    for i, path in enumerate(merged):
        if i:
            llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
            llm.reset_prefix_cache()
        tokens.append([list(o.outputs[0].token_ids)
                       for o in llm.generate(token_prompts(prompts), greedy, use_tqdm=False)])
    shutdown_engine(llm)
    return tokens


def test_bf16_remerge_equals_vllm_on_the_merged_checkpoint(bf16_models, vllm_on_merged, prompts, greedy):
    from bonesoup.vllm import SoupLLM

    soup = SoupLLM(bf16_models[0], bf16_models[1], beta=BETA, dtype="bfloat16", max_model_len=512, max_num_seqs=8)
    try:
        assert soup.info()[0]["dtypes"] == ["torch.bfloat16"]
        got = []
        for p in PREFERENCES:
            info = soup.set_preference(p)
            assert info["launches"] == 1
            got.append([list(o.outputs[0].token_ids) for o in soup.generate(token_prompts(prompts), greedy)])
    finally:
        shutdown_engine(soup)
    assert got == vllm_on_merged
    assert got[0] != got[1]
