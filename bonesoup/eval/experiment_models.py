"""The experiment's trained models, cached by fingerprint under ``out/models``.

Each model's directory is :func:`bonesoup.fingerprint.cached_model_dir` of a
description holding everything it depends on (the SFT's fingerprint, the
training prompts, rewards, reward weights, PPO or value settings, seed, torch
version); a rerun finds it and trains nothing.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bonesoup.fingerprint import cached_model_dir, checkpoint_fingerprint, fingerprint

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

    def __init__(self, cfg, root: Path, sft: Path, seed: int, progress: bool):
        from bonesoup.tasks.registry import get_task

        self.cfg, self.models, self.sft, self.seed, self.progress = cfg, Path(root) / "models", sft, seed, progress
        self.n = len(cfg.rewards)
        #: names of the directories trained by this object (the rest were found)
        self.trained: list[str] = []
        # The training prompts come from code: fingerprint them too, so a change there is a new model.
        self.prompts = get_task(cfg.task).prompts("train")
        self.common = {"sft": checkpoint_fingerprint(sft), "prompts": fingerprint(self.prompts),
                       "rewards": list(cfg.rewards), "seed": seed, "torch": torch.__version__,
                       # How rollouts are drawn: a change of sampler is a new model.
                       "sampler": "guided_generate/derive_seed"}

    def _ppo(self, name: str, weights, steps: int | None = None) -> Path:
        from bonesoup.train.ppo.checkpoint_training import train_checkpoint
        from bonesoup.train.ppo.trainer import PPOConfig

        c = self.cfg
        config = PPOConfig(steps=c.ppo_steps if steps is None else steps, batch_size=c.ppo_batch_size, lr=c.ppo_lr,
                           kl_coef=c.ppo_kl_coef, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                           seed=self.seed)
        out = cached_model_dir(self.models, f"{name}-seed{self.seed}", {
            **self.common, "weights": [round(float(x), 10) for x in weights], "ppo": dataclasses.asdict(config)})
        if (out / "config.json").is_file():
            return out
        _log(f"training {out.name} (weights {np.round(np.asarray(weights, float), 4).tolist()})")
        train_checkpoint(self.sft, out, rewards=list(c.rewards), weights=weights, prompts=self.prompts,
                         config=config, progress=self.progress, metadata={"combination": name, "seed": self.seed})
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
        train_value_models(self.sft, outs, rewards=list(c.rewards), weights=np.eye(self.n).tolist(),
                           prompts=self.prompts, samples=c.value_samples, steps=c.value_steps,
                           max_new_tokens=c.max_new_tokens, seed=self.seed, progress=self.progress)
        self.trained += [o.name for o in outs]
        return outs

    def all(self) -> dict:
        """``{"backbones": [...], "experts": [...], "morlhf": {mu: dir}, "values": [...]}``, trained as needed."""
        return {"backbones": self.backbones(), "experts": self.experts(), "morlhf": self.morlhf(),
                "values": self.values()}
