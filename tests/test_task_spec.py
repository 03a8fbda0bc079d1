"""A task as data: prompt files, reward entries, reward models against a direct forward, config files, fingerprints."""

import json
import shutil

import numpy as np
import pytest
import torch

from own_checkpoint_fixtures import save_reward_model, tokenizer

from bonesoup.eval.experiment import ExperimentConfig, read_config_file
from bonesoup.tasks.spec import read_prompts, task_spec
from bonesoup.train.reward_spec import RewardSpec
from bonesoup.train.rewards import get_reward

FIELDS = {f for f in ExperimentConfig.__dataclass_fields__}


@pytest.fixture(scope="module")
def rms(tmp_path_factory):
    root = tmp_path_factory.mktemp("rms")
    return {"one": save_reward_model(root / "rm-one", "qwen2", labels=("score",)),
            "two": save_reward_model(root / "rm-two", "gpt2", labels=("bad", "good"))}


# ------------------------------------------------------------------ prompt files


def test_prompt_files_jsonl_and_plain_text(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a b", "x": 1}\n\n  \n{"prompt": "line\\nbreak"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a b", "line\nbreak"]
    (tmp_path / "p.txt").write_text("first prompt \n\nsecond\n")
    assert read_prompts(tmp_path / "p.txt") == ["first prompt ", "second"]  # as written, blank lines skipped


@pytest.mark.parametrize("text,message", [
    ("", "holds no prompts"),
    ("\n \n", "holds no prompts"),
    ('{"prompt": "ok"}\n{"prompt": 3}\n', ":2: expected an object"),
    ('{"prompt": "ok"}\n["a"]\n', ":2: expected an object"),
    ('{"text": "ok"}\n', ":1: expected an object"),
    ('{"prompt": ""}\n', ":1: expected an object"),
    ('{"prompt": "ok"}\n\n{"prompt": "x",,}\n', ":3: not a JSON line"),
])
def test_bad_prompt_files_name_the_field_and_line(tmp_path, text, message):
    (tmp_path / "p.jsonl").write_text(text)
    with pytest.raises(ValueError, match="train_prompts: ") as e:
        read_prompts(tmp_path / "p.jsonl", "train_prompts")
    assert message in str(e.value)
    with pytest.raises(FileNotFoundError, match="test_prompts: prompt file .*nope.txt not found"):
        read_prompts(tmp_path / "nope.txt", "test_prompts")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompts(tmp_path / "bin.txt")


# ------------------------------------------------------------------ reward entries


def test_reward_entries_parse_and_round_trip(tmp_path):
    s = RewardSpec.parse("sentiment")
    assert (s.kind, s.target, s.name, s.entry()) == ("builtin", "sentiment", "sentiment", "sentiment")
    s = RewardSpec.parse("hf:rm", base_dir=tmp_path)
    assert s.kind == "hf" and s.target == str(tmp_path / "rm") and s.name == "rm"
    assert s.entry() == f"hf:{tmp_path / 'rm'}"
    s = RewardSpec.parse({"hf": "rm", "input": "pair", "label": "good", "name": "helpful"}, base_dir=tmp_path)
    assert s.entry() == {"hf": str(tmp_path / "rm"), "input": "pair", "label": "good", "name": "helpful"}
    assert RewardSpec.parse(s.entry()) == s
    s = RewardSpec.parse("my.module:score")
    assert (s.kind, s.target, s.name) == ("callable", "my.module:score", "score")
    s = RewardSpec.parse("r.py:score", base_dir=tmp_path)
    assert s.target == f"{tmp_path / 'r.py'}:score"
    s = RewardSpec.parse({"builtin": "conciseness", "args": {"target": 3}})
    assert get_reward(s.entry())([""], ["a b c d"]) == [0.0] and s.build()([""], ["a"]) == [pytest.approx(2 / 3)]
    for bad, message in [({"hf": "x", "builtin": "y"}, "exactly one of the keys"), ({}, "exactly one of the keys"),
                         ({"builtin": "length", "target": 3}, r"unknown option\(s\) \['target'\]"),
                         ({"hf": ""}, "hf must be a non-empty string"), (3, "a reward is a name"),
                         ("mod:not an identifier", "'module:function'"), ({"builtin": "length", "args": [1]}, "args"),
                         ("hf:", "needs a reward-model directory")]:
        with pytest.raises(ValueError, match=message):
            RewardSpec.parse(bad, "rewards[1]")
    with pytest.raises(ValueError, match=r"rewards\[0\]: reward 'conciseness'"):
        RewardSpec.parse({"builtin": "conciseness", "args": {"target": 0}}).check("rewards[0]")
    with pytest.raises(ValueError, match="unknown reward 'wit'"):
        RewardSpec.parse("wit").check()


def test_reward_model_options_are_checked_before_loading(rms):
    for options, message in [({"device": "tpu"}, "device must be"), ({"dtype": "int8"}, "dtype"),
                             ({"batch_size": 0}, "batch_size must be a positive integer"),
                             ({"input": "both"}, "input must be one of"),
                             ({"chat_template": "yes"}, "chat_template must be true or false")]:
        with pytest.raises(ValueError, match=message):
            RewardSpec.parse({"hf": str(rms["one"]), **options}).check("rewards[0]")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"rewards\[0\]: device 'cuda' asked for"):
            RewardSpec.parse({"hf": str(rms["one"]), "device": "cuda"}).check("rewards[0]")


def test_callable_rewards_from_a_file_and_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def shout(prompts, responses):\n"
                                            "    return [float(r.count('!')) for r in responses]\n")
    fn = get_reward(f"{tmp_path / 'my_rewards.py'}:shout")
    assert fn(["p", "q"], ["hi!!", "no"]) == [2.0, 0.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_reward("my_rewards:shout")(["p"], ["!"]) == [1.0]
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        get_reward("no_such_module:f")
    with pytest.raises(FileNotFoundError, match="reward file"):
        get_reward(f"{tmp_path / 'missing.py'}:f")


# ------------------------------------------------------------------ reward models


def _direct(rm_dir, texts, pairs=None, label=0):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float64).eval()
    out = []
    for i, t in enumerate(texts):  # one row at a time: no padding at all
        enc = tok(t, pairs[i]) if pairs is not None else tok(t)
        with torch.no_grad():
            out.append(model(**{k: torch.tensor([v]) for k, v in enc.items()}).logits[0, label].item())
    return np.array(out)


def test_reward_model_inputs_match_a_direct_forward(rms):
    prompts = ["The user asks", "A", "Thank you for the clear explanation"]
    responses = [" politely and briefly.", " b c d e", "!"]
    tok = tokenizer()
    chats = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                     tokenize=False) for p, r in zip(prompts, responses)]
    cases = [({"hf": str(rms["one"])}, [p + r for p, r in zip(prompts, responses)], None, 0),
             ({"hf": str(rms["one"]), "chat_template": True}, chats, None, 0),
             ({"hf": str(rms["one"]), "input": "response"}, responses, None, 0),
             ({"hf": str(rms["two"]), "input": "pair", "label": "good"}, prompts, responses, 1),
             ({"hf": str(rms["two"]), "input": "pair", "label": 0}, prompts, responses, 0)]
    for entry, texts, pairs, label in cases:
        want = _direct(entry["hf"], texts, pairs, label)
        for bs in (1, 2, 8):  # batched with right padding: the same scores
            fn = get_reward({**entry, "batch_size": bs})
            np.testing.assert_allclose(fn(prompts, responses), want, rtol=1e-4, atol=1e-5, err_msg=str(entry))
    bf16 = get_reward({"hf": str(rms["one"]), "dtype": "bf16"})
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    np.testing.assert_allclose(bf16(prompts, responses), _direct(rms["one"], cases[0][1]), atol=0.1)


def test_reward_models_that_do_not_fit_are_refused_without_loading(rms, tmp_path):
    from bonesoup.train.reward_models import inspect_reward_model

    assert inspect_reward_model(rms["two"], label="good")["label"] == 1
    assert inspect_reward_model(rms["one"])["label"] == 0
    with pytest.raises(ValueError, match=r"2 labels \{0: 'bad', 1: 'good'\}; say which"):
        inspect_reward_model(rms["two"], what="rewards[1]")
    with pytest.raises(ValueError, match="label must be in"):
        inspect_reward_model(rms["two"], label=2)
    with pytest.raises(ValueError, match="needs input 'text'"):
        inspect_reward_model(rms["one"], input="pair", chat_template=True)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        inspect_reward_model(tmp_path)
    shutil.copytree(rms["one"], tmp_path / "no-template")
    cfg = json.loads((tmp_path / "no-template" / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "no-template" / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "no-template" / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="has no chat template"):
        inspect_reward_model(tmp_path / "no-template", chat_template=True)


# ------------------------------------------------------------------ the task spec and its fingerprint


def test_the_embedded_task_is_one_spec():
    from bonesoup.tasks.review import TASK_MAX_NEW_TOKENS, TASK_REWARDS, task_prompts

    spec = task_spec()
    assert spec.name == "review" and spec.sft is None and spec.reward_names == list(TASK_REWARDS)
    assert spec.prompts["train"] == task_prompts("train") and spec.prompts["test"] == task_prompts("test")
    assert spec.prompts["validation"] == spec.prompts["train"] and spec.max_new_tokens == TASK_MAX_NEW_TOKENS
    cfg = ExperimentConfig()
    cfg.check()
    assert cfg.resolved().rewards == TASK_REWARDS and cfg.resolved().max_new_tokens == TASK_MAX_NEW_TOKENS
    with pytest.raises(ValueError, match="task: unknown task 'nope'"):
        task_spec(task="nope")


def test_fingerprints_follow_file_contents_not_paths(tmp_path, rms):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train.txt").write_text("one\ntwo\n")
    (tmp_path / "r.py").write_text("def f(p, r):\n    return [0.0] * len(r)\n")
    shutil.copytree(rms["one"], tmp_path / "rm")

    def desc(train, rm="rm"):
        return task_spec(train_prompts=str(train), rewards=[f"hf:{tmp_path / rm}", f"{tmp_path / 'r.py'}:f"],
                         device="cpu").description()

    d0 = desc(tmp_path / "a" / "train.txt")
    shutil.copy(tmp_path / "a" / "train.txt", tmp_path / "moved.txt")
    shutil.copytree(tmp_path / "rm", tmp_path / "rm-moved")
    assert desc(tmp_path / "moved.txt", "rm-moved") == d0  # same contents elsewhere: the same models
    (tmp_path / "moved.txt").write_text("one\nthree\n")
    assert desc(tmp_path / "moved.txt")["prompts"] != d0["prompts"]
    cfg = json.loads((tmp_path / "rm" / "tokenizer_config.json").read_text())
    (tmp_path / "rm" / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 77}))
    assert desc(tmp_path / "a" / "train.txt")["rewards"][0] != d0["rewards"][0]  # a changed tokenizer: new input
    (tmp_path / "r.py").write_text("def f(p, r):\n    return [1.0] * len(r)\n")
    assert desc(tmp_path / "a" / "train.txt")["rewards"][1] != d0["rewards"][1]


# ------------------------------------------------------------------ config files


def test_yaml_and_json_config_files_mean_the_same(tmp_path):
    values = {"sft": "ckpt", "train_prompts": "data/t.jsonl", "rewards": ["sentiment", "hf:rm", {"hf": "rm2"}],
              "seeds": [0, 1], "ppo_steps": 3, "out": "here"}
    (tmp_path / "c.json").write_text(json.dumps(values))
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))
    a, b = read_config_file(tmp_path / "c.json", FIELDS), read_config_file(tmp_path / "c.yaml", FIELDS)
    assert a == b
    assert a["sft"] == str(tmp_path / "ckpt") and a["train_prompts"] == str(tmp_path / "data" / "t.jsonl")
    assert a["rewards"] == ("sentiment", f"hf:{tmp_path / 'rm'}", f"hf:{tmp_path / 'rm2'}")
    assert a["seeds"] == (0, 1) and a["out"] == "here"  # the output stays relative to the working directory
    for text, suffix, message in [("[1, 2]", ".json", "top level must be a mapping"),
                                  ("a: [1,\n", ".yaml", "not valid YAML"), ("{", ".json", "not valid JSON"),
                                  ("ppo_steps: 1\nbogus: 2\nworse: 3\n", ".yaml",
                                   r"unknown fields \['bogus', 'worse'\]")]:
        (tmp_path / f"bad{suffix}").write_text(text)
        with pytest.raises(ValueError, match=message):
            read_config_file(tmp_path / f"bad{suffix}", FIELDS)
    with pytest.raises(ValueError, match="ends in .yaml, .yml or .json"):
        read_config_file(tmp_path / "c.toml", FIELDS)
    with pytest.raises(FileNotFoundError, match="--config"):
        read_config_file(tmp_path / "missing.yaml", FIELDS)


def test_flags_override_the_config_file(tmp_path):
    import argparse

    from bonesoup.eval.experiment import add_experiment_parser, config_from_args

    (tmp_path / "c.yaml").write_text("ppo_steps: 3\nrewards: [sentiment, length]\neval_batch_size: 5\n")
    parser = argparse.ArgumentParser()
    add_experiment_parser(parser.add_subparsers())
    args = parser.parse_args(["experiment", "--config", str(tmp_path / "c.yaml"), "--ppo-steps", "7",
                              "--dtype", "bfloat16", "--rewards", "conciseness", "hf:x"])
    cfg = config_from_args(args)
    assert cfg.ppo_steps == 7 and cfg.eval_batch_size == 5 and cfg.dtype == "bfloat16"
    assert cfg.rewards == ("conciseness", "hf:x")


def test_run_fields_are_checked():
    for kw, message in [(dict(lora_rank=0), "lora_rank must be a positive integer"),
                        (dict(device="tpu:0"), "device must be"), (dict(dtype="int8"), "dtype"),
                        (dict(rollout_batch_size=0), "rollout_batch_size"),
                        (dict(eval_batch_size=0), "eval_batch_size"),
                        (dict(rewards=("sentiment", "sentiment")), "each objective once"),
                        (dict(rewards=("sentiment",)), "2 objectives")]:
        with pytest.raises(ValueError, match=message):
            ExperimentConfig(**kw).check()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            ExperimentConfig(device="cuda").check()
