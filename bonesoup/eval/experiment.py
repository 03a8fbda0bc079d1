"""``bonesoup experiment``: Rewarded Soup vs Bone Soup vs MOD vs MAGE on a task, embedded or yours.

A task is data (:mod:`bonesoup.tasks.spec`): an SFT checkpoint, prompt
files per split and rewards (built-in names, ``hf:DIR`` reward models,
``module:function`` callables). Without them the embedded task (``review``)
is used; with ``--config FILE`` (YAML or JSON) one file names them all. One
command trains what the comparison needs and evaluates every method on the
same held-out prompts with the same random numbers:

1. the task's SFT model (yours, or the embedded task's built in code);
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
it depends on (the SFT's content, the training prompts' and reward models'
content, the reward weights, PPO settings, seed); a rerun finds them and only
evaluates. With ``lora_rank`` (``--lora-rank R``) the PPO-trained policies
are LoRA adapters of the SFT model and the merged methods decode through
:class:`~bonesoup.lora.AdapterSoup` (the exact low-rank merge, no re-merge).
The methods are a table
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
           "get_experiment_method", "preference_grid", "summarize", "format_table", "config_from_args",
           "read_config_file", "add_config_flags"]


@dataclass
class ExperimentConfig:
    """Everything the experiment depends on (the cache keys hash the parts each model needs)."""

    out: str = "out/experiment"
    # -- the task (bonesoup.tasks.spec): fields left out come from the embedded task `task`
    #: Embedded task (bonesoup.tasks.registry) whose parts fill what the fields below leave out.
    task: str = "review"
    #: Your SFT checkpoint directory (Hugging Face causal LM + tokenizer); None: the embedded task's, built in code.
    sft: str | None = None
    #: Prompt files (.jsonl with a "prompt" field per line, or plain text one per line); required with sft.
    train_prompts: str | None = None
    #: None: the first val_prompts training prompts.
    validation_prompts: str | None = None
    test_prompts: str | None = None
    #: One entry per objective: a built-in name, "hf:DIR", "module:function" / "file.py:function", or a mapping
    #: with options (bonesoup.train.reward_spec.RewardSpec); None: the embedded task's (filled in when the
    #: config is made; required with sft).
    rewards: tuple | None = None
    #: Response length; None: the embedded task's (filled in when the config is made; 64 with your own sft).
    max_new_tokens: int | None = None
    #: Where models run: "cpu", "cuda", "cuda:1"; None: cuda when available, else the CPU.
    device: str | None = None
    #: "float32" or "bfloat16": the dtype models load in for evaluation (and reward models that set none);
    #: PPO keeps fp32 weights and runs its forwards under bf16 autocast with "bfloat16".
    dtype: str = "float32"
    #: Rows per generate call in PPO rollouts (None: the whole batch at once).
    rollout_batch_size: int | None = None
    #: Prompt rows per decode call in evaluation (results do not depend on it: rows are seeded by index).
    #: 256: on the embedded task's tiny GPT-2 on a CPU, 64-row calls took 1.6x the time of one call over
    #: the 336 rows and 256-row calls 1.09x; lower it for large models.
    eval_batch_size: int = 256
    #: LoRA rank of the PPO-trained policies (backbones, experts, MORLHF oracles); None = full fine-tuning.
    lora_rank: int | None = None
    # -- the protocol
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
    hv_margin: float = 0.01
    #: Hypervolume reference point: "union" (every evaluated point's minimum minus hv_margin) or "sft"
    #: (the SFT model's mean rewards: fixed, whichever methods are compared).
    reference_point: str = "union"
    #: Chunk-level search (MAGE explicit, K candidates of L tokens scored by the merged value model); 0 = off.
    search_candidates: int = 0
    search_chunk_tokens: int = 4
    threads: int | None = None

    def __post_init__(self):
        # Without your own sft the embedded task's rewards and response length apply; fill them in now so
        # that every reader of ``rewards`` / ``max_new_tokens`` (summary, table, plot) sees them. An unknown
        # task is left to check(), which names it.
        if self.sft is None and (self.rewards is None or self.max_new_tokens is None):
            from bonesoup.tasks.registry import get_task, task_names

            if self.task in task_names():
                t = get_task(self.task)
                self.rewards = tuple(t.rewards) if self.rewards is None else self.rewards
                self.max_new_tokens = t.max_new_tokens if self.max_new_tokens is None else self.max_new_tokens

    def methods(self) -> tuple:
        """Names of the methods this configuration evaluates, in table order."""
        return tuple(m.name for m in METHOD_TABLE if (not m.search or self.search_candidates > 0)
                     and (not m.ablation or self.ablations))

    def preferences(self):
        """The preference sweep, [P, n] float64 (:func:`~bonesoup.eval.experiment_methods.preference_grid`)."""
        n = len(self.rewards)
        return preference_grid(self.points if n == 2 else self.simplex_points, n)

    def check(self) -> None:
        """Refuse, before anything is trained, every configuration that cannot run (ValueError naming the field).

        Reads the prompt files and inspects the reward models (configs and
        tokenizers, not weights); the resolved task is kept for :meth:`task_spec`.
        """
        from bonesoup.merge.coefficients import validate_beta

        self._check_run_fields()
        spec = self.task_spec()
        n = len(spec.rewards)
        if n < 2:
            raise ValueError(f"rewards: the experiment compares methods on n >= 2 objectives, got {n}: "
                             f"{spec.reward_names}")
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
                     "val_prompts", "val_samples_per_prompt", "search_chunk_tokens", "eval_batch_size"):
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
        if self.lora_rank is not None and (isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int)
                                           or self.lora_rank < 1):
            raise ValueError(f"lora_rank must be a positive integer or None (full fine-tuning), got {self.lora_rank!r}")
        n_val = len(spec.prompts["validation"])
        if self.val_prompts > n_val:
            what = "training" if self.validation_prompts is None else "validation"
            raise ValueError(f"val_prompts must be at most the {n_val} {what} prompts, got {self.val_prompts}")
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

    def _check_run_fields(self) -> None:
        from soupkernels._dtypes import parse_dtype_name

        if self.device is not None:
            try:
                dev = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device: {self.device!r} asked for, but CUDA is not available here")
        if parse_dtype_name(self.dtype, "dtype") not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16 (PPO trains fp32 weights, under bf16 autocast "
                             f"with bfloat16; float16 would need loss scaling), got {self.dtype!r}")
        if self.rollout_batch_size is not None and (isinstance(self.rollout_batch_size, bool) or not isinstance(
                self.rollout_batch_size, int) or self.rollout_batch_size < 1):
            raise ValueError(f"rollout_batch_size must be a positive integer or None, got {self.rollout_batch_size!r}")

    def task_spec(self):
        """The task these fields describe (:class:`bonesoup.tasks.spec.TaskSpec`), resolved and checked once."""
        from bonesoup.tasks.spec import task_spec

        key = tuple(repr(getattr(self, f)) for f in _TASK_KEYS)
        cached = getattr(self, "_task", None)
        if cached is None or cached[0] != key:
            spec = task_spec(task=self.task, sft=self.sft, train_prompts=self.train_prompts,
                             validation_prompts=self.validation_prompts, test_prompts=self.test_prompts,
                             rewards=self.rewards, max_new_tokens=self.max_new_tokens, device=self.run_device(),
                             dtype=self.dtype)
            self._task = cached = (key, spec)
        return cached[1]

    def resolved(self) -> "ExperimentConfig":
        """This configuration with the task's parts filled in: reward entries (absolute paths) and the response length.

        What the results file records and what the rest of the experiment reads (``rewards``, ``max_new_tokens``).
        """
        spec = self.task_spec()
        out = dataclasses.replace(self, rewards=tuple(r.entry() for r in spec.rewards),
                                  max_new_tokens=spec.max_new_tokens)
        out._task = (tuple(repr(getattr(out, f)) for f in _TASK_KEYS), spec)
        return out

    def run_device(self) -> str:
        """``device``, or cuda when available and the CPU otherwise."""
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def torch_dtype(self) -> torch.dtype:
        from soupkernels._dtypes import parse_dtype_name

        return getattr(torch, parse_dtype_name(self.dtype, "dtype"))


#: The fields a task spec is resolved from (with the device and dtype its reward models default to).
_TASK_KEYS = ("task", "sft", "train_prompts", "validation_prompts", "test_prompts", "rewards", "max_new_tokens",
              "device", "dtype")

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

    cfg.check()
    cfg = cfg.resolved()
    task = cfg.task_spec()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    t_start = time.perf_counter()
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    sft = task.sft_dir(root / "sft", progress=progress)
    train_seeds = list(cfg.seeds) if cfg.seed_mode == "train" else [cfg.seeds[0]]
    paths, trained = {}, []
    t0 = time.perf_counter()
    beta_report = None
    if cfg.beta_grid:
        ms = TrainedModels(cfg, root, sft, train_seeds[0], progress, task=task)
        beta_report = search_beta(cfg, ms, sft, train_seeds[0])
        trained += ms.trained
        _log(f"beta search: validation hypervolume {beta_report['validation_hv']}, chosen {beta_report['chosen']:g}")
        cfg = dataclasses.replace(cfg, beta=beta_report["chosen"])
    for s in train_seeds:
        ms = TrainedModels(cfg, root, sft, s, progress, task=task)
        paths[s] = ms.all()
        trained += ms.trained
    t_train = time.perf_counter() - t0
    _log(f"models ready ({len(trained)} trained, {t_train:.0f} s)")
    per_seed = {}
    t0 = time.perf_counter()
    for s in cfg.seeds:
        p = paths[s] if cfg.seed_mode == "train" else paths[train_seeds[0]]
        per_seed[s] = evaluate_seed(cfg, sft, p, s, progress, task=task)
    t_eval = time.perf_counter() - t0
    summary = summarize(cfg, per_seed)
    fwd = per_seed[cfg.seeds[0]]["forwards_per_token"]
    accounting = {m: method_accounting(cfg, m, forwards_per_token=fwd.get(m), beta_search=beta_report)
                  for m in cfg.methods()}
    tables = [format_table(cfg, summary), format_accounting(cfg, accounting)]
    if beta_report is not None:
        tables.append(format_beta_search(beta_report))
    table = "\n\n".join(tables)
    result = {"config": dataclasses.asdict(cfg), "task": {"name": task.name, "sources": task.sources,
                                                          "objectives": task.reward_names},
              "seconds": {"train": t_train, "evaluate": t_eval, "total": time.perf_counter() - t_start},
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
    p = sub.add_parser("experiment", help="Rewarded Soup vs Bone Soup vs MOD vs MAGE on a task (embedded or yours)",
                       description=__doc__.split("\n\n")[0] + " Trains what it needs (cached by what each model "
                       "depends on, under --out/models), evaluates every method at --points preferences on held-out "
                       "prompts for every seed, and writes results.json, results.md (the table) and pareto.png. "
                       "Your own task: --config FILE naming sft, train_prompts, test_prompts and rewards.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                   help="YAML (.yaml/.yml) or JSON (.json) file of the fields below (flags given override it); its "
                   "relative input paths resolve against the file's directory")
    p.add_argument("--quick", action="store_true", help=f"the README setting: {QUICK}")
    p.add_argument("--out", default=argparse.SUPPRESS,
                   help=f"output and cache directory [default {d.out}, quick: {d.out}-quick]")
    add_config_flags(p, ExperimentConfig, skip=("out",))
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_experiment)


#: Element type of each list field on the command line (every other list field holds floats).
_LIST_TYPES = {"rewards": str, "seeds": int}
_SCALAR_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str,
                 "float | None": float}
#: --help of the task and run fields (the others show their default).
_FIELD_HELP = {
    "task": "embedded task that fills what the task fields leave out",
    "sft": "your SFT checkpoint directory (HF causal LM + tokenizer); default: the embedded task's, built in code",
    "train_prompts": ".jsonl (a 'prompt' per line) or plain text, one prompt per line; required with --sft",
    "validation_prompts": "default: the first --val-prompts training prompts",
    "test_prompts": "held-out prompts of the sweep; required with --sft",
    "rewards": "one per objective: a built-in name, hf:DIR (a sequence-classification reward model), "
               "module:function or file.py:function; required with --sft (a config file also takes mappings "
               "with options)",
    "max_new_tokens": "response length (default: the embedded task's, 64 with --sft)",
    "device": "cpu, cuda, cuda:N (default: cuda when available)",
    "dtype": "float32 or bfloat16 (evaluation and reward models load in it; PPO under bf16 autocast)",
    "rollout_batch_size": "rows per PPO generate call (default: the whole batch)",
    "eval_batch_size": "rows per evaluation decode call (results do not depend on it)",
    "lora_rank": "train the policies as LoRA adapters of this rank (default: full fine-tuning)",
}


def add_config_flags(p, config_cls, *, skip=(), only=None) -> None:
    """One ``--field-name`` flag per dataclass field of ``config_cls`` (lists take several values); a flag
    not given leaves the field to the config file or its default (argparse.SUPPRESS: no attribute)."""
    import argparse

    for f in dataclasses.fields(config_cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        flag = "--" + f.name.replace("_", "-")
        t = str(f.type)
        help = f"{_FIELD_HELP[f.name]} [default {f.default}]" if f.name in _FIELD_HELP else f"[default {f.default}]"
        kw = dict(default=argparse.SUPPRESS, help=help)
        if t.startswith("tuple"):
            p.add_argument(flag, nargs="*", type=_LIST_TYPES.get(f.name, float), **kw)
        elif t.startswith("bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(flag, type=_SCALAR_TYPES.get(t, str), **kw)


def read_config_file(path: str | Path, fields, what: str = "--config") -> dict:
    """A YAML / JSON config file's mapping, unknown keys refused (naming them), relative input paths made absolute.

    ``fields``: the names a key may have. Lists become tuples.
    """
    from bonesoup.tasks.spec import resolve_paths

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"{what} {path}: a config file ends in .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"{what} {path}: {e.strerror or e}") from None
    import yaml

    try:
        values = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ValueError(f"{what} {path}: not valid {'JSON' if suffix == '.json' else 'YAML'}: {e}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path}: the top level must be a mapping of fields, got {type(values).__name__}")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        named = f"field {unknown[0]!r}" if len(unknown) == 1 else f"fields {unknown}"
        raise ValueError(f"{what} {path}: unknown {named}; fields: {sorted(fields)}")
    values = resolve_paths(values, path.parent)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def config_from_args(args) -> ExperimentConfig:
    """The configuration of ``bonesoup experiment``: --quick, then --config, then the flags given (last wins)."""
    values: dict = {}
    if args.quick:
        values.update(QUICK)
        values["out"] = ExperimentConfig.out + "-quick"
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    if getattr(args, "config", None):
        values.update(read_config_file(args.config, names))
    for f in dataclasses.fields(ExperimentConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = tuple(v) if isinstance(v, list) else v
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
