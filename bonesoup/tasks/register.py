"""The register task: formality vs casualness, a conflict on both sides, no download.

The same prompts as the review task (opener + subject, a fixed held-out
quarter). Endings list one to four adjectives of the formal register
(``"commendable and courteous."``), of the casual one (``"cool, comfy and
legit."``), of both (``"adequate and chill."``) or neutral ones. Rewards:
``formality`` and ``casualness`` (:mod:`bonesoup.tasks.rewards_extra`): each
register's words raise its own reward with diminishing returns and cost the
other its share of the words, so each reward's expert lowers the other reward
(the review task's conflict is one-sided: training on conciseness does not
lower sentiment).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from bonesoup.tasks.corpus_sft import OPENERS, SUBJECTS, adjective_list, build_corpus_sft, review_prompts
from bonesoup.tasks.lexicons import CASUAL_WORDS, DESCRIPTIVE_WORDS, FORMAL_WORDS

__all__ = ["TASK_REWARDS", "TASK_MAX_NEW_TOKENS", "task_corpus", "task_prompts", "build_task_sft"]

TASK_REWARDS = ("formality", "casualness")
TASK_MAX_NEW_TOKENS = 20


def _mixed(rng: random.Random) -> str:
    """A list of 2 to 4 adjectives with at least one of each register, shuffled."""
    k = rng.randint(2, 4)
    f = rng.randint(1, k - 1)
    words = rng.sample(FORMAL_WORDS, f) + rng.sample(CASUAL_WORDS, k - f)
    rng.shuffle(words)
    return adjective_list(rng, words, k)


def task_corpus(seed: int = 0) -> list[str]:
    """Five sentences per prompt, shuffled deterministically (840 in all).

    Per prompt: a formal list and a casual list (1 to 4 adjectives each), two
    lists that mix the registers, and a neutral list (1 or 2 adjectives), so
    the SFT model writes every mixture and neither reward is saturated.
    """
    rng = random.Random(seed)
    out = []
    for opener in OPENERS:
        for s in SUBJECTS:
            prompt = opener.format(s=s)
            endings = [adjective_list(rng, FORMAL_WORDS, rng.randint(1, 4)),
                       adjective_list(rng, CASUAL_WORDS, rng.randint(1, 4)), _mixed(rng), _mixed(rng),
                       adjective_list(rng, DESCRIPTIVE_WORDS, rng.randint(1, 2))]
            out.extend(f"{prompt} {e}" for e in endings)
    rng.shuffle(out)
    return out


def task_prompts(split: str = "train") -> list[str]:
    """The review task's prompts (:func:`bonesoup.tasks.corpus_sft.review_prompts`)."""
    return review_prompts(split)


def build_task_sft(out_dir: str | os.PathLike, *, seed: int = 0, force: bool = False, progress: bool = False) -> Path:
    """The task's tiny GPT-2 SFT checkpoint (:func:`bonesoup.tasks.corpus_sft.build_corpus_sft`), cached."""
    return build_corpus_sft(out_dir, task_corpus(seed), task_corpus(), seed=seed, force=force, progress=progress)
