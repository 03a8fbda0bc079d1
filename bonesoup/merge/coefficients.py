"""Merge coefficients: Rewarded Soup, Bone Soup and extrapolation.

Every merge in this project is one weighted sum ``out = sum_k c_k x_k``; this
module turns a user preference ``mu`` (a point on the simplex, one weight per
objective) into the ``c_k``.

Bone Soup (seek, then soup) trains backbone j on the mixed reward
``h_j = sum_i B_ji r_i`` with the symmetric circulant matrix

    B = (beta - g) I + g 11^T,    g = (1 - beta) / (n - 1),    beta in (1/2, 1),

and merges with ``lambda = B^-1 mu``. ``lambda`` may have negative entries
(beta = 0.7, mu = (1, 0) gives (1.75, -0.75)); that is the method, never clip.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "PREFERENCE_TOLERANCE",
    "validate_preference",
    "validate_beta",
    "backbone_matrix",
    "bone_coefficients",
    "rewarded_soup_coefficients",
    "fold_extrapolation",
    "per_objective_extrapolation",
    "merge_coefficients",
]

#: |sum(mu) - 1| allowed before a preference is refused (we never renormalise).
PREFERENCE_TOLERANCE = 1e-6


def validate_beta(beta: float, name: str = "beta") -> float:
    """Return ``beta`` as a float, or raise ValueError unless 1/2 < beta < 1."""
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in (0.5, 1), got {beta!r}") from None
    if not math.isfinite(b) or not 0.5 < b < 1.0:
        raise ValueError(
            f"{name} must lie strictly between 0.5 and 1 (the backbone matrix is "
            f"singular at 0.5 and is the identity at 1), got {beta!r}"
        )
    return b


def validate_preference(mu: Sequence[float], n: int | None = None, name: str = "preference") -> np.ndarray:
    """Check a preference vector and return it as float64 ``[n]``.

    Refuses (ValueError naming ``name``) a preference that is empty, of the
    wrong length, non-finite, negative or does not sum to 1 within
    ``PREFERENCE_TOLERANCE``. It is never renormalised silently: a
    preference that does not sum to 1 is most often a bug upstream.
    """
    try:
        arr = np.asarray(mu, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers, got {mu!r}") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {arr.shape}")
    if n is not None and arr.size != n:
        raise ValueError(f"{name} must have {n} entries (one per objective), got {arr.size}: {arr.tolist()}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative, got {arr.tolist()}")
    total = float(arr.sum())
    if abs(total - 1.0) > PREFERENCE_TOLERANCE:
        raise ValueError(
            f"{name} must sum to 1 (within {PREFERENCE_TOLERANCE:g}), got sum {total!r} for "
            f"{arr.tolist()}; it is not renormalised for you"
        )
    return arr


def _validate_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an integer >= 2, got {n!r}")
    if n < 2:
        raise ValueError(f"n (the number of objectives) must be >= 2, got {n}")
    return int(n)


def backbone_matrix(n: int, beta: float) -> np.ndarray:
    """The Bone Soup backbone matrix ``B`` (float64 ``[n, n]``).

    ``B = (beta - g) I + g 11^T`` with ``g = (1 - beta) / (n - 1)``: row j holds
    the reward mixture that backbone j is trained on. Symmetric, circulant, rows
    sum to 1; for n = 2 it is ``[[beta, 1 - beta], [1 - beta, beta]]``.
    """
    n = _validate_n(n)
    beta = validate_beta(beta)
    g = (1.0 - beta) / (n - 1)
    return (beta - g) * np.eye(n) + g * np.ones((n, n))


def bone_coefficients(mu: Sequence[float], beta: float) -> np.ndarray:
    """Bone Soup merge coefficients ``lambda = B^-1 mu`` (float64 ``[n]``).

    Uses the closed form ``lambda = (mu - g sum(mu) 1) / (beta - g)``, which is
    B^-1 mu exactly for any mu (B's rows sum to 1, so sum(lambda) = sum(mu));
    with sum(mu) = 1 it is the paper's ``(mu - g 1) / (beta - g)``. Entries
    may be negative and are never clipped.

    >>> bone_coefficients([1.0, 0.0], beta=0.7).round(6).tolist()
    [1.75, -0.75]
    """
    return _bone(validate_preference(mu), validate_beta(beta))


def _bone(arr: np.ndarray, beta: float) -> np.ndarray:
    """B^-1 mu for a validated preference and beta."""
    n = _validate_n(arr.size)
    g = (1.0 - beta) / (n - 1)
    return (arr - g * arr.sum()) / (beta - g)


def rewarded_soup_coefficients(mu: Sequence[float]) -> np.ndarray:
    """Rewarded Soup merge coefficients: the preference itself (float64 ``[n]``)."""
    arr = validate_preference(mu)
    _validate_n(arr.size)
    return arr.copy()


def fold_extrapolation(lambdas: Sequence[float], alpha: float) -> tuple[np.ndarray, float]:
    """Fold extrapolation away from the SFT model into one linear combination.

    ``theta_hat = (1 + alpha) sum_j lambda_j theta_j - alpha theta_sft``, so the
    backbone coefficients are ``(1 + alpha) lambda`` and the SFT coefficient is
    ``-alpha``; the coefficients still sum to ``sum(lambda)``.

    Returns ``(backbone_coefficients [n] float64, sft_coefficient float)``.
    """
    lam = np.asarray(lambdas, dtype=np.float64)
    if lam.ndim != 1 or lam.size == 0 or not np.all(np.isfinite(lam)):
        raise ValueError(f"lambdas must be a non-empty 1-D sequence of finite numbers, got {lambdas!r}")
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise TypeError(f"alpha must be a number, got {alpha!r}") from None
    if not math.isfinite(a):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    return (1.0 + a) * lam, -a


def per_objective_extrapolation(
    preference: Sequence[float],
    k: Sequence[float],
    *,
    method: str = "bone",
    beta: float | None = None,
) -> tuple[np.ndarray, float]:
    """Merge coefficients with one extrapolation factor per objective, folded into one merge.

    The Bone Soup reference code extrapolates each objective's merge away
    from the SFT model by its own factor ``k_i = 1 / (1 - a_i)`` (``a_i``
    picked on a validation slice to maximise reward i) and mixes the results
    with the preference. With ``lambda^(i) = B^-1 e_i`` the merge for
    objective i alone, that is::

        theta = sum_i mu_i (k_i sum_j lambda^(i)_j theta_j + (1 - k_i) theta_sft)

    so the backbone coefficients are ``c_j = sum_i mu_i k_i (B^-1 e_i)_j`` and
    the SFT coefficient is ``c_sft = sum_i mu_i (1 - k_i)``: still ONE
    weighted sum over n + 1 inputs. ``method="rewarded"`` uses B = I (the
    experts, ``c_j = mu_j k_j``). One factor for every objective,
    ``k_i = 1 + alpha``, gives :func:`fold_extrapolation`'s coefficients.

    Parameters
    ----------
    preference : [n] on the simplex
    k : [n] finite factors, each > 0 (1 = no extrapolation; > 1 away from the SFT model)
    method : str, a name registered in :mod:`bonesoup.merge.methods` (``"bone"``, ``"rewarded"``, ...)
    beta : float, required where the method reads it (``"bone"``)

    Returns ``(backbone coefficients [n] float64, SFT coefficient float)``.
    """
    mu = validate_preference(preference)
    n = _validate_n(mu.size)
    kk = np.asarray(k, dtype=np.float64)
    if kk.shape != (n,) or not np.all(np.isfinite(kk)) or np.any(kk <= 0):
        raise ValueError(f"k must hold {n} finite factors > 0 (one per objective), got {k!r}")
    lam = mixing_matrix(method, n, beta)  # column i = objective i's backbone weights (B^-1 e_i for bone)
    c = lam @ (mu * kk)
    return c, float(np.sum(mu * (1.0 - kk)))


def mixing_matrix(method: str, n: int, beta: float | None = None) -> np.ndarray:
    """The registered ``method``'s mixing matrix L [n, n] float64 (lambda = L mu), ``beta`` checked where it is read."""
    from bonesoup.merge.methods import get_merge_method

    m = get_merge_method(method)
    if m.needs_beta:
        if beta is None:
            raise ValueError(f"beta is required for method={method!r}")
        beta = validate_beta(beta)
    return m.mixing(n, beta)


def merge_coefficients(
    preference: Sequence[float],
    *,
    method: str = "bone",
    beta: float | None = None,
    alpha: float = 0.0,
    n: int | None = None,
) -> tuple[np.ndarray, float]:
    """Preference -> the coefficients of one merge, validating everything once.

    ``method`` names a registered merge method (:mod:`bonesoup.merge.methods`):
    ``"bone"``: lambda = B^-1 mu (``beta`` required); ``"rewarded"``:
    lambda = mu. Extrapolation is folded in, so this returns
    ``(backbone coefficients [n] float64, SFT coefficient)``; the SFT
    coefficient is ``-alpha`` (0 without extrapolation). ``n``, if given, is
    the number of backbones the preference must match.
    """
    mu = validate_preference(preference, n)
    lam = mixing_matrix(method, _validate_n(mu.size), beta) @ mu
    return fold_extrapolation(lam, alpha)
