"""Sequence-classification reward models (a task's ``hf:DIR`` rewards) as reward functions.

A reward model is any transformers ``*ForSequenceClassification`` checkpoint
(a Llama / Qwen2 / DeBERTa RM on a GPU, a tiny one in the tests). One logit
of it is the reward: the only one of a one-output RM, otherwise the label
the task names (an index or a name of ``config.id2label``). The model reads
one of three inputs:

- ``"text"``: prompt + response as one text (with ``chat_template``: the
  conversation ``[user: prompt, assistant: response]`` rendered by the
  tokenizer's chat template, as chat RMs were trained);
- ``"pair"``: the tokenizer's (prompt, response) text pair (cross-encoder RMs);
- ``"response"``: the response alone.

:func:`inspect_reward_model` checks a directory from its config and
tokenizer alone (no weights read), so an experiment refuses a reward model
whose labels do not fit before anything is trained.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["REWARD_MODEL_INPUTS", "inspect_reward_model", "resolve_label", "SequenceClassifierReward"]

#: What a reward model reads: see the module docstring.
REWARD_MODEL_INPUTS = ("text", "pair", "response")


def resolve_label(config, label, what: str = "label") -> int:
    """The logit index of ``label`` (int index, label name or None) for a model ``config``; ValueError naming ``what``.

    None is the single logit of a one-output RM; a model with several labels
    must be told which one is the reward.
    """
    n = int(config.num_labels)
    names = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
    if label is None:
        if n == 1:
            return 0
        raise ValueError(f"{what}: the reward model has {n} labels {names}; say which logit is the reward "
                         "(an index or a label name)")
    if isinstance(label, str):
        by_name = {v: k for k, v in names.items()}
        if label not in by_name:
            raise ValueError(f"{what}: the reward model has no label {label!r}; its labels: {names}")
        return by_name[label]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n:
        raise ValueError(f"{what}: label must be in [0, {n}) for this model (labels {names}), got {label!r}")
    return label


def _check_input(input: str, chat_template: bool, what: str) -> None:
    if input not in REWARD_MODEL_INPUTS:
        raise ValueError(f"{what}: input must be one of {list(REWARD_MODEL_INPUTS)}, got {input!r}")
    if not isinstance(chat_template, bool):
        raise ValueError(f"{what}: chat_template must be true or false, got {chat_template!r}")
    if chat_template and input != "text":
        raise ValueError(f"{what}: chat_template renders the conversation as one text; it needs input 'text', "
                         f"got {input!r}")


def inspect_reward_model(path: str | os.PathLike, *, label=None, input: str = "text", chat_template: bool = False,
                         what: str = "reward model") -> dict:
    """Check a reward-model directory without reading its weights.

    Refuses (naming ``what`` and the directory) a missing directory or
    ``config.json``, a checkpoint that is not a sequence classifier (its head
    would be initialised at random), a ``label`` that does not fit the
    model's labels, a tokenizer without a pad token (batches need one) and a
    chat template asked of a tokenizer that has none.

    Returns
    -------
    dict
        ``{"label": int, "num_labels": int, "labels": {index: name}, "architectures": [...]}``.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what}: {path} is not a checkpoint directory (no config.json)")
    _check_input(input, chat_template, what)
    config = AutoConfig.from_pretrained(path)
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(f"{what}: {path} holds {archs}, not a *ForSequenceClassification reward model "
                         "(loading it as one would initialise the reward head at random)")
    index = resolve_label(config, label, what)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        raise ValueError(f"{what}: the tokenizer in {path} has no pad token; the reward model needs one to batch")
    if chat_template and not getattr(tok, "chat_template", None):
        raise ValueError(f"{what}: chat_template is on but the tokenizer in {path} has no chat template")
    return {"label": index, "num_labels": int(config.num_labels),
            "labels": {int(k): v for k, v in (config.id2label or {}).items()}, "architectures": archs}


class SequenceClassifierReward:
    """A transformers sequence-classification reward model as a reward function.

    Parameters
    ----------
    model : str, os.PathLike or transformers.PreTrainedModel
        A checkpoint directory / hub name (loaded with
        ``AutoModelForSequenceClassification`` in ``dtype`` on ``device``) or a loaded model.
    tokenizer : tokenizer or None
        Defaults to ``AutoTokenizer.from_pretrained(model)`` when ``model`` is a path.
    label : int, str or None
        Which logit is the reward: an index, a name of ``config.id2label``, or
        None for a one-output RM.
    input : {"text", "pair", "response"}
        What the model reads (module docstring).
    chat_template : bool
        Render ``[user: prompt, assistant: response]`` with the tokenizer's chat template (input "text").
    batch_size : int
        Pairs per forward pass.
    device, dtype
        Where and in which dtype the model runs (e.g. ``"cuda"``, ``torch.bfloat16``); None: fp32.
    max_length : int
        Longer inputs are truncated (from the right) to this many tokens.
    name : str, optional
        Name in logs (default ``"reward_model"``).

    Calling it with B prompts and B responses returns B floats (the logit, in fp32).
    """

    name = "reward_model"

    def __init__(self, model, tokenizer=None, *, label=None, input: str = "text", chat_template: bool = False,
                 batch_size: int = 32, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 max_length: int = 512, name: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        _check_input(input, chat_template, "reward model")
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            model = AutoModelForSequenceClassification.from_pretrained(model, dtype=dtype or torch.float32)
        if tokenizer is None:
            raise ValueError("tokenizer is required when model is a loaded model")
        self.label = resolve_label(model.config, label)
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; the reward model needs one to batch")
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template is on but the tokenizer has no chat template")
        # The classifier pools the last token that is not padding: it must know which id pads.
        model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.input, self.chat_template, self.batch_size, self.max_length = input, chat_template, batch_size, max_length
        if name is not None:
            self.name = name

    def _texts(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[list[str], list[str] | None]:
        if self.input == "pair":
            return list(prompts), list(responses)
        if self.input == "response":
            return list(responses), None
        if self.chat_template:
            return [self.tokenizer.apply_chat_template([{"role": "user", "content": p},
                                                        {"role": "assistant", "content": r}], tokenize=False)
                    for p, r in zip(prompts, responses)], None
        return [p + r for p, r in zip(prompts, responses)], None

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} and "
                             f"{len(responses)}")
        first, second = self._texts(prompts, responses)
        device = next(self.model.parameters()).device
        out: list[float] = []
        for i in range(0, len(first), self.batch_size):
            args = [first[i:i + self.batch_size]]
            if second is not None:
                args.append(second[i:i + self.batch_size])
            # Right padding: the classifier reads the last non-pad token, and positions start at 0
            # for every row (left pads would shift GPT-2's absolute positions). A rendered chat
            # template already holds its special tokens.
            enc = self.tokenizer(*args, padding=True, truncation=True, padding_side="right",
                                 max_length=self.max_length, return_tensors="pt",
                                 add_special_tokens=not self.chat_template).to(device)
            logits = self.model(**enc).logits.float()
            out.extend(logits[:, self.label].tolist())
        return out
