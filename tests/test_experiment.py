"""`bonesoup experiment` end to end on a toy budget: invariants of what it reports, the method table, the cache."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ppo_task_fixtures import task_sft  # noqa: F401  (session fixture)

from bonesoup.cli import main
from bonesoup.eval.experiment import (LABELS, METHOD_TABLE, METHODS, ExperimentConfig, preference_grid,
                                      run_experiment, summarize)

TOY = dict(seeds=(0,), seed_mode="train", ppo_steps=2, ppo_batch_size=16, morlhf=(0.5,), value_samples=64,
           value_steps=3, points=3, eval_samples_per_prompt=1, val_prompts=4, val_samples_per_prompt=1,
           extrapolation_grid=(0.0, 0.3), w_implicit_grid=(0.5,), w_explicit_grid=(1.0, 2.0), threads=1,
           search_candidates=2, search_chunk_tokens=5)


@pytest.fixture(scope="module")
def toy_run(task_sft, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("experiment")
    shutil.copytree(task_sft, out / "sft")  # same fingerprint: build_task_sft reuses it
    n = torch.get_num_threads()
    try:
        res = run_experiment(ExperimentConfig(out=str(out), **TOY), progress=False)
    finally:
        torch.set_num_threads(n)
    return out, res, json.loads((out / "results.json").read_text())


def test_the_method_table_orders_the_results(toy_run):
    out, _, saved = toy_run
    methods = ExperimentConfig(**TOY).methods()
    # Table order: the table's rows, search only when asked for, MORLHF (points only where trained) last.
    assert methods == tuple(m.name for m in METHOD_TABLE)
    assert ExperimentConfig().methods() == METHODS and METHODS[-1] == "morlhf"
    assert list(saved["summary"]["methods"]) == list(methods)
    rows = [line.split(" | ")[0].removeprefix("| ") for line in (out / "results.md").read_text().splitlines()
            if line.startswith("| ") and "+-" in line]
    assert rows == [LABELS[m] for m in methods]
    seed = saved["per_seed"]["0"]
    assert list(seed["points"]) == [m for m in methods if m != "morlhf"]
    assert (out / "pareto.png").stat().st_size > 0
    # 2 backbones + 2 experts + 1 MORLHF + 2 value models, each trained once
    assert len(saved["trained_now"]) == 7


def test_hypervolumes_recompute_from_the_reported_points(toy_run):
    """Every method's hypervolume is the metric of its reported points at the ONE stated reference point."""
    from bonesoup.eval.metrics import controllability, hypervolume

    _, _, saved = toy_run
    s, seed = saved["summary"], saved["per_seed"]["0"]
    ref = np.asarray(s["reference_point"])
    every = np.concatenate([np.asarray(p) for p in seed["points"].values()]
                           + [np.asarray(list(seed["morlhf"].values()))])
    np.testing.assert_allclose(ref, every.min(0) - ExperimentConfig.hv_margin, rtol=0, atol=1e-12)
    prefs = preference_grid(3)
    for m, v in s["methods"].items():
        if m == "morlhf":
            pts = np.asarray(list(seed["morlhf"].values()))
            mus = np.array([[float(k), 1 - float(k)] for k in seed["morlhf"]])
        else:
            pts, mus = np.asarray(seed["points"][m]), prefs
        assert v["hypervolume"] == [pytest.approx(hypervolume(pts, ref), rel=1e-12)], m
        assert v["controllability"][0] == pytest.approx(controllability(mus, pts)["mean"], nan_ok=True), m
        np.testing.assert_allclose(v["mean_points"], pts, rtol=0, atol=0)  # one seed: the mean is the points
    # summarize() recomputes the same summary from the per-seed results alone.
    again = summarize(ExperimentConfig(**TOY), {0: seed})
    assert again["reference_point"] == s["reference_point"]
    assert {m: v["hypervolume"] for m, v in again["methods"].items()} == {m: v["hypervolume"]
                                                                          for m, v in s["methods"].items()}
    for k, c in s["comparisons"].items():
        a, b = k.split(" > ")
        d = s["methods"][a]["hypervolume"][0] - s["methods"][b]["hypervolume"][0]
        assert c["mean_difference"] == pytest.approx(d, abs=1e-15) and c["seeds_won"] == int(d > 0)


def test_the_corners_are_the_experts(toy_run):
    """At mu = e_i, Rewarded Soup's merge IS expert i (coefficients 1 and 0), so with the same prompts and
    seed it reports expert i's point exactly -- the point MORLHF's sweep uses at that end."""
    _, _, saved = toy_run
    seed = saved["per_seed"]["0"]
    rs = seed["points"]["rewarded_soup"]  # preference_grid: mu_1 = 0 first, mu_1 = 1 last
    assert rs[0] == seed["morlhf"]["0.0"] and rs[-1] == seed["morlhf"]["1.0"]


def test_validation_picks_the_best_candidate(toy_run):
    _, _, saved = toy_run
    tuned = saved["per_seed"]["0"]["tuned"]
    grid = TOY["extrapolation_grid"]
    for a, scores in zip(tuned["a"], tuned["a_scores"]):
        assert len(scores) == len(grid) and a == grid[int(np.argmax(scores))]
    for kind, scores in tuned["w_scores"].items():
        assert float(max(scores, key=scores.get)) == tuned["w"][kind]


def test_lmc_ends_are_single_models(toy_run):
    _, _, saved = toy_run
    lmc = saved["per_seed"]["0"]["lmc"]
    assert len(lmc["merged_mse"]) == len(lmc["ensemble_mse"]) == len(lmc["t"])
    # At t = 0 and t = 1 the merge IS one value model and so is the ensemble: no gap at the ends.
    assert lmc["merged_mse"][0] == pytest.approx(lmc["ensemble_mse"][0], rel=1e-5)
    assert lmc["merged_mse"][-1] == pytest.approx(lmc["ensemble_mse"][-1], rel=1e-5)


def _state(path):
    from safetensors.torch import load_file

    return load_file(Path(path) / "model.safetensors")


def test_live_models_are_the_offline_merges(toy_run, tmp_path):
    """What each method decodes with, at one preference, against the merge computed another way."""
    from bonesoup import merge_checkpoints
    from bonesoup.eval.experiment_methods import LiveModels
    from bonesoup.merge.coefficients import per_objective_extrapolation

    out, _, saved = toy_run
    paths = saved["models"]["0"]
    sft = out / "sft"
    live = LiveModels(0.7, sft, paths["backbones"], paths["experts"], paths["values"])
    mu = [0.3, 0.7]

    def assert_is(model, ref: dict, what: str):
        got = model.state_dict()
        for key, want in ref.items():
            torch.testing.assert_close(got[key], want.to(got[key].dtype), rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"{what} {key}: {m}")

    # Bone Soup == merge_checkpoints of the same backbones at mu (the offline path), tensor by tensor.
    models, coeffs = live.decode_with("bone_soup", mu)
    assert coeffs == [1.0] and models[0] is live.bone.model
    merged = merge_checkpoints(paths["backbones"], tmp_path / "bone", preference=mu, beta=0.7, progress=False)
    assert_is(models[0], _state(merged), "bone_soup")
    # Bone Soup + extrapolation: one merge with per-objective factors, checked in float64 from the files.
    live.k = np.array([1.25, 1.5])
    models, _ = live.decode_with("bone_soup_extrapolated", mu)
    c, c_sft = per_objective_extrapolation(mu, live.k, beta=0.7)
    bbs, s = [_state(p) for p in paths["backbones"]], _state(sft)
    assert_is(models[0], {k: (c[0] * bbs[0][k].double() + c[1] * bbs[1][k].double() + c_sft * s[k].double())
                          for k in s if s[k].is_floating_point()}, "bone_soup_extrapolated")
    # MAGE implicit: the Bone base, the experts merged with mu, the SFT reference; coefficients [1, w, -w].
    models, coeffs = live.decode_with("mage_implicit", mu, w=0.5)
    assert models[0] is live.bone.model and models[2] is live.sft_model and coeffs == [1.0, 0.5, -0.5]
    merged = merge_checkpoints(paths["experts"], tmp_path / "rs", preference=mu, method="rewarded", progress=False)
    assert_is(models[1], _state(merged), "mage_implicit guide")
    # MOD: the n experts' logits mixed with mu itself.
    models, coeffs = live.decode_with("mod", mu)
    assert models == live.experts and coeffs == mu
    with pytest.raises(ValueError, match="morlhf is trained per preference"):
        live.decode_with("morlhf", mu)
    with pytest.raises(ValueError, match="experiment method must be one of"):
        live.decode_with("bone", mu)


def test_rerun_reuses_the_cached_models(toy_run, capsys):
    out, _, _ = toy_run
    flags = []
    for k, v in TOY.items():
        flag = "--" + k.replace("_", "-")
        flags += [flag, *map(str, v)] if isinstance(v, tuple) else [flag, str(v)]
    assert main(["experiment", "--out", str(out), "--no-progress", *flags]) == 0
    printed = capsys.readouterr().out
    assert "0 models trained now" in printed and "| Bone Soup |" in printed


@pytest.mark.parametrize("argv, message", [
    (["--points", "1"], "points must be >= 2"),
    (["--extrapolation-grid", "1.0"], "extrapolation_grid"),
    (["--extrapolation-grid"], "extrapolation_grid must hold at least one"),
    (["--w-explicit-grid"], "w_explicit_grid must hold at least one"),
    (["--rewards", "sentiment"], "rewards: the experiment compares methods on n >= 2"),
    (["--rewards", "sentiment", "sentiment"], "rewards: each objective once"),
    (["--rewards", "sentiment", "nonsense"], "rewards[1]: unknown reward 'nonsense'"),
    (["--ppo-steps", "0"], "ppo_steps must be a positive integer"),
    (["--value-samples", "-1"], "value_samples must be a positive integer"),
    (["--val-prompts", "100000"], "val_prompts must be at most"),
    (["--seeds"], "seeds must hold at least one seed"),
    (["--seeds", "1", "1"], "seeds must be distinct"),
    (["--beta", "0.4"], "beta must lie strictly between 0.5 and 1"),
    (["--morlhf", "1.0"], "morlhf: mu_1 = 1.0 outside (0, 1)"),
    (["--temperature", "0"], "temperature must be a finite number > 0"),
])
def test_bad_configuration_is_refused_before_any_training(tmp_path, capsys, argv, message):
    out = tmp_path / "exp"
    assert main(["experiment", "--out", str(out), "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # refused before the SFT model or any directory was made


def test_unknown_config_field_is_refused(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"sedes": [1]}))
    assert main(["experiment", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "o")]) == 2
    assert "unknown field 'sedes'" in capsys.readouterr().err
