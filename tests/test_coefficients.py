"""Bone Soup coefficients, their validation, and Theorem 1 of the paper."""

import numpy as np
import pytest

from bonesoup import (
    backbone_matrix,
    bone_coefficients,
    fold_extrapolation,
    rewarded_soup_coefficients,
    validate_preference,
)


def test_backbone_matrix_n2_and_properties():
    np.testing.assert_allclose(backbone_matrix(2, 0.7), [[0.7, 0.3], [0.3, 0.7]])
    for n in (2, 3, 5):
        for beta in (0.55, 0.7, 0.95):
            B = backbone_matrix(n, beta)
            np.testing.assert_allclose(B, B.T)
            np.testing.assert_allclose(B.sum(axis=1), np.ones(n))
            np.testing.assert_allclose(np.diag(B), np.full(n, beta))
            # circulant: each row is the previous one rotated
            for j in range(1, n):
                np.testing.assert_allclose(B[j], np.roll(B[j - 1], 1))


def test_bone_coefficients_match_inverse_and_can_be_negative():
    np.testing.assert_allclose(bone_coefficients([1.0, 0.0], 0.7), [1.75, -0.75])
    rng = np.random.default_rng(0)
    for n in (2, 3, 4, 7):
        for beta in (0.51, 0.6, 0.8, 0.99):
            mu = rng.dirichlet(np.ones(n))
            lam = bone_coefficients(mu, beta)
            np.testing.assert_allclose(lam, np.linalg.solve(backbone_matrix(n, beta), mu), atol=1e-10)
            np.testing.assert_allclose(lam.sum(), 1.0)
    # corner preferences always need a negative coefficient (never clipped)
    assert (bone_coefficients([0.0, 0.0, 1.0], 0.8) < 0).sum() == 2


def test_rewarded_and_fold_extrapolation():
    np.testing.assert_allclose(rewarded_soup_coefficients([0.25, 0.75]), [0.25, 0.75])
    c, c_sft = fold_extrapolation([1.75, -0.75], alpha=0.2)
    np.testing.assert_allclose(c, [2.1, -0.9])
    assert c_sft == pytest.approx(-0.2)
    assert c.sum() + c_sft == pytest.approx(1.0)  # still an affine combination
    c0, s0 = fold_extrapolation([0.3, 0.7], 0.0)
    np.testing.assert_allclose(c0, [0.3, 0.7])
    assert s0 == 0.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: backbone_matrix(1, 0.7), "must be >= 2"),
        (lambda: backbone_matrix(3, 0.5), "strictly between 0.5 and 1"),
        (lambda: backbone_matrix(3, 1.0), "strictly between 0.5 and 1"),
        (lambda: bone_coefficients([1.0], 0.7), "must be >= 2"),
        (lambda: bone_coefficients([0.5, 0.6], 0.7), r"must sum to 1 .* not renormalised"),
        (lambda: bone_coefficients([1.2, -0.2], 0.7), "non-negative"),
        (lambda: bone_coefficients([float("nan"), 1.0], 0.7), "finite"),
        (lambda: bone_coefficients([0.5, 0.5], float("nan")), "strictly between"),
        (lambda: validate_preference([0.5, 0.5], n=3), "must have 3 entries"),
        (lambda: rewarded_soup_coefficients([]), "non-empty"),
        (lambda: fold_extrapolation([1.0, 0.0], float("inf")), "alpha must be finite"),
    ],
)
def test_validation_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_preference_tolerance_is_1e6():
    validate_preference([0.5, 0.5 + 9e-7])
    with pytest.raises(ValueError, match="must sum to 1"):
        validate_preference([0.5, 0.5 + 2e-6])


def _theorem1_scores(a, t, beta, mu):
    """Scores of the Rewarded Soup and Bone Soup merges on mu r1 + (1 - mu) r2.

    r_i(theta) = -a_i (theta - t_i)^2. Expert i maximises r_i (theta = t_i);
    backbone j maximises h_j = sum_i B_ji r_i, a weighted quadratic whose
    optimum is sum_i B_ji a_i t_i / sum_i B_ji a_i.
    """
    a, t = np.asarray(a, float), np.asarray(t, float)
    B = backbone_matrix(2, beta)
    experts = t
    backbones = (B * a) @ t / (B @ a)
    pref = np.array([mu, 1.0 - mu])
    theta_rs = rewarded_soup_coefficients(pref) @ experts
    theta_bs = bone_coefficients(pref, beta) @ backbones

    def score(theta):
        return float(pref @ (-a * (theta - t) ** 2))

    return score(theta_rs), score(theta_bs)


def test_theorem1_bone_beats_rewarded_inside_the_interval():
    """DESIGN.md Theorem 1: strictly better for mu in ((1 - s)/2, (1 + s)/2)."""
    checked = 0
    for beta in np.linspace(0.55, 0.95, 9):
        s = np.sqrt(2 * beta**2 - 2 * beta + 1)
        for a1, a2 in [(1.0, 2.0), (0.3, 5.0), (4.0, 0.5), (1.0, 1.01), (10.0, 0.1)]:
            for t1, t2 in [(0.0, 1.0), (-2.0, 3.0), (5.0, -1.0)]:
                lo, hi = (1 - s) / 2, (1 + s) / 2
                for mu in np.linspace(lo, hi, 23)[1:-1]:
                    rs, bs = _theorem1_scores([a1, a2], [t1, t2], beta, mu)
                    assert bs > rs, f"beta={beta} a=({a1},{a2}) t=({t1},{t2}) mu={mu}: bone {bs} <= rewarded {rs}"
                    checked += 1
    assert checked == 9 * 5 * 3 * 21


def test_theorem1_needs_different_curvatures():
    """With a1 == a2 the backbones' merge reproduces Rewarded Soup exactly."""
    for mu in (0.2, 0.5, 0.8):
        rs, bs = _theorem1_scores([2.0, 2.0], [0.0, 1.0], 0.7, mu)
        assert bs == pytest.approx(rs, abs=1e-12)


def test_theorem1_interval_matters():
    """At the corners the single expert is optimal, so Bone Soup must lose there:
    the check above is not vacuous."""
    for beta in (0.6, 0.8):
        for mu in (0.0, 1.0):
            rs, bs = _theorem1_scores([1.0, 2.0], [0.0, 1.0], beta, mu)
            assert rs == pytest.approx(0.0, abs=1e-12) and bs < rs


def test_bone_coefficients_exact_inverse_within_the_sum_tolerance():
    """mu may be off sum 1 by up to 1e-6; the coefficients are still exactly B^-1 mu."""
    mu = [0.5 + 9e-7, 0.5]
    for beta in (0.5001, 0.7):
        np.testing.assert_allclose(bone_coefficients(mu, beta), np.linalg.solve(backbone_matrix(2, beta), mu),
                                   rtol=0, atol=1e-9)


def test_merge_coefficients_is_the_chain():
    from bonesoup import merge_coefficients

    c, s = merge_coefficients([1.0, 0.0], method="bone", beta=0.7, alpha=0.2)
    np.testing.assert_allclose(c, [2.1, -0.9])
    assert s == pytest.approx(-0.2)
    c, s = merge_coefficients([0.25, 0.75], method="rewarded")
    np.testing.assert_allclose(c, [0.25, 0.75])
    assert s == 0.0
    with pytest.raises(ValueError, match="beta is required"):
        merge_coefficients([0.5, 0.5])
    with pytest.raises(ValueError, match="must have 3 entries"):
        merge_coefficients([0.5, 0.5], beta=0.7, n=3)
    with pytest.raises(ValueError, match="method must be"):
        merge_coefficients([0.5, 0.5], method="ties")


def test_per_objective_extrapolation_closed_form():
    from bonesoup import per_objective_extrapolation

    beta, mu, k = 0.7, np.array([0.3, 0.7]), np.array([1.25, 2.0])
    Binv = np.linalg.inv(backbone_matrix(2, beta))
    c, c_sft = per_objective_extrapolation(mu, k, beta=beta)
    # Mix the per-objective extrapolated merges by hand, objective by objective.
    want = sum(mu[i] * k[i] * Binv[:, i] for i in range(2))
    np.testing.assert_allclose(c, want, rtol=0, atol=1e-15)
    assert c_sft == pytest.approx(0.3 * (1 - 1.25) + 0.7 * (1 - 2.0), abs=1e-15)
    # Coefficients still sum to 1: each objective's extrapolated merge does.
    assert c.sum() + c_sft == pytest.approx(1.0, abs=1e-12)
    # One factor for all objectives is fold_extrapolation with alpha = k - 1.
    c1, s1 = per_objective_extrapolation(mu, [1.3, 1.3], beta=beta)
    c2, s2 = fold_extrapolation(bone_coefficients(mu, beta), 0.3)
    np.testing.assert_allclose(c1, c2, atol=1e-14)
    assert s1 == pytest.approx(s2, abs=1e-14)
    # Rewarded Soup: B = I.
    c3, s3 = per_objective_extrapolation(mu, k, method="rewarded")
    np.testing.assert_allclose(c3, mu * k, atol=0)
    with pytest.raises(ValueError, match="k must hold 2"):
        per_objective_extrapolation(mu, [1.0], beta=beta)
    with pytest.raises(ValueError, match="k must hold"):
        per_objective_extrapolation(mu, [1.0, 0.0], beta=beta)
    with pytest.raises(ValueError, match="beta is required"):
        per_objective_extrapolation(mu, k)


def test_registered_method_is_accepted_by_name_and_unknown_names_list_the_known(monkeypatch):
    from bonesoup import merge_coefficients
    from bonesoup.merge.methods import MERGE_METHODS, MergeMethod, get_merge_method, merge_method_names

    with pytest.raises(ValueError, match="method must be one of 'bone', 'rewarded'.*got 'uniform'"):
        merge_coefficients([0.3, 0.7], method="uniform")
    uniform = MergeMethod("uniform", "test only: every backbone 1/n", False, lambda n, beta: np.full((n, n), 1.0 / n))
    monkeypatch.setitem(MERGE_METHODS, "uniform", uniform)
    assert get_merge_method("uniform") is uniform and merge_method_names()[-1] == "uniform"
    c, s = merge_coefficients([0.3, 0.7], method="uniform", alpha=0.5)
    np.testing.assert_allclose(c, [0.75, 0.75], rtol=0, atol=1e-15)  # (1 + alpha) / n each
    assert s == -0.5
    from bonesoup import per_objective_extrapolation

    c, s = per_objective_extrapolation([0.3, 0.7], [2.0, 1.0], method="uniform")
    np.testing.assert_allclose(c, [0.65, 0.65], rtol=0, atol=1e-15)  # column i = 1/n, weighted by mu_i k_i
    assert s == pytest.approx(-0.3)
