"""``bonesoup merge`` with LoRA adapter directories: full checkpoint, --as-adapter, mergekit entries, refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

import soupkernels as sk
from bonesoup.cli import main
from bonesoup.merge.coefficients import merge_coefficients
from bonesoup.merge.lora import load_adapter, mixture_adapter

peft = pytest.importorskip("peft")

BETA = 0.7


def _gpt2(width=32):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=2, n_head=2, vocab_size=61, n_positions=32)).eval()


def _adapter(base, d: Path, sft_dir: Path, r: int, seed: int) -> Path:
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=2 * r, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    model.save_pretrained(d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(sft_dir)  # as `bonesoup train --lora-rank` writes it
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = _gpt2()
    sft = root / "sft"
    base.save_pretrained(sft, max_shard_size="40KB")  # sharded: the output must mirror this layout
    dirs = [_adapter(base, root / f"a{j}", sft, r, 3 + j) for j, r in enumerate((4, 2))]
    fulls = []
    for d in dirs:  # the backbones as full checkpoints: peft merges each adapter into the SFT model
        merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), d).merge_and_unload()
        fulls.append({k: v.detach().clone() for k, v in merged.state_dict().items()})
    return base, sft, dirs, fulls


def weights(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _close_to(got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, key: str) -> None:
    tol = 4 * torch.finfo(torch.float32).eps * (exact.abs().max() + 1)
    assert (got.double() - ref.double()).abs().max() <= tol, key
    assert (got.double() - exact).abs().max() <= tol, key


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_merge_of_adapter_dirs_equals_sk_merge_of_the_full_backbones(setup, tmp_path, capsys, alpha):
    base, sft, dirs, fulls = setup
    out = tmp_path / "merged"
    mu = [0.3, 0.7]
    rc = main(["merge", *map(str, dirs), "--sft", str(sft), "--out", str(out), "--preference", *map(str, mu),
               "--beta", str(BETA), "--alpha", str(alpha), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    c, c_sft = merge_coefficients(mu, method="bone", beta=BETA, alpha=alpha)
    assert [a["coefficient"] for a in report["adapters"]] == pytest.approx(list(c))
    # The SFT's layout, side files and keys (GPT-2 files hold no tied lm_head).
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in sft.glob("*.safetensors"))
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    got, sft_w = weights(out), base.state_dict()
    assert set(got) == set(weights(sft))
    for key, w in got.items():
        ref = sk.merge([f[key] for f in fulls] + [sft_w[key]], [*c, c_sft])
        exact = sum(cj * f[key].double() for cj, f in zip(c, fulls)) + c_sft * sft_w[key].double()
        _close_to(w, ref, exact, key)


def test_as_adapter_equals_mixture_adapter_and_loads_in_peft(setup, tmp_path, capsys):
    base, sft, dirs, fulls = setup
    out = tmp_path / "mix"
    mu = [0.8, 0.2]
    rc = main(["merge", *map(str, dirs), "--sft", str(sft), "--out", str(out), "--preference", *map(str, mu),
               "--beta", str(BETA), "--as-adapter"])
    assert rc == 0, capsys.readouterr().err
    provenance = json.loads(capsys.readouterr().out)
    assert provenance["method"] == "bone" and provenance["preference"] == mu
    c, c_sft = merge_coefficients(mu, method="bone", beta=BETA)
    ours, ref = load_adapter(out), mixture_adapter(dirs, c)
    assert ours.rank == 6 and set(ours.modules) == set(ref.modules)
    for name, m in ref.modules.items():
        assert torch.equal(ours.modules[name].A, m.A) and torch.equal(ours.modules[name].B, m.B), name
    assert ours.base == str(sft.absolute())
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).merge_and_unload().state_dict()
    sft_w = base.state_dict()
    for key, w in merged.items():
        exact = sum(cj * f[key].double() for cj, f in zip(c, fulls)) + c_sft * sft_w[key].double()
        _close_to(w, sk.merge([f[key] for f in fulls] + [sft_w[key]], [*c, c_sft]), exact, key)


def _run_yaml(tmp_path, config: dict, capsys) -> tuple[int, Path, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    rc = main(["merge", "--config", str(path), "--out", str(out), "--no-progress"])
    return rc, out, capsys.readouterr().err


def test_mergekit_yaml_with_adapter_entries(setup, tmp_path, capsys):
    base, sft, dirs, fulls = setup
    sft_w = base.state_dict()
    # linear: mergekit's "base+lora" spelling and a plain adapter directory (its recorded base), weights normalised.
    rc, out, err = _run_yaml(tmp_path / "lin", {"merge_method": "linear", "models": [
        {"model": f"{sft}+{dirs[0]}", "parameters": {"weight": 1.0}},
        {"model": str(dirs[1]), "parameters": {"weight": 3.0}}]}, capsys)
    assert rc == 0, err
    for key, w in weights(out).items():
        exact = 0.25 * fulls[0][key].double() + 0.75 * fulls[1][key].double()
        _close_to(w, sk.merge([fulls[0][key], fulls[1][key]], [0.25, 0.75]), exact, key)
    # task_arithmetic: base + lambda * sum_i w_i (x_i - base), one full model and one adapter on the same base.
    full_dir = tmp_path / "full1"
    m = copy.deepcopy(base)
    m.load_state_dict(fulls[1])
    m.save_pretrained(full_dir)
    rc, out, err = _run_yaml(tmp_path / "ta", {"merge_method": "task_arithmetic", "base_model": str(sft),
                                               "parameters": {"lambda": 0.5}, "models": [
        {"model": f"{sft}+{dirs[0]}", "parameters": {"weight": 1.0}},
        {"model": str(full_dir), "parameters": {"weight": -0.4}}]}, capsys)
    assert rc == 0, err
    report = json.loads((out / "bonesoup-merge.json").read_text())
    assert [i["role"] for i in report["inputs"]] == ["base", "model"]  # the SFT read once: base + adapter base
    for key, w in weights(out).items():
        s = sft_w[key].double()
        exact = s + 0.5 * (fulls[0][key].double() - s) - 0.2 * (fulls[1][key].double() - s)
        _close_to(w, sk.merge([sft_w[key], fulls[0][key], fulls[1][key]], [0.7, 0.5, -0.2]), exact, key)
    # bone_soup in mergekit's schema: plain adapter directories as the backbones, the SFT named once.
    rc, out, err = _run_yaml(tmp_path / "bone", {"merge_method": "bone_soup", "sft": str(sft),
                                                 "parameters": {"beta": BETA, "alpha": 0.2}, "models": [
        {"model": str(d), "parameters": {"preference": m}} for d, m in zip(dirs, (0.4, 0.6))]}, capsys)
    assert rc == 0, err
    report = json.loads((out / "bonesoup-merge.json").read_text())
    assert len(report["inputs"]) == 1 and report["inputs"][0]["coefficient"] == pytest.approx(1.0)
    c, c_sft = merge_coefficients([0.4, 0.6], method="bone", beta=BETA, alpha=0.2)
    for key, w in weights(out).items():
        exact = sum(cj * f[key].double() for cj, f in zip(c, fulls)) + c_sft * sft_w[key].double()
        _close_to(w, sk.merge([f[key] for f in fulls] + [sft_w[key]], [*c, c_sft]), exact, key)


def test_bad_inputs_are_named(setup, tmp_path, capsys):
    base, sft, dirs, fulls = setup
    common = ["--preference", "0.5", "0.5", "--beta", str(BETA), "--no-progress"]

    def err_of(*argv) -> str:
        assert main(["merge", *map(str, argv), *common]) == 2
        return capsys.readouterr().err

    other = tmp_path / "other-sft"
    base.save_pretrained(other)
    assert "not on the SFT model" in err_of(*dirs, "--sft", other, "--out", tmp_path / "o1")
    assert "--sft is required" in err_of(*dirs, "--out", tmp_path / "o2")
    e = err_of(dirs[0], sft, "--sft", sft, "--out", tmp_path / "o3")
    assert "mix LoRA adapters" in e and str(dirs[0]) in e and str(sft) in e
    assert "--as-adapter needs adapter directories" in err_of(sft, sft, "--out", tmp_path / "o4", "--as-adapter")
    assert "preference has 2 entries but 1 adapters" in err_of(dirs[0], "--sft", sft, "--out", tmp_path / "o5")
    # An adapter recording this SFT but made for a wider model: the shape is named with the SFT file.
    wide = _adapter(_gpt2(width=48), tmp_path / "wide", sft, 2, 9)
    e = err_of(wide, wide, "--sft", sft, "--out", tmp_path / "o6")
    assert "transformer.h.0.attn.c_attn.weight" in e and "shape" in e
    assert "maps 48" in err_of(dirs[0], wide, "--sft", sft, "--out", tmp_path / "o7")  # the adapters disagree
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))
    # mergekit: a model+LoRA whose second half is no adapter; a LoRA as base_model.
    rc, _, e = _run_yaml(tmp_path / "y1", {"merge_method": "linear", "models": [
        {"model": f"{sft}+{sft}", "parameters": {"weight": 1.0}}]}, capsys)
    assert rc == 2 and "holds no adapter_config.json" in e
    rc, _, e = _run_yaml(tmp_path / "y2", {"merge_method": "task_arithmetic", "base_model": f"{sft}+{dirs[0]}",
                                           "models": [{"model": str(sft), "parameters": {"weight": 1.0}}]}, capsys)
    assert rc == 2 and "supported in 'models' only" in e
