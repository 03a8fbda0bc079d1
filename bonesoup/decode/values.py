"""Value models for MAGE: implicit and explicit guidance, merged into ONE proxy.

Two kinds of value model per objective i (DESIGN.md, "MAGE stage 2"):

- **implicit**: a policy pi_i tuned on r_i (a PPO expert or backbone) against
  its reference pi_ref (the SFT model). The guidance is the log-ratio
  ``z_i = log pi_i(.|s) - log pi_ref(.|s)``: in logits, ``z_tuned - z_ref``
  up to a per-row constant, which sampling ignores.
- **explicit**: a causal LM whose outputs are token-level Q-values,
  ``Q_i(s, v) ~ E[r_i | prefix s + v]`` (trained by
  :mod:`bonesoup.train.value_training`); the guidance is ``Q(s, .)`` itself.

MAGE does not keep n of them side by side (that is MOD/GenARM: n forwards
and n models' memory per decoding step). It merges the n value models of
one kind in weight space with the preference -- linear coefficients for
models trained on the single rewards, Bone Soup coefficients for models
trained on backbone rewards -- into ONE model, re-merged in place by a
:class:`~bonesoup.LiveSoup` when the preference changes. Decoding then reads
the base, the merged proxy and (implicit only) the reference: 3 or 2
forwards per step whatever n.

:class:`Guidance` is what decoding consumes: the guide models and the
coefficient of each per unit of guidance strength ``w`` (implicit:
``[+1, -1]`` over [tuned, ref]; explicit: ``[+1]``).

With LoRA backbones a guide can be an :class:`~bonesoup.AdapterSoup` model
instead of a merged one (e.g. the tuned policy: a soup over the backbones
with ``method="rewarded"``); ``mage_generate(..., preference=[B, n])`` then
mixes it at each row's own preference, with no re-merge.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from bonesoup.decode.batching import position_ids_from_mask
from bonesoup.merge.live import LiveSoup, RemergeInfo

__all__ = ["Guidance", "implicit_guidance", "explicit_guidance", "ValueSoup", "guidance_logits"]

KINDS = ("implicit", "explicit")


@dataclass(frozen=True)
class Guidance:
    """Guide models and their coefficients per unit of guidance strength.

    Decoding samples from ``z_base + w * sum_g unit[g] * z_g`` with ``z_g`` the
    logits of ``models[g]``: coefficients ``[1, w * unit[0], ...]`` over
    ``[base, *models]``.
    """

    kind: str  #: "implicit" or "explicit"
    models: tuple  #: implicit: (tuned, ref); explicit: (value,)
    unit: tuple[float, ...]  #: implicit: (1, -1); explicit: (1,)

    def coefficients(self, w) -> torch.Tensor:
        """``[1, w * unit...]`` as float64 ``[1 + G]``, or ``[B, 1 + G]`` for a per-row ``w`` of shape [B]."""
        wt = torch.as_tensor(w, dtype=torch.float64)
        if wt.ndim > 1 or not bool(torch.isfinite(wt).all()):
            raise ValueError(f"w must be a finite number or a 1-D per-row sequence of them, got {w!r}")
        unit = torch.tensor(self.unit, dtype=torch.float64)
        if wt.ndim == 0:
            return torch.cat([torch.ones(1, dtype=torch.float64), wt * unit])
        return torch.cat([torch.ones(wt.shape[0], 1, dtype=torch.float64), wt[:, None] * unit], dim=1)


def implicit_guidance(tuned, ref) -> Guidance:
    """``log pi_tuned - log pi_ref`` as guidance: coefficients ``[w, -w]`` over ``[tuned, ref]``."""
    return Guidance("implicit", (tuned, ref), (1.0, -1.0))


def explicit_guidance(value_model) -> Guidance:
    """A Q-value model's outputs as guidance: coefficient ``w`` over ``[value_model]``."""
    return Guidance("explicit", (value_model,), (1.0,))


@torch.no_grad()
def guidance_logits(guidance: Guidance, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """The guidance ``z_guide`` [B, L, V] fp32 for every position of ``input_ids`` [B, L] (analysis, tests).

    implicit: ``log_softmax(z_tuned) - log_softmax(z_ref)`` (exactly 0 where the
    two models agree); explicit: the Q-values. Decoding does not call this:
    it hands the raw logits to the fused sampling kernel with
    :meth:`Guidance.coefficients`.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pos = position_ids_from_mask(attention_mask)
    outs = [m(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).logits.float()
            for m in guidance.models]
    if guidance.kind == "implicit":
        return torch.log_softmax(outs[0], -1) - torch.log_softmax(outs[1], -1)
    return outs[0]


def _load(path, device, dtype):
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


class ValueSoup:
    """n value models of one kind merged into ONE guidance proxy, re-merged in place.

    Parameters
    ----------
    values : sequence of n checkpoint directories (or state dicts, with ``model``)
        implicit: the tuned policies (experts, or backbones with
        ``method="bone"``); explicit: value models from
        :func:`bonesoup.train.value_training.train_value_models`. All of one
        architecture (refused otherwise, naming the key).
    kind : {"implicit", "explicit"}
    ref : checkpoint directory or model, required for ``kind="implicit"``
        The reference pi_ref (the SFT model); loaded once, never merged.
    model : module, optional
        The live merged model (its parameters become views into the merge
        arena); default: ``values[0]`` loaded from disk.
    method : str, a name registered in :mod:`bonesoup.merge.methods`
        How a preference becomes coefficients: ``"rewarded"``, ``mu`` itself (value
        models of the single rewards), or ``"bone"``, ``B^-1 mu`` (of the backbone rewards, ``beta``).
    device, dtype : where and in which dtype to load what is loaded here.

    Attributes
    ----------
    guidance : :class:`Guidance` over the live merged model (and ``ref``).
    soup : the :class:`LiveSoup` doing the merges (``soup.reading()`` holds
        the weights steady across a generation in a multi-threaded server).
    """

    def __init__(self, values: Sequence, *, kind: str, ref=None, model=None, method: str = "rewarded",
                 beta: float | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        if kind not in KINDS:
            raise ValueError(f"kind must be 'implicit' or 'explicit', got {kind!r}")
        if isinstance(values, (str, os.PathLike)) or len(values) < 1:
            raise TypeError("values must be a non-empty sequence of checkpoint directories or state dicts")
        if kind == "implicit" and ref is None:
            raise ValueError("kind='implicit' needs ref= (the reference policy the tuned ones started from)")
        if kind == "explicit" and ref is not None:
            raise ValueError("ref= applies to kind='implicit' only")
        if model is None:
            if not isinstance(values[0], (str, os.PathLike)):
                raise TypeError("pass model= (the live merged model) when values are state dicts")
            model = _load(values[0], device, dtype)
        self.kind, self.n = kind, len(values)
        self.soup = LiveSoup(model, list(values), beta=beta, method=method, device=device)
        self.model = model
        if kind == "implicit":
            self.ref = _load(ref, device, dtype) if isinstance(ref, (str, os.PathLike)) else ref
            self.guidance = implicit_guidance(model, self.ref)
        else:
            self.ref = None
            self.guidance = explicit_guidance(model)

    def set_preference(self, preference: Sequence[float]) -> RemergeInfo:
        """Merge the proxy for ``preference`` (one fused pass per dtype, in place, atomic for readers)."""
        return self.soup.set_preference(preference)

    def set_coefficients(self, coefficients: Sequence[float]) -> RemergeInfo:
        """Merge with raw coefficients over the n value models (one-hot ``e_i`` serves model i bit for bit)."""
        return self.soup.set_coefficients(coefficients)

    def __repr__(self) -> str:
        return f"ValueSoup(kind={self.kind!r}, n={self.n}, {self.soup!r})"
