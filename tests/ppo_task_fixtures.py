"""Fixtures shared by the PPO / training tests: the embedded task's SFT model, built once per session.

Import the fixture into a test module (``from ppo_task_fixtures import task_sft``).
It is rebuilt at most once per session: build_task_sft reuses a directory
that holds a model with the same fingerprint, and the directory is the
session's base temp dir.
"""

import pytest
import torch


@pytest.fixture(scope="session")
def task_sft(tmp_path_factory):
    from bonesoup.tasks.review import build_task_sft

    with torch.random.fork_rng(devices=[]):
        return build_task_sft(tmp_path_factory.getbasetemp() / "task-sft")


def tiny_policy(sft_path):
    """(policy, tokenizer) of the task SFT model, fp32, fresh from disk."""
    from bonesoup.train.ppo.checkpoint_training import load_policy

    return load_policy(sft_path)
