"""bonesoup: the Bone Soup / MAGE method on top of soupkernels.

Knows models, checkpoints and preferences: merge coefficients, checkpoint
I/O, the offline merge, live re-merge inside a serving process (LiveSoup),
PPO training of backbones on combined rewards (``bonesoup.ppo``,
``bonesoup.rewards``, the embedded task ``bonesoup.task``) and the command
line (``bonesoup --help``).
"""

from bonesoup.coefficients import (
    backbone_matrix,
    bone_coefficients,
    fold_extrapolation,
    merge_coefficients,
    per_objective_extrapolation,
    rewarded_soup_coefficients,
    validate_preference,
)
from bonesoup.live import LiveSoup, RemergeInfo
from bonesoup.offline_merge import merge_checkpoints
from bonesoup.ppo import PPOConfig, PPOTrainer
from bonesoup.ppo.checkpoint_training import evaluate_checkpoint, train_checkpoint
from bonesoup.rewards import CombinedReward, RewardNormalization, combination_weights, get_reward, register_reward

__all__ = [
    "backbone_matrix",
    "bone_coefficients",
    "rewarded_soup_coefficients",
    "fold_extrapolation",
    "merge_coefficients",
    "per_objective_extrapolation",
    "validate_preference",
    "merge_checkpoints",
    "LiveSoup",
    "RemergeInfo",
    "PPOConfig",
    "PPOTrainer",
    "train_checkpoint",
    "evaluate_checkpoint",
    "CombinedReward",
    "RewardNormalization",
    "combination_weights",
    "get_reward",
    "register_reward",
]

# Guided decoding (MAGE stage 2) imports transformers; load it on first use so that
# `import bonesoup` stays light for the merge paths.
_GUIDED = ("GuidanceLogitsProcessor", "GuidedGeneration", "guided_generate")
__all__ += list(_GUIDED)


def __getattr__(name):
    if name in _GUIDED:
        from bonesoup import guided

        return getattr(guided, name)
    raise AttributeError(f"module 'bonesoup' has no attribute {name!r}")
