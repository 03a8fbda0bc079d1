"""bonesoup.eval.metrics against hand-computed values and brute-force oracles.

scipy is not installed in this venv, so Spearman is checked against hand-computed
ranks and an independent O(K^2) rank oracle; if scipy ever is installed, the
comparison test runs too.
"""

import itertools
import time

import numpy as np
import pytest

from bonesoup.eval import metrics as M
from bonesoup.eval import pareto as P
from bonesoup.eval.metrics import (
    controllability,
    hypervolume,
    lmc_barrier,
    merge_gap,
    pareto_front,
    pareto_mask,
    reference_point,
    spearman,
    sweep_summary,
)


# ----------------------------------------------------------------------------- oracles


def union_volume_by_inclusion_exclusion(points, ref):
    """|union of boxes [ref, p]| = sum over non-empty subsets S of (-1)^(|S|+1) |box(min over S)|."""
    ref = np.asarray(ref, float)
    pts = [np.asarray(p, float) for p in points if np.all(np.asarray(p, float) > ref)]
    total = 0.0
    for k in range(1, len(pts) + 1):
        for sub in itertools.combinations(pts, k):
            total += (-1) ** (k + 1) * np.prod(np.min(sub, axis=0) - ref)
    return total


def union_volume_by_cells(points, ref):
    """Integer coordinates: count the unit cells [c, c + 1] inside at least one box [ref, p]."""
    pts = np.asarray(points, int)
    ref = np.asarray(ref, int)
    hi = np.maximum(pts.max(0), ref)
    axes = [np.arange(ref[i], hi[i]) for i in range(len(ref))]
    cells = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(ref))  # lower corners
    inside = np.any(np.all(cells[:, None, :] + 1 <= pts[None, :, :], axis=2), axis=1)
    return float(inside.sum())


def pareto_oracle(points):
    """O(N^2) definition, written out: dominated, or an exact copy of an earlier point."""
    p = np.asarray(points, float)
    keep = []
    for i in range(len(p)):
        dominated = any(np.all(p[j] >= p[i]) and np.any(p[j] > p[i]) for j in range(len(p)))
        earlier_copy = any(np.array_equal(p[j], p[i]) for j in range(i))
        if not dominated and not earlier_copy:
            keep.append(i)
    return keep


def spearman_oracle(x, y):
    """Ranks by counting (rank = #less + (#equal + 1) / 2), then the Pearson formula."""
    def ranks(v):
        v = list(v)
        return [sum(u < a for u in v) + (sum(u == a for u in v) + 1) / 2 for a in v]
    rx, ry = np.array(ranks(x)), np.array(ranks(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def sphere_front(rng, n, d):
    """n points on the positive unit sphere: all mutually non-dominated (the worst case for size)."""
    p = np.abs(rng.standard_normal((n, d))) + 1e-3
    return p / np.linalg.norm(p, axis=1, keepdims=True)


# ----------------------------------------------------------------------------- hypervolume by hand


def test_hypervolume_2d_staircase_by_hand():
    pts = [(1, 3), (2, 2), (3, 1)]
    assert hypervolume(pts, (0, 0)) == 6.0  # columns of height 3, 2, 1
    assert hypervolume([(2, 5)], (0, 1)) == 8.0  # a single point: its box
    assert hypervolume(pts, (0.5, 0.5)) == 0.5 * 2.5 + 1 * 1.5 + 1 * 0.5  # columns (0.5,1], (1,2], (2,3]
    # (1, 3) does not beat ref strictly in x: dropped; (2,2), (3,1) above (1, 0): 1*2 + 1*1
    assert hypervolume(pts, (1, 0)) == 3.0
    # dominated, duplicate, on-the-reference and below-reference points change nothing
    assert hypervolume(pts + [(1, 1), (2, 2), (0.5, 0.5), (-1, 9), (0, 5), (5, 0)], (0, 0)) == 6.0
    # a point dominating everything: its own box
    assert hypervolume(pts + [(4, 4)], (0, 0)) == 16.0
    assert hypervolume(np.zeros((0, 2)), (0, 0)) == 0.0
    assert hypervolume([], (0, 0)) == 0.0
    assert hypervolume([(-1, -1)], (0, 0)) == 0.0


def test_hypervolume_1d_by_hand():
    assert hypervolume([[3.0], [1.0]], [0.5]) == 2.5
    assert hypervolume([[3.0], [1.0]], [3.0]) == 0.0


def test_hypervolume_3d_by_hand():
    ref = (0, 0, 0)
    # boxes [0,2]x[0,2]x[0,1] (4) and [0,1]x[0,1]x[0,3] (3), overlap [0,1]^3 (1): 4 + 3 - 1 = 6
    assert hypervolume([(2, 2, 1), (1, 1, 3)], ref) == 6.0
    # a 2x2x2 cube with a unit cube inside it: 8; one sticking out by 1 in x: 8 + 1
    assert hypervolume([(2, 2, 2), (1, 1, 1)], ref) == 8.0
    assert hypervolume([(2, 2, 2), (3, 1, 1)], ref) == 9.0
    # three slabs 3x1x1 along each axis: 3 * 3 - 3 * 1 (pairwise overlaps = unit cube) + 1 (triple) = 7
    assert hypervolume([(3, 1, 1), (1, 3, 1), (1, 1, 3)], ref) == 7.0
    # shifted reference point: the same three slabs above (-1, -1, -1): 3*(4*2*2) - 3*(2*2*2) + 8 = 32
    assert hypervolume([(3, 1, 1), (1, 3, 1), (1, 1, 3)], (-1, -1, -1)) == 32.0
    # a point below the reference in one coordinate is dropped
    assert hypervolume([(2, 2, 2), (5, 5, 0)], ref) == 8.0


def test_hypervolume_4d_by_hand():
    # four slabs 2x1x1x1: 4 * 2 - C(4,2) * 1 + C(4,3) * 1 - 1 = 5
    pts = 1 + np.eye(4)
    assert hypervolume(pts, np.zeros(4)) == 5.0
    assert hypervolume(np.ones((1, 4)) * 3, np.zeros(4)) == 81.0


# ----------------------------------------------------------------------------- hypervolume against oracles


@pytest.mark.parametrize("d, n", [(2, 8), (3, 6), (3, 9), (4, 6), (4, 8), (5, 6)])
def test_hypervolume_integer_points_against_cell_count_and_inclusion_exclusion(d, n):
    rng = np.random.default_rng(100 * d + n)
    for _ in range(4):
        pts = rng.integers(-1, 6, size=(n, d))  # some points on/below the reference point
        ref = np.full(d, -1)
        want = union_volume_by_cells(pts, ref)
        assert hypervolume(pts, ref) == want  # exact: integer arithmetic in float64
        assert union_volume_by_inclusion_exclusion(pts, ref) == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("d, n", [(2, 9), (3, 9), (4, 8), (5, 7)])
def test_hypervolume_real_points_against_inclusion_exclusion(d, n):
    rng = np.random.default_rng(7 * d + n)
    for _ in range(4):
        pts = rng.random((n, d))
        ref = rng.random(d) * 0.3  # a few points fall below it in some coordinate
        want = union_volume_by_inclusion_exclusion(pts, ref)
        assert hypervolume(pts, ref) == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_hypervolume_ties_in_every_coordinate():
    # many equal coordinates exercise the staircase's tie handling (equal x, equal y, equal z)
    rng = np.random.default_rng(11)
    for d in (3, 4):
        for _ in range(20):
            pts = rng.integers(0, 3, size=(10, d))
            assert hypervolume(pts, np.full(d, -1)) == union_volume_by_cells(pts, np.full(d, -1))


def test_the_exact_paths_agree_with_each_other():
    rng = np.random.default_rng(3)
    # d = 2: the sort-and-sweep against slicing down to d = 1
    for n in (1, 2, 40):
        p = rng.random((n, 2))
        assert P._hv2(p, np.zeros(2)) == pytest.approx(P._hv_slice(p, np.zeros(2), base=1), rel=1e-12)
    # d = 3: the staircase sweep against slicing down to the 2-D sweep, and down to d = 1
    for p in (rng.random((60, 3)), sphere_front(rng, 60, 3)):
        hv3 = P._hv3(p, np.zeros(3))
        assert hv3 == pytest.approx(P._hv_slice(p, np.zeros(3), base=2), rel=1e-12)
        assert hv3 == pytest.approx(P._hv_slice(p, np.zeros(3), base=1), rel=1e-12)
    # d = 4: the public path (Pareto filter + slicing to the 3-D sweep) against slicing to the 2-D sweep
    p = sphere_front(rng, 40, 4)
    assert hypervolume(p, np.zeros(4)) == pytest.approx(P._hv_slice(p, np.zeros(4), base=2), rel=1e-12)
    # a constant extra objective multiplies the volume by the slab height
    p = rng.random((30, 2))
    assert hypervolume(np.c_[p, np.full(30, 0.5)], (0.1, 0.1, 0.0)) == pytest.approx(
        0.5 * hypervolume(p, (0.1, 0.1)), rel=1e-12)


def test_hypervolume_invariances():
    rng = np.random.default_rng(5)
    p = rng.random((25, 3))
    ref = np.zeros(3)
    v = hypervolume(p, ref)
    assert 0 < v < 1
    assert hypervolume(p[rng.permutation(25)], ref) == pytest.approx(v, rel=1e-13)  # order-free
    assert hypervolume(p[:, [2, 0, 1]], ref) == pytest.approx(v, rel=1e-13)  # objective order-free
    assert hypervolume(np.r_[p, p], ref) == pytest.approx(v, rel=1e-13)  # duplicates
    assert hypervolume(p[pareto_front(p)], ref) == pytest.approx(v, rel=1e-13)  # front only
    assert hypervolume(p * [2, 3, 4], ref) == pytest.approx(24 * v, rel=1e-12)  # scaling
    assert hypervolume(p + 1.5, ref + 1.5) == pytest.approx(v, rel=1e-12)  # translation
    assert hypervolume(np.r_[p, [[0.99, 0.99, 0.99]]], ref) > v  # a new non-dominated point adds volume


def test_hypervolume_is_fast_on_a_few_hundred_front_points():
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    v3 = hypervolume(sphere_front(rng, 400, 3), np.zeros(3))
    v4 = hypervolume(sphere_front(rng, 200, 4), np.zeros(4))
    elapsed = time.perf_counter() - t0
    # the positive orthant of the unit ball has volume pi/6 (d = 3) and pi^2/32 (d = 4): the front's union is below
    assert 0.4 < v3 < np.pi / 6 and 0.15 < v4 < np.pi ** 2 / 32
    assert elapsed < 3.0, elapsed  # ~0.2 s on one core; generous for a shared machine


# ----------------------------------------------------------------------------- Pareto front


def test_pareto_front_by_hand():
    pts = np.array([(1, 3), (2, 2), (3, 1), (1, 1), (2, 2), (0, 3), (3, 1.5)])
    # (1,1) dominated; index 4 duplicates index 1; (0,3) dominated by (1,3); (3,1) dominated by (3,1.5)
    assert pareto_front(pts).tolist() == [0, 1, 6]
    assert pareto_mask(pts).tolist() == [True, True, False, False, False, False, True]
    assert pareto_front(pts).dtype == np.int64
    assert pareto_front(np.zeros((0, 2))).tolist() == []
    assert pareto_front([(1, 2, 3), (3, 2, 1), (1, 1, 1)]).tolist() == [0, 1]
    assert pareto_front([(5, 5), (5, 5), (5, 5)]).tolist() == [0]  # duplicates: the first only
    assert pareto_front([(1, 1), (0, 0), (1, 1)]).tolist() == [0]
    assert pareto_front([(0, 0), (1, 1), (1, 1)]).tolist() == [1]  # the first copy on the front, not of all
    assert pareto_front([(1, 2), (1, 3)]).tolist() == [1]  # equal in one, better in the other: dominated
    assert pareto_front([[3.0], [1.0], [3.0]]).tolist() == [0]


def test_pareto_front_against_the_definition():
    rng = np.random.default_rng(9)
    for d in (2, 3, 4):
        for _ in range(10):
            pts = rng.integers(0, 4, size=(15, d))  # many ties and duplicates
            assert pareto_front(pts).tolist() == pareto_oracle(pts)


# ----------------------------------------------------------------------------- reference point


def test_reference_point_is_the_minimum_of_all_sets():
    a, b = [(1, 5), (2, 3)], [(0.5, 4), (3, 6)]
    np.testing.assert_array_equal(reference_point(a, b), [0.5, 3])
    np.testing.assert_allclose(reference_point(a, b, margin=0.1), [0.4, 2.9])
    np.testing.assert_array_equal(reference_point(b), [0.5, 4])
    np.testing.assert_array_equal(reference_point(a, [], np.zeros((0, 2))), [1, 3])
    # with a margin every method's points count at the shared reference
    ref = reference_point(a, b, margin=0.5)
    assert hypervolume(a, ref) > 0 and hypervolume(b, ref) > 0
    assert reference_point(a).dtype == np.float64


# ----------------------------------------------------------------------------- Spearman and controllability


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == 1.0  # monotone, not linear
    # ties: y ranks (1, 2.5, 2.5, 4) against x ranks (1, 2, 3, 4):
    # centred x (-1.5, -0.5, 0.5, 1.5), y (-1.5, 0, 0, 1.5): 4.5 / sqrt(5 * 4.5)
    assert spearman([1, 2, 3, 4], [1, 5, 5, 9]) == pytest.approx(4.5 / np.sqrt(5 * 4.5), abs=1e-15)
    # x = (1, 2, 3), y = (2, 1, 3): centred ranks (-1, 0, 1) and (0, -1, 1): 1 / 2
    assert spearman([1, 2, 3], [2, 1, 3]) == pytest.approx(0.5, abs=1e-15)
    # ties on both sides: x ranks (1.5, 1.5, 3), y ranks (1, 2.5, 2.5)
    # centred (-0.5, -0.5, 1) and (-1, 0.5, 0.5): sum 0.5 - 0.25 + 0.5 = 0.75; norms 1.5 and 1.5: 0.5
    assert spearman([7, 7, 9], [0, 3, 3]) == pytest.approx(0.5, abs=1e-15)
    assert np.isnan(spearman([1, 2, 3], [7, 7, 7]))
    assert np.isnan(spearman([2, 2], [1, 3]))


def test_spearman_against_a_counting_oracle():
    rng = np.random.default_rng(2)
    for _ in range(30):
        k = int(rng.integers(3, 15))
        x, y = rng.integers(0, 4, k), rng.integers(0, 5, k) + 0.5 * rng.random(k).round()
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        assert spearman(x, y) == pytest.approx(spearman_oracle(x, y), abs=1e-12)


def test_spearman_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    for _ in range(20):
        x, y = rng.integers(0, 5, 11), rng.integers(0, 3, 11)
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_controllability_by_hand():
    mu = np.array([[0, 1], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [1, 0]], float)
    follows = np.array([[0.1, 0.9], [0.2, 0.8], [0.5, 0.6], [0.6, 0.3], [0.9, 0.2]])
    c = controllability(mu, follows)
    assert c["per_objective"] == [1.0, 1.0] and c["mean"] == 1.0
    c = controllability(mu, follows[::-1])  # the sweep runs backwards
    assert c["per_objective"] == [-1.0, -1.0] and c["mean"] == -1.0
    # objective 0 never moves: undefined, left out of the mean
    stuck = follows.copy()
    stuck[:, 0] = 0.5
    c = controllability(mu, stuck)
    assert np.isnan(c["per_objective"][0]) and c["per_objective"][1] == 1.0 and c["mean"] == 1.0
    # nothing moves: the mean is NaN too
    c = controllability(mu, np.ones((5, 2)))
    assert np.isnan(c["per_objective"]).all() and np.isnan(c["mean"])
    # a tie: r_0 = (1, 2, 2, 3, 4) -> ranks (1, 2.5, 2.5, 4, 5) against (1, 2, 3, 4, 5):
    # centred (-2, -0.5, -0.5, 1, 2) . (-2, -1, 0, 1, 2) = 4 + 0.5 + 0 + 1 + 4 = 9.5; norms^2 9.5 and 10
    # r_1 = (3, 1, 2, 5, 4): mu_1 descends, so ranks against (5, 4, 3, 2, 1): centred (0, -2, -1, 2, 1) .
    # (2, 1, 0, -1, -2) = 0 - 2 + 0 - 2 - 2 = -6 over 10: -0.6
    r = np.array([[1, 3], [2, 1], [2, 2], [3, 5], [4, 4]], float)
    c = controllability(mu, r)
    assert c["per_objective"][0] == pytest.approx(9.5 / np.sqrt(9.5 * 10), abs=1e-15)
    assert c["per_objective"][1] == pytest.approx(-0.6, abs=1e-15)
    assert c["mean"] == pytest.approx((9.5 / np.sqrt(95) - 0.6) / 2, abs=1e-15)


# ----------------------------------------------------------------------------- LMC


def test_lmc_barrier_on_a_known_bump():
    ts = np.linspace(0, 1, 11)
    losses = 1.0 + ts + 0.3 * np.sin(np.pi * ts)  # a line from 1 to 2 plus a bump peaking at t = 0.5
    r = lmc_barrier(ts, losses)
    assert r["barrier"] == pytest.approx(0.3, abs=1e-12) and r["argmax_t"] == 0.5
    np.testing.assert_allclose(r["linear"], 1.0 + ts, atol=1e-15)
    r = lmc_barrier([0, 0.5, 1], [1.0, 3.0, 2.0])  # the line at 0.5 is 1.5: excess 1.5
    assert r["barrier"] == 1.5 and r["argmax_t"] == 0.5 and r["linear"] == [1.0, 1.5, 2.0]
    r = lmc_barrier([0, 0.25, 1], [1.0, 1.0, 2.0])  # below the line (convex path): only the ends count
    assert r["barrier"] == 0.0 and r["argmax_t"] == 0.0
    r = lmc_barrier([0, 0.2, 0.6, 1], [2.0, 2.5, 3.0, 0.0])  # line (2, 1.6, 0.8, 0): excess (0, .9, 2.2, 0)
    assert r["barrier"] == pytest.approx(2.2) and r["argmax_t"] == 0.6


def test_merge_gap_by_hand():
    g = merge_gap([1.0, 2.0, 3.0], [1.0, 1.5, 3.5])
    assert g["gap"] == [0.0, 0.5, -0.5] and g["max"] == 0.5 and g["mean"] == 0.0
    g = merge_gap([2.0], [1.0])
    assert g == {"gap": [1.0], "max": 1.0, "mean": 1.0}


# ----------------------------------------------------------------------------- summary


def test_sweep_summary():
    mu = np.array([[0, 1], [0.5, 0.5], [1, 0]], float)
    r = np.array([[1, 3], [2, 2], [3, 1]], float)
    s = sweep_summary(mu, r, (0, 0))
    assert s["hypervolume"] == 6.0 and s["pareto_front"] == [0, 1, 2]
    assert s["controllability"] == {"per_objective": [1.0, 1.0], "mean": 1.0}
    r2 = np.array([[1, 3], [0.5, 0.5], [3, 1]], float)  # the middle point collapses
    s = sweep_summary(mu, r2, (0, 0))
    assert s["hypervolume"] == 5.0 and s["pareto_front"] == [0, 2]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, match", [
    (lambda: hypervolume([1, 2], (0, 0)), r"^points must be a 2-D array"),
    (lambda: hypervolume(np.zeros((2, 2, 2)), (0, 0)), r"^points must be a 2-D array"),
    (lambda: hypervolume([(1, 2)], (0, 0, 0)), r"^points has 2 objectives, the reference point ref has 3"),
    (lambda: hypervolume([(1, np.nan)], (0, 0)), r"^points holds NaN"),
    (lambda: hypervolume([(1, np.inf)], (0, 0)), r"^points holds NaN or infinite"),
    (lambda: hypervolume([("a", 2)], (0, 0)), r"^points must be an array of real numbers"),
    (lambda: hypervolume([(1, 2)], (0, np.inf)), r"^ref holds NaN or infinite"),
    (lambda: hypervolume([(1, 2)], [[0, 0]]), r"^ref must be a 1-D"),
    (lambda: hypervolume([(1, 2)], []), r"^ref must be a 1-D"),
    (lambda: hypervolume([(1, 2)], 0.0), r"^ref must be a 1-D"),
    (lambda: pareto_front([1, 2, 3]), r"^points must be a 2-D array"),
    (lambda: pareto_mask([[1.0, np.nan]]), r"^points holds NaN"),
    (lambda: pareto_front(np.zeros((3, 0))), r"^points needs at least one objective"),
    (lambda: reference_point(), r"^point_sets"),
    (lambda: reference_point([(1, 2)], margin=-1), r"^margin must be a finite number >= 0"),
    (lambda: reference_point([(1, 2)], margin=np.nan), r"^margin must be a finite number >= 0"),
    (lambda: reference_point([(1, 2)], margin="x"), r"^margin must be a real number"),
    (lambda: reference_point([(1, 2)], [(1, 2, 3)]), r"^point_sets\[1\] has 3 objectives, point_sets\[0\] has 2"),
    (lambda: reference_point([(1, 2)], [(1, np.nan)]), r"^point_sets\[1\] holds NaN"),
    (lambda: reference_point([], np.zeros((0, 2))), r"^point_sets: every set is empty"),
    (lambda: spearman([1, 2], [1, 2, 3]), r"^x and y must have the same length"),
    (lambda: spearman([[1, 2]], [1, 2]), r"^x must be 1-D"),
    (lambda: spearman([1, 2], [[1, 2]]), r"^y must be 1-D"),
    (lambda: spearman([1], [1]), r"^x needs at least 2 values"),
    (lambda: spearman([1, np.nan], [1, 2]), r"^x holds NaN"),
    (lambda: spearman([1, 2], [1, np.inf]), r"^y holds NaN or infinite"),
    (lambda: controllability([[0, 1]], [[1, 2]]), r"^preferences: controllability needs at least 2"),
    (lambda: controllability([[0, 1], [1, 0]], [[1, 2, 3], [1, 2, 3]]), r"^preferences \(2, 2\) and rewards"),
    (lambda: controllability([0, 1], [[1, 2], [1, 2]]), r"^preferences must be a 2-D array"),
    (lambda: controllability([[0, 1], [1, 0]], [[1, np.nan], [1, 2]]), r"^rewards holds NaN"),
    (lambda: controllability([[0, 1], [1, 1]], [[1, 2], [2, 1]]), r"^preferences rows must lie on the simplex"),
    (lambda: controllability([[-0.5, 1.5], [1, 0]], [[1, 2], [2, 1]]), r"^preferences rows must lie on the simplex"),
    (lambda: lmc_barrier([0, 0.7, 0.5, 1], [1, 1, 1, 1]), r"^ts must increase strictly from 0 to 1"),
    (lambda: lmc_barrier([0, 0.5, 0.5, 1], [1, 1, 1, 1]), r"^ts must increase strictly from 0 to 1"),
    (lambda: lmc_barrier([0.1, 1], [1, 1]), r"^ts must increase strictly from 0 to 1"),
    (lambda: lmc_barrier([0, 0.9], [1, 1]), r"^ts must increase strictly from 0 to 1"),
    (lambda: lmc_barrier([0, 0.5, 1], [1, 1]), r"^ts and losses must have the same length"),
    (lambda: lmc_barrier([0], [1]), r"^ts needs at least 2 values"),
    (lambda: lmc_barrier([0, 1], [1, np.nan]), r"^losses holds NaN"),
    (lambda: lmc_barrier([[0, 1]], [1, 2]), r"^ts must be 1-D"),
    (lambda: merge_gap([1.0], [1.0, 2.0]), r"^merged_losses and ensembled_losses must have the same length"),
    (lambda: merge_gap([], []), r"^merged_losses needs at least 1 value"),
    (lambda: merge_gap([1.0], [np.inf]), r"^ensembled_losses holds NaN or infinite"),
    (lambda: sweep_summary([[0, 1], [1, 0]], [[1, 2], [2, 1]], (0, 0, 0)), r"^rewards has 2 objectives, the reference point ref has 3"),
    (lambda: sweep_summary([[0, 1], [1, 0]], [1, 2], (0, 0)), r"^rewards must be a 2-D array"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_public_names_unchanged_after_the_split():
    """The hypervolume half lives in bonesoup.eval.pareto; every public name is still importable from metrics."""
    for name in ("pareto_mask", "pareto_front", "hypervolume", "reference_point"):
        assert getattr(M, name) is getattr(P, name) and name in M.__all__
    import bonesoup

    assert bonesoup.hypervolume is P.hypervolume and bonesoup.controllability is M.controllability
