"""LoRA adapters as Bone Soup backbones: load, check, mix exactly, save in peft's format.

A backbone that is the SFT model plus a LoRA delta ``D_j = s_j B_j A_j``
(``s_j = alpha_j / r_j``, or ``alpha_j / sqrt(r_j)`` with rsLoRA) merges in
low rank: when the coefficients satisfy ``sum_j c_j + c_sft = 1`` (Bone
Soup, Rewarded Soup and extrapolation all do),

    theta(mu) = sum_j c_j (W + D_j) + c_sft W = W + sum_j c_j D_j,

so one preference is ONE adapter of rank ``R = sum_j r_j``: ``A`` the
stacked ``A_j`` [R, in], ``B`` the concatenated ``c_j s_j B_j`` [out, R],
scaling 1 (``lora_alpha = r = R``). peft and vLLM load it as it is.

Only LoRA on linear layers (``nn.Linear``, transformers' ``Conv1D`` via
``fan_in_fan_out``) is read; adapters that also train other parameters
(``modules_to_save``, trainable tokens, biases, DoRA magnitudes, embedding
LoRA) are refused, since their merge is not this weighted sum.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

# The marker file and its test live in the torch-free module, so `bonesoup merge` can tell adapters apart
# without importing torch; this module re-exports them.
from bonesoup.merge.adapter_merge import ADAPTER_CONFIG, is_adapter_dir

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LoraModule",
    "LoraAdapter",
    "is_adapter_dir",
    "load_adapter",
    "load_adapters",
    "check_compatible",
    "mixture_adapter",
    "merged_weights",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: peft's prefix of every saved adapter key (``PeftModel.base_model.model.<module>``).
_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")

# Config entries whose non-default value means "not a plain LoRA on linear layers": the
# weighted sum of deltas would not be the merge, so the adapter is refused (naming the entry).
_REFUSED = {
    "use_dora": (False, None),
    "modules_to_save": (None, []),
    "trainable_token_indices": (None, {}, []),
    "layer_replication": (None,),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
    "target_parameters": (None, []),
}


def _pattern_value(patterns: dict, module: str, default):
    """peft's rule for rank_pattern / alpha_pattern: the first key matching a dotted suffix of ``module``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class LoraModule:
    """The LoRA of one linear layer: delta = scaling * B @ A (transposed for ``fan_in_fan_out`` layers).

    ``A`` [r, in] and ``B`` [out, r], the adapter's dtype, on the CPU.
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self, fan_in_fan_out: bool, dtype=torch.float64) -> torch.Tensor:
        """The weight delta in the layer's own layout: [out, in] (``nn.Linear``) or [in, out] (``Conv1D``)."""
        d = (self.B.to(dtype) @ self.A.to(dtype)) * self.scaling
        return d.T if fan_in_fan_out else d


@dataclass
class LoraAdapter:
    """A LoRA adapter in peft's format, read into memory.

    Attributes
    ----------
    config : dict
        ``adapter_config.json`` as read (or as it will be written).
    modules : dict of str -> LoraModule
        Keyed by module name in the base model (``transformer.h.0.attn.c_attn``), sorted.
    path : Path or None
        Where it was read from (None for one made in memory).
    """

    config: dict
    modules: dict[str, LoraModule]
    path: Path | None = None
    #: How a mixture was made (coefficients, sources); saved beside it as ``bonesoup-mixture.json``.
    provenance: dict | None = None
    _name: str = field(default="", repr=False)

    @property
    def name(self) -> str:
        """How messages name this adapter: its directory, or "adapter"."""
        return self._name or (str(self.path) if self.path is not None else "adapter")

    @property
    def base(self) -> str | None:
        """``base_model_name_or_path``: the SFT model the adapter was trained on (None if not recorded)."""
        return self.config.get("base_model_name_or_path")

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.modules.values())).A.dtype

    @property
    def rank(self) -> int:
        """The largest rank over the modules (the rank vLLM's ``max_lora_rank`` must allow)."""
        return max(m.rank for m in self.modules.values())

    def weight_deltas(self, dtype=torch.float64) -> dict[str, torch.Tensor]:
        """``{"<module>.weight": delta}`` in each layer's own layout, scaling folded in."""
        return {f"{name}.weight": m.delta(self.fan_in_fan_out, dtype) for name, m in self.modules.items()}

    def save(self, out_dir: str | os.PathLike, *, force: bool = False, extra_files: dict[str, str] | None = None
             ) -> Path:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically into ``out_dir``.

        ``extra_files`` (file name -> text, e.g. an extraction report) are written in the same atomic step.
        """
        from safetensors.torch import save_file

        from bonesoup.merge.atomic_dir import atomic_output_dir

        tensors = {}
        for name, m in self.modules.items():
            tensors[f"{_PREFIX}{name}.lora_A.weight"] = m.A.contiguous()
            tensors[f"{_PREFIX}{name}.lora_B.weight"] = m.B.contiguous()
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        nbytes += sum(len(text.encode()) for text in (extra_files or {}).values())
        with atomic_output_dir(out_dir, force=force, required_bytes=nbytes + 65536) as tmp:
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
            if self.provenance is not None:  # beside, not inside, the config: peft reads that one strictly
                (tmp / "bonesoup-mixture.json").write_text(json.dumps(self.provenance, indent=2) + "\n")
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
        self.path = Path(out_dir)
        return self.path


def load_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read one peft LoRA adapter directory; refuse (naming the file and entry) anything not a plain linear LoRA."""
    from safetensors import safe_open

    from bonesoup.merge.safetensors_file import load_json, read_header

    path = Path(path)
    cfg_file, w_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a peft adapter directory: {ADAPTER_CONFIG} is missing")
    if not w_file.is_file():
        raise FileNotFoundError(f"{w_file} is missing (adapters are read from safetensors, never pickles)")
    cfg = load_json(cfg_file.read_bytes(), str(cfg_file))
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters merge as a weighted sum")
    for key, allowed in _REFUSED.items():
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"{cfg_file}: {key} = {cfg[key]!r} is not supported: the adapter must be a plain LoRA "
                             "on linear layers for its merge to be a weighted sum of low-rank deltas")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    for name, v in (("r", r), ("lora_alpha", alpha)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{cfg_file}: {name} must be a positive number, got {v!r}")
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora", False))

    read_header(w_file)  # the strict header check (sizes, offsets, dtypes) before any tensor is mapped
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(w_file), "pt") as f:
        for key in f.keys():
            k = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            m = _KEY_RE.match(k)
            if m is None:
                raise ValueError(f"{w_file}: tensor {key!r} is not a lora_A / lora_B weight (embedding LoRA, biases "
                                 "and other trained parameters are not supported)")
            parts.setdefault(m["module"], {})[m["which"]] = f.get_tensor(key)
    if not parts:
        raise ValueError(f"{w_file} holds no LoRA weights")
    modules = {}
    for name in sorted(parts):
        p = parts[name]
        for which in "AB":
            if which not in p:
                raise ValueError(f"{w_file}: module {name!r} has lora_{'AB'.replace(which, '')} but no lora_{which}")
        A, B = p["A"], p["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"{w_file}: module {name!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; "
                             "expected [r, in] and [out, r]")
        if A.dtype != B.dtype or not A.is_floating_point():
            raise ValueError(f"{w_file}: module {name!r} has lora_A {A.dtype} and lora_B {B.dtype}; expected one "
                             "floating dtype")
        rank = int(_pattern_value(rank_pattern, name, r))
        if rank != A.shape[0]:
            raise ValueError(f"{w_file}: module {name!r} has rank {A.shape[0]} but {cfg_file} says r = {rank}")
        a = float(_pattern_value(alpha_pattern, name, alpha))
        modules[name] = LoraModule(A, B, a / (math.sqrt(rank) if rslora else rank))
    dtypes = {m.A.dtype for m in modules.values()}
    if len(dtypes) > 1:
        raise ValueError(f"{w_file}: modules mix dtypes {sorted(map(str, dtypes))}")
    return LoraAdapter(cfg, modules, path)


def _same_base(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_compatible(adapters: Sequence[LoraAdapter], *, sft: str | os.PathLike | None = None) -> None:
    """Refuse adapters that cannot be mixed: different base, target modules, shapes or layer layout.

    ``sft``, if given, is the base checkpoint they will be applied to: an
    adapter that records another base is refused. Messages name the adapters.
    """
    if not adapters:
        raise ValueError("adapters must hold at least one adapter")
    first = adapters[0]
    bases = [(a, a.base) for a in adapters if a.base]
    if sft is not None:
        for a, base in bases:
            if not _same_base(base, str(sft)):
                raise ValueError(f"{a.name}: trained on base {base!r}, not on the SFT model {str(sft)!r}")
    for a, base in bases[1:]:
        if not _same_base(base, bases[0][1]):
            raise ValueError(f"{a.name} was trained on base {base!r} but {bases[0][0].name} on {bases[0][1]!r}; "
                             "backbones must share one base model")
    for a in adapters[1:]:
        if a.fan_in_fan_out != first.fan_in_fan_out:
            raise ValueError(f"{a.name} has fan_in_fan_out = {a.fan_in_fan_out} but {first.name} has "
                             f"{first.fan_in_fan_out}; they are not LoRAs of the same layers")
        if set(a.modules) != set(first.modules):
            only_a = sorted(set(a.modules) - set(first.modules))[:3]
            only_f = sorted(set(first.modules) - set(a.modules))[:3]
            raise ValueError(f"{a.name} and {first.name} adapt different modules (only in the first: {only_a}, "
                             f"only in the second: {only_f}); backbones must target the same modules")
        for name, m in a.modules.items():
            f = first.modules[name]
            if m.A.shape[1] != f.A.shape[1] or m.B.shape[0] != f.B.shape[0]:
                raise ValueError(f"module {name!r}: {a.name} maps {m.A.shape[1]} -> {m.B.shape[0]} features but "
                                 f"{first.name} maps {f.A.shape[1]} -> {f.B.shape[0]}")


def load_adapters(paths: Sequence[str | os.PathLike], *, sft: str | os.PathLike | None = None) -> list[LoraAdapter]:
    """Read the adapters of n backbones and check they can be mixed (see :func:`check_compatible`)."""
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError("paths must be a list of adapter directories, got a single path")
    adapters = [p if isinstance(p, LoraAdapter) else load_adapter(p) for p in paths]
    check_compatible(adapters, sft=sft)
    return adapters


def _coefficient_list(coeffs, n: int) -> list[float]:
    try:
        c = [float(x) for x in (coeffs.tolist() if hasattr(coeffs, "tolist") else coeffs)]
    except (TypeError, ValueError):
        raise TypeError(f"coeffs must be {n} numbers (one per adapter), got {coeffs!r}") from None
    if len(c) != n or not all(math.isfinite(x) for x in c):
        raise ValueError(f"coeffs must hold {n} finite numbers (one per adapter), got {coeffs!r}")
    return c


def mixture_adapter(adapters: Sequence, coeffs, out_dir: str | os.PathLike | None = None, *,
                    force: bool = False, base: str | None = None) -> LoraAdapter:
    """One adapter whose delta is exactly ``sum_j coeffs[j] * delta_j``: rank ``sum_j r_j``.

    ``A`` = the ``A_j`` stacked [R, in]; ``B`` = the ``coeffs[j] * s_j * B_j``
    concatenated [out, R]; scaling 1 (``lora_alpha = r``; modules whose
    total rank differs from the most common one get ``rank_pattern`` /
    ``alpha_pattern`` entries). ``A`` is copied exactly; each ``B`` element
    is rounded once (float64 product, cast to the adapters' dtype).

    The merged model is ``W + sum_j coeffs[j] D_j``: the Bone Soup merge of
    the full backbones when ``sum_j coeffs[j] + c_sft = 1``; pass the
    backbone coefficients of :func:`~bonesoup.merge.coefficients.merge_coefficients`.

    Parameters
    ----------
    adapters : list of LoraAdapter or adapter directories
        n adapters of one base (checked).
    coeffs : [n] floats
        One coefficient per adapter; negative allowed (Bone Soup, extrapolation).
    out_dir : path, optional
        Also save it there (peft format, atomic; ``force`` replaces).
    base : str, optional
        ``base_model_name_or_path`` to record (default: the adapters').

    Returns
    -------
    LoraAdapter
        Loads with ``peft.PeftModel.from_pretrained(sft_model, out_dir)`` and
        vLLM's ``LoRARequest``.
    """
    adapters = load_adapters(adapters)
    c = _coefficient_list(coeffs, len(adapters))
    first = adapters[0]
    dtype = first.dtype if all(a.dtype == first.dtype for a in adapters) else torch.float32
    modules = {}
    for name in first.modules:
        parts = [a.modules[name] for a in adapters]
        A = torch.cat([m.A.to(dtype) for m in parts], dim=0)
        B = torch.cat([(m.B.to(torch.float64) * (cj * m.scaling)).to(dtype) for m, cj in zip(parts, c)], dim=1)
        modules[name] = LoraModule(A, B, 1.0)
    ranks = {name: m.rank for name, m in modules.items()}
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))  # the most common total rank (ties: the larger)
    pattern = {name: rr for name, rr in ranks.items() if rr != r}
    config = {
        "peft_type": "LORA",
        "task_type": first.config.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": base if base is not None else first.base,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        # The same modules as the sources (checked above), so the sources' rule is kept verbatim.
        "target_modules": first.config.get("target_modules") or sorted({n.rsplit(".", 1)[-1] for n in modules}),
        "fan_in_fan_out": first.fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
    }
    # The sources' selection rule is kept whole: without its exclusions, peft would wrap modules the mixture
    # has no weights for (and warn of missing keys).
    for key in ("exclude_modules", "layers_to_transform", "layers_pattern"):
        if first.config.get(key) is not None:
            config[key] = first.config[key]
    out = LoraAdapter(config, modules, provenance={"coefficients": c, "sources": [a.name for a in adapters]})
    if out_dir is not None:
        out.save(out_dir, force=force)
    return out


def merged_weights(adapter: LoraAdapter, weights) -> dict[str, torch.Tensor]:
    """The adapted layers' merged weights ``W + delta``: ``{"<module>.weight": tensor}``, new tensors.

    ``weights`` maps parameter names (``transformer.h.0.attn.c_attn.weight``)
    to the base model's tensors (a state dict, or a callable ``name -> tensor``);
    only the adapted layers are read and returned, each in its own dtype and
    device, summed in float64 and rounded once. Other parameters are the base's
    unchanged, so a caller that needs the whole merged model shares them
    instead of copying them (peak extra memory: the adapted layers).
    """
    get = weights if callable(weights) else weights.__getitem__
    out = {}
    for name, delta in adapter.weight_deltas(torch.float64).items():
        try:
            w = get(name)
        except (KeyError, AttributeError):
            raise ValueError(f"{adapter.name}: adapts {name!r}, which the base model does not have") from None
        if tuple(w.shape) != tuple(delta.shape):
            raise ValueError(f"{adapter.name}: {name!r} has shape {tuple(w.shape)} in the base model but the "
                             f"adapter's delta is {tuple(delta.shape)}")
        out[name] = (w.detach().to(torch.float64) + delta.to(w.device)).to(w.dtype)
    return out
