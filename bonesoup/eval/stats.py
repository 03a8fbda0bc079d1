"""Honest statistics for a comparison over a few seeds: sample std, bootstrap intervals, paired tests.

numpy only (no scipy), float64, seeded: the same input and seed give the same interval.

- :func:`sample_std`: the Bessel-corrected (ddof 1) standard deviation;
- :func:`bootstrap_ci`: the percentile bootstrap interval of a statistic;
- :func:`sign_flip_test`: the paired permutation test of a mean difference
  (exact over all 2^n sign patterns for n <= ``max_exact``, else seeded Monte Carlo);
- :func:`wilcoxon_signed_rank`: the exact Wilcoxon signed-rank test (any n; ties by mid-ranks);
- :func:`describe` and :func:`paired_comparison`: what a results table needs.

A p-value here is two-sided and tests "the paired differences are
symmetric around 0" (no difference between the two methods).
"""

from __future__ import annotations

import math

import numpy as np

from bonesoup.eval.metrics import _ranks

__all__ = ["sample_std", "bootstrap_ci", "sign_flip_test", "wilcoxon_signed_rank", "describe", "paired_comparison"]

#: Default bootstrap / Monte Carlo resamples.
RESAMPLES = 10_000


def _sample(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} must hold at least one value")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite, got {a.tolist()}")
    return a


def _check(confidence: float, resamples: int) -> None:
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    if not (isinstance(confidence, (int, float)) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def sample_std(x) -> float:
    """Sample standard deviation (ddof 1) of ``x`` (any shape, flattened); NaN for a single value.

    Parameters
    ----------
    x : array_like of float, n >= 1 values
    """
    a = _sample(x, "x")
    return float(np.std(a, ddof=1)) if a.size > 1 else math.nan


def bootstrap_ci(x, *, statistic=np.mean, confidence: float = 0.95, resamples: int = RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(x)``.

    ``resamples`` samples of size n are drawn from ``x`` with replacement
    (``numpy.random.default_rng(seed)``); the interval is the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the
    statistic over them. With n = 1 there is nothing to resample: (NaN, NaN).

    Parameters
    ----------
    x : array_like of float, shape (n,)
    statistic : callable mapping an (resamples, n) array to (resamples,) along ``axis=1``
        (``np.mean``, ``np.median``, ...).

    Examples
    --------
    >>> lo, hi = bootstrap_ci([0.31, 0.29, 0.35], resamples=2000, seed=1)
    """
    a = _sample(x, "x")
    _check(confidence, resamples)
    if a.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(resamples, a.size))
    stats = np.asarray(statistic(a[idx], axis=1), dtype=np.float64)
    lo, hi = np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def sign_flip_test(differences, *, resamples: int = RESAMPLES, seed: int = 0, max_exact: int = 20) -> dict:
    """Paired permutation test of ``mean(d) = 0``: flip the sign of each difference at random.

    Under the null hypothesis each difference is as likely positive as
    negative; the p-value is the share of sign patterns whose ``|mean|``
    reaches the observed one. For n <= ``max_exact`` every one of the 2^n
    patterns is counted (exact; the smallest p-value is 2 / 2^n, e.g. 0.25
    for 3 seeds); above, ``resamples`` random patterns (seeded) with
    ``p = (1 + hits) / (1 + resamples)``, which never understates p.

    Returns ``{"p_value", "exact", "n", "mean"}``.
    """
    d = _sample(differences, "differences")
    _check(0.5, resamples)
    n, observed = d.size, abs(float(np.mean(d)))
    tol = 1e-12 * max(observed, np.max(np.abs(d)))  # the observed pattern (and exact ties) must count as hits
    if n <= max_exact:
        hits = 0
        codes = np.arange(2**n, dtype=np.int64)
        for start in range(0, 2**n, 1 << 16):
            c = codes[start:start + (1 << 16)]
            signs = 1.0 - 2.0 * ((c[:, None] >> np.arange(n)) & 1)
            hits += int(np.sum(np.abs(signs @ d) / n >= observed - tol))
        return {"p_value": hits / 2**n, "exact": True, "n": n, "mean": float(np.mean(d))}
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(resamples, n))
    hits = int(np.sum(np.abs(signs @ d) / n >= observed - tol))
    return {"p_value": (1 + hits) / (1 + resamples), "exact": False, "n": n, "mean": float(np.mean(d))}


def wilcoxon_signed_rank(differences) -> dict:
    """Exact two-sided Wilcoxon signed-rank test of paired differences (any n, no normal approximation).

    Zero differences are dropped (Wilcoxon's convention); tied ``|d|`` get
    their mid-rank. The null distribution of ``W+`` (the rank sum of the
    positive differences) is computed exactly, given those ranks, by
    counting all 2^n sign patterns with a dynamic programme over doubled
    (integer) ranks. ``p = min(1, 2 min(P(W+ <= w), P(W+ >= w)))``.

    Returns ``{"p_value", "statistic" (W+), "n" (non-zero differences)}``; p = 1 when every difference is 0.
    """
    d = _sample(differences, "differences")
    d = d[d != 0]
    n = d.size
    if n == 0:
        return {"p_value": 1.0, "statistic": 0.0, "n": 0}
    r2 = np.rint(2 * _ranks(np.abs(d))).astype(np.int64)  # mid-ranks are multiples of 1/2
    w2 = int(r2[d > 0].sum())
    prob = np.zeros(int(r2.sum()) + 1)
    prob[0] = 1.0
    for r in r2:  # each rank joins W+ or not with probability 1/2
        shifted = np.zeros_like(prob)
        shifted[r:] = prob[:prob.size - r]
        prob = 0.5 * (prob + shifted)
    lower, upper = float(prob[:w2 + 1].sum()), float(prob[w2:].sum())
    return {"p_value": min(1.0, 2.0 * min(lower, upper)), "statistic": w2 / 2, "n": int(n)}


def describe(x, *, confidence: float = 0.95, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """``{"n", "mean", "std" (ddof 1), "ci": [lo, hi]}`` of ``x`` (percentile bootstrap of the mean)."""
    a = _sample(x, "x")
    return {"n": int(a.size), "mean": float(np.mean(a)), "std": sample_std(a),
            "ci": list(bootstrap_ci(a, confidence=confidence, resamples=resamples, seed=seed))}


def paired_comparison(a, b, *, confidence: float = 0.95, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Method A against method B on paired measurements (same seeds, same preferences, same prompts).

    Parameters
    ----------
    a, b : array_like of float, the same shape (e.g. (seeds,) or (seeds, preferences)), flattened into pairs.

    Returns
    -------
    dict
        ``n`` pairs, ``mean_difference`` (mean of a - b), ``std`` (ddof 1),
        ``ci`` (percentile bootstrap of the mean difference over pairs),
        ``wins`` (pairs with a > b), ``p_sign_flip`` and ``p_exact`` (:func:`sign_flip_test`),
        ``p_wilcoxon`` (:func:`wilcoxon_signed_rank`).

    The pairs are treated as exchangeable units; pairs that share a seed
    are correlated, so over seeds x preferences the interval is narrower
    than a seed-level one would be (state it where it is reported).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape (paired), got {a.shape} and {b.shape}")
    d = _sample(a - b, "a - b")
    flip = sign_flip_test(d, resamples=resamples, seed=seed)
    return {"n": int(d.size), "mean_difference": float(np.mean(d)), "std": sample_std(d),
            "ci": list(bootstrap_ci(d, confidence=confidence, resamples=resamples, seed=seed)),
            "wins": int(np.sum(d > 0)), "p_sign_flip": flip["p_value"], "p_exact": flip["exact"],
            "p_wilcoxon": wilcoxon_signed_rank(d)["p_value"]}
