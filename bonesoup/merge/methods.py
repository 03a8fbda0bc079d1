"""The merge-method registry: the one place a preference becomes per-objective mixing weights.

A merge method maps a preference mu [n] (on the simplex) to the mixing matrix
L [n, n] whose column i is the backbone weights of objective i alone, so that
lambda = L mu (Bone Soup: L = B^-1; Rewarded Soup: L = I). Everything else --
single-alpha extrapolation, per-objective extrapolation, per-row coefficients
of adapter mixtures -- is built from lambda and L in :mod:`bonesoup.merge.coefficients`.

Adding a method: ``register_merge_method(MergeMethod("name", "one line", needs_beta, mixing))``;
the offline merge, LiveSoup, the CLI and the server then accept it by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["MergeMethod", "MERGE_METHODS", "register_merge_method", "get_merge_method", "merge_method_names"]


@dataclass(frozen=True)
class MergeMethod:
    """One way of turning a preference into backbone weights."""

    name: str
    """The name users pass (``--method``, ``method=``)."""
    description: str
    """One line for ``--help`` and ``GET /v1/models``."""
    needs_beta: bool
    """Whether :attr:`mixing` reads ``beta`` (refused as missing otherwise)."""
    mixing: Callable[[int, float | None], np.ndarray]
    """``(n, beta) -> L [n, n] float64``: lambda = L @ mu; column i is objective i's backbone weights."""


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(method: MergeMethod) -> MergeMethod:
    """Add ``method`` under its name (refusing a name already taken); returns it."""
    if method.name in MERGE_METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    MERGE_METHODS[method.name] = method
    return method


def get_merge_method(name: str) -> MergeMethod:
    """The registered method called ``name``; ValueError naming the known ones otherwise."""
    try:
        return MERGE_METHODS[name]
    except (KeyError, TypeError):
        known = ", ".join(repr(k) for k in MERGE_METHODS)
        raise ValueError(f"method must be one of {known}, got {name!r}") from None


def merge_method_names() -> list[str]:
    """Registered names, in registration order (argparse ``choices``)."""
    return list(MERGE_METHODS)


def _bone_mixing(n: int, beta: float | None) -> np.ndarray:
    # B^-1 in closed form: B = (beta - g) I + g 11^T has rows summing to 1, so
    # B^-1 = (I - g 11^T) / (beta - g) exactly (no matrix inverse, no rounding from one).
    g = (1.0 - beta) / (n - 1)
    return (np.eye(n) - g * np.ones((n, n))) / (beta - g)


register_merge_method(MergeMethod(
    "bone", "Bone Soup: backbones trained on h = B r, merged with lambda = B^-1 mu", True, _bone_mixing))
register_merge_method(MergeMethod(
    "rewarded", "Rewarded Soup: one expert per reward, merged with lambda = mu", False,
    lambda n, beta: np.eye(n)))
