"""The three-objective task: sentiment, conciseness and detail on reviews, so n = 3 runs offline.

The review task's prompts and endings, plus per prompt one ending that mixes
descriptive (valence-free) adjectives with positive or negative ones
(``"quiet, lovely and small."``). Rewards: VADER ``sentiment``,
``conciseness`` and ``detail`` (``1 - 2^-D``, D descriptive adjectives;
:mod:`bonesoup.tasks.rewards_extra`). Each list slot holds a positive or a
descriptive word and every word costs conciseness: a three-way trade-off.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from bonesoup.tasks import review
from bonesoup.tasks.corpus_sft import OPENERS, SUBJECTS, adjective_list, build_corpus_sft, review_prompts
from bonesoup.tasks.lexicons import DESCRIPTIVE_WORDS, NEGATIVE_WORDS, POSITIVE_WORDS

__all__ = ["TASK_REWARDS", "TASK_MAX_NEW_TOKENS", "task_corpus", "task_prompts", "build_task_sft"]

TASK_REWARDS = ("sentiment", "conciseness", "detail")
TASK_MAX_NEW_TOKENS = 20


def task_corpus(seed: int = 0) -> list[str]:
    """The review corpus plus one mixed descriptive + polar list per prompt (1008 sentences), shuffled."""
    rng = random.Random(10_000 + seed)
    out = review.task_corpus(seed)
    for opener in OPENERS:
        for s in SUBJECTS:
            k = rng.randint(2, 4)
            d = rng.randint(1, k - 1)
            polar = POSITIVE_WORDS if rng.random() < 0.5 else NEGATIVE_WORDS
            words = rng.sample(DESCRIPTIVE_WORDS, d) + rng.sample(polar, k - d)
            rng.shuffle(words)
            out.append(f"{opener.format(s=s)} {adjective_list(rng, words, k)}")
    rng.shuffle(out)
    return out


def task_prompts(split: str = "train") -> list[str]:
    """The review task's prompts (:func:`bonesoup.tasks.corpus_sft.review_prompts`)."""
    return review_prompts(split)


def build_task_sft(out_dir: str | os.PathLike, *, seed: int = 0, force: bool = False, progress: bool = False) -> Path:
    """The task's tiny GPT-2 SFT checkpoint (:func:`bonesoup.tasks.corpus_sft.build_corpus_sft`), cached."""
    return build_corpus_sft(out_dir, task_corpus(seed), task_corpus(), seed=seed, force=force, progress=progress)
