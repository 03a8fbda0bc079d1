"""Helpers shared by the vLLM tests (a module of its own: test files import it by name, not conftest)."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

BETA = 0.7
MAX_TOKENS = 16


def shutdown_engine(llm) -> None:
    """Free an in-process engine so the next module can start its own."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def token_prompts(prompts):
    """vLLM prompts from token ids (the ids transformers gets: no second tokenisation)."""
    return [{"prompt_token_ids": list(p)} for p in prompts]


class References:
    """Greedy tokens of transformers on ``bonesoup.merge_checkpoints`` at a preference (cached; None: the SFT model)."""

    def __init__(self, root: Path):
        self.root, self._cache, self._n = root, {}, 0

    def __call__(self, models, preference, alpha=0.0, prompts=(), max_tokens=MAX_TOKENS, method="bone"):
        from transformers import AutoModelForCausalLM

        from bonesoup import guided_generate, merge_checkpoints

        sft, backbones = models
        key = (str(sft), preference and tuple(preference), alpha, method)
        if key not in self._cache:
            self._n += 1
            out = sft if preference is None else merge_checkpoints(backbones, self.root / f"merged-{self._n}", preference=preference,
                                    beta=BETA if method == "bone" else None, alpha=alpha, sft=sft, method=method,
                                    progress=False)
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            self._cache[key] = (model, {})
        model, toks = self._cache[key]
        result = []
        for ids in prompts:
            if (tuple(ids), max_tokens) not in toks:
                with torch.no_grad():
                    g = guided_generate(model, [], [1.0], torch.tensor([ids]), max_new_tokens=max_tokens,
                                        temperature=0.0, stop_token_ids=[])
                toks[(tuple(ids), max_tokens)] = g.new_tokens[0].tolist()
            result.append(toks[(tuple(ids), max_tokens)])
        return result

