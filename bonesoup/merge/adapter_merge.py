"""``bonesoup merge`` with LoRA adapter directories as backbones: a full checkpoint, or one mixture adapter.

With backbones ``W + D_j`` (peft adapters on the SFT model ``W``) and merge
coefficients that sum to one with the SFT's (Bone Soup, Rewarded Soup and
extrapolation all do),

    sum_j c_j (W + D_j) + c_sft W = W + sum_j c_j D_j,

so the full merged checkpoint is the SFT checkpoint plus one weighted delta
per adapted weight. It is written by the torch-free streamed CPU merge
(:func:`~bonesoup.merge.cpu_merge.merge_weighted_cpu`: the SFT's layout,
atomic, fsynced), with :class:`AdapterDeltas` supplying each adapted key's
``sum_j c_j s_j B_j A_j`` (float32, computed when the merge reaches the key)
as one more input of the kernel. ``--as-adapter`` writes the exact mixture
adapter instead (:func:`~bonesoup.merge.lora.mixture_adapter`, rank ``sum_j r_j``).

Importing this module imports no torch (``bonesoup merge --help`` stays
light); the adapter work imports it when it runs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .coefficients import merge_coefficients
from .methods import get_merge_method

__all__ = ["ADAPTER_CONFIG", "is_adapter_dir", "AdapterDeltas", "merge_adapters_cpu", "merge_as_adapter"]

#: peft's marker file: the one test for "this input is an adapter" (bonesoup.merge.lora re-exports it;
#: it lives here because that module imports torch).
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding a peft adapter (``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


class AdapterDeltas:
    """``sum_j c_j D_j`` per adapted weight key: the :class:`~bonesoup.merge.cpu_merge.DeltaSource` of adapters.

    Parameters
    ----------
    terms : sequence of (adapter, coefficient, base)
        An adapter directory (or LoraAdapter), its coefficient, and the checkpoint it applies to
        (checked against the base the adapter records; None: not checked). Adapters may target
        different modules; those on one module must agree on its shape and layout.
    """

    def __init__(self, terms: Sequence[tuple]):
        from .lora import LoraAdapter, check_compatible, load_adapter

        self.terms = []
        for adapter, coeff, base in terms:
            a = adapter if isinstance(adapter, LoraAdapter) else load_adapter(adapter)
            check_compatible([a], sft=base)
            self.terms.append((a, float(coeff)))
        if not self.terms:
            raise ValueError("no adapters given")
        self.name = (f"adapter {self.terms[0][0].name}" if len(self.terms) == 1
                     else f"adapters {', '.join(a.name for a, _ in self.terms)}")
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._parts: dict[str, list] = {}
        for a, c in self.terms:
            for module, m in a.modules.items():
                key = f"{module}.weight"
                out_f, in_f = m.B.shape[0], m.A.shape[1]
                shape = (in_f, out_f) if a.fan_in_fan_out else (out_f, in_f)
                if self._shapes.setdefault(key, shape) != shape:
                    raise ValueError(f"{a.name} changes {key!r} as a {list(shape)} weight but another adapter as "
                                     f"{list(self._shapes[key])}; they are not adapters of one model")
                self._parts.setdefault(key, []).append((m, c, a.fan_in_fan_out))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def delta(self, key: str) -> np.ndarray:
        """``sum_j c_j s_j B_j A_j`` of ``key`` in the weight's own layout, float32 [shape]."""
        import torch

        parts = self._parts[key]
        # One matmul over the stacked ranks (the mixture adapter's layout); c_j s_j folded into B in
        # float64 and rounded once, then fp32 products: far below the merged weight's own rounding.
        A = torch.cat([m.A.float() for m, _, _ in parts], 0)
        B = torch.cat([(m.B.double() * (c * m.scaling)).float() for m, c, _ in parts], 1)
        d = B @ A
        return (d.T if parts[0][2] else d).contiguous().numpy()

    def report(self) -> list[dict]:
        return [{"path": str(Path(a.path).absolute()) if a.path else a.name, "coefficient": c, "rank": a.rank}
                for a, c in self.terms]


def _coefficients(n: int, preference, beta, alpha, method) -> tuple[list[float], dict]:
    """Backbone coefficients (the SFT's is 1 - their sum, implicit) and the report's method fields."""
    spec = get_merge_method(method)
    pref = [float(x) for x in preference]
    if len(pref) != n:
        raise ValueError(f"preference has {len(pref)} entries but {n} adapters were given; they must match "
                         "(one weight per backbone)")
    c, c_sft = merge_coefficients(pref, method=method, beta=beta, alpha=alpha)
    if not math.isclose(float(np.sum(c)) + c_sft, 1.0, rel_tol=0.0, abs_tol=1e-9):
        raise ValueError(f"method {method!r} gives coefficients summing to {np.sum(c) + c_sft} with the SFT "
                         "model's; merging adapters needs them to sum to 1")
    report = {"method": method, "preference": pref,
              "beta": None if not spec.needs_beta or beta is None else float(beta), "alpha": float(alpha)}
    return [float(x) for x in c], report


def merge_adapters_cpu(adapters: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                       sft: str | os.PathLike, preference: Sequence[float], beta: float | None = None,
                       alpha: float = 0.0, method: str = "bone", dtype: str | None = None, force: bool = False,
                       progress: bool = True) -> Path:
    """The full merged checkpoint ``W_sft + sum_j c_j D_j`` of adapter backbones, on the CPU.

    Parameters
    ----------
    adapters : sequence of path, length n
        peft LoRA adapter directories of one base, one per objective (checked: same base, which must be
        ``sft`` when recorded; same modules and shapes).
    out_dir : path
        Output checkpoint directory (the SFT's layout, config and tokenizer; ``bonesoup-merge.json``).
    sft : path
        The SFT checkpoint the adapters were trained on.
    preference, beta, alpha, method, dtype, force, progress :
        As :func:`bonesoup.merge.offline.merge_checkpoints`.

    Returns
    -------
    Path
        ``out_dir``, complete.
    """
    from .cpu_merge import MergeInput, merge_weighted_cpu
    from .lora import load_adapters

    if isinstance(adapters, (str, os.PathLike)):
        raise TypeError(f"adapters must be a sequence of adapter directories, got the single path {adapters!r}")
    loaded = load_adapters(adapters, sft=sft)
    c, report = _coefficients(len(loaded), preference, beta, alpha, method)
    deltas = AdapterDeltas([(a, cj, None) for a, cj in zip(loaded, c)])
    report["adapters"] = deltas.report()
    return merge_weighted_cpu([MergeInput(Path(sft), 1.0, "sft")], out_dir, dtype=dtype, force=force,
                              progress=progress, report=report, deltas=deltas)


def merge_as_adapter(adapters: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                     preference: Sequence[float], beta: float | None = None, alpha: float = 0.0,
                     method: str = "bone", sft: str | os.PathLike | None = None, force: bool = False) -> Path:
    """The merge as ONE peft adapter (``--as-adapter``): :func:`~bonesoup.merge.lora.mixture_adapter` at the
    preference's backbone coefficients, rank ``sum_j r_j``, exact. ``sft``, if given, is checked (the
    adapters' recorded base, and every adapted key's shape in its checkpoint) and recorded as the base.

    Returns ``out_dir`` (adapter_config.json, adapter_model.safetensors, bonesoup-mixture.json).
    """
    from .checkpoint import CheckpointDir
    from .cpu_merge import check_deltas, check_output_dir
    from .lora import load_adapters, mixture_adapter

    if isinstance(adapters, (str, os.PathLike)):
        raise TypeError(f"adapters must be a sequence of adapter directories, got the single path {adapters!r}")
    out_dir = check_output_dir(out_dir, [*adapters, *([sft] if sft is not None else [])], force)
    loaded = load_adapters(adapters, sft=sft)
    c, report = _coefficients(len(loaded), preference, beta, alpha, method)
    if sft is not None:
        check_deltas(CheckpointDir(sft), AdapterDeltas([(a, 1.0, None) for a in loaded]))
    mix = mixture_adapter(loaded, c, base=str(Path(sft).absolute()) if sft is not None else None)
    mix.provenance = {**report, **mix.provenance}
    mix.save(out_dir, force=force)
    return out_dir


def read_mixture_report(out_dir: str | os.PathLike) -> dict:
    """What :func:`merge_as_adapter` recorded beside the adapter (``bonesoup-mixture.json``)."""
    return json.loads((Path(out_dir) / "bonesoup-mixture.json").read_text())
