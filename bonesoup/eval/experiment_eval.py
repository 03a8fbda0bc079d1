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
    """Samples responses for a list of prompts with any [base, guides] + coefficients, scores them."""

    def __init__(self, tokenizer, prompts: Sequence[str], samples_per_prompt: int, cfg):
        from bonesoup.decode.batching import left_pad_prompts
        from bonesoup.train.ppo.rollout import check_special_tokens
        from bonesoup.train.rewards import get_reward

        self.tok, self.cfg = tokenizer, cfg
        self.prompts = [p for p in prompts for _ in range(samples_per_prompt)]
        self.ids, self.mask = left_pad_prompts(tokenizer, self.prompts)
        self.pad, self.eos = check_special_tokens(tokenizer)
        self.fns = [get_reward(r) for r in cfg.rewards]

    @torch.no_grad()
    def __call__(self, models: Sequence, coeffs, seed: int, search=None) -> np.ndarray:
        """Mean raw reward per objective [n] float64 of one sample per prompt row, sampled with ``seed``."""
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


def _lmc(cfg, live: LiveModels, values: list[Path], sft: Path, seed: int) -> dict:
    """Linear mode connectivity of the explicit value models: merged vs ensembled loss along the path.

    The path runs from objective 0's value model to objective 1's (a 1-D path; at n >= 3 the other
    weights stay 0: one edge of the simplex, reported as ``"path"``).
    """
    from bonesoup.eval.metrics import lmc_barrier, merge_gap
    from bonesoup.tasks.registry import get_task
    from bonesoup.train.value_training import ensemble_loss, load_value_model, sample_value_data, value_loss

    data = sample_value_data(sft, get_task(cfg.task).prompts("test"), list(cfg.rewards), samples=256,
                             max_new_tokens=cfg.max_new_tokens, seed=10_000 + seed)
    qs = [load_value_model(v) for v in values]
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


def evaluate_seed(cfg, sft: Path, paths: dict, seed: int, progress: bool) -> dict:
    """Tune, then evaluate every method of ``cfg`` at ``cfg.preferences()`` with sampling seed ``1000 + seed``."""
    from bonesoup.tasks.registry import get_task
    from bonesoup.train.ppo.checkpoint_training import load_policy

    task_prompts = get_task(cfg.task).prompts
    live = LiveModels(cfg.beta, sft, paths["backbones"], paths["experts"], paths["values"])
    val = Evaluator(live.tok, task_prompts("train")[:cfg.val_prompts], cfg.val_samples_per_prompt, cfg)
    test = Evaluator(live.tok, task_prompts("test"), cfg.eval_samples_per_prompt, cfg)
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
    res["morlhf"] = {k: test([load_policy(p)[0]], [1.0], sample_seed).tolist() for k, p in sorted(morlhf.items())}
    res["forwards_per_token"]["morlhf"] = 1
    res["sft"] = test([live.sft_model], [1.0], sample_seed).tolist()
    res["lmc"] = _lmc(cfg, live, paths["values"], sft, seed)
    return res


def _method_points(r: dict, name: str, prefs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(points [P, n], preferences [P, n]) of one method in one seed's results."""
    if get_experiment_method(name).decode is None:  # MORLHF: keyed by the trained preference
        n = prefs.shape[1]
        return np.asarray(list(r["morlhf"].values())), np.array([preference_from_key(k, n) for k in r["morlhf"]])
    return np.asarray(r["points"][name]), prefs


def summarize(cfg, per_seed: dict) -> dict:
    """Hypervolume (one reference point for all), controllability and means over seeds."""
    from bonesoup.eval.metrics import controllability, hypervolume

    prefs = cfg.preferences()
    allpts = [np.asarray(r["points"][m]) for r in per_seed.values() for m in r["points"]]
    allpts += [np.asarray(list(r["morlhf"].values())) for r in per_seed.values()]
    ref = np.min(np.concatenate(allpts), axis=0) - cfg.hv_margin
    out = {"reference_point": ref.tolist(), "methods": {}}
    for m in cfg.methods():
        hv, ctrl, per_obj, all_pts = [], [], [], []
        for r in per_seed.values():
            pts, mus = _method_points(r, m, prefs)
            hv.append(hypervolume(pts, ref))
            c = controllability(mus, pts)
            ctrl.append(c["mean"])
            per_obj.append(c["per_objective"])
            all_pts.append(pts)
        out["methods"][m] = {"hypervolume": hv, "hv_mean": float(np.mean(hv)), "hv_std": float(np.std(hv)),
                             "controllability": ctrl, "ctrl_mean": float(np.nanmean(ctrl)),
                             "ctrl_std": float(np.nanstd(ctrl)), "ctrl_per_objective": np.nanmean(per_obj, 0).tolist(),
                             "mean_points": np.mean(all_pts, axis=0).tolist()}
    hv = {m: np.asarray(out["methods"][m]["hypervolume"]) for m in cfg.methods()}
    out["comparisons"] = {
        f"{a} > {b}": {"seeds_won": int(np.sum(hv[a] > hv[b])), "seeds": len(hv[a]),
                        "mean_difference": float(np.mean(hv[a] - hv[b]))}
        for a, b in COMPARISONS if b in hv and a in hv}
    return out


def format_table(cfg, summary: dict) -> str:
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


def plot_pareto(cfg, summary: dict, per_seed: dict, path: Path) -> Path:
    """The mean points of every method (and the SFT model) on the two rewards; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for name in cfg.methods():
        m = get_experiment_method(name)
        pts = np.asarray(summary["methods"][name]["mean_points"])
        color, style = m.style
        ax.plot(pts[:, 0], pts[:, 1], style, color=color, ms=5 if m.decode is not None else 11, lw=1.2,
                label=f"{m.label} (HV {summary['methods'][name]['hv_mean']:.3f})")
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
