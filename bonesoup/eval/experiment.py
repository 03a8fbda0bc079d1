"""``bonesoup experiment``: Rewarded Soup vs Bone Soup vs MOD vs MAGE on the embedded task.

One command trains what the comparison needs and evaluates every method on
the same held-out prompts with the same random numbers:

1. the task's SFT model (:func:`bonesoup.tasks.review.build_task_sft`);
2. per training seed: n Bone Soup backbones (rewards ``h = B r``), n experts
   (one reward each: Rewarded Soup's inputs and MOD's), MORLHF oracles (PPO
   on ``mu . r`` at a few preferences) and n explicit value models (token
   Q-functions of each reward under the SFT policy);
3. on a validation slice of the TRAINING prompts: the per-objective
   extrapolation factors ``k_i = 1 / (1 - a_i)`` (the ``a_i`` that maximises
   reward i at ``mu = e_i``) and the guidance strengths ``w`` of MAGE
   (the one that maximises the hypervolume of three preference points);
4. on the held-out prompts, for each of the ``points`` preferences: Rewarded
   Soup (experts merged with mu), Bone Soup (backbones merged with B^-1 mu),
   Bone Soup + extrapolation (per-objective k, folded into one merge), MOD
   (the experts' logits mixed with mu), MAGE implicit (Bone base + w
   (merged experts - SFT)), MAGE explicit (Bone base + w merged value
   models), and MORLHF at its trained preferences;
5. metrics (:mod:`bonesoup.eval.metrics`): hypervolume at ONE reference point for
   every method (the coordinate-wise minimum over every evaluated point of
   every method and seed, minus a margin), controllability (Spearman of mu_i
   with r_i), mean +- std over seeds; a table, a Pareto plot and JSON.

Every trained model lives under ``out/models/<name>-<hash>``, the hash
covering everything it depends on (SFT fingerprint, rewards, weights, PPO
settings, seed); a rerun finds them and only evaluates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["ExperimentConfig", "QUICK", "run_experiment", "METHODS"]

#: Method names, in table order (MORLHF last: it has points only where trained).
METHODS = ("rewarded_soup", "bone_soup", "bone_soup_extrapolated", "mod", "mage_implicit", "mage_explicit",
           "morlhf")
#: Evaluated only when ``ExperimentConfig.search_candidates > 0``.
SEARCH_METHOD = "mage_explicit_search"
LABELS = {"rewarded_soup": "Rewarded Soup", "bone_soup": "Bone Soup", "bone_soup_extrapolated": "Bone Soup + extrap.",
          "mod": "MOD (n experts' logits)", "mage_implicit": "MAGE implicit", "mage_explicit": "MAGE explicit",
          "mage_explicit_search": "MAGE explicit + chunk search", "morlhf": "MORLHF (oracle)"}


@dataclass
class ExperimentConfig:
    """Everything the experiment depends on (the cache keys hash the parts each model needs)."""

    out: str = "out/experiment"
    rewards: tuple = ("sentiment", "conciseness")
    beta: float = 0.7
    seeds: tuple = (0, 1, 2)
    #: "train": every seed trains its own models; "sample": one set of models (seed seeds[0]), seeds vary sampling.
    seed_mode: str = "train"
    ppo_steps: int = 150
    ppo_batch_size: int = 64
    ppo_lr: float = 1e-4
    ppo_kl_coef: float = 0.05
    morlhf: tuple = (0.25, 0.5, 0.75)  # mu_1 of the MORLHF oracles (n = 2)
    value_samples: int = 2048
    value_steps: int = 300
    points: int = 11
    eval_samples_per_prompt: int = 8
    val_prompts: int = 32
    val_samples_per_prompt: int = 4
    extrapolation_grid: tuple = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    w_implicit_grid: tuple = (0.25, 0.5, 1.0)
    w_explicit_grid: tuple = (2.0, 4.0, 8.0)
    temperature: float = 1.0
    max_new_tokens: int = 20
    hv_margin: float = 0.01
    #: Chunk-level search (MAGE explicit, K candidates of L tokens scored by the merged value model); 0 = off.
    search_candidates: int = 0
    search_chunk_tokens: int = 4
    threads: int | None = None

    def methods(self) -> tuple:
        """The methods this configuration evaluates, in table order."""
        extra = (SEARCH_METHOD,) if self.search_candidates > 0 else ()
        return METHODS[:-1] + extra + METHODS[-1:]

    def check(self) -> None:
        if len(self.rewards) != 2 and self.morlhf:
            raise ValueError("--morlhf preferences are given as mu_1 and need exactly 2 rewards")
        if self.seed_mode not in ("train", "sample"):
            raise ValueError(f"seed_mode must be 'train' or 'sample', got {self.seed_mode!r}")
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed")
        if self.points < 2:
            raise ValueError(f"points must be >= 2, got {self.points}")
        for a in self.extrapolation_grid:
            if not 0.0 <= a < 1.0:
                raise ValueError(f"extrapolation_grid: a = {a} outside [0, 1) (k = 1 / (1 - a))")
        for m in self.morlhf:
            if not 0.0 < m < 1.0:
                raise ValueError(f"morlhf: mu_1 = {m} outside (0, 1) (the endpoints are the experts)")


#: The README's main command: one set of models, short PPO, three sampling seeds (minutes on a laptop CPU).
QUICK = dict(seeds=(0, 1, 2), seed_mode="sample", ppo_steps=60, morlhf=(0.5,), value_samples=1024,
             value_steps=150, eval_samples_per_prompt=4, val_prompts=24, val_samples_per_prompt=2,
             extrapolation_grid=(0.0, 0.2, 0.4), w_implicit_grid=(0.5, 1.0), w_explicit_grid=(2.0, 6.0))


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _log(msg: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- training (cached)


class _Models:
    """Trains (or finds) the models of one training seed."""

    def __init__(self, cfg: ExperimentConfig, root: Path, sft: Path, seed: int, progress: bool):
        self.cfg, self.root, self.sft, self.seed, self.progress = cfg, root, sft, seed, progress
        self.sft_fp = json.loads((sft / "bonesoup-sft.json").read_text())["fingerprint"]
        self.n = len(cfg.rewards)
        self.trained: list[str] = []
        from bonesoup.tasks.review import task_prompts

        # The training prompts come from code: hash them too, so a change there is a new model.
        self.prompts_fp = hashlib.sha256("\n".join(task_prompts("train")).encode()).hexdigest()[:16]

    def _ppo(self, name: str, weights) -> Path:
        from bonesoup.train.ppo.checkpoint_training import train_checkpoint
        from bonesoup.train.ppo.trainer import PPOConfig
        from bonesoup.tasks.review import task_prompts

        c = self.cfg
        config = PPOConfig(steps=c.ppo_steps, batch_size=c.ppo_batch_size, lr=c.ppo_lr, kl_coef=c.ppo_kl_coef,
                           max_new_tokens=c.max_new_tokens, temperature=c.temperature, seed=self.seed)
        key = _hash({"sft": self.sft_fp, "prompts": self.prompts_fp, "rewards": c.rewards, "weights": [round(float(x), 10) for x in weights],
                     "ppo": dataclasses.asdict(config), "torch": torch.__version__})
        out = self.root / "models" / f"{name}-seed{self.seed}-{key}"
        if (out / "config.json").is_file():
            return out
        _log(f"training {out.name} (weights {np.round(np.asarray(weights, float), 4).tolist()})")
        train_checkpoint(self.sft, out, rewards=list(c.rewards), weights=weights, prompts=task_prompts("train"),
                         config=config, progress=self.progress, metadata={"combination": name, "seed": self.seed})
        self.trained.append(out.name)
        return out

    def backbones(self) -> list[Path]:
        from bonesoup.merge.coefficients import backbone_matrix

        B = backbone_matrix(self.n, self.cfg.beta)
        return [self._ppo(f"backbone{j}-beta{self.cfg.beta:g}", B[j]) for j in range(self.n)]

    def experts(self) -> list[Path]:
        return [self._ppo(f"expert{i}", np.eye(self.n)[i]) for i in range(self.n)]

    def morlhf(self) -> dict[float, Path]:
        return {m: self._ppo(f"morlhf{m:g}", [m, 1.0 - m]) for m in self.cfg.morlhf}

    def values(self) -> list[Path]:
        from bonesoup.tasks.review import task_prompts
        from bonesoup.train.value_training import train_value_models

        c = self.cfg
        key = _hash({"sft": self.sft_fp, "prompts": self.prompts_fp, "rewards": c.rewards, "samples": c.value_samples, "steps": c.value_steps,
                     "T": c.max_new_tokens, "seed": self.seed, "torch": torch.__version__})
        outs = [self.root / "models" / f"value{i}-seed{self.seed}-{key}" for i in range(self.n)]
        if all((o / "config.json").is_file() for o in outs):
            return outs
        _log(f"training {self.n} explicit value models ({c.value_samples} SFT samples, {c.value_steps} steps)")
        train_value_models(self.sft, outs, rewards=list(c.rewards), weights=np.eye(self.n).tolist(),
                           prompts=task_prompts("train"), samples=c.value_samples, steps=c.value_steps,
                           max_new_tokens=c.max_new_tokens, seed=self.seed, progress=self.progress)
        self.trained += [o.name for o in outs]
        return outs


# --------------------------------------------------------------------------- evaluation


class _Evaluator:
    """Samples responses for a list of prompts with any [base, guides] + coefficients, scores them."""

    def __init__(self, tokenizer, prompts: Sequence[str], samples_per_prompt: int, cfg: ExperimentConfig):
        from bonesoup.train.ppo.rollout import check_special_tokens, left_pad_prompts
        from bonesoup.train.rewards import get_reward

        self.tok, self.cfg = tokenizer, cfg
        self.prompts = [p for p in prompts for _ in range(samples_per_prompt)]
        self.ids, self.mask = left_pad_prompts(tokenizer, self.prompts)
        self.pad, self.eos = check_special_tokens(tokenizer)
        self.fns = [get_reward(r) for r in cfg.rewards]

    @torch.no_grad()
    def __call__(self, models: Sequence, coeffs, seed: int, search=None) -> np.ndarray:
        """Mean raw reward per objective [n] of one sample per prompt row, sampled with ``seed``."""
        from bonesoup.decode.mage import mage_generate
        from bonesoup.train.ppo.rollout import decode_responses

        if search is None:
            from bonesoup.decode.guided import guided_generate

            g = guided_generate(models[0], list(models[1:]), coeffs, self.ids, self.mask,
                                max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                seed=seed, stop_token_ids=[self.eos], pad_token_id=self.pad)
        else:
            from bonesoup.decode.values import Guidance

            guide = Guidance("custom", tuple(models[1:]), tuple(float(c) for c in coeffs[1:]))
            g = mage_generate(models[0], guide, self.ids, self.mask, w=1.0, max_new_tokens=self.cfg.max_new_tokens,
                              temperature=self.cfg.temperature, seed=seed, stop_token_ids=[self.eos],
                              pad_token_id=self.pad, search=search)
        resp_mask = torch.arange(g.steps)[None, :] < g.lengths[:, None]
        texts = decode_responses(self.tok, g.new_tokens, resp_mask, self.eos)
        return np.array([np.mean(f(self.prompts, texts)) for f in self.fns], dtype=np.float64)


def preference_grid(points: int) -> np.ndarray:
    """``points`` preferences (mu_1, 1 - mu_1), mu_1 from 0 to 1 evenly: [points, 2] float64."""
    m = np.linspace(0.0, 1.0, points)
    return np.stack([m, 1.0 - m], axis=1)


class _Methods:
    """The live merged models of one seed and the (models, coeffs) each method decodes with."""

    def __init__(self, cfg: ExperimentConfig, sft: Path, bbs, experts, values):
        from bonesoup.merge.live import LiveSoup
        from bonesoup.train.ppo.checkpoint_training import load_policy
        from bonesoup.decode.values import ValueSoup

        self.cfg = cfg
        self.sft_model, self.tok = load_policy(sft)
        self.bone = LiveSoup(load_policy(sft)[0], bbs, beta=cfg.beta, sft=sft)
        self.bone_ext = LiveSoup(load_policy(sft)[0], bbs, beta=cfg.beta, sft=sft)
        self.rs = LiveSoup(load_policy(sft)[0], experts, method="rewarded")
        self.experts = [load_policy(e)[0] for e in experts]
        # MAGE implicit's guide: the experts merged with mu (ONE model) against the SFT reference.
        self.implicit = ValueSoup(experts, kind="implicit", ref=self.sft_model)
        self.explicit = ValueSoup(values, kind="explicit")
        self.k = np.ones(len(cfg.rewards))
        self.w = {"implicit": 1.0, "explicit": 1.0}

    def set(self, method: str, mu: np.ndarray, *, w: float | None = None) -> tuple[list, list]:
        from bonesoup.merge.coefficients import per_objective_extrapolation

        mu = [float(x) for x in mu]
        if method == "rewarded_soup":
            self.rs.set_preference(mu)
            return [self.rs.model], [1.0]
        if method == "bone_soup":
            self.bone.set_preference(mu)
            return [self.bone.model], [1.0]
        if method == "bone_soup_extrapolated":
            c, c_sft = per_objective_extrapolation(mu, self.k, beta=self.cfg.beta)
            self.bone_ext.set_coefficients([*c, c_sft])
            return [self.bone_ext.model], [1.0]
        if method == "mod":
            return self.experts, mu
        if method in ("mage_implicit", "mage_explicit", SEARCH_METHOD):
            kind = method.split("_")[1]
            soup = self.implicit if kind == "implicit" else self.explicit
            self.bone.set_preference(mu)
            soup.set_preference(mu)
            ww = self.w[kind] if w is None else w
            return [self.bone.model, *soup.guidance.models], soup.guidance.coefficients(ww).tolist()
        raise ValueError(f"unknown method {method!r}")


def _tune(cfg: ExperimentConfig, methods: _Methods, val: _Evaluator, seed: int) -> dict:
    """Per-objective extrapolation a_i and the guidance strengths w, on the validation slice."""
    from bonesoup.merge.coefficients import per_objective_extrapolation
    from bonesoup.eval.metrics import hypervolume

    n = len(cfg.rewards)
    out = {"a": [], "a_scores": [], "w": {}, "w_scores": {}}
    for i in range(n):
        e = np.eye(n)[i]
        scores = []
        for a in cfg.extrapolation_grid:
            k = np.ones(n)
            k[i] = 1.0 / (1.0 - a)
            c, c_sft = per_objective_extrapolation(e, k, beta=cfg.beta)  # at mu = e_i only k_i matters
            methods.bone_ext.set_coefficients([*c, c_sft])
            scores.append(float(val([methods.bone_ext.model], [1.0], seed)[i]))
        best = int(np.argmax(scores))  # first maximum: the smallest a among ties
        out["a"].append(float(cfg.extrapolation_grid[best]))
        out["a_scores"].append(scores)
    methods.k = 1.0 / (1.0 - np.asarray(out["a"]))
    prefs = preference_grid(3)
    for kind, grid in (("implicit", cfg.w_implicit_grid), ("explicit", cfg.w_explicit_grid)):
        pts = {w: np.array([val(*methods.set(f"mage_{kind}", mu, w=w), seed) for mu in prefs]) for w in grid}
        # One reference point for the candidates: the validation minimum, so the w's compete on equal terms.
        ref = np.min(np.concatenate(list(pts.values())), axis=0) - cfg.hv_margin
        hv = {w: hypervolume(p, ref) for w, p in pts.items()}
        out["w"][kind] = float(max(grid, key=lambda w: hv[w]))
        out["w_scores"][kind] = {str(w): v for w, v in hv.items()}
    methods.w = dict(out["w"])
    return out


def _lmc(cfg: ExperimentConfig, methods: _Methods, values: list[Path], sft: Path, seed: int) -> dict:
    """Linear mode connectivity of the explicit value models: merged vs ensembled loss along the path."""
    from bonesoup.eval.metrics import lmc_barrier, merge_gap
    from bonesoup.tasks.review import task_prompts
    from bonesoup.train.value_training import ensemble_loss, load_value_model, sample_value_data, value_loss

    data = sample_value_data(sft, task_prompts("test"), list(cfg.rewards), samples=256,
                             max_new_tokens=cfg.max_new_tokens, seed=10_000 + seed)
    qs = [load_value_model(v) for v in values]
    ts = np.linspace(0.0, 1.0, 5)
    merged, ens = [], []
    for t in ts:
        w = [1.0 - t, t]
        methods.explicit.set_coefficients(w)
        merged.append(value_loss(methods.explicit.model, data, w))
        ens.append(ensemble_loss(qs, w, data, w))
    return {"t": ts.tolist(), "merged_mse": merged, "ensemble_mse": ens,
            "barrier": lmc_barrier(ts, merged)["barrier"], "gap": merge_gap(merged, ens)}


def _evaluate_seed(cfg: ExperimentConfig, sft: Path, paths: dict, seed: int, progress: bool) -> dict:
    from bonesoup.tasks.review import task_prompts

    methods = _Methods(cfg, sft, paths["backbones"], paths["experts"], paths["values"])
    train = task_prompts("train")
    val = _Evaluator(methods.tok, train[:cfg.val_prompts], cfg.val_samples_per_prompt, cfg)
    test = _Evaluator(methods.tok, task_prompts("test"), cfg.eval_samples_per_prompt, cfg)
    sample_seed = 1000 + seed
    t0 = time.perf_counter()
    tuned = _tune(cfg, methods, val, sample_seed)
    _log(f"seed {seed}: validation picked a = {tuned['a']}, w = {tuned['w']} ({time.perf_counter() - t0:.0f} s)")
    prefs = preference_grid(cfg.points)
    res = {"tuned": tuned, "points": {}}
    todo = [m for m in cfg.methods() if m != "morlhf"]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo) * len(prefs), desc=f"evaluate seed {seed}", unit="point")
    for m in todo:
        pts = []
        search = None
        if m == SEARCH_METHOD:
            from bonesoup.decode.mage import ChunkSearch

            search = ChunkSearch(methods.explicit.model, cfg.search_candidates, cfg.search_chunk_tokens)
        for mu in prefs:
            pts.append(test(*methods.set(m, mu), sample_seed, search=search).tolist())
            if bar is not None:
                bar.update()
        res["points"][m] = pts
    if bar is not None:
        bar.close()
    from bonesoup.train.ppo.checkpoint_training import load_policy

    morlhf = {0.0: paths["experts"][1], 1.0: paths["experts"][0], **paths["morlhf"]}
    res["morlhf"] = {str(m): test([load_policy(p)[0]], [1.0], sample_seed).tolist() for m, p in sorted(morlhf.items())}
    res["sft"] = test([methods.sft_model], [1.0], sample_seed).tolist()
    res["lmc"] = _lmc(cfg, methods, paths["values"], sft, seed)
    return res


# --------------------------------------------------------------------------- metrics, table, plot


def summarize(cfg: ExperimentConfig, per_seed: dict) -> dict:
    """Hypervolume (one reference point for all), controllability and means over seeds."""
    from bonesoup.eval.metrics import controllability, hypervolume

    prefs = preference_grid(cfg.points)
    allpts = [np.asarray(r["points"][m]) for r in per_seed.values() for m in r["points"]]
    allpts += [np.asarray(list(r["morlhf"].values())) for r in per_seed.values()]
    ref = np.min(np.concatenate(allpts), axis=0) - cfg.hv_margin
    out = {"reference_point": ref.tolist(), "methods": {}}
    for m in cfg.methods():
        hv, ctrl, per_obj = [], [], []
        for r in per_seed.values():
            if m == "morlhf":
                pts = np.asarray(list(r["morlhf"].values()))
                mus = np.array([[float(k), 1 - float(k)] for k in r["morlhf"]])
            else:
                pts, mus = np.asarray(r["points"][m]), prefs
            hv.append(hypervolume(pts, ref))
            c = controllability(mus, pts)
            ctrl.append(c["mean"])
            per_obj.append(c["per_objective"])
        mean_pts = np.mean([np.asarray(r["points"][m]) if m != "morlhf" else np.asarray(list(r["morlhf"].values()))
                            for r in per_seed.values()], axis=0)
        out["methods"][m] = {"hypervolume": hv, "hv_mean": float(np.mean(hv)), "hv_std": float(np.std(hv)),
                             "controllability": ctrl, "ctrl_mean": float(np.nanmean(ctrl)),
                             "ctrl_std": float(np.nanstd(ctrl)), "ctrl_per_objective": np.nanmean(per_obj, 0).tolist(),
                             "mean_points": mean_pts.tolist()}
    hv = {m: np.asarray(out["methods"][m]["hypervolume"]) for m in cfg.methods()}
    out["comparisons"] = {
        f"{a} > {b}": {"seeds_won": int(np.sum(hv[a] > hv[b])), "seeds": len(hv[a]),
                        "mean_difference": float(np.mean(hv[a] - hv[b]))}
        for a, b in (("bone_soup", "rewarded_soup"), ("bone_soup_extrapolated", "rewarded_soup"),
                     ("mage_implicit", "bone_soup"), ("mage_explicit", "bone_soup"), ("mage_implicit", "mod"),
                     ("mage_explicit", "mod"), (SEARCH_METHOD, "mage_explicit")) if b in hv and a in hv}
    return out


def format_table(cfg: ExperimentConfig, summary: dict) -> str:
    """Markdown: hypervolume and controllability (mean +- std over seeds) per method, then the comparisons."""
    lines = [f"| method | hypervolume (ref {np.round(summary['reference_point'], 3).tolist()}) | "
             f"controllability (Spearman, mean of {len(cfg.rewards)}) | per objective |",
             "|---|---|---|---|"]
    for m in cfg.methods():
        s = summary["methods"][m]
        lines.append(f"| {LABELS[m]} | {s['hv_mean']:.4f} +- {s['hv_std']:.4f} | "
                     f"{s['ctrl_mean']:.3f} +- {s['ctrl_std']:.3f} | "
                     f"{', '.join(f'{x:.2f}' for x in s['ctrl_per_objective'])} |")
    lines += ["", "| comparison (hypervolume) | seeds won | mean difference |", "|---|---|---|"]
    for k, v in summary["comparisons"].items():
        a, b = k.split(" > ")
        lines.append(f"| {LABELS[a]} > {LABELS[b]} | {v['seeds_won']} / {v['seeds']} | {v['mean_difference']:+.4f} |")
    return "\n".join(lines)


def plot_pareto(cfg: ExperimentConfig, summary: dict, per_seed: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    styles = {"rewarded_soup": ("tab:gray", "o--"), "bone_soup": ("tab:blue", "s-"),
              "bone_soup_extrapolated": ("tab:cyan", "s:"), "mod": ("tab:orange", "^--"),
              "mage_implicit": ("tab:green", "D-"), "mage_explicit": ("tab:red", "v-"),
              SEARCH_METHOD: ("tab:purple", "P-"), "morlhf": ("black", "*")}
    for m in cfg.methods():
        pts = np.asarray(summary["methods"][m]["mean_points"])
        color, style = styles[m]
        s = summary["methods"][m]
        ax.plot(pts[:, 0], pts[:, 1], style, color=color, ms=5 if m != "morlhf" else 11, lw=1.2,
                label=f"{LABELS[m]} (HV {s['hv_mean']:.3f})")
    sft = np.mean([r["sft"] for r in per_seed.values()], axis=0)
    ax.plot([sft[0]], [sft[1]], "kx", ms=9, label="SFT")
    ref = summary["reference_point"]
    ax.axvline(ref[0], color="0.8", lw=0.8)
    ax.axhline(ref[1], color="0.8", lw=0.8)
    ax.set_xlabel(f"{cfg.rewards[0]} (mean over held-out prompts)")
    ax.set_ylabel(f"{cfg.rewards[1]}")
    ax.set_title(f"Preference sweep ({cfg.points} points, mean of {len(per_seed)} seed(s)); "
                 f"mu_1 = 1 at the {cfg.rewards[0]} end", fontsize=9)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- driver


def run_experiment(cfg: ExperimentConfig, *, progress: bool = True) -> dict:
    """Train (or find) every model, evaluate every method, write results.{json,md} and pareto.png under ``cfg.out``."""
    import transformers

    from bonesoup.tasks.review import build_task_sft

    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    t_start = time.perf_counter()
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    sft = build_task_sft(root / "sft", progress=progress)
    train_seeds = list(cfg.seeds) if cfg.seed_mode == "train" else [cfg.seeds[0]]
    paths, trained = {}, []
    t0 = time.perf_counter()
    for s in train_seeds:
        ms = _Models(cfg, root, sft, s, progress)
        paths[s] = {"backbones": ms.backbones(), "experts": ms.experts(), "morlhf": ms.morlhf(),
                    "values": ms.values()}
        trained += ms.trained
    t_train = time.perf_counter() - t0
    _log(f"models ready ({len(trained)} trained, {t_train:.0f} s)")
    per_seed = {}
    t0 = time.perf_counter()
    for s in cfg.seeds:
        p = paths[s] if cfg.seed_mode == "train" else paths[train_seeds[0]]
        per_seed[s] = _evaluate_seed(cfg, sft, p, s, progress)
    t_eval = time.perf_counter() - t0
    summary = summarize(cfg, per_seed)
    table = format_table(cfg, summary)
    result = {"config": dataclasses.asdict(cfg), "seconds": {"train": t_train, "evaluate": t_eval,
                                                             "total": time.perf_counter() - t_start},
              "trained_now": trained, "summary": summary,
              "per_seed": {str(k): v for k, v in per_seed.items()},
              "models": {str(k): {kk: ([str(x) for x in v] if isinstance(v, list) else
                                       {str(a): str(b) for a, b in v.items()}) for kk, v in p.items()}
                         for k, p in paths.items()}}
    (root / "results.json").write_text(json.dumps(result, indent=2))
    (root / "results.md").write_text(table + "\n")
    plot_pareto(cfg, summary, per_seed, root / "pareto.png")
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
            typ = {"int": int, "float": float, "str": str, "int | None": int}.get(str(f.type), str)
            p.add_argument(flag, type=typ, default=None, help=f"(default {f.default})")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_experiment)


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
