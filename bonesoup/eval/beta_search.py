"""The paper's beta search: short backbone runs at each beta of a grid, beta picked by validation hypervolume.

For each beta of ``cfg.beta_grid`` the n Bone Soup backbones are trained for
``round(beta_search_fraction * ppo_steps)`` PPO steps (cached like every
model), merged with ``B^-1 mu`` at the validation preferences
(:func:`~bonesoup.eval.experiment_methods.validation_preferences`) and
scored on the validation slice of the training prompts; the beta whose
points have the largest hypervolume (one reference point for all betas:
their coordinate-wise minimum minus ``hv_margin``) is chosen, and the
experiment then trains the chosen beta's backbones for the full
``ppo_steps``. They are trained again from the SFT model (the report says
so: ``"resumed": false``): the PPO trainer can extend a run from a training
checkpoint (``steps`` is a resumable change), but it writes none at a run's
last step and removes its checkpoints once the output is in place, so a
finished search run has nothing to continue from. The search's PPO steps
are charged to the methods that use the backbones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from bonesoup.eval.experiment_methods import validation_preferences

__all__ = ["search_steps", "search_beta", "format_beta_search"]

#: ``(beta, backbone dirs, preferences [P, n]) -> reward points [P, n]`` on the validation slice.
BetaEvaluator = Callable[[float, Sequence[Path], np.ndarray], np.ndarray]


def search_steps(cfg) -> int:
    """PPO steps of each search run: ``round(beta_search_fraction * ppo_steps)``, at least 1."""
    return max(1, int(round(cfg.beta_search_fraction * cfg.ppo_steps)))


def _validation_evaluator(cfg, sft: Path, seed: int) -> BetaEvaluator:
    """Bone Soup of the given backbones at each preference, scored on the validation slice with ``seed``."""
    from bonesoup.eval.experiment_eval import Evaluator
    from bonesoup.lora import AdapterSoup, is_adapter_dir
    from bonesoup.merge.live import LiveSoup
    from bonesoup.train.ppo.checkpoint_training import load_policy

    task = cfg.task_spec()
    where = dict(device=cfg.run_device(), dtype=cfg.torch_dtype())
    tok = load_policy(sft)[1]
    val = Evaluator(tok, task.prompts["validation"][:cfg.val_prompts], cfg.val_samples_per_prompt, cfg,
                    rewards=task.reward_fns())

    def evaluate(beta: float, backbones: Sequence[Path], prefs: np.ndarray) -> np.ndarray:
        model = load_policy(sft, **where)[0]  # a fresh model: the soup owns its weights
        if is_adapter_dir(backbones[0]):  # LoRA backbones (lora_rank): the exact low-rank merge, no re-merge
            soup = AdapterSoup(model, list(backbones), beta=beta)
        else:
            soup = LiveSoup(model, list(backbones), beta=beta, device=where["device"])
        pts = []
        for mu in prefs:
            soup.set_preference([float(x) for x in mu])
            pts.append(val([soup.model], [1.0], seed))
        return np.asarray(pts)

    return evaluate


def search_beta(cfg, models, sft: Path, seed: int, *, evaluate: BetaEvaluator | None = None) -> dict:
    """Train the short backbone runs of every beta in ``cfg.beta_grid`` and pick beta by validation hypervolume.

    Parameters
    ----------
    cfg : ExperimentConfig (``beta_grid`` non-empty)
    models : :class:`~bonesoup.eval.experiment_models.TrainedModels` of the training seed that searches
        (its ``backbones(beta=, steps=)`` trains or finds the runs).
    sft : the SFT checkpoint directory.
    seed : the training seed; validation samples with ``1000 + seed`` as the tuning does.
    evaluate : optional; the default decodes Bone Soup on the validation slice (tests pass a stub).

    Returns
    -------
    dict
        ``grid``, ``fraction``, ``steps`` (per run), ``preferences`` [P][n], ``points`` {beta: [P][n]},
        ``reference_point``, ``validation_hv`` {beta: float}, ``chosen`` (the first maximum in grid
        order), ``ppo_runs`` and ``ppo_steps`` (what the search cost), ``resumed`` (False: the chosen
        backbones are trained again for the full length), ``backbones`` {beta: [dirs]}.
    """
    from bonesoup.eval.metrics import hypervolume

    grid = [float(b) for b in cfg.beta_grid]
    if not grid:
        raise ValueError("beta_grid is empty: there is nothing to search (the experiment uses beta)")
    steps = search_steps(cfg)
    n = len(cfg.rewards)
    prefs = validation_preferences(n)
    if evaluate is None:
        evaluate = _validation_evaluator(cfg, sft, seed)
    dirs, pts = {}, {}
    for beta in grid:
        dirs[beta] = models.backbones(beta=beta, steps=steps)
        p = np.asarray(evaluate(beta, dirs[beta], prefs), dtype=np.float64)
        if p.shape != prefs.shape:
            raise ValueError(f"beta {beta}: the evaluator returned points of shape {p.shape}, expected {prefs.shape}")
        pts[beta] = p
    # One reference point for every beta, as for the methods: they compete on equal terms.
    ref = np.min(np.concatenate(list(pts.values())), axis=0) - cfg.hv_margin
    hv = {beta: float(hypervolume(p, ref)) for beta, p in pts.items()}
    chosen = max(grid, key=lambda b: hv[b])  # max() keeps the first maximum: the grid order breaks ties
    return {"grid": grid, "fraction": float(cfg.beta_search_fraction), "steps": steps,
            "preferences": prefs.tolist(), "points": {str(b): p.tolist() for b, p in pts.items()},
            "reference_point": ref.tolist(), "validation_hv": {str(b): v for b, v in hv.items()},
            "chosen": chosen, "ppo_runs": len(grid) * n, "ppo_steps": len(grid) * n * steps, "resumed": False,
            "backbones": {str(b): [str(d) for d in ds] for b, ds in dirs.items()}}


def format_beta_search(report: dict) -> str:
    """Markdown: every beta's validation hypervolume and the choice."""
    lines = [f"Beta search: backbones trained {report['steps']} PPO steps (fraction {report['fraction']:g}) at each "
             f"beta, Bone Soup scored at {len(report['preferences'])} validation preferences "
             f"(reference point {np.round(report['reference_point'], 3).tolist()}); chosen beta = "
             f"{report['chosen']:g}, its backbones then trained from the SFT model for the full run "
             f"({'resumed' if report['resumed'] else 'not resumed: a finished PPO run keeps no checkpoint to extend'}).",
             "", "| beta | validation hypervolume | |", "|---|---|---|"]
    for b in report["grid"]:
        mark = "chosen" if b == report["chosen"] else ""
        lines.append(f"| {b:g} | {report['validation_hv'][str(b)]:.4g} | {mark} |")
    return "\n".join(lines)
