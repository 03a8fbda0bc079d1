"""Reward functions on (prompt, response) text and their combinations.

A reward function takes two equally long sequences of strings, the prompts and
the responses (the response without the prompt and without EOS), and returns
one float per pair. Any callable with that signature plugs in; the built-ins
are registered by name:

=================  =========================================================
``sentiment``      VADER compound score of the response, in [-1, 1]
                   (the vaderSentiment package ships its lexicon: offline).
``readability``    Flesch reading ease of the response / 100 (our own
                   Flesch, no NLTK download); 0 for an empty response.
``conciseness``    ``1 - min(words, target) / target``: 1 for an empty
                   response, 0 from ``target`` words on.
``length``         number of words in the response.
``coverage``       fraction of ``keywords`` (or, without keywords, of the
                   prompt's content words) that the response contains.
=================  =========================================================

:class:`SequenceClassifierReward` (:mod:`bonesoup.train.reward_models`) wraps
any transformers sequence-classification reward model (a real RM on a GPU).
A task names its rewards as data (:class:`bonesoup.train.reward_spec.RewardSpec`):
a registered name, ``"hf:DIR"`` or ``"module:function"``; :func:`get_reward`
takes all of them.

The combinations train the models that get merged: a one-hot weight vector
(a Rewarded Soup expert), row j of ``backbone_matrix(n, beta)`` (Bone Soup
backbone j, reward ``h_j = sum_i B_ji r_i``) or a preference ``mu`` (the
MORLHF oracle). :class:`CombinedReward` applies the weights, optionally after
a per-reward normalisation with statistics measured on SFT samples
(:class:`RewardNormalization`), so that rewards on different scales mix as
the weights say.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from bonesoup.merge.coefficients import backbone_matrix, validate_preference

__all__ = [
    "RewardFn",
    "register_reward",
    "get_reward",
    "available_rewards",
    "Sentiment",
    "Readability",
    "Conciseness",
    "Length",
    "Coverage",
    "SequenceClassifierReward",
    "flesch_reading_ease",
    "count_syllables",
    "combination_weights",
    "RewardNormalization",
    "RewardOutput",
    "CombinedReward",
]

#: ``fn(prompts, responses) -> one float per pair``.
RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]

_REGISTRY: dict[str, Callable[..., RewardFn]] = {}

_WORD_RE = re.compile(r"[A-Za-z0-9']+")


def register_reward(name: str, factory: Callable[..., RewardFn] | None = None):
    """Register ``factory(**kwargs) -> reward function`` under ``name`` (usable as a decorator)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")

    def add(f):
        if not callable(f):
            raise TypeError(f"factory for reward {name!r} must be callable, got {f!r}")
        _REGISTRY[name] = f
        return f

    return add if factory is None else add(factory)


def available_rewards() -> list[str]:
    """Names of the registered rewards, sorted."""
    return sorted(_REGISTRY)


def get_reward(spec, **kwargs) -> RewardFn:
    """A reward function from a callable (returned as is), a registered name (``kwargs`` go to its factory),
    or any :class:`RewardSpec` entry: ``"hf:DIR"``, ``"module:function"``, ``"file.py:function"``, a mapping."""
    if callable(spec):
        if kwargs:
            raise TypeError(f"keyword arguments {sorted(kwargs)} apply to registered names only, not to {spec!r}")
        return spec
    if isinstance(spec, str) and spec in _REGISTRY:
        return _REGISTRY[spec](**kwargs)
    if kwargs:
        raise TypeError(f"keyword arguments {sorted(kwargs)} apply to registered names only, not to {spec!r}")
    if isinstance(spec, str) and ":" not in spec:
        raise ValueError(f"reward must be a callable or one of {available_rewards()} (or 'hf:DIR', "
                         f"'module:function'), got {spec!r}")
    from bonesoup.train.reward_spec import RewardSpec

    s = RewardSpec.parse(spec, "reward")
    s.check("reward")
    return s.build()


def _check_pairs(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} and {len(responses)}")


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text)


# --------------------------------------------------------------------------- built-in rewards


class Sentiment:
    """VADER compound sentiment of the response, in [-1, 1] (positive is high)."""

    name = "sentiment"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        _check_pairs(prompts, responses)
        return [float(self._analyzer.polarity_scores(r)["compound"]) for r in responses]


def count_syllables(word: str) -> int:
    """English syllables by vowel groups (a silent final ``e`` dropped), at least 1 for a word with letters."""
    w = re.sub(r"[^a-z]", "", word.lower())
    if not w:
        return 0
    groups = len(re.findall(r"[aeiouy]+", w))
    if w.endswith("e") and not w.endswith(("le", "ee", "ye")) and groups > 1:
        groups -= 1
    return max(1, groups)


def flesch_reading_ease(text: str) -> float:
    """Flesch reading ease ``206.835 - 1.015 words/sentences - 84.6 syllables/words`` (0 for no words)."""
    words = _words(text)
    if not words:
        return 0.0
    sentences = max(1, len(re.findall(r"[.!?]+", text)))
    syllables = sum(count_syllables(w) for w in words)
    return 206.835 - 1.015 * len(words) / sentences - 84.6 * syllables / len(words)


class Readability:
    """Flesch reading ease of the response divided by 100 (higher is easier to read)."""

    name = "readability"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        _check_pairs(prompts, responses)
        return [flesch_reading_ease(r) / 100.0 for r in responses]


class Conciseness:
    """``1 - min(words, target) / target``: 1 for an empty response, 0 from ``target`` words on."""

    name = "conciseness"

    def __init__(self, target: int = 12):
        if isinstance(target, bool) or not isinstance(target, int) or target < 1:
            raise ValueError(f"target must be a positive integer (words), got {target!r}")
        self.target = target

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        _check_pairs(prompts, responses)
        return [1.0 - min(len(_words(r)), self.target) / self.target for r in responses]


class Length:
    """Number of words in the response."""

    name = "length"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        _check_pairs(prompts, responses)
        return [float(len(_words(r))) for r in responses]


_STOPWORDS = frozenset(
    "a an the and or but of to in on at for with is was were are be been it this that my our your their i we you "
    "they he she his her its as by from so very".split()
)


class Coverage:
    """Fraction of the keywords present in the response (case-insensitive, whole words).

    Without ``keywords``, the keywords are the prompt's content words (not
    stop words, at least 3 letters); a prompt without any scores 0.
    """

    name = "coverage"

    def __init__(self, keywords: Sequence[str] | None = None):
        if keywords is not None:
            if isinstance(keywords, str) or not all(isinstance(k, str) and k.strip() for k in keywords):
                raise ValueError(f"keywords must be a sequence of non-empty strings, got {keywords!r}")
            keywords = [k.lower() for k in keywords]
        self.keywords = keywords

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        _check_pairs(prompts, responses)
        out = []
        for p, r in zip(prompts, responses):
            keys = self.keywords
            if keys is None:
                keys = sorted({w.lower() for w in _words(p) if len(w) >= 3 and w.lower() not in _STOPWORDS})
            got = {w.lower() for w in _words(r)}
            out.append(sum(k in got for k in keys) / len(keys) if keys else 0.0)
        return out


from bonesoup.train.reward_models import SequenceClassifierReward  # noqa: E402  (it uses _check_pairs)

register_reward("sentiment", Sentiment)
register_reward("readability", Readability)
register_reward("conciseness", Conciseness)
register_reward("length", Length)
register_reward("coverage", Coverage)
register_reward("reward_model", SequenceClassifierReward)


# --------------------------------------------------------------------------- combinations


def combination_weights(n: int, *, expert: int | None = None, backbone: int | None = None, beta: float | None = None,
                        preference: Sequence[float] | None = None) -> np.ndarray:
    """The reward weights (float64 ``[n]``) of one trained model; give exactly one of the three.

    - ``expert=i``: one-hot e_i (a Rewarded Soup expert trained on r_i alone);
    - ``backbone=j, beta=b``: row j of ``backbone_matrix(n, b)`` (Bone Soup backbone j);
    - ``preference=mu``: mu itself (the MORLHF oracle for that preference).
    """
    given = [k for k, v in (("expert", expert), ("backbone", backbone), ("preference", preference)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of expert, backbone, preference; got {given or 'none'}")

    def index(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < n:
            raise ValueError(f"{name} must be an integer in [0, {n}), got {v!r}")
        return int(v)

    if expert is not None:
        w = np.zeros(n)
        w[index("expert", expert)] = 1.0
        return w
    if backbone is not None:
        if beta is None:
            raise ValueError("beta is required with backbone")
        return backbone_matrix(n, beta)[index("backbone", backbone)].copy()
    if beta is not None:
        raise ValueError("beta applies to backbone only")
    return validate_preference(preference, n)


@dataclass(frozen=True)
class RewardNormalization:
    """Per-reward affine normalisation ``(r - mean) / std``, with statistics from SFT samples.

    Attributes
    ----------
    mean, std : tuple of float
        One entry per reward; ``std`` is at least ``min_std`` (a constant reward is only centred).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, objectives: torch.Tensor | np.ndarray, *, min_std: float = 1e-3) -> "RewardNormalization":
        """Statistics of ``objectives`` (``[samples, n]``, the raw rewards of SFT samples)."""
        x = torch.as_tensor(objectives, dtype=torch.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"objectives must have shape [samples >= 2, n], got {tuple(x.shape)}")
        return cls(tuple(x.mean(0).tolist()), tuple(x.std(0).clamp_min(min_std).tolist()))

    def apply(self, objectives: torch.Tensor) -> torch.Tensor:
        """``[B, n]`` raw -> ``[B, n]`` normalised (same dtype)."""
        if objectives.shape[-1] != len(self.mean):
            raise ValueError(f"objectives has {objectives.shape[-1]} rewards, the normalisation {len(self.mean)}")
        mean = torch.tensor(self.mean, dtype=objectives.dtype, device=objectives.device)
        std = torch.tensor(self.std, dtype=objectives.dtype, device=objectives.device)
        return (objectives - mean) / std

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "RewardNormalization":
        try:
            mean, std = [float(v) for v in d["mean"]], [float(v) for v in d["std"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"a reward normalisation needs lists 'mean' and 'std', got {d!r}") from None
        if len(mean) != len(std) or any(s <= 0 or not math.isfinite(s) for s in std):
            raise ValueError(f"normalisation 'std' must be positive, one per 'mean' entry, got {d!r}")
        return cls(tuple(mean), tuple(std))

    @classmethod
    def load(cls, path) -> "RewardNormalization":
        return cls.from_dict(json.loads(open(path).read()))


@dataclass
class RewardOutput:
    """What :class:`CombinedReward` returns for a batch of B pairs.

    Attributes
    ----------
    score : torch.Tensor
        shape (B,), float32: ``sum_i w_i * normalised r_i``, the PPO score.
    objectives : torch.Tensor
        shape (B, n), float32: the raw rewards r_i (not normalised), for logs.
    """

    score: torch.Tensor
    objectives: torch.Tensor


class CombinedReward:
    """``h(prompt, response) = sum_i w_i * norm_i(r_i(prompt, response))``.

    Parameters
    ----------
    rewards : sequence of str or callable
        The n reward functions (registered names or callables).
    weights : sequence of float, length n
        From :func:`combination_weights` (one-hot, a backbone-matrix row or a preference).
    names : sequence of str, optional
        Names for logs (default: the registered names, or ``r0``, ``r1``, ...).
    normalization : RewardNormalization, optional
        Applied to the raw rewards before weighting.
    """

    def __init__(self, rewards: Sequence[str | RewardFn], weights: Sequence[float], *,
                 names: Sequence[str] | None = None, normalization: RewardNormalization | None = None):
        if isinstance(rewards, (str, bytes)) or not len(rewards):
            raise ValueError(f"rewards must be a non-empty sequence of names or callables, got {rewards!r}")
        self.rewards = [get_reward(r) for r in rewards]
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(self.rewards),) or not np.all(np.isfinite(w)):
            raise ValueError(f"weights must be {len(self.rewards)} finite numbers (one per reward), got {weights!r}")
        self.weights = w
        if names is None:
            names = [r if isinstance(r, str) else getattr(r, "name", f"r{i}") for i, r in enumerate(rewards)]
        if len(names) != len(self.rewards):
            raise ValueError(f"names must have one entry per reward ({len(self.rewards)}), got {names!r}")
        self.names = list(names)
        if normalization is not None and len(normalization.mean) != len(self.rewards):
            raise ValueError(f"normalization has {len(normalization.mean)} entries, expected {len(self.rewards)}")
        self.normalization = normalization

    def objectives(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Raw rewards, float32 ``[B, n]``."""
        _check_pairs(prompts, responses)
        cols = []
        for name, fn in zip(self.names, self.rewards):
            v = torch.as_tensor(np.asarray(fn(prompts, responses), dtype=np.float64), dtype=torch.float32)
            if v.shape != (len(prompts),):
                raise ValueError(f"reward {name!r} returned shape {tuple(v.shape)} for {len(prompts)} pairs")
            if not torch.isfinite(v).all():
                raise ValueError(f"reward {name!r} returned a non-finite value")
            cols.append(v)
        return torch.stack(cols, dim=1)

    def score(self, objectives: torch.Tensor) -> torch.Tensor:
        """Raw ``[B, n]`` -> combined score ``[B]`` float32."""
        x = objectives if self.normalization is None else self.normalization.apply(objectives)
        return x @ torch.as_tensor(self.weights, dtype=x.dtype)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> RewardOutput:
        obj = self.objectives(prompts, responses)
        return RewardOutput(score=self.score(obj), objectives=obj)
