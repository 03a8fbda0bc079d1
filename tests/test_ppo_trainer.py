"""PPOTrainer on the embedded task: exactness at the first minibatch, temperature, dropout, masks,
learning, and the checkpoint it writes (loadable, mergeable, no value head)."""

import copy
import json

import pytest
import torch
from ppo_task_fixtures import task_sft, tiny_policy  # noqa: F401  (fixture)

from bonesoup.decode.batching import position_ids_from_mask
from bonesoup.train.ppo import PPOConfig, PPOTrainer
from bonesoup.train.ppo.rollout import logprobs_from_logits, response_logits
from bonesoup.train.rewards import CombinedReward, combination_weights
from bonesoup.tasks.review import TASK_REWARDS, task_prompts

SMALL = dict(batch_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=12, lr=1e-4)


def _trainer(sft, weights=(1.0, 0.0), **kw):
    policy, tok = tiny_policy(sft)
    reward = CombinedReward(list(TASK_REWARDS), list(weights))
    cfg = PPOConfig(**{**SMALL, **kw})
    return PPOTrainer(cfg, policy, tok, reward, task_prompts("train"), device="cpu")


def test_first_minibatch_ratio_is_one_and_approx_kl_zero_exactly(task_sft):
    tr = _trainer(task_sft, grad_accum_steps=2)
    for _ in range(2):  # also after the policy has moved away from the reference
        tr.step()
        fm = tr.first_microbatch
        m = fm["mask"].bool()
        assert m.any()
        assert torch.all(fm["ratio"][m] == 1.0)
        assert torch.all(fm["approx_kl"][m] == 0.0)


def test_rollout_i_is_the_decode_loops_draw_with_key_seed_step_i(task_sft):
    # Rollout i of step s draws with derive_seed(seed, s, i): generation batches do not change it, and
    # row i alone through generate_rollout (the SFT policy, which samples step 0) draws the same tokens.
    from bonesoup.decode.batching import derive_seed
    from bonesoup.train.ppo.rollout import generate_rollout

    whole, chunked = _trainer(task_sft, seed=4), _trainer(task_sft, seed=4, generation_batch_size=4)
    whole.step()
    chunked.step()
    r = whole.last_rollout
    assert torch.equal(r["response"], chunked.last_rollout["response"])
    sft, tok = tiny_policy(task_sft)
    for i in (0, 5, 15):
        alone = generate_rollout(sft, r["query"][[i]], r["query_mask"][[i]], seeds=[derive_seed(4, 0, i)],
                                 max_new_tokens=SMALL["max_new_tokens"], temperature=1.0, eos_id=tok.eos_token_id,
                                 pad_id=tok.pad_token_id)
        assert torch.equal(alone.response[0], r["response"][i]), i
        assert torch.equal(alone.response_mask[0], r["response_mask"][i]), i
    assert len({tuple(x) for x in r["response"].tolist()}) > 8  # rows are distinct draws


def test_first_step_kl_to_reference_is_zero_and_rewards_are_placed_right(task_sft):
    tr = _trainer(task_sft, kl_coef=0.2)
    stats = tr.step()
    r = tr.last_rollout
    assert torch.equal(r["old_logprobs"], r["ref_logprobs"])  # the policy starts as the reference
    assert stats["kl"] == 0.0
    # Step 2: the KL penalty is on every real token, the score on the last real token only.
    tr.step()
    r = tr.last_rollout
    mask = r["response_mask"].float()
    kl = (r["old_logprobs"] - r["ref_logprobs"]) * mask
    last = mask.sum(1).long() - 1
    expected = -0.2 * kl
    expected[torch.arange(len(last)), last] += r["score"]
    torch.testing.assert_close(r["rewards"], expected)
    assert torch.any(kl != 0)


def test_masks_exclude_padding_and_post_eos_tokens(task_sft):
    tr = _trainer(task_sft)
    tr.step()
    r = tr.last_rollout
    resp, mask = r["response"], r["response_mask"]
    eos, pad = tr.eos_id, tr.pad_id
    assert pad != eos
    for row, m in zip(resp, mask):
        hits = (row == eos).nonzero()
        end = hits[0, 0].item() + 1 if len(hits) else len(row)
        assert m[:end].tolist() == [1] * end and m[end:].sum() == 0
        assert torch.all(row[end:] == pad)
    # Nothing outside the mask carries advantage, value or reward.
    off = mask == 0
    assert torch.all(r["advantages"][off] == 0) and torch.all(r["values"][off] == 0)
    assert torch.all(r["rewards"][off] == 0)
    assert (mask.sum(1) < mask.shape[1]).any(), "the SFT model should end some responses with EOS"


def test_temperature_tempers_policy_and_reference_alike(task_sft):
    T = 0.7
    tr = _trainer(task_sft, temperature=T)
    sft_model = copy.deepcopy(tr.ref_model)
    tr.step()
    before = copy.deepcopy(tr.policy)  # the policy that samples step 2's rollout
    tr.step()
    r = tr.last_rollout
    ids = torch.cat([r["query"], r["response"]], 1)
    attn = torch.cat([r["query_mask"], r["response_mask"]], 1)
    pos = position_ids_from_mask(attn)
    P, m = r["query"].shape[1], r["response_mask"].bool()
    with torch.no_grad():
        for model, key in ((before, "old_logprobs"), (sft_model, "ref_logprobs")):
            logits = response_logits(model(input_ids=ids, attention_mask=attn, position_ids=pos).logits, P)
            at_t = logprobs_from_logits(logits, r["response"], T)
            at_1 = logprobs_from_logits(logits, r["response"], 1.0)
            torch.testing.assert_close(r[key][m], at_t[m], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(r[key][m], at_1[m], atol=1e-3)


def test_dropout_is_off_but_the_saved_config_keeps_it(task_sft, tmp_path):
    policy, tok = tiny_policy(task_sft)
    assert policy.config.resid_pdrop > 0  # GPT-2 default 0.1: the test would notice dropout
    reward = CombinedReward(list(TASK_REWARDS), [1.0, 0.0])
    tr = PPOTrainer(PPOConfig(**SMALL), policy, tok, reward, task_prompts("train"), device="cpu")
    tr.module.train()
    x = torch.randint(2, len(tok), (4, 10))
    a = torch.ones_like(x)
    p = torch.arange(10).expand(4, 10)
    with torch.no_grad():
        l1, v1 = tr.module(x, a, p)
        l2, v2 = tr.module(x, a, p)
    assert torch.equal(l1, l2) and torch.equal(v1, v2)
    tr.save_policy(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["resid_pdrop"] == policy.config.resid_pdrop == 0.1


def test_missing_eos_penalty_is_subtracted(task_sft):
    tr = _trainer(task_sft, max_new_tokens=2, missing_eos_penalty=0.5)
    stats = tr.step()
    r = tr.last_rollout
    has_eos = (r["response"] == tr.eos_id).any(1)
    assert (~has_eos).any()
    from bonesoup.train.ppo.rollout import decode_responses

    texts = decode_responses(tr.tokenizer, r["response"], r["response_mask"], tr.eos_id)
    prompts = tr.tokenizer.batch_decode(r["query"], skip_special_tokens=True)
    raw = tr.reward_fn(prompts, texts).score
    torch.testing.assert_close(r["score"], raw - 0.5 * (~has_eos).float())
    assert stats["score"] == pytest.approx(float(raw.mean()), abs=1e-6)  # logged: the reward before the penalty


def test_k3_adaptive_kl_and_separate_critic_run(task_sft, tmp_path):
    policy, tok = tiny_policy(task_sft)
    critic, _ = tiny_policy(task_sft)
    reward = CombinedReward(list(TASK_REWARDS), [0.5, 0.5])
    cfg = PPOConfig(**{**SMALL, "kl_estimator": "k3", "adaptive_kl": True, "target_kl": 0.01, "kl_horizon": 100,
                       "whiten_rewards": True})
    tr = PPOTrainer(cfg, policy, tok, reward, task_prompts("train"), critic=critic, device="cpu")
    records = tr.train(3, out_dir=tmp_path / "out", progress=False)
    assert records[0]["kl"] == 0 and records[1]["kl"] > 0.01  # k3 is never negative
    # Step 0: KL 0, below target, the coefficient went down; step 1: above the tiny target, up again.
    assert records[1]["kl_coef"] < records[0]["kl_coef"]
    assert records[2]["kl_coef"] > records[1]["kl_coef"]
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert not any("value" in k or "critic" in k for k in keys)


def test_sentiment_expert_learns_and_the_rewards_conflict(task_sft, tmp_path):
    # 25 steps of 32 rollouts on sentiment alone, then both models on the 42 held-out prompts x 4
    # samples (the same per-sample seeds): sentiment rises far above the SFT model's, and conciseness
    # falls (more positive words make longer responses), which is the trade-off the task is built on.
    from bonesoup.train.ppo.checkpoint_training import evaluate_checkpoint

    tr = _trainer(task_sft, batch_size=32, mini_batch_size=16, ppo_epochs=4, max_new_tokens=16, seed=1)
    records = tr.train(25, out_dir=tmp_path / "expert", progress=False)
    assert all(r["kl"] < 10 for r in records)
    held_out = task_prompts("test")
    kw = dict(samples_per_prompt=4, max_new_tokens=16)
    sft = evaluate_checkpoint(task_sft, held_out, TASK_REWARDS, **kw)["rewards"]
    expert = evaluate_checkpoint(tmp_path / "expert", held_out, TASK_REWARDS, ref=task_sft, **kw)
    gain = expert["rewards"]["sentiment"]["mean"] - sft["sentiment"]["mean"]
    loss = sft["conciseness"]["mean"] - expert["rewards"]["conciseness"]["mean"]
    assert gain > 0.4, (sft, expert["rewards"])
    assert loss > 0.03, (sft, expert["rewards"])
    assert 0 < expert["kl"]["mean"] < 10


def test_output_checkpoint_is_policy_only_atomic_and_logged(task_sft, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "expert"
    tr = _trainer(task_sft)
    records = tr.train(2, out_dir=out, progress=False, metadata={"note": "test"})
    with safe_open(out / "model.safetensors", "pt") as f, safe_open(task_sft / "model.safetensors", "pt") as g:
        assert set(f.keys()) == set(g.keys())
    model = AutoModelForCausalLM.from_pretrained(out)
    trained = dict(model.named_parameters())
    assert all(torch.equal(trained[k], v) for k, v in tr.policy.named_parameters())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1] and log == json.loads(json.dumps(records))
    for key in ("kl", "entropy", "value_loss", "reward/sentiment", "reward/conciseness", "score"):
        assert key in log[0]
    assert (out / "train_log.png").stat().st_size > 10_000
    meta = json.loads((out / "bonesoup-train.json").read_text())
    assert meta["note"] == "test" and meta["config"]["batch_size"] == SMALL["batch_size"]
    # An existing output is refused before any training happens; nothing is left half-written.
    tr2 = _trainer(task_sft)
    with pytest.raises(FileExistsError, match="already exists"):
        tr2.train(1, out_dir=out, progress=False)
    assert tr2.step_index == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert"]


def test_trained_backbones_merge_and_load(task_sft, tmp_path):
    from transformers import AutoModelForCausalLM

    from bonesoup import LiveSoup, merge_checkpoints
    from bonesoup.merge.coefficients import merge_coefficients

    backbones = []
    for j in range(2):
        policy, tok = tiny_policy(task_sft)
        reward = CombinedReward(list(TASK_REWARDS), combination_weights(2, backbone=j, beta=0.7))
        tr = PPOTrainer(PPOConfig(**SMALL, seed=j), policy, tok, reward, task_prompts("train"), device="cpu")
        tr.train(2, out_dir=tmp_path / f"backbone-{j}", progress=False)
        backbones.append(tmp_path / f"backbone-{j}")
    out = merge_checkpoints(backbones, tmp_path / "merged", preference=[0.3, 0.7], beta=0.7, alpha=0.1,
                            sft=task_sft, progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out)
    models = [AutoModelForCausalLM.from_pretrained(p) for p in (*backbones, task_sft)]
    c, c_sft = merge_coefficients([0.3, 0.7], beta=0.7, alpha=0.1)
    coeffs = [*c.tolist(), c_sft]
    for name, w in merged.state_dict().items():
        ref = sum(k * m.state_dict()[name].double() for k, m in zip(coeffs, models))
        torch.testing.assert_close(w.double(), ref, rtol=0, atol=1e-5)
    assert not torch.equal(models[0].state_dict()["transformer.h.0.mlp.c_fc.weight"],
                           models[1].state_dict()["transformer.h.0.mlp.c_fc.weight"])
    live_model = AutoModelForCausalLM.from_pretrained(task_sft)
    soup = LiveSoup(live_model, backbones, beta=0.7, sft=task_sft)
    soup.set_preference([0.3, 0.7], alpha=0.1)
    for name, w in live_model.state_dict().items():
        torch.testing.assert_close(w, merged.state_dict()[name], rtol=0, atol=1e-5)


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="batch_size .* multiple of mini_batch_size"):
        PPOConfig(batch_size=10, mini_batch_size=4)
    with pytest.raises(ValueError, match="temperature"):
        PPOConfig(temperature=0.0)
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match="lam"):
        PPOConfig(lam=1.5)
    with pytest.raises(ValueError, match="steps"):
        PPOConfig(steps=0)
    with pytest.raises(ValueError, match="mini_batch_size .* world size"):
        PPOConfig(batch_size=16, mini_batch_size=8, grad_accum_steps=8).check_world(2)
    with pytest.raises(ValueError, match="unknown PPOConfig fields"):
        PPOConfig.from_dict({"stepz": 3})


def test_gpu_settings_bf16_autocast_and_gradient_checkpointing_run_on_cpu(task_sft):
    # The CUDA defaults (bf16 autocast, gradient checkpointing) forced on the CPU: the same code path.
    tr = _trainer(task_sft, bf16=True, gradient_checkpointing=True, grad_accum_steps=2)
    assert tr.autocast_dtype == torch.bfloat16
    assert any(getattr(m, "gradient_checkpointing", False) for m in tr.policy.modules())
    before = {k: v.detach().clone() for k, v in tr.policy.named_parameters()}
    for _ in range(2):
        stats = tr.step()
        m = tr.first_microbatch["mask"].bool()
        assert torch.all(tr.first_microbatch["ratio"][m] == 1.0)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in stats.items() if isinstance(v, float))
    assert any(not torch.equal(before[k], v) for k, v in tr.policy.named_parameters())
    assert next(tr.policy.parameters()).dtype == torch.float32  # autocast, not a cast of the weights


def test_lora_policy_uses_the_adapter_free_base_as_reference_and_saves_the_adapter(task_sft, tmp_path):
    pytest.importorskip("peft", reason="LoRA is the optional peft extra")  # pinned in requirements-dev.txt
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from bonesoup.train.ppo import with_lora

    policy, tok = tiny_policy(task_sft)
    sft_state = {k: v.clone() for k, v in policy.state_dict().items()}
    lora = with_lora(policy, rank=4)
    reward = CombinedReward(list(TASK_REWARDS), [1.0, 0.0])
    tr = PPOTrainer(PPOConfig(**{**SMALL, "lr": 3e-3}), lora, tok, reward, task_prompts("train"), device="cpu")
    assert tr.ref_model is None  # no copy: the base with adapters disabled is the reference
    trainable = {n for n, p in tr.module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_head") for n in trainable)
    records = tr.train(3, out_dir=tmp_path / "lora", progress=False, save_merged=True)
    assert records[0]["kl"] == 0.0 and records[2]["kl"] != 0.0
    r = tr.last_rollout
    # The reference log-probs are the SFT model's.
    sft_model = AutoModelForCausalLM.from_pretrained(task_sft)
    ids = torch.cat([r["query"], r["response"]], 1)
    attn = torch.cat([r["query_mask"], r["response_mask"]], 1)
    pos = position_ids_from_mask(attn)
    with torch.no_grad():
        ref = logprobs_from_logits(response_logits(sft_model(input_ids=ids, attention_mask=attn,
                                                             position_ids=pos).logits, r["query"].shape[1]),
                                   r["response"], 1.0)
    m = r["response_mask"].bool()
    torch.testing.assert_close(r["ref_logprobs"][m], ref[m], rtol=1e-5, atol=1e-5)
    # Saved: the peft adapter; with save_merged also lora/merged: the SFT model's keys, adapters merged in
    # (weights moved), loadable as a plain causal LM.
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "lora" / "model.safetensors").exists()
    with safe_open(tmp_path / "lora" / "merged" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        moved = max(float((f.get_tensor(k) - sft_state[k]).abs().max()) for k in keys)
    with safe_open(task_sft / "model.safetensors", "pt") as g:
        assert keys == set(g.keys())
    assert moved > 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "merged")
