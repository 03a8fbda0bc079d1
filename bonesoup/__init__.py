"""bonesoup: the Bone Soup / MAGE method on top of soupkernels.

Knows models, checkpoints and preferences: merge coefficients, checkpoint
I/O, the offline merge, live re-merge inside a serving process (LiveSoup),
PPO training of backbones on combined rewards (``bonesoup.train.ppo``,
``bonesoup.train.rewards``, the embedded task ``bonesoup.tasks.review``), MAGE guidance
(value models merged into one proxy: ``bonesoup.decode.values``,
``bonesoup.train.value_training``; decoding: ``bonesoup.decode.mage``), metrics
(``bonesoup.eval.metrics``), the experiment (``bonesoup.eval.experiment``) and the
command line (``bonesoup --help``).
"""

from bonesoup.merge.coefficients import (
    backbone_matrix,
    bone_coefficients,
    fold_extrapolation,
    merge_coefficients,
    per_objective_extrapolation,
    rewarded_soup_coefficients,
    validate_preference,
)
from bonesoup.merge.live import LiveSoup, RemergeInfo
from bonesoup.merge.methods import MergeMethod, get_merge_method, merge_method_names, register_merge_method
from bonesoup.merge.offline import merge_checkpoints
from bonesoup.train.ppo import PPOConfig, PPOTrainer
from bonesoup.train.ppo.checkpoint_training import evaluate_checkpoint, train_checkpoint
from bonesoup.train.rewards import CombinedReward, RewardNormalization, combination_weights, get_reward, register_reward

__all__ = [
    "backbone_matrix",
    "bone_coefficients",
    "rewarded_soup_coefficients",
    "fold_extrapolation",
    "merge_coefficients",
    "per_objective_extrapolation",
    "validate_preference",
    "MergeMethod",
    "get_merge_method",
    "merge_method_names",
    "register_merge_method",
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
    "GuidanceLogitsProcessor": "decode.guided", "GuidedGeneration": "decode.guided",
    "guided_generate": "decode.guided",
    "mage_generate": "decode.mage", "mod_generate": "decode.mage", "ChunkSearch": "decode.mage",
    "ValueSoup": "decode.values", "Guidance": "decode.values", "implicit_guidance": "decode.values",
    "explicit_guidance": "decode.values",
    "train_value_models": "train.value_training",
    "hypervolume": "eval.metrics", "controllability": "eval.metrics", "pareto_front": "eval.metrics",
    "run_experiment": "eval.experiment", "ExperimentConfig": "eval.experiment",
}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"bonesoup.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'bonesoup' has no attribute {name!r}")
