"""A user's own checkpoints through the CLI: tiny Llama / Qwen2 policies and reward models saved as HF directories,
a config file and prompt files only (no code), bad configs refused before anything is trained."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from own_checkpoint_fixtures import save_policy, save_reward_model, write_prompts

from bonesoup.cli import main

#: The README's "Your models" config (its paths are relative to the file), with a toy budget.
CONFIG = """\
sft: models/sft-llama              # a Hugging Face causal LM + tokenizer
train_prompts: data/train.jsonl    # one {"prompt": ...} per line
validation_prompts: data/validation.txt   # plain text works too: one prompt per line
test_prompts: data/test.jsonl
rewards:                           # one per objective
  - hf: models/rm-chat             # a sequence-classification reward model
    chat_template: true            # score the [user, assistant] conversation
    batch_size: 4
  - hf: models/rm-pair
    input: pair                    # (prompt, response) as a text pair
    label: good                    # which logit is the reward (index or name)
max_new_tokens: 6
device: cpu
dtype: float32
rollout_batch_size: 8
eval_batch_size: 3
seeds: [0]
ppo_steps: 1
ppo_lr: 0.01                       # big enough that one step moves a random model
ppo_batch_size: 16
morlhf: [0.5]
value_samples: 16
value_steps: 2
points: 3
eval_samples_per_prompt: 1
val_prompts: 3
val_samples_per_prompt: 1
extrapolation_grid: [0.0, 0.3]
w_implicit_grid: [0.5]
w_explicit_grid: [1.0]
threads: 1
"""

REWARDS_PY = """\
def brevity(prompts, responses):
    return [-len(r.split()) / 10 for r in responses]
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A user's directory: checkpoints, prompt files, a rewards.py and the config file. Nothing else."""
    root = tmp_path_factory.mktemp("project")
    save_policy(root / "models" / "sft-llama", "llama")
    save_policy(root / "models" / "sft-qwen2", "qwen2")
    shutil.copytree(root / "models" / "sft-llama", root / "models" / "sft-pad-is-eos")
    tok_cfg = root / "models" / "sft-pad-is-eos" / "tokenizer_config.json"
    tok_cfg.write_text(json.dumps({**json.loads(tok_cfg.read_text()), "pad_token": "<|endoftext|>"}))
    save_reward_model(root / "models" / "rm-chat", "qwen2", labels=("score",))
    save_reward_model(root / "models" / "rm-pair", "gpt2", labels=("bad", "good"))
    write_prompts(root / "data")
    (root / "rewards.py").write_text(REWARDS_PY)
    (root / "experiment.yaml").write_text(CONFIG)
    return root


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_the_whole_comparison_runs_from_a_config_file(project, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # the config's paths resolve against its own directory, not the working one
    assert main(["experiment", "--config", str(project / "experiment.yaml"), "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["task"]["name"] == "own" and res["task"]["objectives"] == ["rm-chat", "rm-pair"]
    assert res["task"]["sources"]["sft"] == str(project / "models" / "sft-llama")
    assert res["task"]["sources"]["validation_prompts"] == str(project / "data" / "validation.txt")
    assert res["config"]["rewards"][1] == {"hf": str(project / "models" / "rm-pair"), "input": "pair",
                                           "label": "good", "device": "cpu", "dtype": "float32"}
    # 2 backbones + 2 experts + 1 MORLHF + 2 value models, all Llama like the SFT model
    assert len(res["trained_now"]) == 7
    for d in res["models"]["0"]["backbones"] + res["models"]["0"]["experts"]:
        assert json.loads((Path(d) / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    summary = res["summary"]["methods"]
    assert {"rewarded_soup", "bone_soup", "mage_implicit", "mage_explicit", "morlhf"} <= set(summary)
    for m, v in summary.items():
        assert np.all(np.isfinite(v["mean_points"])), m
    seed = res["per_seed"]["0"]
    # The trained models moved (the sweep measures something), and at mu = e_i Rewarded Soup IS expert i.
    assert seed["morlhf"]["1.0"] != seed["sft"] and seed["morlhf"]["0.0"] != seed["sft"]
    assert len({tuple(p) for pts in seed["points"].values() for p in pts}) > 3
    rs = seed["points"]["rewarded_soup"]
    assert rs[0] == seed["morlhf"]["0.0"] and rs[-1] == seed["morlhf"]["1.0"]
    # The test set is the test file's 2 prompts, the validation slice the validation file's first 3.
    assert "Rewarded Soup" in (out / "results.md").read_text() and (out / "pareto.png").stat().st_size > 0
    capsys.readouterr()
    # A rerun finds every model (cached by content), and a copy of the SFT directory is the same input.
    shutil.copytree(project / "models" / "sft-llama", tmp_path / "sft-copy")
    assert main(["experiment", "--config", str(project / "experiment.yaml"), "--out", str(out), "--no-progress",
                 "--sft", str(tmp_path / "sft-copy")]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["trained_now"] == []
    assert again["summary"]["methods"]["bone_soup"]["hypervolume"] == summary["bone_soup"]["hypervolume"]


def test_train_takes_the_same_config_on_a_qwen2_policy(project, tmp_path, capsys):
    """`bonesoup train --config` with a JSON file: a Qwen2 SFT, a built-in with arguments and a file.py callable."""
    cfg = yaml.safe_load(CONFIG)
    cfg.update(sft="models/sft-qwen2", rewards=[{"builtin": "conciseness", "args": {"target": 4}},
                                                "rewards.py:brevity"], ppo_steps=99)  # ppo_steps: not train's
    (project / "train.json").write_text(json.dumps(cfg))
    out = tmp_path / "expert-1"
    assert main(["train", "--config", str(project / "train.json"), "--expert", "1", "--steps", "1",
                 "--batch-size", "8", "--mini-batch-size", "8", "--epochs", "1", "--out", str(out),
                 "--no-progress"]) == 0
    meta = json.loads((out / "bonesoup-train.json").read_text())
    assert meta["rewards"] == ["conciseness", "brevity"] and meta["weights"] == [0.0, 1.0]
    assert meta["config"]["max_new_tokens"] == 6 and meta["config"]["generation_batch_size"] == 8
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    log = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert {"reward/conciseness", "reward/brevity"} <= set(log)
    # train-all --eval scores on the config's test file (2 prompts), not on the embedded task's.
    root = tmp_path / "all"
    assert main(["train-all", "--config", str(project / "train.json"), "--beta", "0.7", "--steps", "1",
                 "--batch-size", "8", "--mini-batch-size", "8", "--epochs", "1", "--eval", "--eval-samples", "1",
                 "--out", str(root), "--no-progress"]) == 0
    summary = json.loads((root / "train-all.json").read_text())
    assert summary["rewards"] == ["conciseness", "brevity"] and summary["eval"]["sft"]["n"] == 2


def _bad(project, tmp_path, **changes):
    cfg = yaml.safe_load(CONFIG)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    path = project / f"bad-{len(list(project.glob('bad-*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("changes,message", [
    (dict(train_prompts="data/missing.jsonl"), "train_prompts: prompt file"),
    (dict(sft="models/nothing-here"), "sft: "),
    (dict(sft="models/rm-chat"), "not a causal LM"),
    (dict(sft="models/sft-pad-is-eos"), "pad_token_id equals eos_token_id"),
    (dict(ppo_stepz=3), "unknown field 'ppo_stepz'"),
    (dict(rewards=[{"hf": "models/rm-chat"}, {"hf": "models/rm-pair", "input": "pair"}]),
     "rewards[1] (hf:"),  # two labels and none chosen
    (dict(rewards=[{"hf": "models/rm-chat", "label": 1}, "sentiment"]), "label must be in [0, 1)"),
    (dict(rewards=[{"hf": "models/rm-pair", "label": "great"}, "sentiment"]), "no label 'great'"),
    (dict(rewards=[{"hf": "models/sft-llama"}, "sentiment"]), "not a *ForSequenceClassification"),
    (dict(rewards=[{"hf": "models/rm-chat", "colour": "red"}, "sentiment"]), "unknown option(s) ['colour']"),
    (dict(rewards=["sentiment"]), "rewards: the experiment compares methods on n >= 2 objectives"),
    (dict(rewards=["sentiment", "rewards.py:nothing"]), "no callable 'nothing'"),
    (dict(rewards=None), "rewards: required with sft"),
    (dict(morlhf=[1.5]), "morlhf"),
    (dict(dtype="float16"), "dtype must be float32 or bfloat16"),
    (dict(val_prompts=4), "val_prompts must be at most the 3 validation prompts"),
])
def test_bad_configs_are_refused_before_training_naming_the_field(project, tmp_path, capsys, changes, message):
    path = _bad(project, tmp_path, **changes)
    out = tmp_path / "run"
    assert main(["experiment", "--config", str(path), "--out", str(out), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # refused before the output directory, let alone a model, was made


def test_bad_prompt_lines_name_file_and_line(project, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n\n{"prompt": "broken"\n')
    path = _bad(project, tmp_path, test_prompts=str(bad))
    assert main(["experiment", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    assert f"test_prompts: {bad}:3: not a JSON line" in capsys.readouterr().err


def test_train_refuses_a_preference_of_the_wrong_length(project, tmp_path, capsys):
    assert main(["train", "--config", str(project / "experiment.yaml"), "--preference", "0.2", "0.3", "0.5",
                 "--steps", "1", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "preference" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_evaluation_in_batches_equals_one_call(project):
    """Rows are seeded by their index in the set, so the batch size changes nothing (with chunk search too)."""
    from bonesoup.decode.mage import ChunkSearch
    from bonesoup.eval.experiment import ExperimentConfig
    from bonesoup.eval.experiment_eval import Evaluator
    from bonesoup.tasks.spec import read_prompts
    from bonesoup.train.ppo.checkpoint_training import load_policy

    cfg = ExperimentConfig(max_new_tokens=6, rewards=("conciseness", "length"))
    base, tok = load_policy(project / "models" / "sft-llama")
    guide, _ = load_policy(project / "models" / "sft-qwen2")  # any causal LM over the same vocabulary
    prompts = read_prompts(project / "data" / "train.jsonl")
    one = Evaluator(tok, prompts, 2, cfg, batch_size=1000)
    assert len(one.chunks) == 1
    for bs in (1, 3, 5):
        many = Evaluator(tok, prompts, 2, cfg, batch_size=bs)
        assert len(many.chunks) == -(-16 // bs)
        for models, coeffs, search in (([base], [1.0], None), ([base, guide], [1.0, 0.5], None),
                                       ([base, guide], [1.0, 0.5], ChunkSearch(guide, 2, 3))):
            want, got = one(models, coeffs, 7, search=search), many(models, coeffs, 7, search=search)
            np.testing.assert_array_equal(got, want)
    # ...and the seed does matter (the comparison above could not pass by decoding nothing).
    assert not np.array_equal(one([base], [1.0], 7), one([base], [1.0], 8))
