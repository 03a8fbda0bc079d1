"""``bonesoup experiment``: Rewarded Soup vs Bone Soup vs MOD vs MAGE on the embedded task.

One command trains what the comparison needs and evaluates every method on
the same held-out prompts with the same random numbers:

1. the task's SFT model (the embedded task ``task`` of :mod:`bonesoup.tasks.registry`);
2. with a ``beta_grid``: the beta search (:mod:`bonesoup.eval.beta_search`), short backbone runs at
   each beta, beta picked by validation hypervolume;
3. per training seed: n Bone Soup backbones (rewards ``h = B r``), n experts
   (one reward each: Rewarded Soup's inputs and MOD's), MORLHF oracles (PPO
   on ``mu . r`` at a few preferences) and n explicit value models (token
   Q-functions of each reward under the SFT policy);
4. on a validation slice of the TRAINING prompts: the per-objective
   extrapolation factors ``k_i = 1 / (1 - a_i)`` (the ``a_i`` that maximises
   reward i at ``mu = e_i``) and the guidance strengths ``w`` of MAGE
   (the one that maximises the hypervolume of three preference points at n = 2, the vertices
   and the centroid at n >= 3);
5. on the held-out prompts, for each preference of the sweep (``points`` at n = 2, a simplex grid
   with ``simplex_points`` per edge at n >= 3): Rewarded
   Soup (experts merged with mu), Bone Soup (backbones merged with B^-1 mu),
   Bone Soup + extrapolation (per-objective k, folded into one merge), MOD
   (the experts' logits mixed with mu), MAGE implicit (Bone base + w
   (merged experts - SFT)), MAGE explicit (Bone base + w merged value
   models), and MORLHF at its trained preferences; with ``ablations``: Rewarded Soup + per-objective
   extrapolation, Bone Soup merged with mu instead of B^-1 mu, and MAGE's guidance on the SFT and on
   the Rewarded Soup bases; per method the PPO runs it used and its forwards per token;
6. metrics (:mod:`bonesoup.eval.metrics`): hypervolume at ONE reference point for
   every method (the coordinate-wise minimum over every evaluated point of
   every method and seed, minus a margin; or, ``reference_point="sft"``, the
   SFT model's mean rewards), controllability (Spearman of mu_i with r_i),
   mean +- sample std, bootstrap CIs and paired tests over seeds
   (:mod:`bonesoup.eval.stats`); a table, a Pareto plot and JSON.

Every trained model lives under ``out/models/<name>-<fingerprint>``
(:mod:`bonesoup.eval.experiment_models`), the fingerprint covering everything
it depends on (SFT fingerprint, rewards, weights, PPO settings, seed); a rerun
finds them and only evaluates. The methods are a table
(:mod:`bonesoup.eval.experiment_methods`); tuning, the sweep, the summary,
the table and the plot live in :mod:`bonesoup.eval.experiment_eval`. This
module holds the configuration, its checks, the driver and the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bonesoup.eval.experiment_eval import evaluate_seed, format_table, plot_pareto, summarize
from bonesoup.eval.experiment_methods import (LABELS, METHOD_TABLE, METHODS, SEARCH_METHOD, format_accounting,
                                              get_experiment_method, method_accounting, preference_grid)
from bonesoup.eval.experiment_models import TrainedModels, _log

__all__ = ["ExperimentConfig", "QUICK", "run_experiment", "METHODS", "METHOD_TABLE", "SEARCH_METHOD", "LABELS",
           "get_experiment_method", "preference_grid", "summarize", "format_table", "config_from_args"]


@dataclass
class ExperimentConfig:
    """Everything the experiment depends on (the cache keys hash the parts each model needs)."""

    out: str = "out/experiment"
    #: The embedded task (:func:`bonesoup.tasks.registry.task_names`): SFT model, prompts, default rewards.
    task: str = "review"
    #: Empty: the task's rewards.
    rewards: tuple = ()
    beta: float = 0.7
    #: Beta search: short backbone runs at each beta, the best by validation hypervolume replaces beta (empty = off).
    beta_grid: tuple = ()
    #: PPO steps of each search run, as a fraction of ppo_steps.
    beta_search_fraction: float = 0.3
    seeds: tuple = (0, 1, 2)
    #: "train": every seed trains its own models; "sample": one set of models (seed seeds[0]), seeds vary sampling.
    seed_mode: str = "train"
    ppo_steps: int = 150
    ppo_batch_size: int = 64
    ppo_lr: float = 1e-4
    ppo_kl_coef: float = 0.05
    #: MORLHF oracles: mu_1 at n = 2; at n >= 3 each m puts weight m on one objective, the rest shared equally.
    morlhf: tuple = (0.25, 0.5, 0.75)
    value_samples: int = 2048
    value_steps: int = 300
    points: int = 11
    #: n >= 3: the sweep is the simplex grid with this many points per edge (step 1/(k-1); 15 preferences at n = 3).
    simplex_points: int = 5
    #: Also evaluate the ablations (Bone Soup with mu, MAGE's guidance on the SFT and Rewarded Soup bases).
    ablations: bool = True
    eval_samples_per_prompt: int = 8
    val_prompts: int = 32
    val_samples_per_prompt: int = 4
    extrapolation_grid: tuple = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    w_implicit_grid: tuple = (0.25, 0.5, 1.0)
    w_explicit_grid: tuple = (2.0, 4.0, 8.0)
    temperature: float = 1.0
    max_new_tokens: int = 20
    hv_margin: float = 0.01
    #: Hypervolume reference point: "union" (every evaluated point's minimum minus hv_margin) or "sft"
    #: (the SFT model's mean rewards: fixed, whichever methods are compared).
    reference_point: str = "union"
    #: Chunk-level search (MAGE explicit, K candidates of L tokens scored by the merged value model); 0 = off.
    search_candidates: int = 0
    search_chunk_tokens: int = 4
    threads: int | None = None

    def __post_init__(self):
        if not self.rewards and isinstance(self.task, str):
            from bonesoup.tasks.registry import get_task

            self.rewards = tuple(get_task(self.task).rewards)

    def methods(self) -> tuple:
        """Names of the methods this configuration evaluates, in table order."""
        return tuple(m.name for m in METHOD_TABLE if (not m.search or self.search_candidates > 0)
                     and (not m.ablation or self.ablations))

    def preferences(self):
        """The preference sweep, [P, n] float64 (:func:`~bonesoup.eval.experiment_methods.preference_grid`)."""
        n = len(self.rewards)
        return preference_grid(self.points if n == 2 else self.simplex_points, n)

    def check(self) -> None:
        """Refuse, before anything is trained, every configuration that cannot run (ValueError naming the field)."""
        from bonesoup.merge.coefficients import validate_beta
        from bonesoup.tasks.registry import get_task
        from bonesoup.train.rewards import available_rewards

        task = get_task(self.task)  # ValueError naming the embedded tasks
        known = available_rewards()
        for r in self.rewards:
            if r not in known:
                raise ValueError(f"rewards: unknown reward {r!r}; registered: {known}")
        if len(self.rewards) < 2:
            raise ValueError(f"rewards: the experiment compares methods on n >= 2 objectives, got "
                             f"{len(self.rewards)}: {list(self.rewards)}")
        if len(set(self.rewards)) != len(self.rewards):
            raise ValueError(f"rewards: each objective once, got {list(self.rewards)}")
        validate_beta(self.beta, "beta")
        for b in self.beta_grid:
            validate_beta(b, "beta_grid")
        if len(set(self.beta_grid)) != len(self.beta_grid):
            raise ValueError(f"beta_grid: each beta once, got {list(self.beta_grid)}")
        f = self.beta_search_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise ValueError(f"beta_search_fraction must be in (0, 1] (of ppo_steps), got {f!r}")
        if not isinstance(self.ablations, bool):
            raise ValueError(f"ablations must be true or false, got {self.ablations!r}")
        if self.reference_point not in ("union", "sft"):
            raise ValueError(f"reference_point must be 'union' or 'sft', got {self.reference_point!r}")
        if self.seed_mode not in ("train", "sample"):
            raise ValueError(f"seed_mode must be 'train' or 'sample', got {self.seed_mode!r}")
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be non-negative integers, got {list(self.seeds)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct (results are keyed by seed), got {list(self.seeds)}")
        for name in ("ppo_steps", "ppo_batch_size", "value_samples", "value_steps", "eval_samples_per_prompt",
                     "val_prompts", "val_samples_per_prompt", "max_new_tokens", "search_chunk_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("points", "simplex_points"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise ValueError(f"{name} must be >= 2, got {v!r}")
        if isinstance(self.search_candidates, bool) or not isinstance(self.search_candidates, int) \
                or self.search_candidates < 0:
            raise ValueError(f"search_candidates must be an integer >= 0 (0 = off), got {self.search_candidates!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
        n_train = len(task.prompts("train"))
        if self.val_prompts > n_train:
            raise ValueError(f"val_prompts must be at most the {n_train} training prompts, got {self.val_prompts}")
        for name, v, ok, what in (("ppo_lr", self.ppo_lr, lambda x: x > 0, "> 0"),
                                  ("ppo_kl_coef", self.ppo_kl_coef, lambda x: x >= 0, ">= 0"),
                                  ("temperature", self.temperature, lambda x: x > 0, "> 0 (PPO and the sweep sample)"),
                                  ("hv_margin", self.hv_margin, lambda x: x >= 0, ">= 0")):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"{name} must be a finite number {what}, got {v!r}")
        for name in ("extrapolation_grid", "w_implicit_grid", "w_explicit_grid"):
            grid = getattr(self, name)
            if not grid:
                raise ValueError(f"{name} must hold at least one candidate (validation picks among them)")
            if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in grid):
                raise ValueError(f"{name} must hold finite numbers, got {list(grid)}")
        for a in self.extrapolation_grid:
            if not 0.0 <= a < 1.0:
                raise ValueError(f"extrapolation_grid: a = {a} outside [0, 1) (k = 1 / (1 - a))")
        for m in self.morlhf:
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 < m < 1.0:
                raise ValueError(f"morlhf: mu_1 = {m} outside (0, 1) (at n >= 3 the weight on one objective; the "
                                 "vertices are the experts)")
        if len(set(self.morlhf)) != len(self.morlhf):
            raise ValueError(f"morlhf: each weight once, got {list(self.morlhf)}")


#: The README's main command: one set of models, short PPO, three sampling seeds (minutes on a laptop CPU).
QUICK = dict(seeds=(0, 1, 2), seed_mode="sample", ppo_steps=60, morlhf=(0.5,), value_samples=1024,
             value_steps=150, eval_samples_per_prompt=4, val_prompts=24, val_samples_per_prompt=2,
             extrapolation_grid=(0.0, 0.2, 0.4), w_implicit_grid=(0.5, 1.0), w_explicit_grid=(2.0, 6.0))


def run_experiment(cfg: ExperimentConfig, *, progress: bool = True) -> dict:
    """Train (or find) every model, evaluate every method, write results.{json,md} and pareto.png under ``cfg.out``.

    With a ``beta_grid`` the beta search runs first (on the first training seed) and its choice replaces
    ``beta`` for everything after it; results.json holds the search (``beta_search``) and the config
    with the chosen beta.
    """
    import transformers

    from bonesoup.eval.beta_search import format_beta_search, search_beta
    from bonesoup.tasks.registry import get_task

    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    t_start = time.perf_counter()
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    sft = get_task(cfg.task).build_sft(root / "sft", progress=progress)
    train_seeds = list(cfg.seeds) if cfg.seed_mode == "train" else [cfg.seeds[0]]
    paths, trained = {}, []
    t0 = time.perf_counter()
    beta_report = None
    if cfg.beta_grid:
        ms = TrainedModels(cfg, root, sft, train_seeds[0], progress)
        beta_report = search_beta(cfg, ms, sft, train_seeds[0])
        trained += ms.trained
        _log(f"beta search: validation hypervolume {beta_report['validation_hv']}, chosen {beta_report['chosen']:g}")
        cfg = dataclasses.replace(cfg, beta=beta_report["chosen"])
    for s in train_seeds:
        ms = TrainedModels(cfg, root, sft, s, progress)
        paths[s] = ms.all()
        trained += ms.trained
    t_train = time.perf_counter() - t0
    _log(f"models ready ({len(trained)} trained, {t_train:.0f} s)")
    per_seed = {}
    t0 = time.perf_counter()
    for s in cfg.seeds:
        p = paths[s] if cfg.seed_mode == "train" else paths[train_seeds[0]]
        per_seed[s] = evaluate_seed(cfg, sft, p, s, progress)
    t_eval = time.perf_counter() - t0
    summary = summarize(cfg, per_seed)
    fwd = per_seed[cfg.seeds[0]]["forwards_per_token"]
    accounting = {m: method_accounting(cfg, m, forwards_per_token=fwd.get(m), beta_search=beta_report)
                  for m in cfg.methods()}
    tables = [format_table(cfg, summary), format_accounting(cfg, accounting)]
    if beta_report is not None:
        tables.append(format_beta_search(beta_report))
    table = "\n\n".join(tables)
    result = {"config": dataclasses.asdict(cfg), "seconds": {"train": t_train, "evaluate": t_eval,
                                                             "total": time.perf_counter() - t_start},
              "trained_now": trained, "summary": summary, "accounting": accounting, "beta_search": beta_report,
              "per_seed": {str(k): v for k, v in per_seed.items()},
              "models": {str(k): {kk: ([str(x) for x in v] if isinstance(v, list) else
                                       {str(a): str(b) for a, b in v.items()}) for kk, v in p.items()}
                         for k, p in paths.items()}}
    plot_pareto(cfg, summary, per_seed, root / "pareto.png")  # n >= 3: one panel per pair of objectives
    (root / "results.json").write_text(json.dumps(result, indent=2))
    (root / "results.md").write_text(table + "\n")
    result["table"] = table
    return result


def add_experiment_parser(sub) -> None:
    import argparse

    d = ExperimentConfig()
    p = sub.add_parser("experiment", help="Rewarded Soup vs Bone Soup vs MOD vs MAGE on the embedded task",
                       description=__doc__.split("\n\n")[0] + " Trains what it needs (cached by config hash under "
                       "--out/models), evaluates every method at --points preferences on held-out prompts for "
                       "every seed, and writes results.json, results.md (the table) and pareto.png.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, help="JSON file of ExperimentConfig fields (flags given override it)")
    p.add_argument("--quick", action="store_true", help=f"the README setting: {QUICK}")
    p.add_argument("--out", default=None, help=f"output and cache directory (default {d.out}, quick: {d.out}-quick)")
    for f in dataclasses.fields(ExperimentConfig):
        if f.name == "out":
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, tuple):
            typ = str if f.name == "rewards" else (int if f.name == "seeds" else float)
            p.add_argument(flag, nargs="*", type=typ, default=None, help=f"(default {f.default})")
        else:
            typ = {"int": int, "float": float, "str": str, "int | None": int, "bool": _flag}.get(str(f.type), str)
            p.add_argument(flag, type=typ, default=None, help=f"(default {f.default})")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_experiment)


def _flag(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no) on the command line."""
    t = text.strip().lower()
    if t in ("true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def config_from_args(args) -> ExperimentConfig:
    values: dict = {}
    if args.quick:
        values.update(QUICK)
        values["out"] = ExperimentConfig.out + "-quick"
    if args.config:
        try:
            values.update(json.loads(Path(args.config).read_text()))
        except (OSError, ValueError) as e:
            raise ValueError(f"--config {args.config}: {e}") from None
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    for k in values:
        if k not in names:
            raise ValueError(f"--config: unknown field {k!r}; fields: {sorted(names)}")
    for f in dataclasses.fields(ExperimentConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = tuple(v) if isinstance(v, list) else v
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return ExperimentConfig(**values)


def _cmd_experiment(args) -> int:
    cfg = config_from_args(args)
    res = run_experiment(cfg, progress=not args.no_progress)
    s = res["seconds"]
    print(res["table"])
    print(f"\n{len(res['trained_now'])} models trained now; train {s['train']:.0f} s, evaluate {s['evaluate']:.0f} s, "
          f"total {s['total']:.0f} s. Results: {Path(cfg.out) / 'results.json'}, table: {Path(cfg.out) / 'results.md'}, "
          f"plot: {Path(cfg.out) / 'pareto.png'}")
    return 0
