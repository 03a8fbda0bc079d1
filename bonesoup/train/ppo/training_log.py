"""The training log: one JSON line of statistics per PPO step, and a plot of it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

__all__ = ["TrainingLog", "read_training_log", "plot_training_log"]


class TrainingLog:
    """Append-only JSONL file, flushed after every step (a crash keeps the steps so far)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: list[dict] = []
        self._f = open(self.path, "w")

    def append(self, record: dict) -> None:
        self.records.append(record)
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def plot(self, path: str | os.PathLike, objective_names: Sequence[str] | None = None) -> Path:
        return plot_training_log(self.records, path, objective_names)


def read_training_log(path: str | os.PathLike) -> list[dict]:
    """The records of a ``train_log.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_training_log(records: Sequence[dict], path: str | os.PathLike,
                      objective_names: Sequence[str] | None = None) -> Path:
    """Six panels against the step: rewards per objective and the combined score, KL (and its
    coefficient), entropy, value loss, policy loss and clip fraction, response length. PNG, Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    steps = [r["step"] for r in records]

    def series(key):
        return [r.get(key, math.nan) for r in records]

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), constrained_layout=True)
    ax = axes[0, 0]
    ax.plot(steps, series("score"), label="combined score", color="black")
    names = objective_names or sorted(k[len("reward/"):] for k in (records[0] if records else {}) if
                                      k.startswith("reward/"))
    for name in names:
        ax.plot(steps, series(f"reward/{name}"), label=name)
    ax.set_title("rewards (raw) and score")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.plot(steps, series("kl"), label="KL(pi || ref), nats/sequence")
    ax2 = ax.twinx()
    ax2.plot(steps, series("kl_coef"), color="grey", linestyle="--", label="kl coef")
    ax.set_title("KL to the reference (dashed: coefficient)")
    axes[0, 2].plot(steps, series("entropy"))
    axes[0, 2].set_title("entropy (nats/token)")
    axes[1, 0].plot(steps, series("value_loss"))
    axes[1, 0].set_title("value loss")
    axes[1, 1].plot(steps, series("policy_loss"), label="policy loss")
    axes[1, 1].plot(steps, series("clipfrac"), label="clip fraction")
    axes[1, 1].legend(fontsize=8)
    axes[1, 1].set_title("policy loss, clip fraction")
    axes[1, 2].plot(steps, series("response_length"), label="tokens")
    axes[1, 2].plot(steps, series("eos_fraction"), label="EOS fraction")
    axes[1, 2].legend(fontsize=8)
    axes[1, 2].set_title("response length")
    for a in axes.flat:
        a.set_xlabel("step")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
