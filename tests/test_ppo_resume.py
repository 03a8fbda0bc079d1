"""PPO that survives a long run: training checkpoints, resume (after an exception and after SIGKILL) equal to
the uninterrupted run bit for bit, refusal of another run's checkpoint, early stopping, LoRA saved without a
copy of the model."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ppo_task_fixtures import task_sft, tiny_policy  # noqa: F401  (fixture)
from safetensors.torch import load_file

from bonesoup.train.ppo import PPOConfig, PPOTrainer
from bonesoup.train.ppo import training_state as ts
from bonesoup.train.ppo.checkpoint_training import train_checkpoint
from bonesoup.train.ppo.training_log import read_training_log
from bonesoup.train.rewards import CombinedReward
from bonesoup.tasks.review import TASK_REWARDS, task_prompts

SMALL = dict(batch_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=10, lr=3e-4)
TIMING = ("seconds", "rollout_tokens_per_s", "train_tokens_per_s")
REPO = Path(__file__).resolve().parents[1]


def _trainer(sft, weights=(1.0, 0.0), **kw):
    policy, tok = tiny_policy(sft)
    return PPOTrainer(PPOConfig(**{**SMALL, **kw}), policy, tok, CombinedReward(list(TASK_REWARDS), list(weights)),
                      task_prompts("train"), device="cpu")


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _assert_same_output(a: Path, b: Path):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit for bit
    assert _untimed(read_training_log(a / "train_log.jsonl")) == _untimed(read_training_log(b / "train_log.jsonl"))


class SimulatedCrash(Exception):
    pass


def _interrupt_at(monkeypatch, step_index):
    """Make PPOTrainer.step raise when it is about to run step ``step_index`` (a crash mid-run)."""
    real = PPOTrainer.step

    def step(self):
        if self.step_index == step_index:
            raise SimulatedCrash(f"before step {step_index}")
        return real(self)

    monkeypatch.setattr(PPOTrainer, "step", step)
    return real


def test_resume_after_a_crash_equals_the_uninterrupted_run(task_sft, tmp_path, monkeypatch):
    ref = _trainer(task_sft, adaptive_kl=True, target_kl=0.05, kl_horizon=50)
    ref_records = ref.train(4, out_dir=tmp_path / "ref", progress=False)

    real = _interrupt_at(monkeypatch, 3)
    crashed = _trainer(task_sft, adaptive_kl=True, target_kl=0.05, kl_horizon=50, save_every=2)
    with pytest.raises(SimulatedCrash):
        crashed.train(4, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # no half-written output
    root = tmp_path / "run.checkpoints"
    assert [p.name for p in ts.complete_checkpoints(root)] == ["step-00000002"]
    ran = []
    monkeypatch.setattr(PPOTrainer, "step", lambda self: ran.append(self.step_index) or real(self))

    resumed = _trainer(task_sft, adaptive_kl=True, target_kl=0.05, kl_horizon=50, save_every=2)
    records = resumed.train(4, out_dir=tmp_path / "run", progress=False, resume=True)
    assert ran == [2, 3]  # only the steps after the checkpoint ran again
    assert resumed.step_index == 4 and [r["step"] for r in records] == list(range(4))
    _assert_same_output(tmp_path / "ref", tmp_path / "run")
    assert _untimed(records) == _untimed(ref_records)
    # The value head, the optimiser's moments and the KL controller continue exactly too.
    assert torch.equal(resumed.module.value_head.weight, ref.module.value_head.weight)
    a, b = ref.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert a.keys() == b.keys()
    for i in a:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a[i][k], b[i][k]), (i, k, a[i][k].flatten()[:4], b[i][k].flatten()[:4])
    assert resumed.kl_ctl.value == ref.kl_ctl.value != SMALL.get("kl_coef", PPOConfig().kl_coef)
    meta = json.loads((tmp_path / "run" / "bonesoup-train.json").read_text())
    assert meta["resumed_from"].endswith("step-00000002")
    assert not root.exists()  # the output is in place: the checkpoints are gone


_CHILD = """
import sys, time
from bonesoup.train.ppo.trainer import PPOTrainer
import torch
torch.set_num_threads(int(sys.argv[1]))
real = PPOTrainer.step
def step(self):
    if self.step_index == 3:  # hold here after checkpoint 2 so the parent kills a run that is mid-way
        time.sleep(120)
    return real(self)
PPOTrainer.step = step
from bonesoup.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_resume_after_sigkill_through_the_cli_equals_the_uninterrupted_run(task_sft, tmp_path):
    from bonesoup.cli import main

    common = ["train", "--sft", str(task_sft), "--expert", "0", "--steps", "4", "--batch-size", "16",
              "--mini-batch-size", "8", "--epochs", "2", "--max-new-tokens", "10", "--lr", "3e-4", "--no-progress"]
    out, root = tmp_path / "killed", tmp_path / "killed.checkpoints"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(torch.get_num_threads()), *common,
                              "--save-every", "2", "--out", str(out)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while ts.latest_checkpoint(root) is None:
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert not out.exists() and ts.latest_checkpoint(root).name == "step-00000002"
    assert any(p.name.startswith(".killed.bonesoup-tmp-") for p in tmp_path.iterdir())  # the dead run's output

    assert main([*common, "--save-every", "2", "--out", str(out), "--resume"]) == 0
    assert main([*common, "--out", str(tmp_path / "ref")]) == 0
    _assert_same_output(tmp_path / "ref", out)
    assert json.loads((out / "bonesoup-train.json").read_text())["resumed_from"].endswith("step-00000002")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed", "ref"]  # leftovers cleaned, checkpoints gone


def test_lora_resume_equals_the_uninterrupted_run(task_sft, tmp_path, monkeypatch):
    pytest.importorskip("peft", reason="LoRA is the optional peft extra")
    kw = dict(rewards=list(TASK_REWARDS), weights=[0.5, 0.5], prompts=task_prompts("train"), lora_rank=2,
              progress=False)
    train_checkpoint(task_sft, tmp_path / "ref", config=PPOConfig(**SMALL, steps=3), **kw)
    real = _interrupt_at(monkeypatch, 2)
    with pytest.raises(SimulatedCrash):
        train_checkpoint(task_sft, tmp_path / "run", config=PPOConfig(**SMALL, steps=3, save_every=1), **kw)
    saved = load_file(str(ts.latest_checkpoint(tmp_path / "run.checkpoints") / "model.safetensors"))
    assert saved and all("lora_" in k or k.startswith("value_head") for k in saved)  # adapters only, no base
    monkeypatch.setattr(PPOTrainer, "step", real)
    train_checkpoint(task_sft, tmp_path / "run", config=PPOConfig(**SMALL, steps=3, save_every=1), resume=True, **kw)
    _assert_same_output(tmp_path / "ref", tmp_path / "run")
    assert json.loads((tmp_path / "run" / "bonesoup-train.json").read_text())["resumed_from"].endswith("step-00000002")


def test_a_checkpoint_of_another_run_is_refused_naming_the_field(task_sft, tmp_path, monkeypatch):
    real = _interrupt_at(monkeypatch, 1)
    with pytest.raises(SimulatedCrash):
        _trainer(task_sft, save_every=1).train(3, out_dir=tmp_path / "run", progress=False)
    monkeypatch.setattr(PPOTrainer, "step", real)
    for kw, weights, field in (({"lr": 1e-3}, (1.0, 0.0), "config.lr"),
                               ({"early_stop_kl": 1.0}, (1.0, 0.0), "config.early_stop_kl"),
                               ({}, (0.0, 1.0), "reward.weights")):
        tr = _trainer(task_sft, weights, save_every=1, **kw)
        with pytest.raises(ValueError, match=rf"cannot resume from .*step-00000001.*{field}"):
            tr.train(3, out_dir=tmp_path / "run", progress=False, resume=True)
        assert tr.step_index == 0
    assert not (tmp_path / "run").exists()
    # save_every, checkpoint_dir and steps do not change what a step computes: they may differ.
    tr = _trainer(task_sft, save_every=5, checkpoint_dir=str(tmp_path / "run.checkpoints"))
    assert len(tr.train(2, out_dir=tmp_path / "run", progress=False, resume=True)) == 2
    with pytest.raises(ValueError, match="save_every / resume need config.checkpoint_dir"):
        _trainer(task_sft, save_every=1).train(1, progress=False)


def test_checkpoint_writes_are_atomic_and_keep_the_newest_complete_one(tmp_path):
    root = tmp_path / "ckpt"
    t = {"model": {"w": torch.arange(3.0)}}
    ts.write_checkpoint(root, 2, t, {"step": 2})
    ts.write_checkpoint(root, 4, t, {"step": 4})
    assert [p.name for p in ts.complete_checkpoints(root)] == ["step-00000004"]  # the older one after the new
    # A write killed half-way (pid 2**22 + 1 is not alive) and a directory without state.json do not count.
    dead = root / ".step-00000006.bonesoup-tmp-4194305-deadbeef"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    (root / "step-00000008").mkdir()
    assert ts.latest_checkpoint(root).name == "step-00000004"
    tensors, state = ts.read_checkpoint(ts.latest_checkpoint(root))
    assert state == {"format": ts.FORMAT, "step": 4} and torch.equal(tensors["model"]["w"], torch.arange(3.0))
    ts.write_checkpoint(root, 6, t, {"step": 6})
    assert not dead.exists() and ts.latest_checkpoint(root).name == "step-00000006"
    (root / "step-00000006" / "state.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="format 99"):
        ts.read_checkpoint(root / "step-00000006")


def test_rng_and_optimizer_state_round_trip_exactly():
    import random

    import numpy as np

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 3))], lr=0.1)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    opt.step()
    tensors, state = ts.optimizer_state(opt)
    state = json.loads(json.dumps(state))
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(2, 3))], lr=0.5)
    ts.load_optimizer_state(fresh, tensors, state)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for k in a["state"][i])
    rt, rs = ts.rng_state()
    draws = (torch.rand(3), random.random(), np.random.rand())
    ts.set_rng_state(rt, json.loads(json.dumps(rs)))
    assert torch.equal(torch.rand(3), draws[0]) and random.random() == draws[1] and np.random.rand() == draws[2]


def test_early_stop_skips_the_rest_of_the_step_and_the_adaptive_controller_follows_ziegler(task_sft):
    # A tiny threshold: minibatch 0 sees KL 0 (ratio 1), so it and minibatch 1 are applied, then the step
    # stops; the policy is then exactly the one of a single epoch (the same epoch-0 minibatches).
    stopped = _trainer(task_sft, early_stop_kl=1e-12, adaptive_kl=True, target_kl=0.02, kl_horizon=40)
    one_epoch = _trainer(task_sft, ppo_epochs=1)
    full = _trainer(task_sft, early_stop_kl=1e3)
    r0 = stopped.step()
    one_epoch.step()
    assert r0["ppo_updates"] == 2 and r0["early_stopped"] == 1.0
    assert full.step()["ppo_updates"] == 4 and not full.step()["early_stopped"]
    for (k, a), b in zip(stopped.policy.named_parameters(), one_epoch.policy.parameters()):
        assert torch.equal(a, b), k
    r1 = stopped.step()
    assert r1["kl"] > 0
    # Ziegler et al.: beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) * B / horizon) after each batch.
    for before, after in ((r0, r1), (r1, {"kl_coef": stopped.kl_ctl.value})):
        e = min(max(before["kl"] / 0.02 - 1, -0.2), 0.2)
        assert after["kl_coef"] == pytest.approx(before["kl_coef"] * (1 + e * 16 / 40), rel=1e-12)
    with pytest.raises(ValueError, match="early_stop_kl"):
        PPOConfig(early_stop_kl=0.0)
    with pytest.raises(ValueError, match="save_every"):
        PPOConfig(save_every=-1)


def test_lora_save_merges_without_copying_the_model_and_leaves_the_base_untouched(task_sft, tmp_path, monkeypatch):
    pytest.importorskip("peft", reason="LoRA is the optional peft extra")
    from bonesoup.train.ppo import with_lora
    from bonesoup.train.ppo.policy import merged_lora_state_dict

    policy, tok = tiny_policy(task_sft)
    torch.manual_seed(0)
    lora = with_lora(policy, rank=2)
    tr = PPOTrainer(PPOConfig(**SMALL), lora, tok, CombinedReward(list(TASK_REWARDS), [1.0, 0.0]),
                    task_prompts("train"), device="cpu")
    tr.step()
    with torch.no_grad():  # B starts at 0; make the delta large enough to see in every adapted weight
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)
    base_before = {k: v.clone() for k, v in lora.get_base_model().state_dict().items()}
    expected = copy.deepcopy(lora).merge_and_unload().state_dict()  # peft's own merge, on a copy (test only)

    real_deepcopy = copy.deepcopy

    def no_module_copy(x, *a, **k):
        if isinstance(x, torch.nn.Module):
            raise AssertionError(f"save_policy deep-copied a {type(x).__name__}")
        return real_deepcopy(x, *a, **k)

    monkeypatch.setattr(copy, "deepcopy", no_module_copy)
    sd = merged_lora_state_dict(lora)
    tr.save_policy(tmp_path / "saved")
    monkeypatch.undo()
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    sft = load_file(str(task_sft / "model.safetensors"))
    assert saved.keys() == sft.keys()
    for k in saved:
        assert torch.equal(saved[k], expected[k]), k  # bit for bit peft's merge
    assert any(not torch.equal(saved[k], sft[k]) for k in saved)
    for k, v in lora.get_base_model().state_dict().items():  # the reference (the base) did not move
        assert torch.equal(v, base_before[k]), k
    # Memory: only the adapted weights are new tensors; everything else is the model's own storage.
    own = {p.data_ptr() for p in lora.parameters()} | {b.data_ptr() for b in lora.buffers()}
    new = [k for k, v in sd.items() if v.data_ptr() not in own]
    adapted = {n.rsplit(".lora_A", 1)[0] + ".weight" for n, _ in lora.get_base_model().named_parameters()
               if ".lora_A." in n}
    assert new and set(new) == adapted


def test_train_all_resume_skips_the_models_already_written(task_sft, tmp_path, capsys):
    from bonesoup.cli import main

    args = ["train-all", "--sft", str(task_sft), "--beta", "0.7", "--steps", "1", "--batch-size", "16",
            "--mini-batch-size", "8", "--epochs", "1", "--max-new-tokens", "6", "--no-progress",
            "--out", str(tmp_path / "all")]
    assert main(args) == 0
    first = json.loads((tmp_path / "all" / "train-all.json").read_text())
    stamp = (tmp_path / "all" / "backbone-0" / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 2 and "already exists" in capsys.readouterr().err  # without --resume: refused
    assert main([*args, "--resume"]) == 0
    assert (tmp_path / "all" / "backbone-0" / "model.safetensors").stat().st_mtime_ns == stamp  # not retrained
    again = json.loads((tmp_path / "all" / "train-all.json").read_text())
    assert {k: v["final_score"] for k, v in again["models"].items()} == \
        {k: v["final_score"] for k, v in first["models"].items()}
