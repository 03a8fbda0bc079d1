"""Pareto fronts and the exact hypervolume of a set of reward points (every objective maximised).

A set of points is a ``[N, d]`` float64 array, one row per evaluated model /
preference point. Everything is numpy, float64 and exact: no sampling, no
approximation; with integer inputs below 2**53 the hypervolume is exact to the
last bit. Bad input raises ``ValueError`` whose message starts with the name of
the offending argument. The input checks here are shared with
:mod:`bonesoup.eval.metrics`.

- :func:`pareto_mask`, :func:`pareto_front`: the non-dominated points.
- :func:`hypervolume`: the volume of the union of the boxes ``[ref, p]``, for
  every d (d = 2: sort-and-sweep; d = 3: a sweep along the last objective
  keeping a sorted 2-D staircase; d >= 4: slicing down to d = 3).
- :func:`reference_point`: ONE reference point for every method being
  compared (hypervolumes at different reference points do not compare).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

import numpy as np

__all__ = ["pareto_mask", "pareto_front", "hypervolume", "reference_point"]


# ----------------------------------------------------------------------------- input checks


def _float_array(x, name: str) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be an array of real numbers: {e}") from None
    return a


def _check_finite(a: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[:5].tolist()
        raise ValueError(f"{name} holds NaN or infinite values (first indices {bad})")


def _points(points, name: str = "points", d: int | None = None) -> np.ndarray:
    """``points`` as a finite float64 ``[N, d]`` array; an empty sequence is ``[0, d]``."""
    p = _float_array(points, name)
    if p.ndim == 1 and p.size == 0 and d is not None:
        p = p.reshape(0, d)
    if p.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, d], got shape {p.shape}")
    if p.shape[1] < 1:
        raise ValueError(f"{name} needs at least one objective (column), got shape {p.shape}")
    if d is not None and p.shape[1] != d:
        raise ValueError(f"{name} has {p.shape[1]} objectives, the reference point ref has {d}")
    _check_finite(p, name)
    return p


def _vector(x, name: str, min_len: int = 1) -> np.ndarray:
    v = _float_array(x, name)
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {v.shape}")
    if v.size < min_len:
        raise ValueError(f"{name} needs at least {min_len} values, got {v.size}")
    _check_finite(v, name)
    return v


# ----------------------------------------------------------------------------- Pareto front


def pareto_mask(points) -> np.ndarray:
    """Which points are non-dominated (maximisation).

    Parameters
    ----------
    points : array_like, shape [N, d]
        N points, d objectives, all maximised. Finite. ``N = 0`` is allowed.

    Returns
    -------
    numpy.ndarray, shape [N], bool
        True where the point is on the Pareto front.

    Notes
    -----
    q dominates p when ``q >= p`` in every objective and ``q > p`` in at least
    one. A point is on the front when no other point dominates it. Of several
    EXACT duplicates of a front point only the first (smallest index) is kept,
    so the front never lists the same point twice.

    Algorithm: visit the points in descending lexicographic order (ties by
    index); a point can only be dominated by, or duplicate, one visited
    before it, so each point is compared with the front found so far:
    O(N log N + N F d) time for a front of F points, O(N d) memory.

    Raises
    ------
    ValueError
        ``points`` not 2-D, without columns, or holding NaN/inf.
    """
    p = _points(points)
    n, d = p.shape
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    # np.lexsort: the LAST key is the primary one -> objective 0 desc, ..., objective d-1 desc, index asc.
    order = np.lexsort([np.arange(n)] + [-p[:, j] for j in range(d - 1, -1, -1)])
    front = np.empty((n, d), dtype=np.float64)
    f = 0
    for i in order:
        x = p[i]
        if f and np.any(np.all(front[:f] >= x, axis=1)):
            continue  # dominated, or an exact duplicate of an earlier front point
        front[f] = x
        f += 1
        mask[i] = True
    return mask


def pareto_front(points) -> np.ndarray:
    """Indices of the non-dominated points (maximisation).

    Parameters
    ----------
    points : array_like, shape [N, d]
        N points, d objectives, all maximised. Finite.

    Returns
    -------
    numpy.ndarray, shape [F], int64
        Indices into ``points`` of the Pareto front, sorted ascending. Exact
        duplicates appear once (the first index); see :func:`pareto_mask`.

    Raises
    ------
    ValueError
        ``points`` not 2-D, without columns, or holding NaN/inf.
    """
    return np.nonzero(pareto_mask(points))[0].astype(np.int64)


# ----------------------------------------------------------------------------- hypervolume


def _hv2(p: np.ndarray, ref: np.ndarray) -> float:
    """d = 2, every point strictly above ``ref``: sort by x descending, keep the running best y.

    Sum over the points of (x_k - x_{k+1}) * (max_{j <= k} y_j - ref_y): O(N log N).
    """
    if len(p) == 0:
        return 0.0
    order = np.argsort(-p[:, 0], kind="stable")
    x, y = p[order, 0], np.maximum.accumulate(p[order, 1])
    widths = x - np.append(x[1:], ref[0])
    return float(np.sum(widths * (y - ref[1])))


def _hv3(p: np.ndarray, ref: np.ndarray) -> float:
    """d = 3, every point strictly above ``ref``: sweep down the last objective.

    The points are taken by z descending; the union's cross-section at height z
    is the 2-D dominated area of the (x, y) of the points with z_k >= z. That
    area is kept up to date incrementally on a staircase (x ascending, y
    strictly descending): a new point either is weakly dominated (no change)
    or adds the region between its box and the staircase -- a sum of
    non-negative rectangles over the steps it removes -- and replaces them.
    O(N log N) comparisons (each point enters and leaves the staircase once).
    """
    n = len(p)
    if n == 0:
        return 0.0
    rx, ry, rz = float(ref[0]), float(ref[1]), float(ref[2])
    order = np.argsort(-p[:, 2], kind="stable")
    xs_all, ys_all, zs = p[order, 0].tolist(), p[order, 1].tolist(), p[order, 2].tolist()
    xs: list[float] = []  # staircase, x ascending
    ys: list[float] = []  # y strictly descending along it
    area = 0.0
    volume = 0.0
    for k in range(n):
        qx, qy = xs_all[k], ys_all[k]
        j = bisect_left(xs, qx)  # first step with x >= qx: the highest y among those with x >= qx
        if not (j < len(xs) and ys[j] >= qy):  # not weakly dominated
            r = bisect_right(xs, qx, lo=j)  # steps [0, r) have x <= qx
            s = r
            while s > 0 and ys[s - 1] <= qy:  # steps [s, r) lie inside q's box: removed
                s -= 1
            left = xs[s - 1] if s > 0 else rx
            add = 0.0
            for t in range(s, r):
                add += (xs[t] - left) * (qy - ys[t])
                left = xs[t]
            h_right = ys[r] if r < len(xs) else ry
            add += (qx - left) * (qy - h_right)
            area += add
            xs[s:r] = [qx]
            ys[s:r] = [qy]
        z_next = zs[k + 1] if k + 1 < n else rz
        if zs[k] > z_next:
            volume += area * (zs[k] - z_next)
    return volume


def _hv_slice(p: np.ndarray, ref: np.ndarray, base: int = 3) -> float:
    """Any d, every point strictly above ``ref``: slice along the last objective.

    Between consecutive distinct levels z_k > z_{k+1} of the last objective
    the cross-section is the (d-1)-D hypervolume of the points with last
    objective >= z_k. Recurses until d <= ``base`` (3: the sweep of
    :func:`_hv3`; 2 or 1 give slower, independent paths used in the tests).
    O(N^(d-base) * cost(base)).
    """
    n, d = p.shape
    if n == 0:
        return 0.0
    if d == 1:
        return float(p[:, 0].max() - ref[0])
    if d <= base:
        return _hv2(p, ref) if d == 2 else _hv3(p, ref)
    order = np.argsort(-p[:, -1], kind="stable")
    p = p[order]
    z = p[:, -1]
    total = 0.0
    for k in range(n):
        z_next = z[k + 1] if k + 1 < n else ref[-1]
        if z[k] > z_next:
            total += (z[k] - z_next) * _hv_slice(p[: k + 1, :-1], ref[:-1], base)
    return float(total)


def hypervolume(points, ref) -> float:
    """Exact dominated hypervolume (maximisation).

    The d-dimensional volume of the union over the points p of the boxes
    ``[ref, p]`` (the region that at least one point dominates and that
    dominates ``ref``).

    Parameters
    ----------
    points : array_like, shape [N, d]
        N points, d >= 1 objectives, all maximised. Finite. ``N = 0`` (or an
        empty sequence) gives 0.0.
    ref : array_like, shape [d]
        The reference point, finite. There is no default on purpose: compare
        methods only at ONE reference point, e.g. from :func:`reference_point`
        over every method's points.

    Returns
    -------
    float
        The hypervolume, >= 0.

    Notes
    -----
    Points that are not STRICTLY greater than ``ref`` in every objective are
    clipped away: they contribute nothing (their box is empty or flat). So
    ``ref`` need not be dominated by every point; the ones that fail simply
    do not count. Dominated and duplicate points change nothing.

    Algorithms (N points after clipping): d = 1: max - ref, O(N); d = 2: sort
    by the first objective and sweep, O(N log N); d = 3: sweep down the third
    objective keeping the 2-D staircase of the points above, O(N log N)
    comparisons; d >= 4: the points are first reduced to their Pareto front,
    then sliced along the last objective, each slice a (d-1)-D problem, down
    to the d = 3 sweep: O(N^(d-2) log N) -- d = 4 with a few hundred points
    takes well under a second.

    Raises
    ------
    ValueError
        ``ref`` not 1-D / empty / non-finite; ``points`` not 2-D, holding
        NaN/inf, or with a number of objectives different from ``len(ref)``.
    """
    r = _float_array(ref, "ref")
    if r.ndim != 1 or r.size < 1:
        raise ValueError(f"ref must be a 1-D reference point [d], got shape {r.shape}")
    _check_finite(r, "ref")
    p = _points(points, d=r.size)
    p = p[np.all(p > r, axis=1)]
    if len(p) == 0:
        return 0.0
    d = r.size
    if d == 1:
        return float(p[:, 0].max() - r[0])
    if d == 2:
        return _hv2(p, r)
    if d == 3:
        return _hv3(p, r)
    return _hv_slice(p[pareto_mask(p)], r, base=3)


def reference_point(*point_sets, margin: float = 0.0) -> np.ndarray:
    """ONE reference point for comparing several methods' hypervolumes.

    Intended use: call it once over the points of EVERY method (and seed)
    being compared and pass the same result to each :func:`hypervolume`
    call. Hypervolumes at different reference points do not compare.

    Parameters
    ----------
    *point_sets : array_like, each shape [N_k, d]
        One or more sets of points with the same d (maximised objectives).
        Empty sets are allowed as long as one set is not empty.
    margin : float, default 0.0
        Finite, >= 0, subtracted from every coordinate.

    Returns
    -------
    numpy.ndarray, shape [d], float64
        The coordinate-wise minimum over all points of all sets, minus
        ``margin``. With ``margin = 0`` the worst point in an objective sits
        ON the reference point there and adds no volume (see
        :func:`hypervolume`); a small positive margin lets every point count.

    Raises
    ------
    ValueError
        No sets; ``margin`` negative or not finite; a set not 2-D or holding
        NaN/inf (named ``point_sets[k]``); sets with different d; all empty.
    """
    if not point_sets:
        raise ValueError("point_sets: reference_point needs at least one set of points")
    try:
        m = float(margin)
    except (TypeError, ValueError):
        raise ValueError(f"margin must be a real number, got {margin!r}") from None
    if not np.isfinite(m) or m < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    sets = []
    for k, s in enumerate(point_sets):
        a = _float_array(s, f"point_sets[{k}]")
        if a.size == 0 and a.ndim == 1:
            continue  # an empty sequence: nothing to contribute, d unknown
        sets.append((k, _points(a, name=f"point_sets[{k}]")))
    if not sets:
        raise ValueError("point_sets: every set is empty")
    k0, first = sets[0]
    d = first.shape[1]
    for k, s in sets:
        if s.shape[1] != d:
            raise ValueError(f"point_sets[{k}] has {s.shape[1]} objectives, point_sets[{k0}] has {d}")
    allp = np.concatenate([s for _, s in sets])
    if len(allp) == 0:
        raise ValueError("point_sets: every set is empty")
    return allp.min(axis=0) - m
