"""What LoRA extraction costs Bone Soup: hypervolume of the preference sweep at ranks 4, 8, 16 vs the exact merge.

    python benchmarks/bench_extract_lora.py            # the experiment's quick setting (out/experiment-quick)
    python benchmarks/bench_extract_lora.py --ranks 2 4 8 16 64 --json out/bench-extract.json

One run, on the embedded task: the experiment's trained full-FT Bone Soup
backbones (found under ``--experiment-out``, trained there if missing, as
``bonesoup experiment`` caches them) are each extracted at every rank
(:func:`bonesoup.merge.extract.extract_lora`, float64 SVD; the parameters a
LoRA cannot carry stay at the SFT's values: ``allow_dense_drift``). Then
Bone Soup's preference sweep (``points`` preferences, no extrapolation) is
decoded with

- the exact full-weight merge (``LiveSoup`` over the full backbones),
- the extracted adapters (``AdapterSoup`` on the SFT model, no re-merge),
- "full rank": every linear layer exact, only the dense drift lost, which
  separates the two costs,
- Rewarded Soup (the experts, full weights) for context,

with the experiment's held-out prompts, sampling seeds (``1000 + seed``) and
Evaluator, and ONE reference point for every row (the coordinate-wise
minimum over all evaluated points minus ``hv_margin``). Prints the per-layer
error summary, then the HV-vs-rank table; ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sweep(evaluate, set_preference, model, prefs, seeds) -> np.ndarray:
    """Mean rewards [seeds, points, n] of ``model`` at each preference (set by ``set_preference``)."""
    out = []
    for s in seeds:
        pts = []
        for mu in prefs:
            set_preference([float(x) for x in mu])
            pts.append(evaluate([model], [1.0], 1000 + s))
        out.append(pts)
    return np.asarray(out)


def main(argv=None) -> int:
    from bonesoup.eval.experiment import QUICK, ExperimentConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment-out", default=ExperimentConfig.out + "-quick",
                    help="the experiment's output and model cache (its quick setting unless --full-config)")
    ap.add_argument("--full-config", action="store_true", help="the experiment's default setting, not QUICK")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--threads", type=int, help="torch threads")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    import transformers

    from bonesoup.eval.experiment_eval import Evaluator
    from bonesoup.eval.experiment_methods import preference_grid
    from bonesoup.eval.experiment_models import TrainedModels
    from bonesoup.eval.metrics import hypervolume
    from bonesoup.lora import AdapterSoup
    from bonesoup.merge.extract import extract_lora
    from bonesoup.merge.live import LiveSoup
    from bonesoup.tasks.review import build_task_sft, task_prompts
    from bonesoup.train.ppo.checkpoint_training import load_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cfg = ExperimentConfig(**({} if args.full_config else QUICK), out=args.experiment_out)
    cfg.check()
    root = Path(cfg.out)
    t0 = time.perf_counter()
    sft = build_task_sft(root / "sft")
    models = TrainedModels(cfg, root, sft, cfg.seeds[0], progress=True)  # finds the cached ones
    backbones, experts = models.backbones(), models.experts()
    t_models = time.perf_counter() - t0

    # 1. Extraction at every rank ("full": the layers' smaller side, so only the dense drift is lost).
    full_rank = max(min(r["shape"]) for r in extract_lora(backbones[0], sft, 1, progress=False,
                                                          allow_dense_drift=True).report["layers"])
    ranks = sorted(set(args.ranks)) + [full_rank]
    t0 = time.perf_counter()
    extracted = {r: [extract_lora(b, sft, r, progress=False, allow_dense_drift=True) for b in backbones]
                 for r in ranks}
    t_extract = time.perf_counter() - t0

    # 2. The sweeps: same prompts, same sampling seeds, one Evaluator.
    _, tok = load_policy(sft)
    test = Evaluator(tok, task_prompts("test"), cfg.eval_samples_per_prompt, cfg)
    prefs = preference_grid(cfg.points)
    seeds = list(cfg.seeds)
    points = {}
    t0 = time.perf_counter()
    exact = LiveSoup(load_policy(sft)[0], backbones, beta=cfg.beta, sft=sft)
    points["exact"] = _sweep(test, exact.set_preference, exact.model, prefs, seeds)
    for r in ranks:
        soup = AdapterSoup(load_policy(sft)[0], [e.adapter for e in extracted[r]], beta=cfg.beta)
        points[r] = _sweep(test, soup.set_preference, soup.model, prefs, seeds)
    rewarded = LiveSoup(load_policy(sft)[0], experts, method="rewarded")
    points["rewarded"] = _sweep(test, rewarded.set_preference, rewarded.model, prefs, seeds)
    t_eval = time.perf_counter() - t0

    ref = np.min(np.concatenate([p.reshape(-1, p.shape[-1]) for p in points.values()]), axis=0) - cfg.hv_margin
    hv = {k: np.array([hypervolume(p[i], ref) for i in range(len(seeds))]) for k, p in points.items()}

    # 3. Tables: per-layer relative error (each backbone, each rank), then HV vs rank.
    layers = [row["module"] for row in extracted[ranks[0]][0].report["layers"]]
    head = [f"bb{j} r{r if r != full_rank else 'full'}" for r in ranks for j in range(len(backbones))]
    lines = ["Per-layer relative error ||D - D_r||_F / ||D||_F (float64 SVD, fp32 factors)", "",
             "| layer | shape | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for i, name in enumerate(layers):
        shape = extracted[ranks[0]][0].report["layers"][i]["shape"]
        errs = [extracted[r][j].report["layers"][i]["rel_error"] for r in ranks for j in range(len(backbones))]
        lines.append(f"| {name} | {shape[0]}x{shape[1]} | " + " | ".join(f"{e:.3f}" for e in errs) + " |")
    for label, field in (("overall, linear layers", "overall_rel_error"),
                         ("overall, all parameters (dense drift kept at SFT)", "overall_rel_error_all")):
        vals = [extracted[r][j].report[field] for r in ranks for j in range(len(backbones))]
        lines.append(f"| {label} | | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    drift = extracted[ranks[0]][0].report
    worst = sorted(drift["dense"], key=lambda d: -d["rel_change"])[:3]
    lines += ["", f"Dense parameters a LoRA cannot carry (backbone 0): {drift['dense_drifted']} of {len(drift['dense'])} "
              "drifted; largest relative change: " + ", ".join(f"{d['key']} {d['rel_change']:.3f}" for d in worst)]
    lines += ["", f"Hypervolume of Bone Soup's {cfg.points}-point sweep (beta {cfg.beta}), {len(seeds)} sampling "
              f"seeds, one reference point {np.round(ref, 4).tolist()}", "",
              "| backbones | rank | rel. error (linear) | rel. error (all params) | HV mean +- std | HV / exact |"
              " seeds below exact |", "|---|---|---|---|---|---|---|"]
    e_mean = hv["exact"].mean()

    def row(label, rank, err_lin, err_all, h):
        below = int(np.sum(h < hv["exact"]))
        return (f"| {label} | {rank} | {err_lin} | {err_all} | {h.mean():.4f} +- {h.std():.4f} | "
                f"{h.mean() / e_mean:.3f} | {below} / {len(seeds)} |")

    lines.append(row("full fine-tunes, exact merge", "-", "0", "0", hv["exact"]))
    for r in ranks:
        lin = np.mean([e.report["overall_rel_error"] for e in extracted[r]])
        alle = np.mean([e.report["overall_rel_error_all"] for e in extracted[r]])
        lines.append(row("extracted LoRA (AdapterSoup)", f"{r}" if r != full_rank else f"full ({r})",
                         f"{lin:.3f}", f"{alle:.3f}", hv[r]))
    lines.append(row("Rewarded Soup (experts, full weights)", "-", "-", "-", hv["rewarded"]))
    lines += ["", f"models {t_models:.1f} s (cached), extraction {t_extract:.2f} s for {len(ranks)} ranks x "
              f"{len(backbones)} backbones, evaluation {t_eval:.1f} s; torch threads {torch.get_num_threads()}"]
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "config": {"experiment_out": str(root), "ranks": ranks, "full_rank": full_rank, "seeds": seeds,
                       "points": cfg.points, "beta": cfg.beta},
            "reference_point": ref.tolist(),
            "hypervolume": {str(k): v.tolist() for k, v in hv.items()},
            "points": {str(k): v.tolist() for k, v in points.items()},
            "extraction": {str(r): [e.report for e in extracted[r]] for r in ranks},
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
