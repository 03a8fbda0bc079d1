"""PPO for causal language models: the training path of Bone Soup's backbones.

- :mod:`bonesoup.train.ppo.losses`: the arithmetic (KL penalty, GAE, whitening, clipped losses, KL controllers);
- :mod:`bonesoup.train.ppo.rollout`: rollouts through the one decode loop (``guided_generate``), log-probs;
- :mod:`bonesoup.train.ppo.config`: :class:`PPOConfig`, one docstring per hyper-parameter;
- :mod:`bonesoup.train.ppo.policy`: policy + value head, dropout off, LoRA, activation checkpointing;
- :mod:`bonesoup.train.ppo.distributed`: data parallelism under torchrun;
- :mod:`bonesoup.train.ppo.trainer`: :class:`PPOTrainer`, one numbered PPO step (single process or DDP);
- :mod:`bonesoup.train.ppo.training_log`: JSONL log and its plot;
- :mod:`bonesoup.train.ppo.training_state`: training checkpoints (atomic) and resume.
"""

from .losses import AdaptiveKLController, FixedKLController, gae, kl_penalty, masked_whiten
from .rollout import generate_rollout, sample_texts
from .config import PPOConfig
from .policy import PolicyAndValue, disable_dropout, with_lora
from .trainer import PPOTrainer

__all__ = [
    "PPOConfig",
    "PPOTrainer",
    "PolicyAndValue",
    "disable_dropout",
    "with_lora",
    "AdaptiveKLController",
    "FixedKLController",
    "gae",
    "kl_penalty",
    "masked_whiten",
    "generate_rollout",
    "sample_texts",
]
