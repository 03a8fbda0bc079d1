"""bonesoup extract-lora: truncated SVD of each linear layer's delta, written as a peft adapter."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from bonesoup.cli import main
from bonesoup.merge.extract import EXTRACT_REPORT_NAME, extract_lora, linear_layers
from bonesoup.merge.lora import load_adapter

peft = pytest.importorskip("peft")


def _gpt2(tie=True):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=61, n_positions=32,
                                      tie_word_embeddings=tie)).eval()


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=61,
                                        max_position_embeddings=32)).eval()


def _linear_keys(model) -> list[str]:
    layers, _, _ = linear_layers(model.config.to_dict())
    return sorted(layers)


def _save_pair(tmp_path, model, delta_fn, *, dense=None):
    """SFT = ``model``; backbone = SFT + delta_fn(key, weight) on the linear weights (+ ``dense`` key -> delta)."""
    sft, bb = tmp_path / "sft", tmp_path / "bb"
    model.save_pretrained(sft)
    tuned = copy.deepcopy(model)
    state = tuned.state_dict()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for key in _linear_keys(model):
            state[key] += delta_fn(key, state[key], g)
        for key, d in (dense or {}).items():
            state[key] += d
    tuned.save_pretrained(bb)
    return sft, bb


def _random_delta(key, w, g):
    return 0.05 * torch.randn(w.shape, generator=g)


def test_error_decreases_with_rank_matches_the_optimum_and_vanishes_at_full_rank(tmp_path):
    model = _gpt2()
    sft, bb = _save_pair(tmp_path, model, _random_delta)
    reports = {r: extract_lora(bb, sft, r, progress=False).report for r in (1, 4, 16, 32)}
    deltas = {}
    for key in _linear_keys(model):  # Conv1D layers: [in, out] on disk, [out, in] for the LoRA
        d = (model.state_dict()[key].double() - GPT2LMHeadModel.from_pretrained(bb).state_dict()[key].double()).T
        deltas[key.removesuffix(".weight")] = torch.linalg.svdvals(d)
    previous = None
    for r, rep in reports.items():
        assert rep["rank"] == r and rep["dense_drifted"] == 0
        assert {row["module"] for row in rep["layers"]} == set(deltas)
        for row in rep["layers"]:
            s = deltas[row["module"]]
            optimum = float(s[min(r, len(s)):].square().sum().sqrt() / s.square().sum().sqrt())
            assert row["rel_error"] == pytest.approx(optimum, abs=2e-6), (r, row["module"])  # fp32 factors
        if previous is not None:
            assert rep["overall_rel_error"] < previous
        previous = rep["overall_rel_error"]
    assert reports[1]["overall_rel_error"] > 0.5  # random deltas are far from rank 1
    assert reports[32]["overall_rel_error"] < 1e-6  # 32 = the layers' smaller side: exact up to fp32 rounding
    assert reports[32]["overall_rel_error_all"] == pytest.approx(reports[32]["overall_rel_error"])


@pytest.mark.parametrize("svd", ["full", "lowrank"])
def test_a_true_low_rank_delta_comes_back_exactly_and_loads_in_peft(tmp_path, svd):
    model = _llama()

    def low_rank(key, w, g):
        return 0.1 * torch.randn(w.shape[0], 3, generator=g) @ torch.randn(3, w.shape[1], generator=g)

    sft, bb = _save_pair(tmp_path, model, low_rank)
    out = tmp_path / "adapter"
    rep = extract_lora(bb, sft, 3, out, svd=svd, progress=False).report
    assert rep["overall_rel_error"] < 1e-5
    assert json.loads((out / EXTRACT_REPORT_NAME).read_text())["rank"] == 3
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 3 and cfg["fan_in_fan_out"] is False
    # Llama does not tie its head: lm_head is an nn.Linear like the others, extracted too.
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj",
                                             "up_proj", "v_proj"]
    tuned = LlamaForCausalLM.from_pretrained(bb).state_dict()
    # peft loads it as it is; merged, it is the backbone.
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(model), out).merge_and_unload().state_dict()
    for key, w in merged.items():
        torch.testing.assert_close(w, tuned[key], rtol=0, atol=1e-5, msg=key)
    # bonesoup.lora reads the same deltas.
    for key, d in load_adapter(out).weight_deltas().items():
        torch.testing.assert_close(d, tuned[key].double() - model.state_dict()[key].double(), rtol=0, atol=1e-5)


def test_dense_drift_is_refused_naming_it_and_reported_when_allowed(tmp_path):
    model = _gpt2()
    ln = model.state_dict()["transformer.h.1.ln_2.weight"]
    sft, bb = _save_pair(tmp_path, model, _random_delta, dense={"transformer.h.1.ln_2.weight": 0.01 * ln,
                                                               "transformer.wte.weight": torch.zeros(61, 32)})
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.ln_2\.weight \(LayerNorm\.weight\).*allow-dense-drift"):
        extract_lora(bb, sft, 4, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    rep = extract_lora(bb, sft, 4, progress=False, allow_dense_drift=True).report
    drifted = {d["key"]: d for d in rep["dense"] if d["rel_change"] > rep["dense_tolerance"]}
    assert list(drifted) == ["transformer.h.1.ln_2.weight"]
    assert drifted["transformer.h.1.ln_2.weight"]["rel_change"] == pytest.approx(0.01, rel=1e-4)
    assert rep["overall_rel_error_all"] > rep["overall_rel_error"]
    # The tied lm_head is the embedding: not a linear layer to extract, its drift would be dense drift.
    assert "lm_head.weight" not in {row["module"] + ".weight" for row in rep["layers"]}
    assert {d["key"]: d["kind"] for d in rep["dense"]}["transformer.wte.weight"] == "Embedding.weight"
    # A loose enough tolerance accepts it.
    assert extract_lora(bb, sft, 4, progress=False, dense_tolerance=0.02).report["dense_drifted"] == 0


def test_untied_head_mixes_layer_kinds_and_can_be_excluded(tmp_path):
    model = _gpt2(tie=False)
    sft, bb = _save_pair(tmp_path, model, _random_delta)
    with pytest.raises(ValueError, match="mixes Conv1D layers.*--exclude-modules"):
        extract_lora(bb, sft, 4, progress=False)
    with pytest.raises(ValueError, match=r"lm_head\.weight \(Linear\.weight\)"):  # its delta is dense drift now
        extract_lora(bb, sft, 4, progress=False, exclude_modules=["lm_head"])
    rep = extract_lora(bb, sft, 4, progress=False, exclude_modules=["lm_head"], allow_dense_drift=True).report
    assert {d["key"] for d in rep["dense"] if d["rel_change"] > 0} == {"lm_head.weight"}
    with pytest.raises(ValueError, match=r"exclude_modules \['lm_haed'\] match no linear module"):
        extract_lora(bb, sft, 4, progress=False, exclude_modules=["lm_head", "lm_haed"])


def test_cli_prints_the_table_writes_atomically_and_names_bad_inputs(tmp_path, capsys):
    model = _gpt2()
    sft, bb = _save_pair(tmp_path, model, _random_delta)
    out = tmp_path / "a"
    assert main(["extract-lora", str(bb), "--sft", str(sft), "--rank", "2", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "transformer.h.0.attn.c_attn | 96 x 32 | 2 |" in text and "overall (linear layers)" in text
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     EXTRACT_REPORT_NAME]
    assert load_adapter(out).rank == 2
    assert main(["extract-lora", str(bb), "--sft", str(sft), "--rank", "2", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["extract-lora", str(bb), "--sft", str(sft), "--rank", "0", "--out", str(tmp_path / "b")]) == 2
    assert "rank must be a positive integer" in capsys.readouterr().err
    other = tmp_path / "other"
    _llama().save_pretrained(other)
    assert main(["extract-lora", str(other), "--sft", str(sft), "--rank", "2", "--out", str(tmp_path / "c")]) == 2
    assert "config mismatch" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
