"""A task as data: an SFT checkpoint, prompts per split, rewards and a response length.

:func:`task_spec` turns the task fields of a config file (or of the
``experiment`` / ``train`` flags) into one :class:`TaskSpec`, the only thing
the experiment and the training commands read a task from. An embedded task
(:mod:`bonesoup.tasks.registry`, ``"review"`` the default) is one such spec:
its SFT model is built in code and its prompts and rewards come from code.
The user's own task names files instead:

- ``sft``: a Hugging Face causal-LM checkpoint directory (with its tokenizer);
- ``train_prompts``, ``test_prompts`` and optionally ``validation_prompts``:
  JSONL files (``.jsonl``) with a ``"prompt"`` field per line, or plain text,
  one prompt per line (blank lines skipped). Without a validation file the
  validation slice is a prefix of the training prompts, as in the embedded task;
- ``rewards``: one entry per objective
  (:class:`bonesoup.train.reward_spec.RewardSpec`: a built-in name, ``hf:DIR``,
  ``module:function``, or a mapping with options).

Every check happens here, before anything is trained, with a message that
names the config field (and ``file:line`` for a bad prompt line).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["check_sft", "TASK_FIELDS", "PATH_FIELDS", "OWN_TASK_MAX_NEW_TOKENS", "TaskSpec", "read_prompts", "task_spec",
           "resolve_paths"]

#: Config fields that describe the task (the experiment's and ``train``'s alike); the path fields among them
#: resolve against the config file's directory.
TASK_FIELDS = ("task", "sft", "train_prompts", "validation_prompts", "test_prompts", "rewards", "max_new_tokens")
PATH_FIELDS = ("sft", "train_prompts", "validation_prompts", "test_prompts")
#: Response length of a user's task whose config leaves ``max_new_tokens`` out.
OWN_TASK_MAX_NEW_TOKENS = 64


def read_prompts(path: str | os.PathLike, what: str = "prompts") -> list[str]:
    """The prompts of a file: JSONL (``.jsonl``: an object with a string ``"prompt"`` per line) or plain text.

    Plain text is one prompt per line, taken as written (without the line
    break). Blank lines are skipped in both. Refuses (ValueError naming
    ``what`` and ``file:line``) a line that is not JSON, not an object or
    lacks a non-empty string ``"prompt"``, and a file without prompts;
    FileNotFoundError naming ``what`` for a missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: prompt file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: {path} is not UTF-8 text ({e})") from None
    prompts = []
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{what}: {path}:{i}: not a JSON line ({e.args[0] if e.args else e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise ValueError(f'{what}: {path}:{i}: expected an object with a non-empty string "prompt", '
                             f"got {line.strip()[:80]!r}")
        prompts.append(obj["prompt"])
    if not prompts:
        raise ValueError(f"{what}: prompt file {path} holds no prompts")
    return prompts


@dataclass
class TaskSpec:
    """Everything the experiment and ``train`` take from a task; built by :func:`task_spec`.

    Attributes
    ----------
    name : str
        The embedded task's name, or ``"own"`` for a task of the user's checkpoint and files.
    rewards : tuple of RewardSpec
        One per objective, in order.
    prompts : dict
        ``{"train": [...], "validation": [...], "test": [...]}`` (lists of str).
    max_new_tokens : int
        Response length of training and evaluation.
    sft : Path or None
        The SFT checkpoint directory; None: the embedded task builds it (:meth:`sft_dir`).
    sources : dict
        Where each part came from (files, or ``"embedded:<name>"``), for the results file.
    """

    name: str
    rewards: tuple
    prompts: dict
    max_new_tokens: int
    sft: Path | None = None
    build_sft: Callable | None = None
    sources: dict = field(default_factory=dict)
    _fns: list | None = field(default=None, repr=False)
    _description: dict | None = field(default=None, repr=False)

    @property
    def reward_names(self) -> list[str]:
        return [r.name for r in self.rewards]

    def sft_dir(self, out_dir: str | os.PathLike, *, progress: bool = False) -> Path:
        """The SFT checkpoint: the user's directory, or the embedded task's built (once) under ``out_dir``."""
        if self.sft is not None:
            return self.sft
        return Path(self.build_sft(Path(out_dir), progress=progress))

    def reward_fns(self) -> list:
        """The reward functions, built once per spec (a reward model loads once and serves every run)."""
        if self._fns is None:
            self._fns = [r.build() for r in self.rewards]
        return self._fns

    def description(self) -> dict:
        """What a model trained on this task depends on besides its SFT: prompts and rewards, by content.

        Computed once per spec (a reward model's weights are hashed, which takes seconds for a large one).
        """
        from bonesoup.fingerprint import fingerprint

        if self._description is None:
            self._description = {"prompts": fingerprint(self.prompts["train"]),
                                 "rewards": [r.description() for r in self.rewards]}
        return self._description


def check_sft(path: Path, what: str = "sft") -> None:
    """Refuse, from its config and tokenizer alone, a directory that cannot be the policy (naming ``what``).

    It must hold a causal LM (``*ForCausalLM`` / ``*LMHeadModel``: another head would be initialised at
    random) and a tokenizer with EOS and a pad token distinct from it (PPO masks padding after EOS).
    """
    from transformers import AutoConfig, AutoTokenizer

    from bonesoup.train.ppo.rollout import check_special_tokens

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what}: {path} is not a checkpoint directory (no config.json)")
    archs = list(getattr(AutoConfig.from_pretrained(path), "architectures", None) or [])
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ValueError(f"{what}: {path} holds {archs}, not a causal LM (*ForCausalLM / *LMHeadModel)")
    try:
        check_special_tokens(AutoTokenizer.from_pretrained(path))
    except ValueError as e:
        raise ValueError(f"{what}: {path}: {e}") from None


def _entries(rewards) -> list:
    if isinstance(rewards, (str, bytes)) or not isinstance(rewards, Sequence):
        raise ValueError(f"rewards must be a list of reward entries (one per objective), got {rewards!r}")
    return list(rewards)


def task_spec(*, task: str = "review", sft=None, train_prompts=None, validation_prompts=None, test_prompts=None,
              rewards=None, max_new_tokens: int | None = None, device: str | None = None, dtype: str | None = None,
              check_rewards: bool = True, required_with_sft: Sequence[str] = ("train_prompts", "test_prompts",
                                                                               "rewards")) -> TaskSpec:
    """Resolve a task's fields into a :class:`TaskSpec`, checking every one (ValueError naming the field).

    Fields left out come from the embedded task ``task``. With ``sft`` (the
    user's checkpoint) the embedded task's prompts and rewards are made for
    another model: the fields in ``required_with_sft`` are then required (the
    experiment: all three; ``bonesoup train`` lets them fall back).
    ``device`` / ``dtype``: the defaults of ``hf`` reward models that set none.
    ``check_rewards``: inspect each reward (reward-model configs, imports) now.
    """
    from bonesoup.tasks.registry import get_task
    from bonesoup.train.reward_spec import RewardSpec

    if not isinstance(task, str):
        raise ValueError(f"task must be the name of an embedded task, got {task!r}")
    try:
        embedded = get_task(task)
    except ValueError as e:
        raise ValueError(f"task: {e}") from None
    sources: dict = {}
    if sft is not None:
        sft = Path(sft)
        check_sft(sft)
        for name, v in (("train_prompts", train_prompts), ("test_prompts", test_prompts), ("rewards", rewards)):
            if v is None and name in required_with_sft:
                raise ValueError(f"{name}: required with sft (the embedded task's {name} are made for its own model)")
        sources["sft"] = str(sft)
    else:
        sources["sft"] = f"embedded:{task}"
    prompts = {}
    for split, path in (("train", train_prompts), ("test", test_prompts)):
        if path is None:
            prompts[split] = list(embedded.prompts(split))
            sources[f"{split}_prompts"] = f"embedded:{task}"
        else:
            prompts[split] = read_prompts(path, f"{split}_prompts")
            sources[f"{split}_prompts"] = str(path)
    if validation_prompts is None:
        prompts["validation"] = prompts["train"]  # the validation slice is a prefix of the training prompts
        sources["validation_prompts"] = "prefix of train_prompts"
    else:
        prompts["validation"] = read_prompts(validation_prompts, "validation_prompts")
        sources["validation_prompts"] = str(validation_prompts)
    entries = _entries(embedded.rewards if rewards is None else rewards)
    if not entries:
        raise ValueError("rewards: at least one reward is needed")
    specs = tuple(RewardSpec.parse(e, f"rewards[{i}]").with_defaults(device=device, dtype=dtype)
                  for i, e in enumerate(entries))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"rewards: each objective once, with distinct names (set 'name' to tell two apart), "
                         f"got {names}")
    if check_rewards:
        for i, s in enumerate(specs):
            s.check(f"rewards[{i}]")
    if max_new_tokens is None:
        max_new_tokens = embedded.max_new_tokens if sft is None else OWN_TASK_MAX_NEW_TOKENS
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    return TaskSpec(name=task if sft is None else "own", rewards=specs, prompts=prompts,
                    max_new_tokens=max_new_tokens, sft=sft, build_sft=None if sft is not None else embedded.build_sft,
                    sources=sources)


def resolve_paths(values: dict, base_dir: str | os.PathLike) -> dict:
    """A config file's values with its relative paths (path fields, reward directories and files) made absolute
    against ``base_dir`` (the config file's directory), so the file means the same from any working directory."""
    from bonesoup.train.reward_spec import RewardSpec

    out = dict(values)
    base = Path(base_dir)
    for k in PATH_FIELDS:
        v = out.get(k)
        if isinstance(v, str) and v:
            p = Path(v).expanduser()
            out[k] = str(p if p.is_absolute() else (base / p).absolute())
    if isinstance(out.get("rewards"), list):
        out["rewards"] = [RewardSpec.parse(e, f"rewards[{i}]", base).entry() for i, e in enumerate(out["rewards"])]
    return out
