"""PPOConfig: the hyper-parameters of :class:`bonesoup.train.ppo.trainer.PPOTrainer`, one docstring per field."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields

from .losses import AdaptiveKLController

__all__ = ["PPOConfig"]


@dataclass
class PPOConfig:
    """Hyper-parameters of :class:`PPOTrainer`. Batch sizes count rollouts over all processes."""

    steps: int = 100
    """PPO iterations (one rollout batch + its update each)."""
    batch_size: int = 64
    """Rollouts per step, over all processes."""
    mini_batch_size: int = 16
    """Rollouts per optimiser step, over all processes."""
    grad_accum_steps: int = 1
    """Micro-batches per minibatch on each process (micro-batch = mini_batch_size / (world * grad_accum_steps))."""
    ppo_epochs: int = 4
    """Passes over the rollout batch per step."""
    generation_batch_size: int | None = None
    """Rows per generate call on a process (None: the whole local batch at once)."""
    max_new_tokens: int = 20
    """Sampled response length T (responses end earlier at EOS)."""
    max_prompt_tokens: int | None = None
    """Keep only the last tokens of longer prompts (None: keep all)."""
    temperature: float = 1.0
    """Sampling temperature; the same one tempers the policy's and the reference's log-probs."""
    lr: float = 1e-4
    """AdamW learning rate (constant)."""
    adam_eps: float = 1e-5
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm of each minibatch to this (inf: no clipping)."""
    gamma: float = 1.0
    """Discount in GAE."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """Policy ratio clip epsilon."""
    cliprange_value: float = 0.2
    """Value clip epsilon (around the rollout's values)."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    kl_coef: float = 0.05
    """Initial (or fixed) coefficient of the per-token KL penalty."""
    kl_estimator: str = "k1"
    """Per-token KL estimator: 'k1' (log-ratio) or 'k3' ((r - 1) - log r)."""
    adaptive_kl: bool = False
    """Steer kl_coef towards target_kl (Ziegler et al. 2019)."""
    target_kl: float = 6.0
    """Target sequence KL (nats) of the adaptive controller."""
    kl_horizon: float = 10000.0
    """Horizon of the adaptive controller (rollouts)."""
    early_stop_kl: float | None = None
    """Stop a step's PPO epochs once a minibatch's approximate KL to the rollout policy exceeds 1.5 x this
    (trl's ``early_stopping`` with ``target_kl``; None: off)."""
    whiten_rewards: bool = False
    """Rescale per-token rewards by their masked std (mean kept) before GAE."""
    whiten_advantages: bool = True
    """Masked whitening of the advantages (statistics over the whole batch)."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of a response without EOS within max_new_tokens."""
    seed: int = 0
    """Seeds prompt choice, per-sample sampling, minibatch shuffles and the value head."""
    bf16: bool | None = None
    """bf16 autocast for forward passes (None: on for CUDA, off on the CPU)."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in backward (None: on for CUDA)."""
    save_every: int = 0
    """Write a training checkpoint (resumable, :mod:`~bonesoup.train.ppo.training_state`) every N steps; 0: off."""
    checkpoint_dir: str | None = None
    """Where training checkpoints go (None: ``<out_dir>.checkpoints`` beside the output)."""

    #: Fields that say where and how often state is written, not what a step computes: a resumed run may
    #: change them (and ``steps``, to extend a run) without changing any result.
    RESUMABLE_CHANGES = ("steps", "save_every", "checkpoint_dir")

    def __post_init__(self):
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        for name in ("steps", "batch_size", "mini_batch_size", "grad_accum_steps", "ppo_epochs", "max_new_tokens"):
            positive_int(name)
        for name in ("generation_batch_size", "max_prompt_tokens"):
            if getattr(self, name) is not None:
                positive_int(name)
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size "
                             f"({self.mini_batch_size})")
        if self.mini_batch_size % self.grad_accum_steps:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) must be a multiple of grad_accum_steps "
                             f"({self.grad_accum_steps})")
        for name in ("temperature", "lr", "adam_eps", "max_grad_norm", "cliprange", "cliprange_value"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and not math.isnan(v)):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        for name in ("gamma", "lam"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v <= 1):
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        for name in ("vf_coef", "kl_coef"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.adaptive_kl:
            AdaptiveKLController(self.kl_coef, self.target_kl, self.kl_horizon)  # validates target and horizon
        if self.early_stop_kl is not None and not (isinstance(self.early_stop_kl, (int, float))
                                                   and self.early_stop_kl > 0 and math.isfinite(self.early_stop_kl)):
            raise ValueError(f"early_stop_kl must be a positive number or None, got {self.early_stop_kl!r}")
        if isinstance(self.save_every, bool) or not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"save_every must be an integer >= 0 (0 = off), got {self.save_every!r}")
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, (str, os.PathLike)):
            raise ValueError(f"checkpoint_dir must be a path or None, got {self.checkpoint_dir!r}")
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)  # JSON-able in the metadata
        if self.missing_eos_penalty is not None and not math.isfinite(self.missing_eos_penalty):
            raise ValueError(f"missing_eos_penalty must be finite, got {self.missing_eos_penalty!r}")

    def check_world(self, world: int) -> None:
        """Refuse batch sizes that do not split over ``world`` processes."""
        if self.batch_size % world:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of the world size ({world})")
        if self.mini_batch_size % (world * self.grad_accum_steps):
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) must be a multiple of world size x "
                             f"grad_accum_steps ({world} x {self.grad_accum_steps})")

    def run_settings(self) -> dict:
        """The fields that decide what each step computes (all but :attr:`RESUMABLE_CHANGES`), JSON-able."""
        return {k: v for k, v in asdict(self).items() if k not in self.RESUMABLE_CHANGES}

    @classmethod
    def from_dict(cls, d: dict) -> "PPOConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown PPOConfig fields {unknown}")
        return cls(**d)
