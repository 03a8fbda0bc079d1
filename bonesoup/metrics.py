"""Multi-objective metrics of a preference sweep: hypervolume, Pareto front, controllability, LMC.

Conventions: every objective is MAXIMISED; points are ``[N, d]`` float arrays
(one row per evaluated model / preference point, one column per objective);
everything is computed exactly in float64 with numpy (no torch import).

- :func:`hypervolume`: the d-dimensional volume of the union of the boxes
  ``[ref, p]`` over the points p that beat ``ref`` in every objective --
  exact for any d (a sweep for d = 2, slicing along the last objective
  above). Compare methods only at ONE reference point:
  :func:`reference_point` builds it from all the methods' points together.
- :func:`controllability`: how well the achieved rewards follow the
  preference -- for each objective i, Spearman's rank correlation between
  mu_i and r_i over the sweep (1: raising mu_i never lowers r_i's rank).
- :func:`lmc_barrier`, :func:`merge_gap`: linear mode connectivity of two
  models from losses the caller measured along the interpolation path.
"""

from __future__ import annotations

import numpy as np

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


def _points(points, name: str = "points", d: int | None = None) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim == 1 and p.size == 0:
        p = p.reshape(0, d or 0)
    if p.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, d], got shape {p.shape}")
    if p.shape[1] < 1:
        raise ValueError(f"{name} needs at least one objective (column), got shape {p.shape}")
    if d is not None and p.shape[1] != d:
        raise ValueError(f"{name} has {p.shape[1]} objectives, the reference point {d}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} holds NaN or infinite values (rows {np.nonzero(~np.isfinite(p).all(1))[0].tolist()})")
    return p


def pareto_mask(points) -> np.ndarray:
    """``bool [N]``: True where no other point dominates (maximisation).

    q dominates p when ``q >= p`` in every objective and ``q > p`` in one.
    Of several identical non-dominated points only the first is kept.
    """
    p = _points(points)
    if len(p) == 0:
        return np.zeros(0, dtype=bool)
    ge = np.all(p[:, None, :] >= p[None, :, :], axis=2)  # ge[j, i]: p_j >= p_i everywhere
    gt = np.any(p[:, None, :] > p[None, :, :], axis=2)
    dominated = np.any(ge & gt, axis=0)
    eq = ge & ge.T
    earlier_twin = np.any(np.tril(eq, k=-1), axis=1)  # an identical point with a smaller index
    return ~dominated & ~earlier_twin


def pareto_front(points) -> np.ndarray:
    """Indices (ascending, int64) of the non-dominated points of ``points`` [N, d]; see :func:`pareto_mask`."""
    return np.nonzero(pareto_mask(points))[0].astype(np.int64)


def _hv2(p: np.ndarray, ref: np.ndarray) -> float:
    """2-D: sweep the points by the first objective, descending, tracking the best second."""
    order = np.argsort(-p[:, 0], kind="stable")
    x, y = p[order, 0], np.maximum.accumulate(p[order, 1])
    widths = x - np.append(x[1:], ref[0])
    return float(np.sum(widths * (y - ref[1])))


def _hv(p: np.ndarray, ref: np.ndarray) -> float:
    """Exact hypervolume of points that all beat ``ref`` strictly (already filtered)."""
    if len(p) == 0:
        return 0.0
    d = p.shape[1]
    if d == 1:
        return float(p[:, 0].max() - ref[0])
    if d == 2:
        return _hv2(p, ref)
    p = p[pareto_mask(p)]
    # Slice along the last objective: between consecutive distinct levels z_k > z_{k+1}, the cross-section
    # is the (d-1)-D hypervolume of the points with last objective >= z_k.
    order = np.argsort(-p[:, -1], kind="stable")
    p = p[order]
    z = p[:, -1]
    total = 0.0
    for k in range(len(p)):
        z_next = z[k + 1] if k + 1 < len(p) else ref[-1]
        if z[k] > z_next:
            total += (z[k] - z_next) * _hv(p[: k + 1, :-1], ref[:-1])
    return total


def hypervolume(points, ref) -> float:
    """Exact dominated hypervolume of ``points`` [N, d] with respect to ``ref`` [d] (maximisation).

    The volume of the union over points p of the boxes ``[ref, p]``. Points
    that do not beat ``ref`` strictly in EVERY objective contribute nothing
    (they are dropped; an empty set has volume 0). d = 1 and 2 are closed
    forms / an O(N log N) sweep; d >= 3 slices along the last objective
    (O(N^(d-1) log N) on the Pareto front), fine for hundreds of points at
    d = 3 or 4.

    Raises ValueError (naming the argument) for a non-2-D ``points``, a
    ``ref`` of the wrong length, or NaN/inf anywhere.
    """
    r = np.asarray(ref, dtype=np.float64)
    if r.ndim != 1 or r.size < 1:
        raise ValueError(f"ref must be a 1-D reference point [d], got shape {r.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError(f"ref must be finite, got {ref!r}")
    p = _points(points, d=r.size)
    p = p[np.all(p > r, axis=1)]
    return _hv(p, r)


def reference_point(*point_sets, margin: float = 0.0) -> np.ndarray:
    """ONE reference point for comparing several methods: the coordinate-wise minimum
    over every given set of points [N_k, d], minus ``margin`` (>= 0).

    Use it once over all methods (and seeds) and pass the same point to every
    :func:`hypervolume` call: hypervolumes at different reference points do
    not compare. With ``margin = 0`` the worst point in an objective adds no
    volume along it; a small positive margin lets every point count.
    """
    if not point_sets:
        raise ValueError("reference_point needs at least one set of points")
    if not np.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    sets = [_points(s, name=f"point_sets[{k}]") for k, s in enumerate(point_sets)]
    d = sets[0].shape[1]
    for k, s in enumerate(sets):
        if s.shape[1] != d:
            raise ValueError(f"point_sets[{k}] has {s.shape[1]} objectives, point_sets[0] {d}")
    allp = np.concatenate(sets)
    if len(allp) == 0:
        raise ValueError("reference_point: every set is empty")
    return allp.min(axis=0) - margin


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties averaged."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation of two 1-D sequences (ties get average ranks).

    NaN when either sequence is constant (the correlation is undefined).
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1 or a.size != b.size:
        raise ValueError(f"x and y must be 1-D of the same length, got shapes {a.shape} and {b.shape}")
    if a.size < 2:
        raise ValueError(f"spearman needs at least 2 pairs, got {a.size}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("x and y must be finite")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
    return float(np.sum(ra * rb) / den) if den > 0 else float("nan")


def controllability(preferences, rewards) -> dict:
    """How well achieved rewards follow the preference over a sweep.

    Definition: for objective i, ``rho_i = spearman(mu[:, i], r[:, i])`` over
    the K preference points -- 1 when raising the weight on objective i never
    lowers its reward's rank, -1 when it always does. Undefined (NaN) when
    either column is constant. ``mean`` averages the defined rho_i (NaN if
    none is).

    Parameters
    ----------
    preferences : [K, n], each row a preference (weights per objective)
    rewards : [K, n], the achieved mean reward of each objective at each point

    Returns ``{"per_objective": [n floats], "mean": float}``.
    """
    mu = _points(preferences, "preferences")
    r = _points(rewards, "rewards")
    if mu.shape != r.shape:
        raise ValueError(f"preferences {mu.shape} and rewards {r.shape} must have the same shape [K, n]")
    if len(mu) < 2:
        raise ValueError(f"controllability needs at least 2 preference points, got {len(mu)}")
    per = [spearman(mu[:, i], r[:, i]) for i in range(mu.shape[1])]
    defined = [x for x in per if not np.isnan(x)]
    return {"per_objective": per, "mean": float(np.mean(defined)) if defined else float("nan")}


def lmc_barrier(ts, losses) -> dict:
    """Loss barrier along a linear interpolation path between two models.

    ``ts`` [K]: interpolation coefficients, sorted, from 0 to 1; ``losses``
    [K]: the loss of the model ``(1 - t) theta_a + t theta_b`` at each.
    ``barrier = max_t (loss(t) - ((1 - t) loss(0) + t loss(1)))``: <= 0 means
    the path never rises above the straight line between the ends (linearly
    mode connected); ``argmax_t`` where the excess peaks; ``linear`` the line.
    """
    t = np.asarray(ts, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    if t.ndim != 1 or loss.shape != t.shape or t.size < 2:
        raise ValueError(f"ts and losses must be 1-D of the same length >= 2, got {t.shape} and {loss.shape}")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(loss))):
        raise ValueError("ts and losses must be finite")
    if t[0] != 0.0 or t[-1] != 1.0 or np.any(np.diff(t) <= 0):
        raise ValueError(f"ts must increase strictly from 0 to 1, got {t.tolist()}")
    line = (1 - t) * loss[0] + t * loss[-1]
    excess = loss - line
    k = int(np.argmax(excess))
    return {"barrier": float(excess[k]), "argmax_t": float(t[k]), "linear": line.tolist()}


def merge_gap(merged_losses, ensembled_losses) -> dict:
    """Ensembling-vs-merging gap: loss of the weight-space merge minus loss of the output-space
    ensemble at the same coefficients, point by point (> 0: merging loses something)."""
    m = np.asarray(merged_losses, dtype=np.float64)
    e = np.asarray(ensembled_losses, dtype=np.float64)
    if m.ndim != 1 or m.shape != e.shape or m.size == 0:
        raise ValueError(f"merged_losses and ensembled_losses must be 1-D of one length, got {m.shape}, {e.shape}")
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(e))):
        raise ValueError("merged_losses and ensembled_losses must be finite")
    g = m - e
    return {"gap": g.tolist(), "max": float(g.max()), "mean": float(g.mean())}


def sweep_summary(preferences, rewards, ref) -> dict:
    """One method's sweep: ``hypervolume`` at ``ref``, ``pareto_front`` indices, ``controllability``."""
    r = _points(rewards, "rewards")
    return {"hypervolume": hypervolume(r, ref), "pareto_front": pareto_front(r).tolist(),
            "controllability": controllability(preferences, r)}

