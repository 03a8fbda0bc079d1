"""LoRA out of PPO: `bonesoup train --lora-rank` writes a peft adapter; the experiment runs on adapter backbones."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft", reason="LoRA is the optional peft extra")
from ppo_task_fixtures import task_sft  # noqa: E402,F401  (session fixture)

from bonesoup.cli import main  # noqa: E402

FAST = ["--batch-size", "8", "--mini-batch-size", "8", "--epochs", "1", "--max-new-tokens", "6", "--no-progress",
        "--lr", "3e-3", "--threads", "1"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.double()


def _ids(n=3, length=7, vocab=50):
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(5))


def test_train_lora_writes_a_peft_adapter(task_sft, tmp_path, capsys):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bonesoup.lora import load_adapter
    from bonesoup.train.ppo.checkpoint_training import load_policy

    out = tmp_path / "expert-0"
    assert main(["train", "--sft", str(task_sft), "--expert", "0", "--steps", "2", "--lora-rank", "4",
                 "--out", str(out), *FAST]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    # peft's layout only: no full checkpoint (transformers would load base + adapter from a mixed directory).
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert not (out / "merged").exists()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(task_sft.absolute()) and cfg["r"] == 4
    meta = json.loads((out / "bonesoup-train.json").read_text())
    assert meta["lora_rank"] == 4 and meta["format"] == "peft-adapter" and meta["merged"] is None
    adapter = load_adapter(out)
    assert adapter.rank == 4 and adapter.base == str(task_sft.absolute())
    assert any(float(m.B.abs().max()) > 0 for m in adapter.modules.values())  # trained: B left its zero init
    # peft loads it on the SFT model; our loader merges it into the SFT weights: the same function.
    sft = AutoModelForCausalLM.from_pretrained(task_sft).eval()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(sft), out).eval()
    ours, tok = load_policy(out)
    assert tok.eos_token_id is not None
    ids = _ids()
    torch.testing.assert_close(_logits(ours, ids), _logits(peft_model, ids), rtol=1e-5, atol=1e-5)
    assert float((_logits(ours, ids) - _logits(sft, ids)).abs().max()) > 1e-6  # the adapter changed something


def test_train_all_lora_save_merged_and_eval(task_sft, tmp_path, capsys):  # noqa: F811
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root = tmp_path / "all"
    assert main(["train-all", "--sft", str(task_sft), "--beta", "0.7", "--steps", "1", "--lora-rank", "2",
                 "--save-merged", "--eval", "--eval-samples", "1", "--out", str(root), *FAST]) == 0
    capsys.readouterr()
    summary = json.loads((root / "train-all.json").read_text())
    assert summary["lora_rank"] == 2 and set(summary["eval"]) == {"sft", "backbone-0", "backbone-1"}
    assert "kl" in summary["eval"]["backbone-0"]  # evaluated from the adapter directory, against the SFT
    sft = AutoModelForCausalLM.from_pretrained(task_sft).eval()
    sft_keys = set(load_file(task_sft / "model.safetensors"))
    for j in range(2):
        d = root / f"backbone-{j}"
        assert (d / "adapter_config.json").is_file()
        assert json.loads((d / "bonesoup-train.json").read_text())["merged"] == "merged"
        merged = load_file(d / "merged" / "model.safetensors")
        assert set(merged) == sft_keys  # the SFT model's keys: no lora_ / base_layer names
        want = PeftModel.from_pretrained(copy.deepcopy(sft), d).merge_and_unload().state_dict()
        for k, v in merged.items():
            torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6, msg=lambda m: f"{d} {k}: {m}")
        AutoModelForCausalLM.from_pretrained(d / "merged")


def test_save_merged_needs_lora(task_sft, tmp_path, capsys):  # noqa: F811
    assert main(["train", "--sft", str(task_sft), "--expert", "0", "--steps", "1", "--save-merged",
                 "--out", str(tmp_path / "x"), *FAST]) == 2
    assert "--save-merged applies to --lora-rank" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_experiment_on_lora_backbones(task_sft, tmp_path):  # noqa: F811
    """A toy run end to end with lora_rank; then what each method decodes with against full-weight merges of the
    same adapters (each adapter merged into the SFT weights, then the usual weighted sum)."""
    from bonesoup.eval.experiment import ExperimentConfig, run_experiment
    from bonesoup.eval.experiment_methods import LiveModels
    from bonesoup.merge.coefficients import merge_coefficients, per_objective_extrapolation
    from bonesoup.train.ppo.checkpoint_training import load_policy

    out = tmp_path / "exp"
    shutil.copytree(task_sft, out / "sft")  # same fingerprint: build_task_sft reuses it
    cfg = ExperimentConfig(out=str(out), seeds=(0,), ppo_steps=1, ppo_batch_size=16, ppo_lr=3e-3, morlhf=(0.5,),
                           value_samples=32, value_steps=2, points=3, eval_samples_per_prompt=1, val_prompts=2,
                           val_samples_per_prompt=1, extrapolation_grid=(0.0, 0.3), w_implicit_grid=(0.5,),
                           w_explicit_grid=(1.0,), max_new_tokens=6, threads=1, lora_rank=4)
    n = torch.get_num_threads()
    try:
        res = run_experiment(cfg, progress=False)
    finally:
        torch.set_num_threads(n)
    summary = res["summary"]["methods"]
    assert set(summary) == set(cfg.methods())
    assert all(np.isfinite(s["hv_mean"]) for s in summary.values())
    paths = res["models"]["0"]
    trained = [Path(p) for p in (*paths["backbones"], *paths["experts"], *paths["morlhf"].values())]
    assert len(trained) == 5
    for p in trained:
        assert "-lora4-" in p.name and (p / "adapter_config.json").is_file() and not (p / "config.json").exists()

    live = LiveModels(0.7, out / "sft", paths["backbones"], paths["experts"], paths["values"])
    assert live.lora_backbones and live.lora_experts
    sft = {k: v.double() for k, v in load_policy(out / "sft")[0].state_dict().items()}
    full = {g: [{k: v.double() for k, v in load_policy(p)[0].state_dict().items()} for p in paths[g]]
            for g in ("backbones", "experts")}
    mu, ids = [0.3, 0.7], _ids()

    def merged_model(group, c, c_sft):
        m = load_policy(out / "sft")[0]
        m.load_state_dict({k: sum(cj * f[k] for cj, f in zip(c, full[group])) + c_sft * sft[k] for k in sft})
        return m

    def assert_same(model, ref, what):
        torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{what}: {m}")

    models, coeffs = live.decode_with("bone_soup", mu)
    assert coeffs == [1.0] and models[0] is live.bone.model
    assert_same(models[0], merged_model("backbones", *merge_coefficients(mu, method="bone", beta=0.7, n=2)), "bone")
    models, _ = live.decode_with("rewarded_soup", mu)
    assert_same(models[0], merged_model("experts", mu, 0.0), "rewarded")
    live.k = np.array([1.25, 1.5])
    models, _ = live.decode_with("bone_soup_extrapolated", mu)
    assert_same(models[0], merged_model("backbones", *per_objective_extrapolation(mu, live.k, beta=0.7)), "extrap.")
    # MAGE implicit: Bone base, the experts' mixture at mu, the SFT itself as the reference.
    models, coeffs = live.decode_with("mage_implicit", mu, w=0.5)
    assert models[0] is live.bone.model and models[2] is live.sft_model and coeffs == [1.0, 0.5, -0.5]
    assert_same(models[1], merged_model("experts", mu, 0.0), "mage implicit guide")
    assert_same(models[2], merged_model("experts", [0.0, 0.0], 1.0), "mage implicit reference")
    models, coeffs = live.decode_with("mod", mu)
    assert coeffs == mu
    for i in range(2):
        assert_same(models[i], merged_model("experts", np.eye(2)[i], 0.0), f"mod expert {i}")


def _tiny_adapter(tmp_path, base_dir=None):
    """A random rank-2 peft adapter on a tiny GPT-2 (saved under tmp_path/base unless base_dir is given)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=16))
    if base_dir is None:
        base_dir = tmp_path / "base"
        base.save_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, task_type="CAUSAL_LM"))
    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = str(base_dir)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", base_dir


def test_load_policy_refuses_an_adapter_without_its_base(tmp_path):
    from bonesoup.train.ppo.checkpoint_training import load_policy

    adapter, _ = _tiny_adapter(tmp_path, base_dir=tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json: its base .*gone.* is not a checkpoint"):
        load_policy(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no base_model_name_or_path"):
        load_policy(adapter)
    with pytest.raises(FileNotFoundError, match="nor a peft adapter"):
        load_policy(tmp_path)


def test_merged_weights_is_base_plus_delta_and_names_mismatches(tmp_path):
    from transformers import AutoModelForCausalLM

    from bonesoup.lora import load_adapter, merged_weights

    adapter_dir, base_dir = _tiny_adapter(tmp_path)
    adapter = load_adapter(adapter_dir)
    for m in adapter.modules.values():  # peft starts B at zero: give the delta something to show
        m.B = torch.randn(m.B.shape, generator=torch.Generator().manual_seed(3))
    state = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    got = merged_weights(adapter, state)
    assert set(got) == {f"{name}.weight" for name in adapter.modules}
    for name, w in got.items():
        want = state[name].double() + adapter.weight_deltas()[name]
        assert w.dtype == state[name].dtype and w.data_ptr() != state[name].data_ptr()
        torch.testing.assert_close(w.double(), want, rtol=0, atol=1e-6)
    bad = dict(state)
    key = next(iter(got))
    bad[key] = bad[key][:, :-1]
    with pytest.raises(ValueError, match=f"{key!r} has shape"):
        merged_weights(adapter, bad)
    del bad[key]
    with pytest.raises(ValueError, match="which the base model does not have"):
        merged_weights(adapter, bad)
