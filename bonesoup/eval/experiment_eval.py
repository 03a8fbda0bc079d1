"""The experiment's evaluation: validation tuning, the preference sweep, the summary, the table and the plot.

Every method decodes the same prompt rows with the same seed at every
preference (:class:`Evaluator`); the methods themselves come from
:data:`bonesoup.eval.experiment_methods.METHOD_TABLE`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bonesoup.eval.experiment_methods import (COMPARISONS, LABELS, LiveModels, get_experiment_method,
                                              preference_from_key, preference_key, validation_preferences)
from bonesoup.eval.experiment_models import _log

__all__ = ["Evaluator", "tune", "evaluate_seed", "summarize", "format_table", "plot_pareto"]


class Evaluator:
    """Samples responses for a list of prompts with any [base, guides] + coefficients, scores them.

    Parameters
    ----------
    tokenizer : the policies' tokenizer (pad and EOS distinct).
    prompts : sequence of str; each is repeated ``samples_per_prompt`` times (rows of the evaluation set).
    samples_per_prompt : int
    cfg : ExperimentConfig (``max_new_tokens``, ``temperature``, ``rewards``, ``eval_batch_size``).
    rewards : reward functions, one per objective (default: ``get_reward`` of each ``cfg.rewards`` entry).
    batch_size : rows per decode call (default ``cfg.eval_batch_size``; None there: all rows at once).

    Row i of the set draws with key ``derive_seed(seed, i)`` whatever batch it falls in, so the
    result does not depend on ``batch_size``.
    """

    def __init__(self, tokenizer, prompts: Sequence[str], samples_per_prompt: int, cfg, *, rewards=None,
                 batch_size: int | None = None):
        from bonesoup.decode.batching import left_pad_prompts
        from bonesoup.train.ppo.rollout import check_special_tokens
        from bonesoup.train.rewards import get_reward

        self.tok, self.cfg = tokenizer, cfg
        self.prompts = [p for p in prompts for _ in range(samples_per_prompt)]
        bs = batch_size or getattr(cfg, "eval_batch_size", None) or len(self.prompts)
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ValueError(f"batch_size must be a positive integer, got {bs!r}")
        # Each chunk padded to its own longest prompt: left padding and position ids keep a row's tokens
        # the same at any width (tests/test_guided_generate.py checks that).
        self.chunks = [(lo, *left_pad_prompts(tokenizer, self.prompts[lo:lo + bs]))
                       for lo in range(0, len(self.prompts), bs)]
        self.pad, self.eos = check_special_tokens(tokenizer)
        self.fns = list(rewards) if rewards is not None else [get_reward(r) for r in cfg.rewards]

    @torch.no_grad()
    def __call__(self, models: Sequence, coeffs, seed: int, search=None) -> np.ndarray:
        """Mean raw reward per objective [n] float64 of one sample per prompt row, sampled with ``seed``."""
        from bonesoup.decode.batching import row_seeds
        from bonesoup.decode.guided import guided_generate
        from bonesoup.decode.mage import mage_generate
        from bonesoup.decode.values import Guidance
        from bonesoup.train.ppo.rollout import decode_responses

        keys = row_seeds(seed, len(self.prompts))
        texts: list[str] = []
        for lo, ids, mask in self.chunks:
            rows = keys[lo:lo + ids.shape[0]]
            kw = dict(max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature, seed=rows,
                      stop_token_ids=[self.eos], pad_token_id=self.pad)
            if search is None:
                g = guided_generate(models[0], list(models[1:]), coeffs, ids, mask, **kw)
            else:
                guide = Guidance("custom", tuple(models[1:]), tuple(float(c) for c in coeffs[1:]))
                g = mage_generate(models[0], guide, ids, mask, w=1.0, search=search, **kw)
            resp_mask = torch.arange(g.steps, device=g.lengths.device)[None, :] < g.lengths[:, None]
            texts += decode_responses(self.tok, g.new_tokens, resp_mask, self.eos)
        # Rewards see the whole set at once: a reward model batches by its own batch_size.
        return np.array([np.mean(f(self.prompts, texts)) for f in self.fns], dtype=np.float64)


def tune(cfg, live: LiveModels, val: Evaluator, seed: int) -> dict:
    """What the methods' ``tunes`` name, picked on the validation slice; sets ``live.k``, ``.k_rewarded``, ``.w``.

    ``"k"`` (backbones) and ``"k_rewarded"`` (experts): per objective i, the ``a_i`` of
    ``cfg.extrapolation_grid`` that maximises reward i at ``mu = e_i`` (``k_i = 1 / (1 - a_i)``);
    ``"w_<kind>"``: the guidance strength of that grid that maximises the hypervolume of the
    :func:`~bonesoup.eval.experiment_methods.validation_preferences`.
    """
    from bonesoup.eval.metrics import hypervolume
    from bonesoup.merge.coefficients import per_objective_extrapolation

    wanted = {}
    for name in cfg.methods():
        m = get_experiment_method(name)
        if m.tunes and m.tunes not in wanted:
            wanted[m.tunes] = m  # the first method that needs it decodes the candidates
    n = len(cfg.rewards)
    out = {"a": [], "a_scores": [], "a_rewarded": [], "a_rewarded_scores": [], "w": {}, "w_scores": {}}
    for tunes, which, key in (("k", "bone", "a"), ("k_rewarded", "rewarded", "a_rewarded")):
        if tunes not in wanted:
            continue
        for i in range(n):
            e = np.eye(n)[i]
            scores = []
            for a in cfg.extrapolation_grid:
                k = np.ones(n)
                k[i] = 1.0 / (1.0 - a)
                # at e_i only k_i matters
                live.set_extrapolated(*per_objective_extrapolation(e, k, method=which, beta=cfg.beta), which=which)
                scores.append(float(val([live.extrapolated_model(which)], [1.0], seed)[i]))
            best = int(np.argmax(scores))  # first maximum: the smallest a among ties
            out[key].append(float(cfg.extrapolation_grid[best]))
            out[f"{key}_scores"].append(scores)
        factors = 1.0 / (1.0 - np.asarray(out[key]))
        if which == "bone":
            live.k = factors
        else:
            live.k_rewarded = factors
    prefs = validation_preferences(n)
    for kind in ("implicit", "explicit"):
        if f"w_{kind}" not in wanted:
            continue
        grid, method = getattr(cfg, f"w_{kind}_grid"), wanted[f"w_{kind}"]
        pts = {w: np.array([val(*live.decode_with(method, mu, w=w), seed) for mu in prefs]) for w in grid}
        # One reference point for the candidates: the validation minimum, so the w's compete on equal terms.
        ref = np.min(np.concatenate(list(pts.values())), axis=0) - cfg.hv_margin
        hv = {w: hypervolume(p, ref) for w, p in pts.items()}
        out["w"][kind] = float(max(grid, key=lambda w: hv[w]))
        out["w_scores"][kind] = {str(w): v for w, v in hv.items()}
    live.w.update(out["w"])
    return out


def _lmc(cfg, live: LiveModels, values: list[Path], sft: Path, seed: int, task) -> dict:
    """Linear mode connectivity of the explicit value models: merged vs ensembled loss along the path.

    The path runs from objective 0's value model to objective 1's (a 1-D path; at n >= 3 the other
    weights stay 0: one edge of the simplex, reported as ``"path"``).
    """
    from bonesoup.eval.metrics import lmc_barrier, merge_gap
    from bonesoup.train.value_training import ensemble_loss, load_value_model, sample_value_data, value_loss

    data = sample_value_data(sft, task.prompts["test"], task.reward_fns(), samples=256,
                             max_new_tokens=cfg.max_new_tokens, seed=10_000 + seed, device=cfg.run_device())
    qs = [load_value_model(v, device=cfg.run_device(), dtype=cfg.torch_dtype()) for v in values]
    ts = np.linspace(0.0, 1.0, 5)
    merged, ens = [], []
    explicit = live.guides["explicit"]
    n = len(cfg.rewards)
    for t in ts:
        w = [1.0 - t, t] + [0.0] * (n - 2)
        explicit.set_coefficients(w)
        merged.append(value_loss(explicit.model, data, w))
        ens.append(ensemble_loss(qs, w, data, w))
    return {"path": "e0-e1", "t": ts.tolist(), "merged_mse": merged, "ensemble_mse": ens,
            "barrier": lmc_barrier(ts, merged)["barrier"], "gap": merge_gap(merged, ens)}


def evaluate_seed(cfg, sft: Path, paths: dict, seed: int, progress: bool, task=None) -> dict:
    """Tune, then evaluate every method of ``cfg`` at ``cfg.preferences()`` with sampling seed ``1000 + seed``."""
    from bonesoup.train.ppo.checkpoint_training import load_policy

    task = task if task is not None else cfg.task_spec()
    where = dict(device=cfg.run_device(), dtype=cfg.torch_dtype())
    live = LiveModels(cfg.beta, sft, paths["backbones"], paths["experts"], paths["values"], **where)
    fns = task.reward_fns()
    val = Evaluator(live.tok, task.prompts["validation"][:cfg.val_prompts], cfg.val_samples_per_prompt, cfg,
                    rewards=fns)
    test = Evaluator(live.tok, task.prompts["test"], cfg.eval_samples_per_prompt, cfg, rewards=fns)
    sample_seed = 1000 + seed
    t0 = time.perf_counter()
    tuned = tune(cfg, live, val, sample_seed)
    _log(f"seed {seed}: validation picked a = {tuned['a']}, w = {tuned['w']} ({time.perf_counter() - t0:.0f} s)")
    prefs = cfg.preferences()
    res = {"tuned": tuned, "points": {}, "forwards_per_token": {}}
    todo = [get_experiment_method(m) for m in cfg.methods()]
    todo = [m for m in todo if m.decode is not None]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo) * len(prefs), desc=f"evaluate seed {seed}", unit="point")
    for m in todo:
        search = None
        if m.search:
            from bonesoup.decode.mage import ChunkSearch

            search = ChunkSearch(live.guides["explicit"].model, cfg.search_candidates, cfg.search_chunk_tokens)
        pts = []
        for mu in prefs:
            models, coeffs = live.decode_with(m, mu)
            res["forwards_per_token"][m.name] = len(models)  # base + guides: one forward each per token
            pts.append(test(models, coeffs, sample_seed, search=search).tolist())
            if bar is not None:
                bar.update()
        res["points"][m.name] = pts
    if bar is not None:
        bar.close()
    # MORLHF: the oracles where trained, the experts at the ends (the vertices).
    n = len(cfg.rewards)
    morlhf = {preference_key(np.eye(n)[i]): p for i, p in enumerate(paths["experts"])}
    morlhf.update({preference_key(mu): p for mu, p in paths["morlhf"].items()})
    res["morlhf"] = {k: test([load_policy(p, **where)[0]], [1.0], sample_seed).tolist()
                     for k, p in sorted(morlhf.items())}
    res["forwards_per_token"]["morlhf"] = 1
    res["sft"] = test([live.sft_model], [1.0], sample_seed).tolist()
    res["lmc"] = _lmc(cfg, live, paths["values"], sft, seed, task)
    return res


def _method_points(r: dict, name: str, prefs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(points [P, n], preferences [P, n]) of one method in one seed's results."""
    if get_experiment_method(name).decode is None:  # MORLHF: keyed by the trained preference
        n = prefs.shape[1]
        return np.asarray(list(r["morlhf"].values())), np.array([preference_from_key(k, n) for k in r["morlhf"]])
    return np.asarray(r["points"][name]), prefs


#: The summary's statistics: 95% percentile bootstrap intervals, seeded, and the sign-flip tests' Monte Carlo size.
SUMMARY_CONFIDENCE, SUMMARY_RESAMPLES, SUMMARY_SEED = 0.95, 10_000, 0

#: ``ExperimentConfig.reference_point`` modes and how the table states them.
REFERENCE_POINT_MODES = {"union": "coordinate-wise minimum of every evaluated point of every method and seed, "
                                  "minus hv_margin",
                         "sft": "the SFT model's mean rewards on the held-out prompts (mean over seeds)"}


def _reference_point(cfg, per_seed: dict) -> tuple[np.ndarray, str]:
    """The ONE reference point of every hypervolume, and its mode."""
    mode = getattr(cfg, "reference_point", "union")
    if mode not in REFERENCE_POINT_MODES:
        raise ValueError(f"reference_point must be one of {sorted(REFERENCE_POINT_MODES)}, got {mode!r}")
    if mode == "sft":  # fixed by the SFT model alone: a method's numbers do not move when another is added
        return np.mean([np.asarray(r["sft"], dtype=np.float64) for r in per_seed.values()], axis=0), mode
    allpts = [np.asarray(r["points"][m]) for r in per_seed.values() for m in r["points"]]
    allpts += [np.asarray(list(r["morlhf"].values())) for r in per_seed.values()]
    return np.min(np.concatenate(allpts), axis=0) - cfg.hv_margin, mode


def summarize(cfg, per_seed: dict) -> dict:
    """Hypervolume (one reference point for all), controllability, their statistics over seeds, the comparisons.

    Per method: ``hypervolume`` / ``controllability`` per seed, ``hv_mean``,
    ``hv_std`` (sample std, ddof 1; NaN for one seed), ``hv_ci`` (95%
    percentile bootstrap of the mean over seeds), the same for
    controllability, ``mean_points``. Per comparison ``"a > b"``:
    ``seeds_won``, ``seeds``, ``mean_difference`` (of hypervolume), ``hv``
    (:func:`bonesoup.eval.stats.paired_comparison` of the per-seed
    hypervolumes: CI, exact sign-flip p) and ``weighted_reward`` (the same
    over every (seed, preference) pair of ``mu . r``, for two sweep
    methods). ``reference_point_mode``: ``cfg.reference_point``.
    """
    from bonesoup.eval.metrics import controllability, hypervolume
    from bonesoup.eval.stats import bootstrap_ci, paired_comparison, sample_std

    stat = dict(confidence=SUMMARY_CONFIDENCE, resamples=SUMMARY_RESAMPLES, seed=SUMMARY_SEED)
    prefs = cfg.preferences()
    ref, mode = _reference_point(cfg, per_seed)
    out = {"reference_point": ref.tolist(), "reference_point_mode": mode,
           "statistics": {**stat, "std": "sample (ddof 1)", "ci": "percentile bootstrap of the mean",
                          "p": "two-sided sign-flip permutation test (exact up to 20 pairs)"},
           "methods": {}}
    weighted = {}
    for m in cfg.methods():
        hv, ctrl, per_obj, all_pts, scores = [], [], [], [], []
        for r in per_seed.values():
            pts, mus = _method_points(r, m, prefs)
            hv.append(hypervolume(pts, ref))
            c = controllability(mus, pts)
            ctrl.append(c["mean"])
            per_obj.append(c["per_objective"])
            all_pts.append(pts)
            scores.append(np.sum(mus * pts, axis=1))  # mu . r at each preference of the sweep
        if get_experiment_method(m).decode is not None:
            weighted[m] = np.asarray(scores)  # [seeds, points], paired across sweep methods
        c_ok = [x for x in ctrl if not np.isnan(x)]
        out["methods"][m] = {"hypervolume": hv, "hv_mean": float(np.mean(hv)), "hv_std": sample_std(hv),
                             "hv_ci": list(bootstrap_ci(hv, **stat)),
                             "controllability": ctrl, "ctrl_mean": float(np.nanmean(ctrl)) if c_ok else float("nan"),
                             "ctrl_std": sample_std(c_ok) if c_ok else float("nan"),
                             "ctrl_ci": list(bootstrap_ci(c_ok, **stat)) if c_ok else [float("nan")] * 2,
                             "ctrl_per_objective": np.nanmean(per_obj, 0).tolist(),
                             "mean_points": np.mean(all_pts, axis=0).tolist()}
    hv = {m: np.asarray(out["methods"][m]["hypervolume"]) for m in cfg.methods()}
    out["comparisons"] = {}
    for a, b in COMPARISONS:
        if a not in hv or b not in hv:
            continue
        c = {"seeds_won": int(np.sum(hv[a] > hv[b])), "seeds": len(hv[a]),
             "mean_difference": float(np.mean(hv[a] - hv[b])), "hv": paired_comparison(hv[a], hv[b], **stat)}
        if a in weighted and b in weighted:
            c["weighted_reward"] = paired_comparison(weighted[a], weighted[b], **stat)
        out["comparisons"][f"{a} > {b}"] = c
    return out


def _ci(v) -> str:
    return "n/a" if any(np.isnan(v)) else f"[{v[0]:.4f}, {v[1]:.4f}]"


def format_table(cfg, summary: dict) -> str:
    """Markdown: per method hypervolume and controllability (mean +- sample std over seeds, 95% CI), then the
    paired comparisons (difference, 95% CI, p-value), then how each number was computed."""
    n_seeds = len(next(iter(summary["methods"].values()))["hypervolume"]) if summary["methods"] else 0
    mode = summary.get("reference_point_mode", "union")
    ref = np.round(summary["reference_point"], 3).tolist()
    lines = [f"| method | hypervolume (ref {ref}) | 95% CI of the mean | "
             f"controllability (Spearman, mean of {len(cfg.rewards)}) | per objective |",
             "|---|---|---|---|---|"]
    for m in cfg.methods():
        s = summary["methods"][m]
        lines.append(f"| {LABELS[m]} | {s['hv_mean']:.4f} +- {s['hv_std']:.4f} | {_ci(s.get('hv_ci', [np.nan] * 2))} | "
                     f"{s['ctrl_mean']:.3f} +- {s['ctrl_std']:.3f} | "
                     f"{', '.join(f'{x:.2f}' for x in s['ctrl_per_objective'])} |")
    lines += ["", "| comparison | seeds won | hypervolume difference [95% CI] | p (seeds) | "
              "mu . r difference [95% CI] | p sign-flip / Wilcoxon (seeds x preferences) |", "|---|---|---|---|---|---|"]
    for k, v in summary["comparisons"].items():
        a, b = k.split(" > ")
        h = v.get("hv")
        row = f"| {LABELS[a]} > {LABELS[b]} | {v['seeds_won']} / {v['seeds']} | {v['mean_difference']:+.4f} "
        row += f"{_ci(h['ci'])} | {h['p_sign_flip']:.3g} |" if h else "| |"
        w = v.get("weighted_reward")
        row += (f" {w['mean_difference']:+.4f} {_ci(w['ci'])} | {w['p_sign_flip']:.3g} / {w['p_wilcoxon']:.3g} |"
                if w else " | |")
        lines.append(row)
    st = summary.get("statistics", {})
    lines += ["", f"Reference point ({mode}): {REFERENCE_POINT_MODES.get(mode, mode)}. Over {n_seeds} seed(s): a +- b is "
              "the mean +- the sample std (ddof 1); CIs are "
              f"{100 * st.get('confidence', SUMMARY_CONFIDENCE):g}% percentile bootstraps of the mean "
              f"({st.get('resamples', SUMMARY_RESAMPLES)} resamples, seed {st.get('seed', SUMMARY_SEED)}; with few "
              "seeds they are coarse); p-values are two-sided sign-flip permutation tests (exact over seeds: with 3 "
              "seeds p >= 0.25) and exact Wilcoxon signed-rank tests. The mu . r columns pair every (seed, "
              "preference) and treat the pairs as exchangeable, although the pairs of one seed are correlated: "
              "their CI and p are optimistic."]
    return "\n".join(lines)


def plot_pareto(cfg, summary: dict, per_seed: dict, path: Path) -> Path:
    """The mean points of every method (and the SFT model), one panel per pair of objectives; PNG at ``path``.

    The legend gives each method's hypervolume as mean +- sample std over
    seeds; the grey lines are the reference point (its mode in the title).
    """
    from itertools import combinations

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cfg.rewards)
    pairs = list(combinations(range(n), 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(7.5 * len(pairs), 5.5), squeeze=False)
    sft = np.mean([r["sft"] for r in per_seed.values()], axis=0)
    ref = summary["reference_point"]
    for ax, (i, j) in zip(axes[0], pairs):
        for name in cfg.methods():
            m = get_experiment_method(name)
            s = summary["methods"][name]
            pts = np.asarray(s["mean_points"])
            color, style = m.style
            if n > 2:  # a projection of a simplex sweep: joining its points in grid order draws no curve
                style = style.replace("-", "").replace(":", "")
            std = s["hv_std"]
            hv = f"HV {s['hv_mean']:.3f}" + ("" if np.isnan(std) else f" +- {std:.3f}")
            ax.plot(pts[:, i], pts[:, j], style, color=color, ms=5 if m.decode is not None else 11, lw=1.2,
                    label=f"{m.label} ({hv})")
        ax.plot([sft[i]], [sft[j]], "kx", ms=9, label="SFT")
        ax.axvline(ref[i], color="0.8", lw=0.8)
        ax.axhline(ref[j], color="0.8", lw=0.8)
        ax.set_xlabel(f"{cfg.rewards[i]} (mean over held-out prompts)")
        ax.set_ylabel(f"{cfg.rewards[j]}")
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Preference sweep ({len(cfg.preferences())} points, mean of {len(per_seed)} seed(s)); mu_1 = 1 at the "
                 f"{cfg.rewards[0]} end; reference point: {summary.get('reference_point_mode', 'union')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
