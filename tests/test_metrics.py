"""bonesoup.metrics against hand-computed values and brute-force oracles."""

import itertools

import numpy as np
import pytest

from bonesoup.metrics import (
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


def union_volume_by_inclusion_exclusion(points, ref):
    """Oracle: |union of boxes [ref, p]| = sum over non-empty subsets S of (-1)^(|S|+1) |box(min over S)|."""
    pts = [np.asarray(p, float) for p in points if np.all(np.asarray(p) > ref)]
    total = 0.0
    for k in range(1, len(pts) + 1):
        for sub in itertools.combinations(pts, k):
            corner = np.min(sub, axis=0)
            total += (-1) ** (k + 1) * np.prod(corner - ref)
    return total


def union_volume_by_cells(points, ref):
    """Oracle for integer coordinates: count the unit cells inside at least one box."""
    pts = np.asarray(points, int)
    ref = np.asarray(ref, int)
    hi = pts.max(0)
    axes = [np.arange(ref[i], hi[i]) for i in range(len(ref))]
    cells = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(ref))  # lower corners
    inside = np.any(np.all(cells[:, None, :] + 1 <= pts[None, :, :], axis=2), axis=1)
    return float(inside.sum())


def test_hypervolume_2d_staircase_by_hand():
    pts = [(1, 3), (2, 2), (3, 1)]
    assert hypervolume(pts, (0, 0)) == 6.0  # 3 + 2 + 1 columns
    assert hypervolume(pts, (1, 0)) == 3.0  # (1, 3) no longer beats ref strictly in x
    assert hypervolume([(2, 5)], (0, 1)) == 8.0
    # dominated, duplicate and below-reference points change nothing
    assert hypervolume(pts + [(1, 1), (2, 2), (0.5, 0.5), (-1, 9)], (0, 0)) == 6.0
    assert hypervolume(np.zeros((0, 2)), (0, 0)) == 0.0
    assert hypervolume([(4, 4)], (0, 0)) == 16.0 and hypervolume(pts + [(4, 4)], (0, 0)) == 16.0


def test_hypervolume_1d_and_3d_by_hand():
    assert hypervolume([[3.0], [1.0]], [0.5]) == 2.5
    # two unit-height slabs: boxes [0,2]x[0,2]x[0,1] and [0,1]x[0,1]x[0,3] -> 4 + 1*1*2 = 6
    assert hypervolume([(2, 2, 1), (1, 1, 3)], (0, 0, 0)) == 6.0
    # a cube 2x2x2 with a 1x1x1 corner cube inside it adds nothing; one sticking out adds its part
    assert hypervolume([(2, 2, 2), (1, 1, 1)], (0, 0, 0)) == 8.0
    assert hypervolume([(2, 2, 2), (3, 1, 1)], (0, 0, 0)) == 9.0


@pytest.mark.parametrize("d, n", [(2, 7), (3, 6), (3, 9), (4, 6)])
def test_hypervolume_matches_brute_force(d, n):
    rng = np.random.default_rng(100 * d + n)
    for _ in range(5):
        pts = rng.integers(0, 6, size=(n, d))
        ref = np.full(d, -1)
        want = union_volume_by_cells(pts, ref)
        assert hypervolume(pts, ref) == want
        assert hypervolume(pts, ref) == pytest.approx(union_volume_by_inclusion_exclusion(pts, ref), abs=1e-9)
        # real-valued points against inclusion-exclusion
        fp = rng.random((n, d))
        assert hypervolume(fp, np.zeros(d)) == pytest.approx(union_volume_by_inclusion_exclusion(fp, np.zeros(d)),
                                                             rel=1e-12, abs=1e-12)


def test_hypervolume_2d_path_agrees_with_the_slicing_path():
    # Append a constant third objective: the 3-D volume is the 2-D area times the slab height.
    rng = np.random.default_rng(3)
    pts = rng.random((40, 2))
    area = hypervolume(pts, (0.1, 0.1))
    vol = hypervolume(np.c_[pts, np.full(40, 0.5)], (0.1, 0.1, 0.0))
    assert vol == pytest.approx(0.5 * area, rel=1e-12)


def test_pareto_front_by_hand():
    pts = np.array([(1, 3), (2, 2), (3, 1), (1, 1), (2, 2), (0, 3), (3, 1.5)])
    # (1,1) dominated; second (2,2) a duplicate; (0,3) dominated by (1,3); (3,1) dominated by (3,1.5)
    assert pareto_front(pts).tolist() == [0, 1, 6]
    assert pareto_mask(pts).tolist() == [True, True, False, False, False, False, True]
    assert pareto_front(np.zeros((0, 2))).tolist() == []
    assert pareto_front([(1, 2, 3), (3, 2, 1), (1, 1, 1)]).tolist() == [0, 1]


def test_reference_point_is_the_minimum_of_all_sets():
    a, b = [(1, 5), (2, 3)], [(0.5, 4), (3, 6)]
    np.testing.assert_array_equal(reference_point(a, b), [0.5, 3])
    np.testing.assert_allclose(reference_point(a, b, margin=0.1), [0.4, 2.9])
    with pytest.raises(ValueError, match="margin"):
        reference_point(a, margin=-1)
    with pytest.raises(ValueError, match=r"point_sets\[1\] has 3 objectives"):
        reference_point(a, [(1, 2, 3)])


def test_spearman_and_controllability_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties: y ranks (1, 2.5, 2.5, 4) against x ranks (1, 2, 3, 4):
    # centred x (-1.5, -0.5, 0.5, 1.5), y (-1.5, 0, 0, 1.5): 4.5 / sqrt(5 * 4.5) = 0.948683...
    assert spearman([1, 2, 3, 4], [1, 5, 5, 9]) == pytest.approx(4.5 / np.sqrt(5 * 4.5), abs=1e-12)
    # hand: x = (1,2,3), y = (2,1,3): ranks centred (-1,0,1) and (0,-1,1): 1 / 2 = 0.5
    assert spearman([1, 2, 3], [2, 1, 3]) == pytest.approx(0.5)
    assert np.isnan(spearman([1, 2, 3], [7, 7, 7]))

    mu = np.array([[0, 1], [0.5, 0.5], [1, 0]], float)
    follows = np.array([[0.1, 0.9], [0.5, 0.6], [0.9, 0.2]])
    c = controllability(mu, follows)
    assert c["per_objective"] == pytest.approx([1.0, 1.0]) and c["mean"] == pytest.approx(1.0)
    backwards = follows[::-1]
    assert controllability(mu, backwards)["mean"] == pytest.approx(-1.0)
    stuck = np.array([[0.5, 0.9], [0.5, 0.6], [0.5, 0.2]])  # objective 0 never moves: undefined, left out
    c = controllability(mu, stuck)
    assert np.isnan(c["per_objective"][0]) and c["mean"] == pytest.approx(1.0)


def test_lmc_barrier_and_merge_gap_by_hand():
    r = lmc_barrier([0, 0.5, 1], [1.0, 3.0, 2.0])  # line at 0.5 is 1.5: excess 1.5
    assert r["barrier"] == pytest.approx(1.5) and r["argmax_t"] == 0.5 and r["linear"] == [1.0, 1.5, 2.0]
    assert lmc_barrier([0, 0.5, 1], [1.0, 1.0, 2.0])["barrier"] == pytest.approx(0.0)  # convex path: ends
    g = merge_gap([1.0, 2.0, 3.0], [1.0, 1.5, 3.0])
    assert g["gap"] == [0.0, 0.5, 0.0] and g["max"] == 0.5 and g["mean"] == pytest.approx(0.5 / 3)
    with pytest.raises(ValueError, match="ts must increase strictly from 0 to 1"):
        lmc_barrier([0, 0.7, 0.5, 1], [1, 1, 1, 1])


def test_sweep_summary():
    mu = np.array([[0, 1], [0.5, 0.5], [1, 0]], float)
    r = np.array([[1, 3], [2, 2], [3, 1]], float)
    s = sweep_summary(mu, r, (0, 0))
    assert s["hypervolume"] == 6.0 and s["pareto_front"] == [0, 1, 2] and s["controllability"]["mean"] == 1.0


@pytest.mark.parametrize("call, match", [
    (lambda: hypervolume([1, 2], (0, 0)), "points must be a 2-D array"),
    (lambda: hypervolume([(1, 2)], (0, 0, 0)), "points has 2 objectives, the reference point 3"),
    (lambda: hypervolume([(1, np.nan)], (0, 0)), "points holds NaN"),
    (lambda: hypervolume([(1, 2)], (0, np.inf)), "ref must be finite"),
    (lambda: hypervolume([(1, 2)], [[0, 0]]), "ref must be a 1-D"),
    (lambda: controllability([[0, 1]], [[1, 2]]), "at least 2 preference points"),
    (lambda: controllability([[0, 1], [1, 0]], [[1, 2, 3], [1, 2, 3]]), "same shape"),
    (lambda: spearman([1, 2], [1, 2, 3]), "same length"),
    (lambda: merge_gap([1.0], [1.0, 2.0]), "merged_losses and ensembled_losses"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
