"""The rewards of the extra embedded tasks: lexicon counts, deterministic and fast, registered by name.

=================  =========================================================
``formality``      ``(1 - 2^-F) - C / W``: F formal and C casual words of the
                   :mod:`~bonesoup.tasks.lexicons`, W words in all (1 for an
                   empty response). In [-1, 1).
``casualness``     ``(1 - 2^-C) - F / W``: the mirror image.
``detail``         ``1 - 2^-D``, D descriptive (neutral) adjectives. In [0, 1).
=================  =========================================================

Formality and casualness conflict on both sides by construction: a word of
one register raises its reward with diminishing returns and costs the other
reward its share of the response, so a formality expert lowers casualness
and a casualness expert lowers formality (and a response that mixes both
registers scores in between on each, the regime where mixing pays).
Registered into :mod:`bonesoup.train.rewards` on import (``bonesoup.tasks``
imports this module), so ``get_reward("formality")`` works like a built-in.
"""

from __future__ import annotations

from typing import Sequence

from bonesoup.tasks.lexicons import CASUAL_WORDS, DESCRIPTIVE_WORDS, FORMAL_WORDS
# rewards.py's word split (so W counts what conciseness counts) and its argument check: one home each.
from bonesoup.train.rewards import _check_pairs, _words, register_reward

__all__ = ["LexiconCounts", "Formality", "Casualness", "Detail"]


class LexiconCounts:
    """``(words, hits of each lexicon)`` of one response, case-insensitive, whole words."""

    def __init__(self, *lexicons: Sequence[str]):
        self.lexicons = [frozenset(w.lower() for w in lex) for lex in lexicons]

    def __call__(self, text: str) -> tuple[int, list[int]]:
        words = [w.lower() for w in _words(text)]
        return len(words), [sum(w in lex for w in words) for lex in self.lexicons]


class _Register:
    """``(1 - 2^-own) - other / W`` for one register against the other."""

    own_words: Sequence[str] = ()
    other_words: Sequence[str] = ()

    def __init__(self):
        self._count = LexiconCounts(self.own_words, self.other_words)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        _check_pairs(prompts, responses)
        out = []
        for r in responses:
            w, (own, other) = self._count(r)
            out.append((1.0 - 0.5 ** own) - other / max(w, 1))
        return out


class Formality(_Register):
    """Formal-register words raise it (diminishing), casual ones cost their share of the words."""

    name = "formality"
    own_words, other_words = FORMAL_WORDS, CASUAL_WORDS


class Casualness(_Register):
    """Casual-register words raise it (diminishing), formal ones cost their share of the words."""

    name = "casualness"
    own_words, other_words = CASUAL_WORDS, FORMAL_WORDS


class Detail:
    """``1 - 2^-D`` with D the descriptive (valence-free) adjectives of the response."""

    name = "detail"

    def __init__(self):
        self._count = LexiconCounts(DESCRIPTIVE_WORDS)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        _check_pairs(prompts, responses)
        return [1.0 - 0.5 ** self._count(r)[1][0] for r in responses]


register_reward("formality", Formality)
register_reward("casualness", Casualness)
register_reward("detail", Detail)
