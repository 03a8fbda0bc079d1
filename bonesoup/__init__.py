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

# Every public name is loaded on first use (PEP 562): `bonesoup merge` on the CPU
# and `bonesoup --help` import neither torch nor transformers; the names still
# come from `bonesoup` itself.
_LAZY = {
    **dict.fromkeys(["backbone_matrix", "bone_coefficients", "rewarded_soup_coefficients", "fold_extrapolation",
                     "merge_coefficients", "per_objective_extrapolation", "validate_preference"],
                    "merge.coefficients"),
    **dict.fromkeys(["MergeMethod", "get_merge_method", "merge_method_names", "register_merge_method"],
                    "merge.methods"),
    "merge_checkpoints": "merge.offline",
    "LiveSoup": "merge.live", "RemergeInfo": "merge.live",
    "AdapterSoup": "merge.adapter_soup", "mixture_adapter": "merge.lora",
    "extract_lora": "merge.extract",
    "PPOConfig": "train.ppo", "PPOTrainer": "train.ppo",
    "train_checkpoint": "train.ppo.checkpoint_training", "evaluate_checkpoint": "train.ppo.checkpoint_training",
    **dict.fromkeys(["CombinedReward", "RewardNormalization", "combination_weights", "get_reward",
                     "register_reward"], "train.rewards"),
    # guided decoding (MAGE stage 2), metrics, the experiment: these import transformers
    "GuidanceLogitsProcessor": "decode.guided", "GuidedGeneration": "decode.guided",
    "guided_generate": "decode.guided",
    "mage_generate": "decode.mage", "mod_generate": "decode.mage", "ChunkSearch": "decode.mage",
    "ValueSoup": "decode.values", "Guidance": "decode.values", "implicit_guidance": "decode.values",
    "explicit_guidance": "decode.values",
    "train_value_models": "train.value_training",
    "hypervolume": "eval.metrics", "controllability": "eval.metrics", "pareto_front": "eval.metrics",
    "run_experiment": "eval.experiment", "ExperimentConfig": "eval.experiment",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"bonesoup.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    import importlib.util

    if not name.startswith("_") and importlib.util.find_spec(f"bonesoup.{name}") is not None:
        # a submodule (``bonesoup.<name>``), reachable as an attribute as when everything was imported eagerly
        return importlib.import_module(f"bonesoup.{name}")
    raise AttributeError(f"module 'bonesoup' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
