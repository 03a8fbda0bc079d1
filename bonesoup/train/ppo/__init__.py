"""PPO for causal language models: the training path of Bone Soup's backbones.

- :mod:`bonesoup.train.ppo.losses`: the arithmetic (KL penalty, GAE, whitening, clipped losses, KL controllers);
- :mod:`bonesoup.train.ppo.rollout`: rollouts through the one decode loop (``guided_generate``), log-probs;
- :mod:`bonesoup.train.ppo.trainer`: :class:`PPOConfig`, :class:`PPOTrainer` (single process or DDP under torchrun);
- :mod:`bonesoup.train.ppo.training_log`: JSONL log and its plot.
"""

from .losses import AdaptiveKLController, FixedKLController, gae, kl_penalty, masked_whiten
from .rollout import generate_rollout, sample_texts
from .trainer import PolicyAndValue, PPOConfig, PPOTrainer, disable_dropout, with_lora

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
