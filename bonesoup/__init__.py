"""bonesoup: the Bone Soup / MAGE method on top of soupkernels.

Knows models, checkpoints and preferences: merge coefficients, checkpoint
I/O, the offline merge, live re-merge inside a serving process (LiveSoup),
PPO training of backbones on combined rewards (``bonesoup.ppo``,
``bonesoup.rewards``, the embedded task ``bonesoup.task``), MAGE guidance
(value models merged into one proxy: ``bonesoup.values``,
``bonesoup.value_training``; decoding: ``bonesoup.mage``), metrics
(``bonesoup.metrics``), the experiment (``bonesoup.experiment``) and the
command line (``bonesoup --help``).
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
_LAZY = {
    "GuidanceLogitsProcessor": "guided", "GuidedGeneration": "guided", "guided_generate": "guided",
    "mage_generate": "mage", "mod_generate": "mage", "ChunkSearch": "mage",
    "ValueSoup": "values", "Guidance": "values", "implicit_guidance": "values", "explicit_guidance": "values",
    "train_value_models": "value_training", "hypervolume": "metrics", "controllability": "metrics",
    "pareto_front": "metrics", "run_experiment": "experiment", "ExperimentConfig": "experiment",
}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"bonesoup.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'bonesoup' has no attribute {name!r}")
