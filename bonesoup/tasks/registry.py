"""The embedded tasks by name: what an experiment needs from a task that ships with the code.

A task is data: an SFT checkpoint, prompts per split, reward names and a
response length. An embedded task makes all of it in code (no download);
a user's own task names directories and files instead (the experiment's
config file). Both end up as the same fields, so the experiment never
asks which kind it runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["EmbeddedTask", "register_task", "get_task", "task_names"]


@dataclass(frozen=True)
class EmbeddedTask:
    """One embedded task.

    Attributes
    ----------
    name : str
        Registry key (``"review"``: the default).
    rewards : tuple of str
        Registered reward names (:func:`bonesoup.train.rewards.get_reward`), in objective order.
    prompts : callable ``(split) -> list[str]``
        ``split`` in ``"train"``, ``"test"``; the validation prompts are a prefix of ``"train"``.
    build_sft : callable ``(out_dir, *, progress) -> Path``
        Builds (or finds, by fingerprint) the task's SFT checkpoint in ``out_dir``.
    max_new_tokens : int
        Response length for training and evaluation.
    description : str
        One line for ``--help`` and the results file.
    """

    name: str
    rewards: tuple
    prompts: Callable[[str], list]
    build_sft: Callable[..., Path]
    max_new_tokens: int
    description: str = ""


_TASKS: dict[str, EmbeddedTask] = {}


def register_task(task: EmbeddedTask) -> EmbeddedTask:
    """Add ``task`` under ``task.name`` (refusing a second task of the same name)."""
    if task.name in _TASKS:
        raise ValueError(f"an embedded task named {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def _load_builtin() -> None:
    if "review" in _TASKS:
        return
    from bonesoup.tasks import register, review, review3

    def build(module):
        def build_sft(out_dir: str | os.PathLike, *, progress: bool = False) -> Path:
            return module.build_task_sft(out_dir, progress=progress)

        return build_sft

    register_task(EmbeddedTask("review", review.TASK_REWARDS, review.task_prompts, build(review),
                               review.TASK_MAX_NEW_TOKENS,
                               "short reviews; sentiment vs conciseness (one-sided conflict)"))
    register_task(EmbeddedTask("register", register.TASK_REWARDS, register.task_prompts, build(register),
                               register.TASK_MAX_NEW_TOKENS,
                               "short reviews; formality vs casualness (two-sided conflict)"))
    register_task(EmbeddedTask("review3", review3.TASK_REWARDS, review3.task_prompts, build(review3),
                               review3.TASK_MAX_NEW_TOKENS,
                               "short reviews; sentiment vs conciseness vs detail (three objectives)"))


def get_task(name: str) -> EmbeddedTask:
    """The embedded task ``name``; ValueError naming the registered ones otherwise."""
    _load_builtin()
    try:
        return _TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; embedded tasks: {sorted(_TASKS)}") from None


def task_names() -> list[str]:
    """Names of the embedded tasks, sorted."""
    _load_builtin()
    return sorted(_TASKS)
