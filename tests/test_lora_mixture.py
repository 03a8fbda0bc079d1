"""LoRA backbones: the mixture adapter (exact, peft format) and AdapterSoup's per-row preferences."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import soupkernels as sk  # noqa: E402
from bonesoup import guided_generate, merge_coefficients  # noqa: E402
from bonesoup.lora import AdapterSoup, load_adapter, load_adapters, mixture_adapter  # noqa: E402

BETA = 0.7


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=61, n_positions=48, bos_token_id=0, eos_token_id=0,
                     pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=61, max_position_embeddings=48, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _save_adapters(base, tmp_path, ranks, target_modules=None, seed=1, alpha=None, rslora=False):
    """n peft adapters on ``base`` with random (non-zero) A and B, saved as peft writes them."""
    dirs = []
    for j, r in enumerate(ranks):
        cfg = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=target_modules,
                         use_rslora=rslora, task_type="CAUSAL_LM")
        model = get_peft_model(copy.deepcopy(base), cfg)
        g = torch.Generator().manual_seed(seed + 17 * j)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.3
        d = tmp_path / f"adapter{j}"
        model.save_pretrained(d)
        dirs.append(d)
    return dirs


def _full_backbone(base, adapter_dir):
    """The backbone as a full checkpoint: peft merges the adapter into a copy of the base."""
    merged = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("make, targets", [(_gpt2, None), (_llama, ["q_proj", "v_proj", "down_proj"])])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_mixture_adapter_equals_the_full_weight_merge(tmp_path, make, targets, alpha):
    base = make()
    dirs = _save_adapters(base, tmp_path, [4, 2], targets)
    mu = [0.3, 0.7]
    c, c_sft = merge_coefficients(mu, method="bone", beta=BETA, alpha=alpha)
    out = tmp_path / "mix"
    mix = mixture_adapter(dirs, c, out)
    assert mix.rank == 6 and load_adapter(out).rank == 6
    # peft loads it as it is, and its merged weights are sk.merge of the full backbones (+ SFT).
    merged = PeftModel.from_pretrained(copy.deepcopy(base), out).merge_and_unload().state_dict()
    fulls = [_full_backbone(base, d) for d in dirs]
    sft = base.state_dict()
    for key, w in merged.items():
        ref = sk.merge([f[key] for f in fulls] + [sft[key]], [*c, c_sft])
        exact = sum(cj * f[key].double() for cj, f in zip(c, fulls)) + c_sft * sft[key].double()
        tol = 4 * torch.finfo(torch.float32).eps * (exact.abs().max() + 1)
        assert (w.double() - ref.double()).abs().max() <= tol, key
        assert (w.double() - exact).abs().max() <= tol, key


def test_mixture_matches_peft_cat_combination(tmp_path):
    """peft's add_weighted_adapter(combination_type="cat") is the peer: the same delta."""
    base = _gpt2()
    dirs = _save_adapters(base, tmp_path, [3, 5])
    c = [1.6, -0.6]
    ours = mixture_adapter(dirs, c).weight_deltas()
    peer = PeftModel.from_pretrained(copy.deepcopy(base), dirs[0], adapter_name="a0")
    peer.load_adapter(dirs[1], adapter_name="a1")
    peer.add_weighted_adapter(["a0", "a1"], c, "mix", combination_type="cat")
    for name, module in peer.named_modules():
        if hasattr(module, "get_delta_weight") and "mix" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.") + ".weight"
            torch.testing.assert_close(module.get_delta_weight("mix").double(), ours[key], rtol=1e-5, atol=1e-6)


def test_scaling_rules_rank_pattern_and_rslora(tmp_path):
    base = _llama()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 2},
                     alpha_pattern={"o_proj": 6}, task_type="CAUSAL_LM")
    m = get_peft_model(copy.deepcopy(base), cfg)
    for name, p in m.named_parameters():
        if "lora_" in name:
            p.data.normal_()
    m.save_pretrained(tmp_path / "a")
    a = load_adapter(tmp_path / "a")
    q = a.modules["model.layers.0.self_attn.q_proj"]
    o = a.modules["model.layers.0.self_attn.o_proj"]
    assert (q.rank, q.scaling, o.rank, o.scaling) == (4, 2.0, 2, 3.0)
    r = _save_adapters(base, tmp_path / "rs", [4], ["q_proj"], rslora=True, alpha=6)[0]
    assert load_adapter(r).modules["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(6 / 2)
    # Mixed ranks per module come out as a rank_pattern that peft reads back.
    mix_dir = tmp_path / "mix"
    mixture_adapter([tmp_path / "a", tmp_path / "a"], [0.5, 0.5], mix_dir)
    written = json.loads((mix_dir / "adapter_config.json").read_text())
    assert written["r"] == 8 and written["rank_pattern"] == {f"model.layers.{i}.self_attn.o_proj": 4 for i in (0, 1)}
    merged = PeftModel.from_pretrained(copy.deepcopy(base), mix_dir).merge_and_unload().state_dict()
    one = _full_backbone(base, tmp_path / "a")
    for key in merged:  # 0.5 a + 0.5 a = a
        torch.testing.assert_close(merged[key], one[key], rtol=1e-5, atol=1e-6)


def test_incompatible_adapters_are_refused_naming_them(tmp_path):
    base = _llama()
    a = _save_adapters(base, tmp_path / "a", [2], ["q_proj"])[0]
    b = _save_adapters(base, tmp_path / "b", [2], ["v_proj"])[0]
    with pytest.raises(ValueError, match="adapt different modules"):
        load_adapters([a, b])
    other = _save_adapters(LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                                        num_attention_heads=2, vocab_size=61)),
                           tmp_path / "c", [2], ["q_proj"])[0]
    with pytest.raises(ValueError, match="features"):
        load_adapters([a, other])
    for d, base_name in ((a, "/models/sft-a"), (other, "/models/sft-b")):
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base_name
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="share one base"):
        load_adapters([a, other])
    with pytest.raises(ValueError, match="not on the SFT model"):
        load_adapters([a], sft="/models/elsewhere")
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["lm_head"]
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="modules_to_save"):
        load_adapter(a)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tmp_path)


def _merged_model(base, dirs, c):
    """The full-weight merge at coefficients c (sum c + c_sft = 1) as a model: the exact reference."""
    model = copy.deepcopy(base)
    state = model.state_dict()
    deltas = [load_adapter(d).weight_deltas() for d in dirs]
    with torch.no_grad():
        for key in deltas[0]:
            state[key].copy_((state[key].double() + sum(cj * d[key] for cj, d in zip(c, deltas))).float())
    return model


@pytest.mark.parametrize("make", [_gpt2, _llama])
def test_adapter_soup_rows_decode_like_the_model_merged_at_each_rows_preference(tmp_path, make):
    base = make()
    targets = None if make is _gpt2 else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    dirs = _save_adapters(base, tmp_path, [4, 4], targets, seed=5)
    B = 16
    rng = np.random.default_rng(0)
    m1 = rng.uniform(0, 1, B)
    prefs = np.stack([m1, 1 - m1], 1)
    alpha = 0.2
    ids = torch.randint(1, 61, (B, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[::3, :2] = 0  # left padding on some rows
    soup_model = copy.deepcopy(base)
    soup = AdapterSoup(soup_model, dirs, beta=BETA, alpha=alpha)
    out = guided_generate(soup_model, [], [1.0], ids, mask, max_new_tokens=8, temperature=0.0, stop_token_ids=[],
                          preference=prefs)
    for b in range(B):
        c, _ = merge_coefficients(prefs[b], method="bone", beta=BETA, alpha=alpha)
        ref_model = _merged_model(base, dirs, c)
        ref = guided_generate(ref_model, [], [1.0], ids[b:b + 1], mask[b:b + 1], max_new_tokens=8, temperature=0.0,
                              stop_token_ids=[])
        assert torch.equal(out.new_tokens[b], ref.new_tokens[0]), b
        # The logits themselves agree to fp32 rounding, row by row (not only the argmax).
        seq = out.sequences[b:b + 1]
        with soup.rows(preference=prefs[b:b + 1], alpha=alpha), torch.no_grad():
            z = soup_model(input_ids=seq, attention_mask=torch.cat([mask[b:b + 1], torch.ones(1, 8, dtype=torch.long)],
                                                                   1)).logits
        with torch.no_grad():
            z_ref = ref_model(input_ids=seq, attention_mask=torch.cat([mask[b:b + 1], torch.ones(1, 8,
                                                                                            dtype=torch.long)], 1)).logits
        torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-4)
    # The shared preference is back after the call, and the base weights were never written.
    assert soup._coeffs.c.dim() == 1
    soup.remove()
    for (k, v), (_, w) in zip(soup_model.state_dict().items(), base.state_dict().items()):
        assert torch.equal(v, w), k


def test_adapter_soup_shared_preference_equals_peft_loading_the_mixture(tmp_path):
    base = _gpt2()
    dirs = _save_adapters(base, tmp_path, [2, 3])
    model = copy.deepcopy(base)
    soup = AdapterSoup(model, dirs, method="rewarded")
    soup.set_preference([0.25, 0.75])
    mix = tmp_path / "mix"
    mixture_adapter(dirs, soup.coefficients([0.25, 0.75]), mix)
    peer = PeftModel.from_pretrained(copy.deepcopy(base), mix).eval()
    ids = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, peer(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_preference_argument_errors(tmp_path):
    base = _gpt2()
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="LoRA adapters"):
        guided_generate(base, [], [1.0], ids, max_new_tokens=1, preference=[0.5, 0.5])
    dirs = _save_adapters(base, tmp_path, [2, 2])
    model = copy.deepcopy(base)
    AdapterSoup(model, dirs, beta=BETA)
    with pytest.raises(ValueError, match=r"preference\[1\]"):
        guided_generate(model, [], [1.0], ids, max_new_tokens=1, preference=[[0.5, 0.5], [0.9, 0.3]])
    with pytest.raises(ValueError, match=r"\[B = 2, 2\]"):
        guided_generate(model, [], [1.0], ids, max_new_tokens=1, preference=[[0.5, 0.5]] * 3 + [[1.0, 0.0]])
    with pytest.raises(ValueError, match="already has an AdapterSoup"):
        AdapterSoup(model, dirs, beta=BETA)
    with pytest.raises(ValueError, match="beta"):
        AdapterSoup(copy.deepcopy(base), dirs)


def test_adapter_soup_refuses_reentry_on_its_own_thread_instead_of_hanging(tmp_path):
    import threading

    base = _gpt2()
    dirs = _save_adapters(base, tmp_path, [2, 2])
    model = copy.deepcopy(base)
    soup = AdapterSoup(model, dirs, beta=BETA)
    ids = torch.ones(2, 3, dtype=torch.long)
    errors = []

    def nested():  # in a daemon thread: a hang fails the test below instead of stopping the run
        with soup.rows(preference=[[0.5, 0.5], [0.2, 0.8]]):
            for call in (lambda: guided_generate(model, [], [1.0], ids, max_new_tokens=1, preference=[0.3, 0.7]),
                         lambda: soup.set_preference([0.3, 0.7])):
                try:
                    call()
                except RuntimeError as exc:
                    errors.append(str(exc))

    t = threading.Thread(target=nested, daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "a nested rows() / set_preference on the soup's own thread hangs"
    assert len(errors) == 2 and all("rows() block" in e for e in errors), errors
    # The refused set_preference changed nothing, the block ended cleanly (the shared coefficients are
    # back), and the soup takes new ones.
    assert soup.preference == [0.5, 0.5]
    assert soup._coeffs.c.tolist() == pytest.approx(soup.coefficients([0.5, 0.5]).tolist(), abs=1e-7)
    assert soup.set_preference([0.3, 0.7]) == pytest.approx(soup._coeffs.c.tolist(), abs=1e-7)
    with soup.rows(preference=[[0.5, 0.5]]):
        pass


def test_mixture_keeps_the_sources_exclude_modules(tmp_path):
    import warnings

    base = _gpt2()
    excluded = "transformer.h.1.mlp.c_fc"
    dirs = []
    for j in range(2):
        cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], exclude_modules=[excluded],
                         task_type="CAUSAL_LM")
        model = get_peft_model(copy.deepcopy(base), cfg)
        model.save_pretrained(tmp_path / f"a{j}")
        dirs.append(tmp_path / f"a{j}")
    mixture_adapter(dirs, [0.6, -0.2], tmp_path / "mix")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mix")
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert not hasattr(loaded.get_submodule(f"base_model.model.{excluded}"), "lora_A")


@pytest.mark.gpu
def test_adapter_soup_follows_the_model_to_cuda(tmp_path):
    # A model moved after its soup was made: the coefficients go to each layer's device.
    base = _gpt2()
    dirs = _save_adapters(base, tmp_path, [2, 3])
    model = copy.deepcopy(base)
    soup = AdapterSoup(model, dirs, beta=BETA)
    ids = torch.randint(1, 60, (2, 5))
    prefs = [[0.2, 0.8], [0.9, 0.1]]
    with torch.no_grad(), soup.rows(preference=prefs):
        want = model(ids).logits
    model.to("cuda")
    with torch.no_grad(), soup.rows(preference=prefs):
        got = model(ids.cuda()).logits.cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
