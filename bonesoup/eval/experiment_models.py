"""The experiment's trained models, cached by fingerprint under ``out/models``.

Each model's directory is :func:`bonesoup.fingerprint.cached_model_dir` of a
description holding everything it depends on, by content: the SFT
checkpoint's (weights, config, tokenizer), the training prompts', each
reward's (a reward model's files, a callable's source file, a built-in's
arguments), the reward weights, PPO or value settings, seed, torch version;
a rerun finds it and trains nothing, and a changed file is a new model.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bonesoup.fingerprint import cached_model_dir, directory_fingerprint

__all__ = ["TrainedModels"]


def _log(msg: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class TrainedModels:
    """Trains (or finds) the models of one training seed.

    Parameters
    ----------
    cfg : ExperimentConfig
    root : the experiment's output directory (models go under ``root / "models"``).
    sft : the task's SFT checkpoint directory.
    seed : the training seed.
    """

    def __init__(self, cfg, root: Path, sft: Path, seed: int, progress: bool, *, task=None):
        self.cfg, self.models, self.sft, self.seed, self.progress = cfg, Path(root) / "models", sft, seed, progress
        #: the task (bonesoup.tasks.spec.TaskSpec): prompts and rewards (built once, shared by every run)
        self.task = task if task is not None else cfg.task_spec()
        self.n = len(self.task.rewards)
        #: names of the directories trained by this object (the rest were found)
        self.trained: list[str] = []
        self.prompts = self.task.prompts["train"]
        self.common = {"sft": directory_fingerprint(sft), **self.task.description(), "seed": seed,
                       "torch": torch.__version__,
                       # How rollouts are drawn: a change of sampler is a new model.
                       "sampler": "guided_generate/derive_seed"}

    def _ppo(self, name: str, weights, steps: int | None = None) -> Path:
        from bonesoup.train.ppo.checkpoint_training import train_checkpoint
        from bonesoup.train.ppo.trainer import PPOConfig

        c = self.cfg
        config = PPOConfig(steps=c.ppo_steps if steps is None else steps, batch_size=c.ppo_batch_size, lr=c.ppo_lr,
                           kl_coef=c.ppo_kl_coef, max_new_tokens=c.max_new_tokens, temperature=c.temperature, seed=self.seed,
                           generation_batch_size=c.rollout_batch_size, bf16=c.torch_dtype() == torch.bfloat16)
        ppo = dataclasses.asdict(config)
        # Rollout i is drawn with its own key at the batch's width, whatever the generate chunk: not a new model.
        del ppo["generation_batch_size"]
        desc = {**self.common, "weights": [round(float(x), 10) for x in weights], "ppo": ppo}
        if c.lora_rank is not None:  # only then: full fine-tunes keep their cache keys
            desc["lora_rank"] = c.lora_rank
        prefix = f"{name}-lora{c.lora_rank}" if c.lora_rank is not None else name
        out = cached_model_dir(self.models, f"{prefix}-seed{self.seed}", desc)
        if (out / ("adapter_config.json" if c.lora_rank is not None else "config.json")).is_file():
            return out
        _log(f"training {out.name} (weights {np.round(np.asarray(weights, float), 4).tolist()}"
             + (f", LoRA rank {c.lora_rank})" if c.lora_rank is not None else ")"))
        train_checkpoint(self.sft, out, rewards=self.task.reward_fns(), weights=weights, prompts=self.prompts,
                         config=config, lora_rank=c.lora_rank, progress=self.progress, device=c.run_device(),
                         metadata={"combination": name, "seed": self.seed})
        self.trained.append(out.name)
        return out

    def backbones(self, beta: float | None = None, steps: int | None = None) -> list[Path]:
        """Bone Soup's n backbones: PPO on the rows of ``backbone_matrix(n, beta)`` (default ``cfg.beta``) for
        ``steps`` PPO steps (default ``cfg.ppo_steps``; the beta search trains a fraction)."""
        from bonesoup.merge.coefficients import backbone_matrix

        beta = self.cfg.beta if beta is None else beta
        B = backbone_matrix(self.n, beta)
        tag = "" if steps is None else f"-steps{steps}"
        return [self._ppo(f"backbone{j}-beta{beta:g}{tag}", B[j], steps) for j in range(self.n)]

    def experts(self) -> list[Path]:
        """One expert per reward (Rewarded Soup's and MOD's inputs, MAGE implicit's guides)."""
        return [self._ppo(f"expert{i}", np.eye(self.n)[i]) for i in range(self.n)]

    def morlhf(self) -> dict[tuple, Path]:
        """MORLHF oracles, PPO on ``mu . r`` at :func:`~bonesoup.eval.experiment_methods.morlhf_preferences`."""
        from bonesoup.eval.experiment_methods import morlhf_preferences

        return {mu: self._ppo("morlhf" + "-".join(f"{x:.4g}" for x in mu) if self.n > 2 else f"morlhf{mu[0]:g}", mu)
                for mu in morlhf_preferences(self.cfg.morlhf, self.n)}

    def values(self) -> list[Path]:
        """n explicit value models (token Q-functions of each reward under the SFT policy)."""
        from bonesoup.train.value_training import train_value_models

        c = self.cfg
        desc = {**self.common, "samples": c.value_samples, "steps": c.value_steps, "T": c.max_new_tokens}
        outs = [cached_model_dir(self.models, f"value{i}-seed{self.seed}", desc) for i in range(self.n)]
        if all((o / "config.json").is_file() for o in outs):
            return outs
        _log(f"training {self.n} explicit value models ({c.value_samples} SFT samples, {c.value_steps} steps)")
        train_value_models(self.sft, outs, rewards=self.task.reward_fns(), weights=np.eye(self.n).tolist(),
                           prompts=self.prompts, samples=c.value_samples, steps=c.value_steps,
                           max_new_tokens=c.max_new_tokens, seed=self.seed, progress=self.progress,
                           device=c.run_device())
        self.trained += [o.name for o in outs]
        return outs

    def all(self) -> dict:
        """``{"backbones": [...], "experts": [...], "morlhf": {mu: dir}, "values": [...]}``, trained as needed."""
        return {"backbones": self.backbones(), "experts": self.experts(), "morlhf": self.morlhf(),
                "values": self.values()}
