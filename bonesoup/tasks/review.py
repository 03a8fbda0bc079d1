"""The embedded task: short reviews, two rewards that pull apart, no download.

A corpus of short review sentences is generated in code: an opener with a
subject ("The hotel was", "Honestly, the concert was", ...) and an ending
that lists one to four positive, negative or neutral adjectives ("great.",
"dirty, rude and noisy.") or is a longer phrase. A byte-level BPE tokenizer
is trained on it in code and a tiny GPT-2 (2 layers, 64 wide) is fine-tuned
on it for some seconds: the SFT model writes both happy and unhappy endings,
short and long.

The two built-in rewards are VADER ``sentiment`` of the response and
``conciseness`` (``1 - words / 12``). They conflict: VADER's compound score
grows with the number of positive words (``"good."`` 0.44, ``"good, fun and
lovely."`` 0.88), so the most positive responses are long, while every word
costs conciseness. A policy trained on sentiment alone writes longer
responses than the SFT model, and one trained on a mixture settles at a list
length that depends on the weights (README: measured).

Prompts are opener + subject; a fixed quarter of them is held out for
evaluation (``task_prompts("test")``).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from bonesoup.tasks.corpus_sft import OPENERS, SUBJECTS, adjective_list, build_corpus_sft, review_prompts
from bonesoup.tasks.lexicons import DESCRIPTIVE_WORDS, NEGATIVE_WORDS, POSITIVE_WORDS

__all__ = [
    "TASK_REWARDS",
    "TASK_MAX_NEW_TOKENS",
    "DEFAULT_TASK_DIR",
    "task_corpus",
    "task_prompts",
    "make_task_tokenizer",
    "build_task_sft",
    "task_reward_fns",
]

#: The two built-in rewards of the task, in objective order.
TASK_REWARDS = ("sentiment", "conciseness")
#: Response length used for training and evaluation on the task.
TASK_MAX_NEW_TOKENS = 20
#: Where the embedded SFT model goes by default (under the working directory, never the home).
DEFAULT_TASK_DIR = Path("out") / "task"

_PHRASES = (
    "really good and I enjoyed it.", "great, and the people were friendly.", "wonderful and we loved every minute.",
    "bad and I hated it.", "awful, and the people were rude.", "terrible and we regretted every minute.",
    "about what we expected.", "in the centre of town, near the station.", "the same as last year, more or less.",
    "good but noisy.", "noisy but good.", "small, but it had everything we needed.",
)


def task_corpus(seed: int = 0) -> list[str]:
    """The SFT corpus: five sentences per prompt, shuffled deterministically (840 in all).

    For each of the 168 prompts (opener + subject): two positive and two
    negative endings that list 1 to 4 adjectives (``"good."``, ``"good, fun
    and lovely."``), and one neutral list or a longer phrase. VADER's
    compound score grows with the number of adjectives of one polarity
    (0.44, 0.74, 0.88, 0.92 for 1 to 4 positive ones), while every word costs
    conciseness: the two task rewards trade off along the list length.
    """
    rng = random.Random(seed)
    out = []
    for opener in OPENERS:
        for s in SUBJECTS:
            prompt = opener.format(s=s)
            endings = [adjective_list(rng, words, rng.randint(1, 4))
                       for words in (POSITIVE_WORDS, POSITIVE_WORDS, NEGATIVE_WORDS, NEGATIVE_WORDS)]
            endings.append(adjective_list(rng, DESCRIPTIVE_WORDS, rng.randint(1, 2)) if rng.random() < 0.5
                           else rng.choice(_PHRASES))
            out.extend(f"{prompt} {e}" for e in endings)
    rng.shuffle(out)
    return out


def task_prompts(split: str = "train") -> list[str]:
    """Prompts of the task: ``"train"`` (126), ``"test"`` (42, held out) or ``"all"`` (168).

    The held-out quarter is fixed: every fourth (opener, subject) pair in a
    deterministic shuffle (:func:`bonesoup.tasks.corpus_sft.review_prompts`).
    """
    return review_prompts(split)


def make_task_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained on :func:`task_corpus` (``<|endoftext|>`` = EOS, ``<|pad|>`` = pad, left padding)."""
    from bonesoup.tasks.tiny_models import make_tiny_tokenizer

    return make_tiny_tokenizer(vocab_size, corpus=task_corpus())


def task_reward_fns() -> list:
    """The task's reward functions, in :data:`TASK_REWARDS` order."""
    from bonesoup.train.rewards import get_reward

    return [get_reward(name) for name in TASK_REWARDS]


def build_task_sft(out_dir: str | os.PathLike = DEFAULT_TASK_DIR / "sft", *, steps: int = 400, batch_size: int = 32,
                   lr: float = 3e-3, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, seed: int = 0,
                   force: bool = False, progress: bool = False) -> Path:
    """Fine-tune a tiny GPT-2 on :func:`task_corpus` and save it as a Hugging Face checkpoint.

    Reused when ``out_dir`` already holds a model built with the same
    arguments (a fingerprint in ``bonesoup-sft.json``), so tests and the CLI
    pay for it once; ``force`` rebuilds. Written atomically. Deterministic for
    a given seed, torch version and thread count (the global RNG is left as is).

    Returns the checkpoint directory (config, ``model.safetensors``, tokenizer).
    """
    args = dict(steps=steps, batch_size=batch_size, lr=lr, n_embd=n_embd, n_layer=n_layer, n_head=n_head, seed=seed)
    return build_corpus_sft(out_dir, task_corpus(seed), task_corpus(), **args, force=force, progress=progress)
