"""`bonesoup experiment` end to end on a toy budget: every method evaluated, cached models reused."""

import json
import shutil

import numpy as np
import pytest
import torch

from ppo_task_fixtures import task_sft  # noqa: F401  (session fixture)

from bonesoup.cli import main
from bonesoup.eval.experiment import METHODS, ExperimentConfig, preference_grid, run_experiment, summarize

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
    return out, res


def test_every_method_is_evaluated_and_written(toy_run):
    out, res = toy_run
    assert (out / "results.json").is_file() and (out / "results.md").is_file() and (out / "pareto.png").is_file()
    saved = json.loads((out / "results.json").read_text())
    s = saved["summary"]
    methods = ExperimentConfig(**TOY).methods()
    assert set(METHODS) < set(methods) and "mage_explicit_search" in methods
    assert set(s["methods"]) == set(methods)
    for m in methods:
        hv = s["methods"][m]["hypervolume"]
        assert len(hv) == 1 and np.isfinite(hv[0]) and hv[0] >= 0
    seed = saved["per_seed"]["0"]
    for m in methods:
        if m != "morlhf":
            assert np.asarray(seed["points"][m]).shape == (3, 2)
    assert set(seed["morlhf"]) == {"0.0", "0.5", "1.0"}  # experts at the ends + the trained oracle
    # 2 backbones + 2 experts + 1 MORLHF + 2 value models, each trained once
    assert len(saved["trained_now"]) == 7
    tuned = seed["tuned"]
    assert all(a in (0.0, 0.3) for a in tuned["a"]) and tuned["w"]["explicit"] in (1.0, 2.0)
    lmc = seed["lmc"]
    assert len(lmc["merged_mse"]) == len(lmc["ensemble_mse"]) == len(lmc["t"])
    # At t = 0 and t = 1 the merge IS one value model and so is the ensemble: no gap at the ends.
    assert lmc["merged_mse"][0] == pytest.approx(lmc["ensemble_mse"][0], rel=1e-5)
    assert lmc["merged_mse"][-1] == pytest.approx(lmc["ensemble_mse"][-1], rel=1e-5)
    table = (out / "results.md").read_text()
    assert "Bone Soup" in table and "MAGE explicit" in table and "seeds won" in table


def test_summary_uses_one_reference_point_and_recomputes(toy_run):
    out, res = toy_run
    from bonesoup.eval.metrics import hypervolume

    cfg = ExperimentConfig(out=str(out), **TOY)
    per_seed = {0: res["per_seed"]["0"]}
    s = summarize(cfg, per_seed)
    ref = np.asarray(s["reference_point"])
    pts = np.concatenate([np.asarray(v) for v in per_seed[0]["points"].values()])
    assert np.all(ref < pts.min(0))  # below every evaluated point: everyone's points count
    for m in ("bone_soup", "rewarded_soup"):
        assert s["methods"][m]["hypervolume"][0] == pytest.approx(
            hypervolume(np.asarray(per_seed[0]["points"][m]), ref))
    assert preference_grid(3).tolist() == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]


def test_rerun_reuses_the_cached_models(toy_run, capsys):
    out, _ = toy_run
    flags = []
    for k, v in TOY.items():
        flag = "--" + k.replace("_", "-")
        flags += [flag, *map(str, v)] if isinstance(v, tuple) else [flag, str(v)]
    assert main(["experiment", "--out", str(out), "--no-progress", *flags]) == 0
    printed = capsys.readouterr().out
    assert "0 models trained now" in printed and "| Bone Soup |" in printed


def test_bad_configuration_is_refused(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"sedes": [1]}))
    assert main(["experiment", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path)]) == 2
    assert "unknown field 'sedes'" in capsys.readouterr().err
    assert main(["experiment", "--points", "1", "--out", str(tmp_path)]) == 2
    assert "points must be >= 2" in capsys.readouterr().err
    assert main(["experiment", "--extrapolation-grid", "1.0", "--out", str(tmp_path)]) == 2
    assert "extrapolation_grid" in capsys.readouterr().err
