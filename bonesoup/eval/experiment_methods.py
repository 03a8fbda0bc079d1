"""The experiment's methods: one small object each, in table order, and the live models they set.

A method is *how a preference becomes a decode*: which live models it merges
at ``mu`` and which (models, coefficients) ``guided_generate`` then combines.
Adding a method to the comparison is one :class:`ExperimentMethod` in
:data:`METHOD_TABLE`; the evaluation, the summary, the table and the plot read
everything else from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

__all__ = ["ExperimentMethod", "METHOD_TABLE", "METHODS", "SEARCH_METHOD", "LABELS", "COMPARISONS",
           "get_experiment_method", "LiveModels", "preference_grid"]


@dataclass(frozen=True)
class ExperimentMethod:
    """One row of the comparison."""

    name: str
    """Key in results.json."""
    label: str
    """Row name in the table and the plot's legend."""
    decode: Callable[["LiveModels", list, float | None], tuple[list, list]] | None
    """``(live, mu, w) -> (models, coeffs)``: sets the live models for ``mu`` and returns what to decode with
    (``models[0]`` the base, the rest guides; ``w`` overrides the tuned guidance strength). None: the method's
    policies are trained per preference (MORLHF) and evaluated where they were trained."""
    tunes: str | None = None
    """What validation picks for it: ``"k"`` (per-objective extrapolation factors), ``"w_implicit"`` /
    ``"w_explicit"`` (guidance strength of that value-model kind), or None."""
    search: bool = False
    """Decodes with chunk-level search scored by the merged explicit value (only when search_candidates > 0)."""
    style: tuple[str, str] = ("black", "o-")
    """matplotlib (colour, format) in the Pareto plot."""


def _rewarded_soup(live: "LiveModels", mu: list, w) -> tuple[list, list]:
    live.rewarded.set_preference(mu)
    return [live.rewarded.model], [1.0]


def _bone_soup(live: "LiveModels", mu: list, w) -> tuple[list, list]:
    live.bone.set_preference(mu)
    return [live.bone.model], [1.0]


def _bone_soup_extrapolated(live: "LiveModels", mu: list, w) -> tuple[list, list]:
    from bonesoup.merge.coefficients import per_objective_extrapolation

    live.set_extrapolated(*per_objective_extrapolation(mu, live.k, beta=live.beta))
    return [live.bone_ext.model], [1.0]


def _mod(live: "LiveModels", mu: list, w) -> tuple[list, list]:
    return list(live.experts), list(mu)  # the experts' logits mixed with mu: n forwards per token


def _mage(kind: str):
    def decode(live: "LiveModels", mu: list, w) -> tuple[list, list]:
        # Stage 1: the Bone Soup base at mu; stage 2: the value models of one kind merged with mu (ONE model).
        soup = live.guides[kind]
        live.bone.set_preference(mu)
        soup.set_preference(mu)
        ww = live.w[kind] if w is None else w
        return [live.bone.model, *soup.guidance.models], soup.guidance.coefficients(ww).tolist()

    return decode


#: Every method, in table order (MORLHF last: it has points only where trained).
METHOD_TABLE: tuple[ExperimentMethod, ...] = (
    ExperimentMethod("rewarded_soup", "Rewarded Soup", _rewarded_soup, style=("tab:gray", "o--")),
    ExperimentMethod("bone_soup", "Bone Soup", _bone_soup, style=("tab:blue", "s-")),
    ExperimentMethod("bone_soup_extrapolated", "Bone Soup + extrap.", _bone_soup_extrapolated, tunes="k",
                     style=("tab:cyan", "s:")),
    ExperimentMethod("mod", "MOD (n experts' logits)", _mod, style=("tab:orange", "^--")),
    ExperimentMethod("mage_implicit", "MAGE implicit", _mage("implicit"), tunes="w_implicit",
                     style=("tab:green", "D-")),
    ExperimentMethod("mage_explicit", "MAGE explicit", _mage("explicit"), tunes="w_explicit",
                     style=("tab:red", "v-")),
    ExperimentMethod("mage_explicit_search", "MAGE explicit + chunk search", _mage("explicit"), tunes="w_explicit",
                     search=True, style=("tab:purple", "P-")),
    ExperimentMethod("morlhf", "MORLHF (oracle)", None, style=("black", "*")),
)
_BY_NAME = {m.name: m for m in METHOD_TABLE}
#: Names of the methods every configuration evaluates, in table order.
METHODS = tuple(m.name for m in METHOD_TABLE if not m.search)
#: Evaluated only when ``ExperimentConfig.search_candidates > 0``.
SEARCH_METHOD = next(m.name for m in METHOD_TABLE if m.search)
LABELS = {m.name: m.label for m in METHOD_TABLE}
#: Hypervolume comparisons ``(a, b)`` reported as "a > b" (where both were evaluated).
COMPARISONS = (("bone_soup", "rewarded_soup"), ("bone_soup_extrapolated", "rewarded_soup"),
               ("mage_implicit", "bone_soup"), ("mage_explicit", "bone_soup"), ("mage_implicit", "mod"),
               ("mage_explicit", "mod"), (SEARCH_METHOD, "mage_explicit"))


def get_experiment_method(name: str) -> ExperimentMethod:
    """The method called ``name``; ValueError naming the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"experiment method must be one of {list(_BY_NAME)}, got {name!r}") from None


def preference_grid(points: int) -> np.ndarray:
    """``points`` preferences (mu_1, 1 - mu_1), mu_1 from 0 to 1 evenly: [points, 2] float64."""
    m = np.linspace(0.0, 1.0, points)
    return np.stack([m, 1.0 - m], axis=1)


class _AdapterGuide:
    """MAGE implicit's guide over LoRA experts: their mixture at ``mu`` on an SFT copy, against the SFT.

    The adapter counterpart of ``ValueSoup(experts, kind="implicit")``: the
    same ``set_preference`` / ``guidance`` / ``model``, with the experts'
    merge ``W + sum_i mu_i D_i`` applied by an :class:`~bonesoup.lora.AdapterSoup`.
    """

    def __init__(self, model, experts: Sequence, *, ref):
        from bonesoup.decode.values import implicit_guidance
        from bonesoup.merge.adapter_soup import AdapterSoup

        self.soup = AdapterSoup(model, experts, method="rewarded")
        self.model, self.ref = model, ref
        self.guidance = implicit_guidance(model, ref)

    def set_preference(self, preference) -> list[float]:
        return self.soup.set_preference(preference)

    def set_coefficients(self, coefficients) -> None:
        self.soup.set_coefficients(coefficients)


class LiveModels:
    """The live merged models of one training seed, which the methods' ``decode`` set and read.

    Parameters
    ----------
    beta : Bone Soup's backbone mixing strength.
    sft : the SFT checkpoint directory (reference of MAGE implicit, input of the extrapolation).
    backbones, experts, values : checkpoint directories, n each (Bone Soup's backbones, the
        one-reward experts, the explicit value models). Backbones and experts may be LoRA adapter
        directories of the SFT model: their merges are then exact mixtures applied by AdapterSoups
        (no re-merge of weights), MOD's and MORLHF's models the adapters merged into SFT copies.
    device, dtype : where every live model runs and the dtype it loads in (None: fp32).
    """

    def __init__(self, beta: float, sft: Path, backbones: Sequence, experts: Sequence, values: Sequence, *,
                 device: str = "cpu", dtype=None):
        from bonesoup.decode.values import ValueSoup
        from bonesoup.merge.lora import is_adapter_dir
        from bonesoup.merge.live import LiveSoup
        from bonesoup.train.ppo.checkpoint_training import load_policy

        self.beta = beta
        where = dict(device=device, dtype=dtype)
        self.sft_model, self.tok = load_policy(sft, **where)
        #: LoRA backbones / experts (``ExperimentConfig.lora_rank``): their soups are AdapterSoups on the SFT model
        self.lora_backbones = is_adapter_dir(backbones[0])
        self.lora_experts = is_adapter_dir(experts[0])
        if self.lora_backbones:
            from bonesoup.merge.adapter_soup import AdapterSoup

            self.bone = AdapterSoup(load_policy(sft, **where)[0], backbones, beta=beta)
            self.bone_ext = AdapterSoup(load_policy(sft, **where)[0], backbones, beta=beta)
        else:
            self.bone = LiveSoup(load_policy(sft, **where)[0], backbones, beta=beta, sft=sft, device=device)
            self.bone_ext = LiveSoup(load_policy(sft, **where)[0], backbones, beta=beta, sft=sft, device=device)
        if self.lora_experts:
            from bonesoup.merge.adapter_soup import AdapterSoup

            self.rewarded = AdapterSoup(load_policy(sft, **where)[0], experts, method="rewarded")
            implicit = _AdapterGuide(load_policy(sft, **where)[0], experts, ref=self.sft_model)
        else:
            self.rewarded = LiveSoup(load_policy(sft, **where)[0], experts, method="rewarded", device=device)
            implicit = ValueSoup(experts, kind="implicit", ref=self.sft_model, **where)
        self.experts = [load_policy(e, **where)[0] for e in experts]  # an adapter is merged into its own SFT copy
        # MAGE implicit's guide: the experts merged with mu (ONE model) against the SFT reference.
        self.guides = {"implicit": implicit, "explicit": ValueSoup(values, kind="explicit", **where)}
        #: per-objective extrapolation factors and guidance strengths, set by validation
        self.k = np.ones(len(backbones))
        self.w = {"implicit": 1.0, "explicit": 1.0}

    def set_extrapolated(self, c: np.ndarray, c_sft: float) -> None:
        """Bone Soup + extrapolation's live model: backbone coefficients ``c`` [n] and the SFT's ``c_sft``."""
        if self.lora_backbones:  # the SFT's coefficient is implicit (1 - sum c): exact only when they sum to 1
            if abs(float(np.sum(c)) + c_sft - 1.0) > 1e-9:
                raise ValueError(f"extrapolation coefficients {list(c)} + {c_sft} do not sum to 1; LoRA "
                                 "backbones merge exactly only when they do")
            self.bone_ext.set_coefficients(list(c))
        else:
            self.bone_ext.set_coefficients([*c, c_sft])

    def decode_with(self, method: str | ExperimentMethod, mu, *, w: float | None = None) -> tuple[list, list]:
        """Set the live models of ``method`` for preference ``mu`` [n]; returns ``(models, coeffs)`` to decode with."""
        spec = get_experiment_method(method) if isinstance(method, str) else method
        if spec.decode is None:
            raise ValueError(f"{spec.name} is trained per preference; it has no merged model to set")
        return spec.decode(self, [float(x) for x in mu], w)
