"""Multi-objective metrics of a preference sweep: hypervolume, Pareto front, controllability, LMC.

Conventions
-----------
- Every objective is MAXIMISED (higher reward is better).
- A set of points is a ``[N, d]`` array: one row per evaluated model /
  preference point, one column per objective.
- Everything is computed in float64 with numpy only (no torch import), and
  exactly: no sampling, no approximation. With integer inputs below 2**53 the
  hypervolume is exact to the last bit.
- Bad input raises ``ValueError`` whose message starts with the name of the
  offending argument (``points``, ``ref``, ``preferences``, ...).

Contents
--------
- :func:`pareto_mask`, :func:`pareto_front`, :func:`hypervolume`,
  :func:`reference_point`: defined in :mod:`bonesoup.eval.pareto`, importable
  from here.
- :func:`spearman`, :func:`controllability`: rank correlation of the
  preference weight mu_i with the achieved reward r_i, per objective.
- :func:`lmc_barrier`, :func:`merge_gap`: linear mode connectivity from losses
  the caller measured along an interpolation path.
- :func:`sweep_summary`: all of the above that one method's sweep needs.
"""

from __future__ import annotations

import numpy as np

from bonesoup.eval.pareto import _float_array, _points, _vector, hypervolume, pareto_front, pareto_mask, reference_point

__all__ = [
    "pareto_mask",
    "pareto_front",
    "hypervolume",
    "reference_point",
    "spearman",
    "controllability",
    "lmc_barrier",
    "merge_gap",
    "sweep_summary",
]


# ----------------------------------------------------------------------------- controllability


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, tied values get the average of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based position of each distinct value's first occurrence
    avg = first + (counts + 1) / 2.0
    return avg[inverse.reshape(-1)].astype(np.float64)


def spearman(x, y) -> float:
    """Spearman's rank correlation of two paired samples.

    Parameters
    ----------
    x, y : array_like, shape [K]
        Paired finite values, K >= 2.

    Returns
    -------
    float
        The Pearson correlation of the ranks of ``x`` and of ``y`` (1-based,
        tied values get the average of the ranks they span), in [-1, 1].
        NaN when ``x`` or ``y`` is constant (the correlation is undefined).

    Raises
    ------
    ValueError
        ``x`` or ``y`` not 1-D, shorter than 2, or holding NaN/inf; lengths
        that differ.
    """
    a = _vector(x, "x", min_len=2)
    b = _vector(y, "y", min_len=2)
    if a.size != b.size:
        raise ValueError(f"x and y must have the same length, got {a.size} and {b.size}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
    if den == 0:
        return float("nan")
    return float(np.clip(np.sum(ra * rb) / den, -1.0, 1.0))


def controllability(preferences, rewards) -> dict:
    """How well the achieved rewards follow the preference over a sweep.

    Definition: for each objective i,
    ``rho_i = spearman(preferences[:, i], rewards[:, i])`` over the K
    preference points -- Spearman's rank correlation (average ranks for ties)
    between the weight mu_i put on objective i and the reward r_i achieved.
    +1: raising mu_i never lowers r_i's rank; -1: it always does. If either
    column is constant, rho_i is undefined: NaN. ``mean`` is the mean of the
    defined rho_i, NaN if none is defined.

    Parameters
    ----------
    preferences : array_like, shape [K, n]
        K >= 2 preference points, each row on the simplex (entries >= 0
        summing to 1, checked to 1e-6).
    rewards : array_like, shape [K, n]
        The achieved mean reward of each objective at each preference point
        (maximised). Finite.

    Returns
    -------
    dict
        ``{"per_objective": [n floats], "mean": float}``.

    Raises
    ------
    ValueError
        Either array not 2-D or holding NaN/inf; shapes that differ; K < 2; a
        row of ``preferences`` off the simplex.
    """
    mu = _points(preferences, "preferences")
    r = _points(rewards, "rewards")
    if mu.shape != r.shape:
        raise ValueError(f"preferences {mu.shape} and rewards {r.shape} must have the same shape [K, n]")
    if len(mu) < 2:
        raise ValueError(f"preferences: controllability needs at least 2 preference points, got {len(mu)}")
    off = np.nonzero(np.any(mu < -1e-6, axis=1) | (np.abs(mu.sum(axis=1) - 1.0) > 1e-6))[0]
    if off.size:
        raise ValueError(f"preferences rows must lie on the simplex (>= 0, sum 1); rows {off[:5].tolist()} do not")
    per = [spearman(mu[:, i], r[:, i]) for i in range(mu.shape[1])]
    defined = [v for v in per if not np.isnan(v)]
    return {"per_objective": per, "mean": float(np.mean(defined)) if defined else float("nan")}


# ----------------------------------------------------------------------------- linear mode connectivity


def lmc_barrier(ts, losses) -> dict:
    """Loss barrier along a linear interpolation path between two models.

    Parameters
    ----------
    ts : array_like, shape [K]
        Interpolation coefficients, K >= 2, strictly increasing from exactly
        0 to exactly 1 (``t`` weights the second model: ``(1 - t) theta_a +
        t theta_b``).
    losses : array_like, shape [K]
        The loss (lower is better) the caller measured at each ``t``. Finite.

    Returns
    -------
    dict
        ``barrier`` (float): ``max_t (loss(t) - ((1 - t) loss(0) + t loss(1)))``,
        always >= 0 since the ends give 0; 0 means the path never rises above
        the straight line between the end losses (linearly mode connected).
        ``argmax_t`` (float): the first ``t`` where that maximum is reached
        (0.0 when the barrier is 0). ``linear`` (list of K floats): the line
        ``(1 - t) loss(0) + t loss(1)`` at each ``t``.

    Raises
    ------
    ValueError
        ``ts`` or ``losses`` not 1-D, shorter than 2, or holding NaN/inf;
        lengths that differ; ``ts`` not strictly increasing from 0 to 1.
    """
    t = _vector(ts, "ts", min_len=2)
    loss = _vector(losses, "losses", min_len=2)
    if loss.size != t.size:
        raise ValueError(f"ts and losses must have the same length, got {t.size} and {loss.size}")
    if t[0] != 0.0 or t[-1] != 1.0 or np.any(np.diff(t) <= 0):
        raise ValueError(f"ts must increase strictly from 0 to 1, got {t.tolist()}")
    line = (1.0 - t) * loss[0] + t * loss[-1]
    excess = loss - line
    k = int(np.argmax(excess))
    return {"barrier": float(excess[k]), "argmax_t": float(t[k]), "linear": line.tolist()}


def merge_gap(merged_losses, ensembled_losses) -> dict:
    """Ensembling-vs-merging gap along an interpolation path.

    Parameters
    ----------
    merged_losses : array_like, shape [K]
        Loss of the weight-space merge ``sum_j c_j theta_j`` at K coefficient
        settings. Finite, K >= 1.
    ensembled_losses : array_like, shape [K]
        Loss of the output-space ensemble (the same coefficients applied to
        the models' outputs) at the same K settings. Finite.

    Returns
    -------
    dict
        ``gap`` (list of K floats): ``merged - ensembled`` per point (> 0:
        merging loses something the ensemble keeps); ``max`` and ``mean``
        (floats) of ``gap``.

    Raises
    ------
    ValueError
        Either not 1-D, empty, or holding NaN/inf; lengths that differ.
    """
    m = _vector(merged_losses, "merged_losses")
    e = _vector(ensembled_losses, "ensembled_losses")
    if m.size != e.size:
        raise ValueError(f"merged_losses and ensembled_losses must have the same length, got {m.size} and {e.size}")
    g = m - e
    return {"gap": g.tolist(), "max": float(g.max()), "mean": float(g.mean())}


# ----------------------------------------------------------------------------- one method's sweep


def sweep_summary(preferences, rewards, ref) -> dict:
    """Everything one method's preference sweep is scored on, in one call.

    Parameters
    ----------
    preferences : array_like, shape [K, n]
        The K preference points of the sweep, rows on the simplex.
    rewards : array_like, shape [K, n]
        The achieved mean reward per objective at each point (maximised).
    ref : array_like, shape [n]
        The reference point -- the SAME for every method compared (see
        :func:`reference_point`).

    Returns
    -------
    dict
        ``hypervolume`` (float, :func:`hypervolume` of ``rewards`` at
        ``ref``), ``pareto_front`` (list of int, :func:`pareto_front` of
        ``rewards``), ``controllability`` (dict, :func:`controllability`).

    Raises
    ------
    ValueError
        As :func:`hypervolume` and :func:`controllability`.
    """
    ref_arr = _float_array(ref, "ref")
    r = _points(rewards, "rewards", d=ref_arr.size if ref_arr.ndim == 1 and ref_arr.size else None)
    return {"hypervolume": hypervolume(r, ref_arr), "pareto_front": pareto_front(r).tolist(),
            "controllability": controllability(preferences, r)}
