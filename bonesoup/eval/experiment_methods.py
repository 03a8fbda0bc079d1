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
           "get_experiment_method", "LiveModels", "preference_grid", "simplex_grid", "validation_preferences",
           "morlhf_preferences", "preference_key", "preference_from_key", "method_accounting", "format_accounting"]


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
    ablation: bool = False
    """An ablation of another row (evaluated only when ``ExperimentConfig.ablations``)."""
    uses: tuple[str, ...] = ()
    """The trained model sets it needs: ``"backbones"``, ``"experts"``, ``"values"``, ``"morlhf"`` (accounting)."""
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


def _rewarded_soup_extrapolated(live: "LiveModels", mu: list, w) -> tuple[list, list]:
    # The fair baseline: the experts get the same per-objective extrapolation as the backbones (B = I).
    from bonesoup.merge.coefficients import per_objective_extrapolation

    live.set_extrapolated(*per_objective_extrapolation(mu, live.k_rewarded, method="rewarded"), which="rewarded")
    return [live.rewarded.model], [1.0]


def _bone_soup_mu(live: "LiveModels", mu: list, w) -> tuple[list, list]:
    # The paper's ablation: the backbones merged with mu itself instead of B^-1 mu (no SFT term).
    live.set_extrapolated(np.asarray(mu, dtype=np.float64), 0.0)
    return [live.bone_ext.model], [1.0]


def _mod(live: "LiveModels", mu: list, w) -> tuple[list, list]:
    return list(live.experts), list(mu)  # the experts' logits mixed with mu: n forwards per token


def _mage(kind: str, base: str = "bone"):
    """MAGE with the ``kind`` guidance on the ``base`` policy: ``"bone"`` (MAGE), ``"sft"`` or ``"rewarded"``.

    The other bases are the compatibility ablation: the same guidance (and the same tuned ``w``) on the SFT
    model and on the Rewarded Soup merge, to see how much of MAGE's gain needs the Bone Soup base.
    """

    def decode(live: "LiveModels", mu: list, w) -> tuple[list, list]:
        # Stage 1: the base policy at mu; stage 2: the value models of one kind merged with mu (ONE model).
        soup = live.guides[kind]
        if base == "bone":
            live.bone.set_preference(mu)
            model = live.bone.model
        elif base == "rewarded":
            live.rewarded.set_preference(mu)
            model = live.rewarded.model
        else:
            model = live.sft_model
        soup.set_preference(mu)
        ww = live.w[kind] if w is None else w
        return [model, *soup.guidance.models], soup.guidance.coefficients(ww).tolist()

    return decode


#: Every method, in table order (MORLHF last: it has points only where trained).
METHOD_TABLE: tuple[ExperimentMethod, ...] = (
    ExperimentMethod("rewarded_soup", "Rewarded Soup", _rewarded_soup, uses=("experts",), style=("tab:gray", "o--")),
    ExperimentMethod("rewarded_soup_extrapolated", "Rewarded Soup + extrap.", _rewarded_soup_extrapolated,
                     tunes="k_rewarded", uses=("experts",), style=("0.4", "o:")),
    ExperimentMethod("bone_soup", "Bone Soup", _bone_soup, uses=("backbones",), style=("tab:blue", "s-")),
    ExperimentMethod("bone_soup_extrapolated", "Bone Soup + extrap.", _bone_soup_extrapolated, tunes="k",
                     uses=("backbones",), style=("tab:cyan", "s:")),
    ExperimentMethod("bone_soup_mu", "Bone Soup, mu not B^-1 mu (ablation)", _bone_soup_mu, ablation=True,
                     uses=("backbones",), style=("tab:blue", "x:")),
    ExperimentMethod("mod", "MOD (n experts' logits)", _mod, uses=("experts",), style=("tab:orange", "^--")),
    ExperimentMethod("mage_implicit", "MAGE implicit", _mage("implicit"), tunes="w_implicit",
                     uses=("backbones", "experts"), style=("tab:green", "D-")),
    ExperimentMethod("mage_implicit_sft_base", "MAGE implicit on SFT base (ablation)", _mage("implicit", "sft"),
                     tunes="w_implicit", ablation=True, uses=("experts",), style=("tab:green", "d:")),
    ExperimentMethod("mage_implicit_rs_base", "MAGE implicit on RS base (ablation)", _mage("implicit", "rewarded"),
                     tunes="w_implicit", ablation=True, uses=("experts",), style=("tab:olive", "d--")),
    ExperimentMethod("mage_explicit", "MAGE explicit", _mage("explicit"), tunes="w_explicit",
                     uses=("backbones", "values"), style=("tab:red", "v-")),
    ExperimentMethod("mage_explicit_sft_base", "MAGE explicit on SFT base (ablation)", _mage("explicit", "sft"),
                     tunes="w_explicit", ablation=True, uses=("values",), style=("tab:red", "1:")),
    ExperimentMethod("mage_explicit_rs_base", "MAGE explicit on RS base (ablation)", _mage("explicit", "rewarded"),
                     tunes="w_explicit", ablation=True, uses=("experts", "values"), style=("tab:pink", "1--")),
    ExperimentMethod("mage_explicit_search", "MAGE explicit + chunk search", _mage("explicit"), tunes="w_explicit",
                     search=True, uses=("backbones", "values"), style=("tab:purple", "P-")),
    ExperimentMethod("morlhf", "MORLHF (oracle)", None, uses=("morlhf", "experts"), style=("black", "*")),
)
_BY_NAME = {m.name: m for m in METHOD_TABLE}
#: Names of the methods the default configuration evaluates (ablations on, search off), in table order.
METHODS = tuple(m.name for m in METHOD_TABLE if not m.search)
#: Evaluated only when ``ExperimentConfig.search_candidates > 0``.
SEARCH_METHOD = next(m.name for m in METHOD_TABLE if m.search)
LABELS = {m.name: m.label for m in METHOD_TABLE}
#: Hypervolume comparisons ``(a, b)`` reported as "a > b" (where both were evaluated).
COMPARISONS = (("bone_soup", "rewarded_soup"), ("bone_soup_extrapolated", "rewarded_soup"),
               ("bone_soup_extrapolated", "rewarded_soup_extrapolated"), ("bone_soup", "bone_soup_mu"),
               ("mage_implicit", "bone_soup"), ("mage_explicit", "bone_soup"), ("mage_implicit", "mod"),
               ("mage_explicit", "mod"), ("mage_implicit", "mage_implicit_rs_base"),
               ("mage_implicit", "mage_implicit_sft_base"), ("mage_explicit", "mage_explicit_rs_base"),
               ("mage_explicit", "mage_explicit_sft_base"), (SEARCH_METHOD, "mage_explicit"))


def get_experiment_method(name: str) -> ExperimentMethod:
    """The method called ``name``; ValueError naming the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"experiment method must be one of {list(_BY_NAME)}, got {name!r}") from None


def preference_grid(points: int, n: int = 2) -> np.ndarray:
    """The preference sweep: [P, n] float64, each row on the simplex.

    ``n = 2``: ``points`` preferences (mu_1, 1 - mu_1), mu_1 from 0 to 1 evenly
    (P = points). ``n >= 3``: :func:`simplex_grid` with ``points`` per edge
    (step ``1 / (points - 1)``; P = C(points + n - 2, n - 1), 15 for n = 3 and
    points = 5).
    """
    if n == 2:
        m = np.linspace(0.0, 1.0, points)
        return np.stack([m, 1.0 - m], axis=1)
    return simplex_grid(n, points - 1)


def simplex_grid(n: int, divisions: int) -> np.ndarray:
    """Every mu with entries in {0, 1/d, ..., 1} summing to 1 (d = ``divisions``): [C(d + n - 1, n - 1), n].

    Rows in lexicographic order of the counts, largest mu_1 first: the first
    row is e_1, the last e_n.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    if isinstance(divisions, bool) or not isinstance(divisions, int) or divisions < 1:
        raise ValueError(f"divisions must be a positive integer, got {divisions!r}")

    def counts(left: int, parts: int):
        if parts == 1:
            yield (left,)
            return
        for k in range(left, -1, -1):
            for rest in counts(left - k, parts - 1):
                yield (k, *rest)

    return np.array(list(counts(divisions, n)), dtype=np.float64) / divisions


def validation_preferences(n: int) -> np.ndarray:
    """Where validation compares candidates (guidance strengths, betas): [P, n] float64.

    ``n = 2``: mu_1 in (0, 0.5, 1); ``n >= 3``: the n vertices and the centroid.
    """
    if n == 2:
        return preference_grid(3)
    return np.concatenate([np.eye(n), np.full((1, n), 1.0 / n)])


def morlhf_preferences(weights: Sequence[float], n: int) -> list[tuple[float, ...]]:
    """The preferences of the MORLHF oracles, each a tuple of n floats.

    Each ``m`` of ``weights`` (``ExperimentConfig.morlhf``) gives the
    preferences with weight ``m`` on one objective and ``(1 - m) / (n - 1)``
    on each other one; at n = 2 only (m, 1 - m), so ``m`` is mu_1 as before
    (list 0.25 and 0.75 for both sides); at n = 3, m = 0.5 gives the three
    points (0.5, 0.25, 0.25), (0.25, 0.5, 0.25), (0.25, 0.25, 0.5).
    Duplicates are dropped; sorted by mu_1 at n = 2, by decreasing mu otherwise.
    """
    out: dict[str, tuple] = {}
    for m in weights:
        for i in range(n if n > 2 else 1):
            mu = np.full(n, (1.0 - m) / (n - 1))
            mu[i] = m
            out.setdefault(preference_key(mu), tuple(float(x) for x in mu))
    return sorted(out.values(), key=lambda mu: tuple(-x for x in mu)) if n > 2 else sorted(out.values())


def preference_key(mu) -> str:
    """A preference as a results.json key: ``str(mu_1)`` at n = 2 (``"0.5"``), else ``"0.5,0.25,0.25"``."""
    mu = [float(x) for x in mu]
    if len(mu) == 2:
        return str(mu[0])
    return ",".join(f"{x:.6g}" for x in mu)


def preference_from_key(key: str, n: int) -> np.ndarray:
    """The inverse of :func:`preference_key`: [n] float64."""
    vals = [float(x) for x in str(key).split(",")]
    if len(vals) == 1 and n == 2:
        return np.array([vals[0], 1.0 - vals[0]])
    if len(vals) != n:
        raise ValueError(f"preference key {key!r} has {len(vals)} entries, expected {n}")
    return np.asarray(vals)


def method_accounting(cfg, name: str, *, forwards_per_token: int | None = None,
                      beta_search: dict | None = None) -> dict:
    """What one method cost to train and to decode: PPO runs and steps, value models, forwards per token.

    ``beta_search``: the search's report (:func:`bonesoup.eval.beta_search.search_beta`); its PPO runs are
    charged to every method that uses the backbones. Counts are per training seed.
    """
    n = len(cfg.rewards)
    m = get_experiment_method(name)
    runs, steps, values = 0, 0, 0
    if "backbones" in m.uses:
        runs, steps = runs + n, steps + n * cfg.ppo_steps
        if beta_search:
            runs += beta_search["ppo_runs"]
            steps += beta_search["ppo_steps"]
    if "experts" in m.uses:
        runs, steps = runs + n, steps + n * cfg.ppo_steps
    if "morlhf" in m.uses:
        k = len(morlhf_preferences(cfg.morlhf, n))
        runs, steps = runs + k, steps + k * cfg.ppo_steps
    if "values" in m.uses:
        values = n
    out = {"ppo_runs": runs, "ppo_steps": steps, "value_models": values, "forwards_per_token": forwards_per_token}
    if m.search:
        out["candidates"] = cfg.search_candidates  # each candidate chunk decodes with the forwards above
    return out


def format_accounting(cfg, accounting: dict) -> str:
    """Markdown: per method, the PPO runs and steps it used, its value models and forwards per token."""
    lines = ["| method | PPO runs | PPO steps | value models | forwards per token |", "|---|---|---|---|---|"]
    for name, a in accounting.items():
        fwd = "-" if a["forwards_per_token"] is None else str(a["forwards_per_token"])
        if "candidates" in a:
            fwd += f" per candidate ({a['candidates']} candidates)"
        lines.append(f"| {LABELS[name]} | {a['ppo_runs']} | {a['ppo_steps']} | {a['value_models']} | {fwd} |")
    return "\n".join(lines)


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
            # Also Bone Soup with raw coefficients (mu itself, the ablation): every decode sets it before use.
            self.bone_ext = AdapterSoup(load_policy(sft, **where)[0], backbones, beta=beta)
        else:
            self.bone = LiveSoup(load_policy(sft, **where)[0], backbones, beta=beta, sft=sft, device=device)
            self.bone_ext = LiveSoup(load_policy(sft, **where)[0], backbones, beta=beta, sft=sft, device=device)
        if self.lora_experts:
            from bonesoup.merge.adapter_soup import AdapterSoup

            self.rewarded = AdapterSoup(load_policy(sft, **where)[0], experts, method="rewarded")
            implicit = _AdapterGuide(load_policy(sft, **where)[0], experts, ref=self.sft_model)
        else:
            # With the SFT model stored: Rewarded Soup + per-objective extrapolation merges here too.
            self.rewarded = LiveSoup(load_policy(sft, **where)[0], experts, method="rewarded", sft=sft, device=device)
            implicit = ValueSoup(experts, kind="implicit", ref=self.sft_model, **where)
        self.experts = [load_policy(e, **where)[0] for e in experts]  # an adapter is merged into its own SFT copy
        # MAGE implicit's guide: the experts merged with mu (ONE model) against the SFT reference.
        self.guides = {"implicit": implicit, "explicit": ValueSoup(values, kind="explicit", **where)}
        #: per-objective extrapolation factors (backbones, experts) and guidance strengths, set by validation
        self.k = np.ones(len(backbones))
        self.k_rewarded = np.ones(len(experts))
        self.w = {"implicit": 1.0, "explicit": 1.0}

    def set_extrapolated(self, c: np.ndarray, c_sft: float, which: str = "bone") -> None:
        """Set the extrapolated live model: coefficients ``c`` [n] of the backbones (``which="bone"``) or the
        experts (``"rewarded"``) and the SFT's ``c_sft``."""
        soup = {"bone": self.bone_ext, "rewarded": self.rewarded}[which]
        if self.lora_backbones if which == "bone" else self.lora_experts:
            # Adapters: the SFT's coefficient is implicit (1 - sum c), exact only when they sum to 1.
            if abs(float(np.sum(c)) + c_sft - 1.0) > 1e-9:
                raise ValueError(f"extrapolation coefficients {list(c)} + {c_sft} do not sum to 1; LoRA "
                                 "models merge exactly only when they do")
            soup.set_coefficients(list(c))
        else:
            soup.set_coefficients([*c, c_sft])

    def extrapolated_model(self, which: str = "bone"):
        """The live model :meth:`set_extrapolated` sets."""
        return {"bone": self.bone_ext, "rewarded": self.rewarded}[which].model

    def decode_with(self, method: str | ExperimentMethod, mu, *, w: float | None = None) -> tuple[list, list]:
        """Set the live models of ``method`` for preference ``mu`` [n]; returns ``(models, coeffs)`` to decode with."""
        spec = get_experiment_method(method) if isinstance(method, str) else method
        if spec.decode is None:
            raise ValueError(f"{spec.name} is trained per preference; it has no merged model to set")
        return spec.decode(self, [float(x) for x in mu], w)
