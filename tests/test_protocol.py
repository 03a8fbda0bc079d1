"""The paper's protocol: the simplex sweep, MORLHF at n >= 3, the beta search, the fair baselines and the accounting."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bonesoup.eval.beta_search import format_beta_search, search_beta, search_steps
from bonesoup.eval.experiment import ExperimentConfig, run_experiment
from bonesoup.eval.experiment_methods import (METHOD_TABLE, method_accounting, morlhf_preferences, preference_from_key,
                                              preference_grid, preference_key, simplex_grid, validation_preferences)


# --------------------------------------------------------------------------- the sweep


@pytest.mark.parametrize("n, d", [(2, 1), (2, 4), (3, 1), (3, 4), (3, 5), (4, 3)])
def test_the_simplex_grid_is_every_point_of_step_1_over_d(n, d):
    g = simplex_grid(n, d)
    want = {c for c in itertools.product(range(d + 1), repeat=n) if sum(c) == d}  # brute force
    assert g.shape == (math.comb(d + n - 1, n - 1), n) and g.dtype == np.float64
    assert {tuple(int(round(x)) for x in row) for row in g * d} == want and len(want) == len(g)
    np.testing.assert_allclose(g.sum(1), 1.0, rtol=0, atol=1e-15)
    assert (g[0] == np.eye(n)[0]).all() and (g[-1] == np.eye(n)[-1]).all()


def test_the_sweep_is_the_line_at_n_2_and_the_simplex_above():
    np.testing.assert_array_equal(preference_grid(3), [[0, 1], [0.5, 0.5], [1, 0]])
    np.testing.assert_array_equal(preference_grid(5, 3), simplex_grid(3, 4))
    cfg = ExperimentConfig(task="review3")
    assert cfg.rewards == ("sentiment", "conciseness", "detail") and cfg.preferences().shape == (15, 3)
    assert ExperimentConfig().preferences().shape == (11, 2)
    v = validation_preferences(3)
    np.testing.assert_allclose(v, np.concatenate([np.eye(3), np.full((1, 3), 1 / 3)]))
    for bad in ((1, 3), (3, 0)):
        with pytest.raises(ValueError):
            simplex_grid(*bad)


def test_morlhf_preferences_and_their_keys():
    # n = 2: m is mu_1, as before (the cache names and weights do not change)
    assert morlhf_preferences((0.25, 0.5, 0.75), 2) == [(0.25, 0.75), (0.5, 0.5), (0.75, 0.25)]
    # n = 3: weight m on each objective in turn, the rest shared; interior points of the simplex
    got = morlhf_preferences((0.5, 1 / 3), 3)
    assert (0.5, 0.25, 0.25) in got and (0.25, 0.25, 0.5) in got and len(got) == 4  # + the centroid once
    for mu in got:
        assert min(mu) > 0 and sum(mu) == pytest.approx(1.0)
        np.testing.assert_allclose(preference_from_key(preference_key(mu), 3), mu, atol=1e-6)
    assert preference_key([0.5, 0.5]) == "0.5" and preference_key([1.0, 0.0]) == "1.0"
    np.testing.assert_array_equal(preference_from_key("0.25", 2), [0.25, 0.75])
    with pytest.raises(ValueError, match="expected 3"):
        preference_from_key("0.5,0.5", 3)


def test_the_configuration_takes_n_3_and_refuses_one_objective():
    ExperimentConfig(task="review3").check()
    ExperimentConfig(rewards=("sentiment", "conciseness", "detail")).check()
    with pytest.raises(ValueError, match="rewards: the experiment compares methods on n >= 2"):
        ExperimentConfig(rewards=("sentiment",)).check()
    with pytest.raises(ValueError, match="unknown task"):
        ExperimentConfig(task="nope").check()
    for bad, msg in ((dict(beta_grid=(0.7, 0.4)), "beta_grid"), (dict(beta_grid=(0.7, 0.7)), "each beta once"),
                     (dict(beta_search_fraction=0.0), "beta_search_fraction"),
                     (dict(simplex_points=1), "simplex_points must be >= 2"), (dict(ablations=1), "ablations")):
        with pytest.raises(ValueError, match=msg):
            ExperimentConfig(task="review3", **bad).check()
    names = ExperimentConfig(ablations=False).methods()
    assert not any(m.ablation and m.name in names for m in METHOD_TABLE)
    assert "rewarded_soup_extrapolated" in names  # a fair baseline, not an ablation


# --------------------------------------------------------------------------- the beta search


class _FakeModels:
    """What search_beta needs of TrainedModels: ``backbones(beta=, steps=)``, recorded."""

    def __init__(self):
        self.calls = []

    def backbones(self, beta=None, steps=None):
        self.calls.append((beta, steps))
        return [Path(f"bb{j}-{beta}-{steps}") for j in range(3)]


def _stub(quality):
    """Points that scale with ``quality[beta]`` around a fixed pattern: a larger quality, a larger volume."""
    def evaluate(beta, dirs, prefs):
        assert [d.name for d in dirs] == [f"bb{j}-{beta}-{dirs[0].name.split('-')[-1]}" for j in range(3)]
        return 0.2 + quality[beta] * (0.5 * prefs + 0.3)

    return evaluate


@pytest.mark.parametrize("quality, chosen", [({0.6: 1.0, 0.7: 2.0, 0.8: 1.5}, 0.7),
                                             ({0.6: 3.0, 0.7: 2.0, 0.8: 1.0}, 0.6),
                                             ({0.6: 1.0, 0.7: 2.0, 0.8: 2.0}, 0.7)])  # a tie: the first in the grid
def test_beta_search_picks_the_largest_validation_hypervolume(quality, chosen):
    from bonesoup.eval.metrics import hypervolume

    cfg = ExperimentConfig(task="review3", beta_grid=(0.6, 0.7, 0.8), beta_search_fraction=0.3, ppo_steps=50)
    fake = _FakeModels()
    rep = search_beta(cfg, fake, Path("sft"), 0, evaluate=_stub(quality))
    assert search_steps(cfg) == 15 and fake.calls == [(b, 15) for b in (0.6, 0.7, 0.8)]
    assert rep["chosen"] == chosen and rep["steps"] == 15 and rep["resumed"] is False
    assert rep["ppo_runs"] == 9 and rep["ppo_steps"] == 9 * 15
    # every beta's hypervolume is the metric of its reported points at the ONE stated reference point
    pts = {b: np.asarray(p) for b, p in rep["points"].items()}
    ref = np.min(np.concatenate(list(pts.values())), 0) - cfg.hv_margin
    np.testing.assert_allclose(rep["reference_point"], ref, rtol=0, atol=1e-15)
    for b, p in pts.items():
        assert rep["validation_hv"][b] == pytest.approx(hypervolume(p, ref), rel=1e-12)
    assert max(rep["validation_hv"].values()) == rep["validation_hv"][str(chosen)]
    table = format_beta_search(rep)
    assert f"chosen beta = {chosen:g}" in table and table.count("| chosen |") == 1
    assert f"| {chosen:g} | {rep['validation_hv'][str(chosen)]:.4g} | chosen |" in table


def test_beta_search_refuses_an_empty_grid_and_bad_points():
    with pytest.raises(ValueError, match="beta_grid is empty"):
        search_beta(ExperimentConfig(), _FakeModels(), Path("sft"), 0, evaluate=_stub({}))
    cfg = ExperimentConfig(task="review3", beta_grid=(0.7,))
    with pytest.raises(ValueError, match="beta 0.7: the evaluator returned points of shape"):
        search_beta(cfg, _FakeModels(), Path("sft"), 0, evaluate=lambda b, d, p: np.zeros((2, 3)))


def test_accounting_counts_what_each_method_trained():
    cfg = ExperimentConfig(task="review3", ppo_steps=10, morlhf=(0.5,))
    bs = {"ppo_runs": 9, "ppo_steps": 27}
    a = {m.name: method_accounting(cfg, m.name, beta_search=bs) for m in METHOD_TABLE}
    assert a["rewarded_soup"] == {"ppo_runs": 3, "ppo_steps": 30, "value_models": 0, "forwards_per_token": None}
    assert a["bone_soup"]["ppo_runs"] == 3 + 9 and a["bone_soup"]["ppo_steps"] == 30 + 27  # the search is charged
    assert a["mage_implicit"]["ppo_runs"] == 3 + 9 + 3 and a["mage_explicit"]["value_models"] == 3
    assert a["mage_explicit_sft_base"]["ppo_runs"] == 0
    assert a["morlhf"]["ppo_runs"] == 3 + 3  # three interior oracles and the experts at the vertices
    assert a["mage_explicit_search"]["candidates"] == cfg.search_candidates


# --------------------------------------------------------------------------- n = 3 end to end

TINY3 = dict(task="review3-tiny", seeds=(0,), seed_mode="train", ppo_steps=1, ppo_batch_size=16, morlhf=(0.5,),
             value_samples=16, value_steps=1, simplex_points=3, eval_samples_per_prompt=1, val_prompts=2,
             val_samples_per_prompt=1, extrapolation_grid=(0.0, 0.3), w_implicit_grid=(0.5,),
             w_explicit_grid=(1.0,), threads=1)


def _hypervolume_by_cells(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact hypervolume by brute force: the grid of every point's coordinates, a cell counted when dominated."""
    axes = [np.unique(np.concatenate([[r], points[:, k]])) for k, r in enumerate(ref)]
    total = 0.0
    for idx in itertools.product(*[range(len(a) - 1) for a in axes]):
        upper = np.array([axes[k][i + 1] for k, i in enumerate(idx)])
        if (points >= upper).all(1).any():
            total += float(np.prod([axes[k][i + 1] - axes[k][i] for k, i in enumerate(idx)]))
    return total


def _register_tiny_review3():
    """review3 with an SFT of 30 steps (the real one trains 400: seconds the test need not spend)."""
    from bonesoup.tasks import review3
    from bonesoup.tasks.corpus_sft import build_corpus_sft
    from bonesoup.tasks.registry import EmbeddedTask, register_task, task_names

    if "review3-tiny" in task_names():
        return

    def build(out_dir, *, progress=False):
        return build_corpus_sft(out_dir, review3.task_corpus(), review3.task_corpus(), steps=30, progress=progress)

    register_task(EmbeddedTask("review3-tiny", review3.TASK_REWARDS, review3.task_prompts, build, 20, "test"))


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    _register_tiny_review3()
    out = tmp_path_factory.mktemp("exp3")
    n = torch.get_num_threads()
    try:
        res = run_experiment(ExperimentConfig(out=str(out), **TINY3), progress=False)
    finally:
        torch.set_num_threads(n)
    return out, res, json.loads((out / "results.json").read_text())


def test_a_three_objective_run_reports_3d_hypervolumes(run3):
    out, _, saved = run3
    s, seed = saved["summary"], saved["per_seed"]["0"]
    cfg = ExperimentConfig(**TINY3)
    assert cfg.rewards == ("sentiment", "conciseness", "detail")
    prefs = cfg.preferences()
    assert prefs.shape == (6, 3) and len(s["reference_point"]) == 3
    ref = np.asarray(s["reference_point"])
    for m, v in s["methods"].items():
        pts = np.asarray(list(seed["morlhf"].values()) if m == "morlhf" else seed["points"][m])
        assert pts.shape[1] == 3
        assert v["hypervolume"][0] == pytest.approx(_hypervolume_by_cells(pts, ref), rel=1e-9, abs=1e-15), m
    # MORLHF: the three interior oracles and the experts at the vertices, keyed by their preference
    keys = {tuple(preference_from_key(k, 3)) for k in seed["morlhf"]}
    assert keys == {*map(tuple, np.eye(3)), (0.5, 0.25, 0.25), (0.25, 0.5, 0.25), (0.25, 0.25, 0.5)}
    # At the vertex e_i Rewarded Soup's merge IS expert i: the same point as MORLHF's vertex
    rs = seed["points"]["rewarded_soup"]
    for i in range(3):
        row = int(np.flatnonzero((prefs == np.eye(3)[i]).all(1))[0])
        assert rs[row] == seed["morlhf"][preference_key(np.eye(3)[i])]
    assert len(saved["trained_now"]) == 3 + 3 + 3 + 3  # backbones, experts, oracles, value models
    assert (out / "pareto.png").stat().st_size > 0  # one panel per pair of objectives
    assert seed["lmc"]["path"] == "e0-e1"


def test_the_accounting_is_in_the_results(run3):
    out, _, saved = run3
    acc = saved["accounting"]
    assert list(acc) == list(ExperimentConfig(**TINY3).methods())
    assert acc["mod"]["forwards_per_token"] == 3 and acc["mage_implicit"]["forwards_per_token"] == 3
    assert acc["mage_explicit"]["forwards_per_token"] == 2 and acc["bone_soup"]["forwards_per_token"] == 1
    assert acc["rewarded_soup"]["ppo_runs"] == 3 and acc["morlhf"]["ppo_runs"] == 6
    assert "| PPO runs | PPO steps |" in (out / "results.md").read_text()


def test_the_baselines_and_ablations_decode_the_stated_models(run3, tmp_path):
    """Rewarded Soup + extrapolation, Bone Soup with mu, and MAGE's guidance on the SFT and RS bases."""
    from safetensors.torch import load_file

    from bonesoup.eval.experiment_methods import LiveModels
    from bonesoup.merge.coefficients import per_objective_extrapolation

    out, _, saved = run3
    paths = saved["models"]["0"]
    live = LiveModels(0.7, out / "sft", paths["backbones"], paths["experts"], paths["values"])
    mu = [0.2, 0.3, 0.5]
    state = lambda p: load_file(Path(p) / "model.safetensors")  # noqa: E731
    sft, exps, bbs = state(out / "sft"), [state(p) for p in paths["experts"]], [state(p) for p in paths["backbones"]]

    def assert_is(model, coeffs, inputs, what):
        got = model.state_dict()
        for key in sft:
            if sft[key].is_floating_point():
                want = sum(c * x[key].double() for c, x in zip(coeffs, inputs))
                torch.testing.assert_close(got[key].double(), want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")

    live.k_rewarded = np.array([1.25, 1.0, 1.5])
    models, coeffs = live.decode_with("rewarded_soup_extrapolated", mu)
    c, c_sft = per_objective_extrapolation(mu, live.k_rewarded, method="rewarded")
    assert coeffs == [1.0] and c_sft != 0.0
    assert_is(models[0], [*c, c_sft], [*exps, sft], "rewarded_soup_extrapolated")
    models, _ = live.decode_with("bone_soup_mu", mu)
    assert_is(models[0], mu, bbs, "bone_soup_mu")  # mu itself on the backbones, no SFT term
    for kind in ("implicit", "explicit"):
        bone = live.decode_with(f"mage_{kind}", mu, w=0.5)
        on_sft = live.decode_with(f"mage_{kind}_sft_base", mu, w=0.5)
        on_rs = live.decode_with(f"mage_{kind}_rs_base", mu, w=0.5)
        assert on_sft[0][0] is live.sft_model and on_rs[0][0] is live.rewarded.model
        assert bone[0][1:] == on_sft[0][1:] == on_rs[0][1:] and bone[1] == on_sft[1] == on_rs[1]  # same guidance
    assert_is(live.rewarded.model, mu, exps, "RS base")  # set by the last decode: the experts merged with mu
