"""``bonesoup train`` / ``bonesoup train-all`` on the embedded task (a couple of steps each)."""

import json

import pytest
from ppo_task_fixtures import task_sft  # noqa: F401  (fixture)

from bonesoup.cli import main

FAST = ["--batch-size", "16", "--mini-batch-size", "8", "--epochs", "1", "--max-new-tokens", "8", "--no-progress"]


def test_train_backbone_writes_a_checkpoint(task_sft, tmp_path, capsys):
    out = tmp_path / "backbone-1"
    assert main(["train", "--sft", str(task_sft), "--backbone", "1", "--beta", "0.8", "--steps", "2",
                 "--out", str(out), *FAST]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == pytest.approx([0.2, 0.8]) and report["steps"] == 2
    meta = json.loads((out / "bonesoup-train.json").read_text())
    assert meta["weights"] == pytest.approx([0.2, 0.8]) and meta["rewards"] == ["sentiment", "conciseness"]
    assert meta["normalization"] is None and meta["combination"] == "backbone-1"
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_log.png"):
        assert (out / name).is_file(), name
    # Existing output: refused (exit 2, one line naming it), replaced with --force.
    assert main(["train", "--sft", str(task_sft), "--expert", "0", "--steps", "1", "--out", str(out), *FAST]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["train", "--sft", str(task_sft), "--expert", "0", "--steps", "1", "--out", str(out), "--force",
                 *FAST]) == 0
    assert json.loads((out / "bonesoup-train.json").read_text())["weights"] == [1.0, 0.0]


@pytest.mark.parametrize("args,message", [
    (["--backbone", "0"], "beta is required"),
    (["--expert", "0", "--beta", "0.7"], "--beta applies to --backbone only"),
    (["--preference", "0.5", "0.6"], "preference must sum to 1"),
    (["--expert", "2"], "expert must be an integer in"),
    (["--expert", "0", "--rewards", "sentiment", "wit"], "unknown reward 'wit'"),
    (["--expert", "0", "--batch-size", "12"], "batch_size"),
])
def test_train_refuses_bad_arguments(task_sft, tmp_path, capsys, args, message):
    assert main(["train", "--sft", str(task_sft), "--steps", "1", "--out", str(tmp_path / "x"), *FAST, *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_train_all_with_normalisation_and_eval(task_sft, tmp_path, capsys):
    root = tmp_path / "all"
    assert main(["train-all", "--sft", str(task_sft), "--beta", "0.7", "--steps", "1", "--normalize", "--eval",
                 "--eval-samples", "1", "--out", str(root), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "backbone-1" in printed and "KL" in printed
    summary = json.loads((root / "train-all.json").read_text())
    assert sorted(summary["models"]) == ["backbone-0", "backbone-1"]
    norm = json.loads((root / "reward_normalization.json").read_text())
    assert len(norm["mean"]) == 2 and all(s > 0 for s in norm["std"])
    ev = summary["eval"]
    assert set(ev) == {"sft", "backbone-0", "backbone-1"} and ev["sft"]["n"] == 42
    assert set(ev["backbone-0"]) >= {"rewards", "score", "sft_score", "kl"}
    for j in range(2):
        meta = json.loads((root / f"backbone-{j}" / "bonesoup-train.json").read_text())
        assert meta["normalization"] == norm
    # Re-running without --force refuses before training anything.
    assert main(["train-all", "--sft", str(task_sft), "--beta", "0.7", "--steps", "1", "--out", str(root),
                 *FAST]) == 2
    assert "already exists" in capsys.readouterr().err
