"""``bonesoup merge --config``: mergekit YAML for the merges that are one weighted sum, and its refusals.

Expected outputs are float64 sums computed here from the input files with
mergekit's formulas (linear: sum w_i x_i / sum w_i when normalize;
task_arithmetic: base + lambda sum w_i (x_i - base), / sum w_i when normalize).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bonesoup.cli import main
from bonesoup.merge.coefficients import bone_coefficients, fold_extrapolation
from bonesoup.merge.mergekit_config import plan_from_config
from bonesoup.tasks.tiny_models import make_tiny_backbones

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(base/SFT, [a, b, c]) float32 tiny GPT-2 checkpoints; a is sharded."""
    root = tmp_path_factory.mktemp("mk")
    sft, bbs = make_tiny_backbones(root, 3, seed=31)
    return sft, bbs


def weights(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_config(tmp_path: Path, config: dict, capsys, *extra: str) -> tuple[int, Path, str]:
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    rc = main(["merge", "--config", str(path), "--out", str(out), "--no-progress", *extra])
    return rc, out, capsys.readouterr().err


def assert_sum(out: Path, terms: list[tuple[float, Path]], dtype=torch.float32) -> None:
    ins = [(c, weights(d)) for c, d in terms]
    got = weights(out)
    assert set(got) == set(ins[0][1])
    for key, g in got.items():
        xs = [(c, w[key].double()) for c, w in ins]
        ref = sum(c * x for c, x in xs)
        mag = sum(abs(c) * x.abs() for c, x in xs)
        assert g.dtype == dtype, key
        if dtype == torch.float32:
            bound = 1e-6 * mag
        else:
            fi = torch.finfo(dtype)
            _, e = torch.frexp(ref)
            bound = torch.ldexp(torch.full_like(ref, fi.eps), e - 1).clamp(min=fi.smallest_normal * fi.eps) + 1e-6 * mag
        err = (g.double() - ref).abs()
        assert (err <= bound).all(), f"{key}: max error {err.max().item():.3g}"


@pytest.mark.parametrize("normalize", [None, True, False])
def test_linear(models, tmp_path, capsys, normalize):
    sft, (a, b, c) = models
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                         {"model": str(b), "parameters": {"weight": 0.5}},
                         {"model": str(c), "parameters": {"weight": 0.5}}]}
    if normalize is not None:
        config["parameters"] = {"normalize": normalize}
    rc, out, err = run_config(tmp_path, config, capsys)
    assert rc == 0, err
    scale = 0.5 if normalize in (None, True) else 1.0  # mergekit's default for linear: normalize
    assert_sum(out, [(1.0 * scale, a), (0.5 * scale, b), (0.5 * scale, c)])
    report = json.loads((out / "bonesoup-merge.json").read_text())
    assert report["method"] == "mergekit:linear" and report["normalize"] == (normalize is not False)


@pytest.mark.parametrize("normalize", [None, True])
@pytest.mark.parametrize("base_listed", [False, True])
def test_task_arithmetic(models, tmp_path, capsys, normalize, base_listed):
    sft, (a, b, c) = models
    entries = [{"model": str(a), "parameters": {"weight": 0.7}}, {"model": str(b), "parameters": {"weight": -0.2}}]
    if base_listed:
        entries.insert(0, {"model": str(sft)})  # mergekit configs often list the base: a zero task vector
    config = {"merge_method": "task_arithmetic", "base_model": str(sft), "models": entries,
              "parameters": {"lambda": 1.5, **({"normalize": normalize} if normalize is not None else {})}}
    rc, out, err = run_config(tmp_path, config, capsys)
    assert rc == 0, err
    div = 0.5 if normalize else 1.0  # mergekit's default for task_arithmetic: no normalize
    ca, cb = 1.5 * 0.7 / div, 1.5 * -0.2 / div
    assert_sum(out, [(1 - ca - cb, sft), (ca, a), (cb, b)])


def test_bone_soup_in_mergekit_schema_equals_the_flags(models, tmp_path, capsys):
    sft, (a, b, c) = models
    config = {"merge_method": "bone_soup", "base_model": str(sft),
              "models": [{"model": str(a), "parameters": {"preference": 0.2}},
                         {"model": str(b), "parameters": {"preference": 0.3}},
                         {"model": str(c), "parameters": {"preference": 0.5}}],
              "parameters": {"beta": 0.8, "alpha": 0.3}, "out_dtype": "bfloat16"}
    rc, out, err = run_config(tmp_path, config, capsys)
    assert rc == 0, err
    coeffs, c_sft = fold_extrapolation(bone_coefficients([0.2, 0.3, 0.5], 0.8), 0.3)
    assert_sum(out, [*zip(coeffs.tolist(), (a, b, c)), (c_sft, sft)], dtype=torch.bfloat16)
    flags = tmp_path / "flags"
    assert main(["merge", str(a), str(b), str(c), "--sft", str(sft), "--preference", "0.2", "0.3", "0.5", "--beta",
                 "0.8", "--alpha", "0.3", "--dtype", "bfloat16", "--out", str(flags), "--no-progress"]) == 0
    for name in ("model.safetensors", "config.json"):
        assert (out / name).read_bytes() == (flags / name).read_bytes()


def test_tokenizer_source_and_config(models, tmp_path, capsys):
    sft, (a, b, c) = models
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(c, tok)
    (tok / "tokenizer.json").write_text((a / "tokenizer.json").read_text().replace("}", "} ", 1))
    (tok / "generation_config.json").write_text("{}")
    config = {"merge_method": "linear", "tokenizer_source": str(tok),
              "models": [{"model": str(a), "parameters": {"weight": 1}},
                         {"model": str(b), "parameters": {"weight": 1}}]}
    rc, out, err = run_config(tmp_path, config, capsys)
    assert rc == 0, err
    assert (out / "tokenizer.json").read_text() == (tok / "tokenizer.json").read_text()
    assert (out / "generation_config.json").read_text() == (a / "generation_config.json").read_text()
    assert json.loads((out / "config.json").read_text()) == json.loads((a / "config.json").read_text())


@pytest.mark.parametrize("config, message", [
    ({"merge_method": "ties", "models": [{"model": "x"}]}, "merge_method 'ties' is not supported"),
    ({"merge_method": "dare_linear", "models": [{"model": "x"}]}, "not one weighted sum"),
    ({"merge_method": "slerp", "models": [{"model": "x"}]}, "merge_method 'slerp'"),
    ({"merge_method": "frobnicate", "models": [{"model": "x"}]}, "'frobnicate' is not supported"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "x", "layer_range": [0, 4]}]}]}, "slices"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": [0.1, 0.9]}}]},
     "Per-tensor filters and gradients are not supported"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": [{"filter": "mlp", "value": 1}]}}]},
     "models[0]: parameter 'weight' must be one number"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"density": 0.5, "weight": 1}}]},
     "['density'] do not apply to merge_method 'linear'"),
    ({"merge_method": "linear", "models": [{"model": "x"}]}, "parameter 'weight' is required"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}], "tokenizer_source": "union"},
     "tokenizer_source 'union'"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}], "chat_template": "auto"},
     "unsupported key(s) ['chat_template']"),
    ({"merge_method": "task_arithmetic", "models": [{"model": "x", "parameters": {"weight": 1}}]}, "needs base_model"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}, {"model": "y", "parameters":
      {"weight": -1}}]}, "sum to 0"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}], "dtype": "float64"},
     "dtype must be one of"),
    ({"merge_method": "bone_soup", "models": [{"model": "x", "parameters": {"preference": 1.0}}]},
     "parameter 'beta' is required"),
])
def test_refusals_name_the_problem_before_reading_anything(tmp_path, capsys, config, message):
    # the model paths do not exist: the refusal must come from the config, before any checkpoint is opened
    rc, out, err = run_config(tmp_path, config, capsys)
    assert rc == 2 and err.startswith("bonesoup merge: error:") and message in err, err
    assert "merge.yaml" in err and not out.exists()


def test_config_excludes_the_flags(models, tmp_path, capsys):
    sft, (a, b, c) = models
    config = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1}}]}
    rc, out, err = run_config(tmp_path, config, capsys, "--preference", "1")
    assert rc == 2 and "drop --preference" in err


def test_malformed_yaml(tmp_path, capsys):
    (tmp_path / "merge.yaml").write_text("models: [a, b\n")
    rc = main(["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "is not valid YAML" in err and "merge.yaml" in err


def test_plan_is_pure(models):
    sft, (a, b, c) = models
    plan = plan_from_config({"merge_method": "task_arithmetic", "base_model": str(sft), "parameters": {"lambda": 2.0},
                             "models": [{"model": str(a), "parameters": {"weight": 0.25}}]})
    assert [(p, round(k, 12), r) for p, k, r in plan.inputs] == [(sft, 0.5, "base"), (a, 0.5, "model")]
    assert plan.out_dtype is None and plan.tokenizer_dir is None


def test_config_merge_never_imports_torch(models, tmp_path):
    sft, (a, b, c) = models
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "out_dtype": "bfloat16", "models": [
        {"model": str(a), "parameters": {"weight": 0.3}}, {"model": str(b), "parameters": {"weight": 0.7}}]}))
    code = ("import sys; from bonesoup.cli import main; rc = main(sys.argv[1:]); "
            "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules), 'RC', rc)")
    run = subprocess.run([sys.executable, "-c", code, "merge", "--config", str(path), "--out", str(tmp_path / "o"),
                          "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "HEAVY [] RC 0" in run.stdout, run.stdout + run.stderr
    assert_sum(tmp_path / "o", [(0.3, a), (0.7, b)], dtype=torch.bfloat16)
