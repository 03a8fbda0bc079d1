"""Checkpoint in, checkpoint out: train one policy on a reward combination, and evaluate policies.

:func:`train_checkpoint` is what ``bonesoup train`` runs: load the SFT
checkpoint, build the combined reward (expert, backbone or preference
weights, optionally normalised with statistics of SFT samples), run
:class:`PPOTrainer` and write a Hugging Face checkpoint of the policy alone.
:func:`evaluate_checkpoint` samples a trained policy on held-out prompts and
reports each reward's mean and std and the KL to the reference.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bonesoup.train.rewards import CombinedReward, RewardFn, RewardNormalization, get_reward

from .rollout import (
    check_special_tokens,
    decode_responses,
    logprobs_from_logits,
    response_logits,
    sample_rollouts,
    sample_texts,
)
from .trainer import PPOConfig, PPOTrainer, with_lora

__all__ = ["load_policy", "measure_reward_normalization", "train_checkpoint", "evaluate_checkpoint"]


def load_policy(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` from a Hugging Face checkpoint directory (fp32 by default, eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    check_special_tokens(tokenizer)
    return model, tokenizer


def _reward_fns(rewards: Sequence[str | RewardFn]) -> tuple[list[RewardFn], list[str]]:
    fns = [get_reward(r) for r in rewards]
    names = [r if isinstance(r, str) else getattr(r, "name", f"r{i}") for i, r in enumerate(rewards)]
    return fns, names


def measure_reward_normalization(sft: str | os.PathLike, prompts: Sequence[str], rewards: Sequence[str | RewardFn],
                                 *, samples: int = 256, max_new_tokens: int = 20, temperature: float = 1.0,
                                 seed: int = 0) -> RewardNormalization:
    """Mean and std of each reward over ``samples`` SFT responses to ``prompts`` (cycled in order)."""
    model, tok = load_policy(sft)
    fns, names = _reward_fns(rewards)
    ps = [prompts[i % len(prompts)] for i in range(samples)]
    texts, _ = sample_texts(model, tok, ps, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    obj = CombinedReward(fns, np.zeros(len(fns)), names=names).objectives(ps, texts)
    return RewardNormalization.fit(obj)


def train_checkpoint(sft: str | os.PathLike, out_dir: str | os.PathLike, *, rewards: Sequence[str | RewardFn],
                     weights: Sequence[float], prompts: Sequence[str], config: PPOConfig,
                     normalization: RewardNormalization | None = None, separate_critic: bool = False,
                     lora_rank: int | None = None, force: bool = False, progress: bool = True, metadata: dict | None = None,
                     device: str | torch.device | None = None, resume: bool = False) -> list[dict]:
    """Train a policy from the SFT checkpoint ``sft`` on ``sum_i weights[i] * norm(r_i)`` and save it to ``out_dir``.

    The output holds the policy weights only (no value head), the tokenizer,
    ``train_log.jsonl``, ``train_log.png`` and ``bonesoup-train.json``
    (config, weights, reward names, normalisation), written atomically; it is
    a checkpoint that ``merge_checkpoints`` and ``LiveSoup`` take as is.
    ``lora_rank``: train LoRA adapters of that rank (optional ``peft``
    package) against the adapter-free base as the reference; the output is
    still a full checkpoint (adapters merged). Under ``torchrun`` every
    process calls this and the main one writes.

    ``config.save_every`` / ``resume``: training checkpoints and resuming
    from the newest one (:meth:`PPOTrainer.train`); a checkpoint is refused
    when the SFT checkpoint's fingerprint, the rewards, weights,
    normalisation, LoRA rank, value model or the PPO settings differ.

    Returns the per-step statistics.
    """
    fns, names = _reward_fns(rewards)
    reward = CombinedReward(fns, weights, names=names, normalization=normalization)
    policy, tok = load_policy(sft)
    if lora_rank is not None:  # the adapters' random init is the run's seed's, not the global generator's
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            policy = with_lora(policy, lora_rank)
    critic = load_policy(sft)[0] if separate_critic else None
    trainer = PPOTrainer(config, policy, tok, reward, prompts, critic=critic, device=device)
    meta = {"sft": str(Path(sft).absolute()), "rewards": names, "weights": list(map(float, reward.weights)),
            "normalization": normalization.to_dict() if normalization else None,
            "value_model": "separate" if separate_critic else "shared", "lora_rank": lora_rank,
            **(metadata or {})}
    if config.save_every or resume:  # a resume must start from the same SFT weights, not only the same path
        from bonesoup.fingerprint import checkpoint_fingerprint

        meta["sft_fingerprint"] = checkpoint_fingerprint(sft)
    return trainer.train(out_dir=out_dir, force=force, progress=progress, metadata=meta, resume=resume)


@torch.no_grad()
def evaluate_checkpoint(model_dir: str | os.PathLike, prompts: Sequence[str], rewards: Sequence[str | RewardFn], *,
                        ref: str | os.PathLike | None = None, samples_per_prompt: int = 8,
                        max_new_tokens: int = 20, temperature: float = 1.0, seed: int = 12345,
                        weights: Sequence[float] | None = None,
                        normalization: RewardNormalization | None = None) -> dict:
    """Sample ``samples_per_prompt`` responses per prompt and score them.

    Returns a dict: ``n`` (samples), ``rewards`` {name: {"mean", "std"}} of the
    raw rewards, ``score`` {"mean", "std"} of the combination when ``weights``
    are given, ``kl`` {"mean", "std"} of the sequence KL(pi || ref) (sum over
    response tokens of log pi - log pi_ref at the sampled tokens, tempered
    like the samples) when ``ref`` is given, ``eos_fraction`` and
    ``examples`` (the first few responses), ``per_sample`` (the raw rewards,
    [n][len(rewards)]). Sampling is per-sample seeded, so
    two models are compared on the same random numbers.
    """
    model, tok = load_policy(model_dir)
    fns, names = _reward_fns(rewards)
    _, eos = check_special_tokens(tok)
    ps = [p for p in prompts for _ in range(samples_per_prompt)]
    rollouts = sample_rollouts(model, tok, ps, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    texts = [t for r in rollouts for t in decode_responses(tok, r.response, r.response_mask, eos)]
    has_eos = torch.cat([r.has_eos for r in rollouts])
    comb = CombinedReward(fns, weights if weights is not None else np.zeros(len(fns)), names=names,
                          normalization=normalization)
    obj = comb.objectives(ps, texts)
    out = {"model": str(model_dir), "n": len(ps), "eos_fraction": float(has_eos.float().mean()),
           "rewards": {n: {"mean": float(obj[:, i].mean()), "std": float(obj[:, i].std())}
                       for i, n in enumerate(names)},
           "examples": [p + t for p, t in zip(ps[::samples_per_prompt][:6], texts[::samples_per_prompt][:6])],
           "per_sample": obj.tolist()}
    if weights is not None:
        s = comb.score(obj)
        out["score"] = {"mean": float(s.mean()), "std": float(s.std())}
    if ref is not None:  # KL on the sampled tokens themselves (re-tokenising the text could differ)
        ref_model, _ = load_policy(ref)
        kls = []
        for r in rollouts:
            ids, attn, pos = r.full()
            P = r.query.shape[1]
            lp = [logprobs_from_logits(response_logits(m(input_ids=ids, attention_mask=attn, position_ids=pos,
                                                         use_cache=False).logits, P), r.response, temperature)
                  for m in (model, ref_model)]
            kls.append(((lp[0] - lp[1]) * r.response_mask).sum(1))
        kl = torch.cat(kls)
        out["kl"] = {"mean": float(kl.mean()), "std": float(kl.std())}
    return out
