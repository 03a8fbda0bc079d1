"""bonesoup.eval.stats against float64 brute force: sample std, percentile bootstrap, sign-flip and Wilcoxon."""

import itertools
import math

import numpy as np
import pytest

from bonesoup.eval.stats import (bootstrap_ci, describe, paired_comparison, sample_std, sign_flip_test,
                                 wilcoxon_signed_rank)


def test_sample_std_is_bessel_corrected():
    x = np.random.default_rng(0).normal(size=7)
    assert sample_std(x) == pytest.approx(math.sqrt(sum((v - x.mean()) ** 2 for v in x) / 6), rel=1e-14)
    assert sample_std([[1.0, 2.0], [3.0, 4.0]]) == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert math.isnan(sample_std([3.0]))
    with pytest.raises(ValueError, match="x must be finite"):
        sample_std([1.0, float("nan")])
    with pytest.raises(ValueError, match="x must hold at least one value"):
        sample_std([])


def test_bootstrap_is_seeded_and_matches_the_exact_bootstrap_distribution():
    x = [0.2, 0.5, 1.3]
    y = np.random.default_rng(0).normal(size=10)
    assert bootstrap_ci(y, seed=3) == bootstrap_ci(y, seed=3)
    assert bootstrap_ci(y, seed=3) != bootstrap_ci(y, seed=4)
    # n = 3: the exact bootstrap distribution of the mean has 27 equally likely resamples; its 2.5% and
    # 97.5% quantiles are min(x) and max(x) (each an atom of mass 1/27 > 2.5%).
    exact = sorted(np.mean(c) for c in itertools.product(x, repeat=3))
    lo, hi = bootstrap_ci(x, resamples=20_000, seed=0)
    assert (lo, hi) == (min(exact), max(exact))
    assert (lo, hi) == pytest.approx((min(x), max(x)), abs=1e-15)
    # At 50% the interval is inside the exact distribution's 20% .. 80% quantiles.
    lo, hi = bootstrap_ci(x, confidence=0.5, resamples=20_000, seed=0)
    assert np.quantile(exact, 0.2) <= lo < hi <= np.quantile(exact, 0.8)
    assert bootstrap_ci([1.0, 2.0, 3.0, 4.0], statistic=np.median, seed=0)[1] <= 4.0
    assert all(math.isnan(v) for v in bootstrap_ci([1.0]))
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_ci(x, resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(x, confidence=1.0)


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    hits = sum(lo <= 1.0 <= hi for lo, hi in (bootstrap_ci(rng.normal(1.0, 2.0, size=40), resamples=2000, seed=i)
                                              for i in range(300)))
    assert 0.88 <= hits / 300 <= 0.99  # the percentile bootstrap undercovers a little at n = 40


def _brute_sign_flip(d):
    obs = abs(np.mean(d))
    means = [abs(np.mean(np.array(s) * d)) for s in itertools.product((-1.0, 1.0), repeat=len(d))]
    return sum(m >= obs - 1e-12 for m in means) / len(means)


def test_sign_flip_exact_equals_brute_force_and_monte_carlo_approaches_it():
    rng = np.random.default_rng(2)
    for n in (1, 3, 6, 9):
        d = rng.normal(0.3, 1.0, size=n)
        r = sign_flip_test(d)
        assert r["exact"] and r["p_value"] == pytest.approx(_brute_sign_flip(d), abs=1e-15), n
    assert sign_flip_test([0.1, 0.2, 0.3])["p_value"] == 0.25  # 3 seeds can never give p < 0.25
    assert sign_flip_test([0.0, 0.0])["p_value"] == 1.0
    d = rng.normal(0.4, 1.0, size=12)
    mc = sign_flip_test(d, max_exact=0, resamples=40_000, seed=5)
    assert not mc["exact"] and abs(mc["p_value"] - _brute_sign_flip(d)) < 0.01
    assert sign_flip_test(d, max_exact=0, resamples=500, seed=5) == sign_flip_test(d, max_exact=0, resamples=500,
                                                                                     seed=5)


def _brute_wilcoxon(d):
    from bonesoup.eval.metrics import _ranks

    d = np.asarray([v for v in d if v != 0])
    r = _ranks(np.abs(d))
    w = r[d > 0].sum()
    ws = [sum(ri for ri, s in zip(r, signs) if s) for signs in itertools.product((0, 1), repeat=len(d))]
    lower = np.mean([x <= w + 1e-9 for x in ws])
    upper = np.mean([x >= w - 1e-9 for x in ws])
    return min(1.0, 2 * min(lower, upper))


def test_wilcoxon_exact_equals_brute_force_with_ties_and_zeros_and_the_textbook_value():
    rng = np.random.default_rng(4)
    for d in (rng.normal(0.5, 1.0, size=8), np.round(rng.normal(0.2, 1.0, size=9), 1),  # ties
              [0.0, 1.0, -1.0, 2.0, 2.0, 0.0, 3.0, -0.5]):  # zeros and ties
        assert wilcoxon_signed_rank(d)["p_value"] == pytest.approx(_brute_wilcoxon(d), abs=1e-12)
    assert wilcoxon_signed_rank(np.arange(1.0, 11.0))["p_value"] == pytest.approx(2 / 1024, abs=1e-15)
    # Darwin's Zea mays differences (Fisher 1935), the example of scipy.stats.wilcoxon: W- = 24, p exact.
    d = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]
    r = wilcoxon_signed_rank(d)
    assert r["statistic"] == 120 - 24 and r["p_value"] == pytest.approx(0.041259765625, abs=1e-12)
    assert wilcoxon_signed_rank([0.0, 0.0]) == {"p_value": 1.0, "statistic": 0.0, "n": 0}


def test_describe_and_paired_comparison():
    rng = np.random.default_rng(9)
    a = rng.normal(1.0, 0.1, size=(3, 11))
    b = a - 0.05 + rng.normal(0, 0.01, size=(3, 11))
    c = paired_comparison(a, b, resamples=4000, seed=1)
    assert c["n"] == 33 and c["wins"] == 33 and c["mean_difference"] == pytest.approx(np.mean(a - b))
    assert c["ci"][0] < c["mean_difference"] < c["ci"][1] and c["ci"][0] > 0
    assert not c["p_exact"] and c["p_sign_flip"] == 1 / 4001 and c["p_wilcoxon"] < 1e-6
    assert c["std"] == pytest.approx(np.std(a - b, ddof=1))
    same = paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["p_sign_flip"] == 1.0 and same["p_wilcoxon"] == 1.0 and same["ci"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="same shape"):
        paired_comparison([1.0, 2.0], [1.0])
    s = describe([1.0, 2.0, 4.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(7 / 3) and s["std"] == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert s["ci"][0] <= s["mean"] <= s["ci"][1]


def _synthetic_results(cfg, seed=0):
    """per_seed results of every method of ``cfg`` as evaluate_seed writes them (made up, no models)."""
    from bonesoup.eval.experiment import preference_grid

    rng = np.random.default_rng(seed)
    prefs = preference_grid(cfg.points)
    out = {}
    for s in cfg.seeds:
        pts = {m: (prefs * (1.0 + 0.1 * k) + rng.normal(0, 0.02, prefs.shape)).tolist()
               for k, m in enumerate(m for m in cfg.methods() if m != "morlhf")}
        out[s] = {"points": pts, "morlhf": {"0.0": [0.1, 1.0], "0.5": [0.55, 0.5], "1.0": [1.0, 0.1]},
                  "sft": (rng.normal(0.3, 0.01, 2)).tolist()}
    return out


@pytest.mark.parametrize("mode", ["union", "sft"])
def test_experiment_summary_reports_sample_std_cis_and_paired_tests(mode, tmp_path):
    from bonesoup.eval.experiment import ExperimentConfig, format_table, preference_grid, summarize
    from bonesoup.eval.experiment_eval import plot_pareto
    from bonesoup.eval.metrics import hypervolume

    cfg = ExperimentConfig(seeds=(0, 1, 2), points=4, reference_point=mode)
    per_seed = _synthetic_results(cfg)
    s = summarize(cfg, per_seed)
    ref = np.asarray(s["reference_point"])
    if mode == "sft":
        np.testing.assert_allclose(ref, np.mean([r["sft"] for r in per_seed.values()], 0), rtol=0, atol=1e-15)
    assert s["reference_point_mode"] == mode
    for m, v in s["methods"].items():
        if m == "morlhf":
            continue
        hv = [hypervolume(np.asarray(r["points"][m]), ref) for r in per_seed.values()]
        assert v["hypervolume"] == pytest.approx(hv, rel=1e-12)
        assert v["hv_std"] == pytest.approx(np.std(hv, ddof=1), rel=1e-12)
        assert v["hv_ci"] == list(bootstrap_ci(hv, confidence=0.95, resamples=10_000, seed=0))
        eps = 1e-12  # the mean of three equal values may round by an ulp
        assert min(hv) - eps <= v["hv_ci"][0] <= v["hv_mean"] <= v["hv_ci"][1] <= max(hv) + eps
    c = s["comparisons"]["bone_soup > rewarded_soup"]
    # The synthetic Bone Soup sweep is 10% further out at every point of every seed.
    assert c["seeds_won"] == 3 and c["hv"]["p_sign_flip"] == 0.25 and c["hv"]["p_exact"]
    prefs = preference_grid(4)
    d = [np.sum(prefs * (np.asarray(r["points"]["bone_soup"]) - np.asarray(r["points"]["rewarded_soup"])), 1)
         for r in per_seed.values()]
    w = c["weighted_reward"]
    assert w["n"] == 12 and w["mean_difference"] == pytest.approx(np.mean(d), rel=1e-12) and w["ci"][0] > 0
    assert w["p_wilcoxon"] == pytest.approx(2 / 2**12) and w["p_sign_flip"] == pytest.approx(2 / 2**12)
    assert "weighted_reward" not in s["comparisons"].get("morlhf > bone_soup", {})
    table = format_table(cfg, s)
    assert f"[{c['hv']['ci'][0]:.4f}, {c['hv']['ci'][1]:.4f}]" in table
    assert f"Reference point ({mode})" in table and "ddof 1" in table
    assert sum(1 for line in table.splitlines() if line.startswith("| ") and "+-" in line) == len(cfg.methods())
    assert plot_pareto(cfg, s, per_seed, tmp_path / "p.png").stat().st_size > 10_000


def test_experiment_config_checks_the_reference_point_mode():
    from bonesoup.eval.experiment import ExperimentConfig

    with pytest.raises(ValueError, match="reference_point must be 'union' or 'sft'"):
        ExperimentConfig(reference_point="origin").check()
