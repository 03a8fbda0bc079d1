"""AdapterSoup: Bone Soup over LoRA backbones with a preference per batch row, and no re-merge.

With backbones ``W + D_j`` (``D_j = s_j B_j A_j``) and coefficients that sum
to one with the SFT's (see :mod:`bonesoup.merge.lora`), each target layer
computes, for row r of the batch,

    y_r = W x_r + sum_j c_{r,j} s_j B_j (A_j x_r)
        = W x_r + B_cat (col(c_r) * (A_cat x_r)),

two skinny matmuls of rank ``R = sum_j r_j`` (``col(c_r)`` repeats
``c_{r,j}`` over adapter j's ``r_j`` columns). The base weights are never
written, so rows at different preferences share one batch, one KV cache
layout and one forward; a row's output is that of the model merged at its
own preference (to fp32 rounding).

The soup installs a small wrapper on each target layer of the model it is
given (the layer itself is kept, untouched, inside) and records itself as
``model.adapter_soup``, which is how :func:`bonesoup.guided_generate`
finds it when called with ``preference=``.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from bonesoup.merge.coefficients import merge_coefficients, validate_preference
from bonesoup.merge.lora import LoraAdapter, load_adapters

__all__ = ["AdapterSoup", "adapter_soup_of"]


def adapter_soup_of(model) -> "AdapterSoup | None":
    """The :class:`AdapterSoup` installed on ``model``, or None."""
    soup = getattr(model, "adapter_soup", None)
    return soup if isinstance(soup, AdapterSoup) else None


class _Coefficients:
    """The coefficients the wrapped layers read: shared [n] or per-row [B, n] fp32, on the soup's device
    (its model's first parameter's; each layer copies them to its own device once per change)."""

    def __init__(self, c: torch.Tensor):
        self.c = c
        self.version = 0

    def set(self, c: torch.Tensor) -> None:
        self.c = c
        self.version += 1


class _MixtureLinear(nn.Module):
    """A linear layer plus the n backbones' LoRA deltas, mixed by the soup's current coefficients.

    Per forward, on the tokens as rows [T, in]: ``y = base(x)`` (a plain
    Conv1D / nn.Linear inline, as one addmm), ``h = x A^T`` [T, R], per-row
    ``h *= col(c_r)`` (shared coefficients are folded into a cached copy of
    ``B`` instead), then ``y += h B^T`` in place (one BLAS call, no [T, out]
    temporary) when nothing needs ``y`` for autograd. ``B`` is stored as the
    transpose of a contiguous [R, out] tensor so that call reads it row-major.
    (What these cost: benchmarks/bench_mixture_overhead.py, RESULTS.md.)
    """

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, block: torch.Tensor, coeffs: _Coefficients,
                 name: str):
        super().__init__()
        self.base_layer = base
        self.register_buffer("lora_A", A.contiguous(), persistent=False)  # [R, in]
        # [out, R], scaling folded in; a view of a contiguous [R, out] tensor (see the class docstring)
        self.register_buffer("lora_B", B.t().contiguous().t(), persistent=False)
        self.register_buffer("block", block, persistent=False)  # [R] int64: the adapter of each rank column
        self._coeffs = coeffs
        self._name = name
        self._cached = (-1, None, None)
        # Layers computed inline in forward (exact types only: a subclass may change the product).
        self._plain = "conv1d" if type(base).__name__ == "Conv1D" and type(base).__module__.startswith(
            "transformers") else "linear" if type(base) is nn.Linear else None

    def _refresh(self) -> tuple:
        """(version, per-row col(c) [B, R] or None, B^T [R, out] with shared col(c) folded in)."""
        # The layer's own device: the model may have been moved after the soup was made, or spread over
        # several devices (device_map), while the coefficients live on the soup's device.
        c = self._coeffs.c.to(self.block.device)
        cols = c[..., self.block].to(self.lora_B.dtype)
        if cols.dim() == 2:  # per row: h is scaled, B^T stays as stored
            cached = (self._coeffs.version, cols, self.lora_B.t())
        else:  # shared: fold col(c) into the rows of B^T once per coefficient change
            cached = (self._coeffs.version, None, (self.lora_B.t() * cols[:, None]).contiguous())
        self._cached = cached
        return cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base, A = self.base_layer, self.lora_A
        cached = self._cached
        if cached[0] != self._coeffs.version:
            cached = self._refresh()
        _, cols, Bt = cached
        if cols is not None and (x.dim() < 2 or x.shape[0] != cols.shape[0]):
            raise RuntimeError(f"{self._name}: the soup holds per-row coefficients for {cols.shape[0]} rows but "
                               f"the layer got a batch of shape {tuple(x.shape)}")
        x2 = x.reshape(-1, x.shape[-1])
        # A plain GPT-2 Conv1D or nn.Linear is computed here as one addmm (the module call and its
        # reshapes cost as much as the LoRA products on small layers); other layers are called.
        if self._plain == "conv1d":
            y = torch.addmm(base.bias, x2, base.weight) if base.bias is not None else x2 @ base.weight
        elif self._plain == "linear":
            y = torch.nn.functional.linear(x2, base.weight, base.bias)
        else:
            y = base(x)
            y = y.reshape(-1, y.shape[-1])
        h = torch.nn.functional.linear(x2 if x2.dtype == A.dtype else x2.to(A.dtype), A)  # [T, R]
        if cols is not None:  # per row: row b's tokens are h's rows b*L .. b*L + L - 1
            scale = cols.repeat_interleave(h.shape[0] // cols.shape[0], 0) if h.shape[0] != cols.shape[0] else cols
            h = h.mul_(scale) if not h.requires_grad else h * scale
        if y.dtype == Bt.dtype and not y.requires_grad:
            y = y.addmm_(h, Bt)
        else:
            y = y + torch.matmul(h, Bt).to(y.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])


def _get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        getattr(parent, child)
    except AttributeError:
        raise ValueError(f"the adapters target module {name!r}, which the model does not have") from None
    return parent, child


class AdapterSoup:
    """Bone Soup over LoRA backbones on one base model: shared or per-row preferences, no re-merge.

    Parameters
    ----------
    model : transformers causal LM
        The SFT (base) model the adapters were trained on; its target layers
        get a wrapper, their weights are not changed. Not a peft model.
    adapters : list of adapter directories or LoraAdapter
        The n backbones (checked to share base, modules and shapes).
    beta : float, optional
        Required for ``method="bone"``.
    method : str
        A registered merge method (:func:`bonesoup.merge_method_names`).
    preference, alpha :
        The shared preference used when no per-row one is given (default uniform, 0).

    Examples
    --------
    >>> soup = AdapterSoup(sft_model, ["out/bb0", "out/bb1"], beta=0.7)
    >>> out = guided_generate(sft_model, [], [1.0], ids, mask, preference=[[0.2, 0.8], [0.9, 0.1]])
    """

    def __init__(self, model: nn.Module, adapters: Sequence[str | os.PathLike | LoraAdapter], *,
                 beta: float | None = None, method: str = "bone", preference: Sequence[float] | None = None,
                 alpha: float = 0.0):
        if hasattr(model, "peft_config"):
            raise TypeError("model is a peft model; pass the plain base model (AdapterSoup applies the adapters)")
        if adapter_soup_of(model) is not None:
            raise ValueError("model already has an AdapterSoup installed; call its remove() first")
        self.adapters = load_adapters(adapters)
        self.n = len(self.adapters)
        self.method = method
        self.beta = beta
        self.model = model
        self._lock = threading.Lock()
        self._rows_thread: int | None = None  # the thread inside rows(), to refuse re-entry instead of hanging
        try:
            param = next(model.parameters())
        except StopIteration:
            raise ValueError("model has no parameters") from None
        self.device = param.device
        merge_coefficients([1.0 / self.n] * self.n, method=method, beta=beta, n=self.n)  # checks method and beta
        self._coeffs = _Coefficients(torch.zeros(self.n, device=self.device))
        self._installed: list[tuple[nn.Module, str, nn.Module]] = []
        first = self.adapters[0]
        try:
            for name in first.modules:
                parent, child = _get_parent(model, name)
                layer = getattr(parent, child)
                weight = getattr(layer, "weight", None)
                mods = [a.modules[name] for a in self.adapters]
                d_in, d_out = mods[0].A.shape[1], mods[0].B.shape[0]
                want = (d_in, d_out) if first.fan_in_fan_out else (d_out, d_in)
                if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != want:
                    raise ValueError(f"module {name!r}: the adapters expect a weight of shape {want}, the model has "
                                     f"{None if weight is None else tuple(weight.shape)}")
                dtype = weight.dtype
                A = torch.cat([m.A for m in mods], 0).to(device=weight.device, dtype=dtype)
                B = torch.cat([m.B.to(torch.float64) * m.scaling for m in mods], 1).to(device=weight.device,
                                                                                       dtype=dtype)
                block = torch.cat([torch.full((m.rank,), j, dtype=torch.int64) for j, m in enumerate(mods)])
                wrapper = _MixtureLinear(layer, A, B, block.to(weight.device), self._coeffs, name)
                setattr(parent, child, wrapper)
                self._installed.append((parent, child, layer))
        except BaseException:
            self.remove()
            raise
        model.adapter_soup = self
        self.preference: list[float] = []
        self.alpha = 0.0
        self.version = 0
        self.set_preference(preference if preference is not None else [1.0 / self.n] * self.n, alpha)

    # ------------------------------------------------------------------ coefficients

    def coefficients(self, preference: Sequence[float], alpha: float = 0.0) -> np.ndarray:
        """Backbone coefficients c [n] float64 for ``preference`` (the SFT's is ``1 - sum(c)``, implicit)."""
        c, c_sft = merge_coefficients(preference, method=self.method, beta=self.beta, alpha=alpha, n=self.n)
        # The low-rank merge is exact only when the coefficients over backbones and SFT sum to 1.
        if not math.isclose(float(np.sum(c)) + c_sft, 1.0, rel_tol=0.0, abs_tol=1e-9):
            raise ValueError(f"method {self.method!r} gives coefficients summing to {np.sum(c) + c_sft} with the "
                             "SFT model's; an adapter soup needs them to sum to 1")
        return c

    def row_coefficients(self, preference, alpha=0.0) -> torch.Tensor:
        """Per-row backbone coefficients [B, n] float32 from preferences [B, n] and alpha (float or [B])."""
        try:
            prefs = np.asarray(preference.tolist() if hasattr(preference, "tolist") else preference, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"preference must be a [B, {self.n}] array of numbers, got {preference!r}") from None
        if prefs.ndim != 2 or prefs.shape[1] != self.n:
            raise ValueError(f"preference must have shape [B, {self.n}] (one row per sequence), got {prefs.shape}")
        alphas = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (prefs.shape[0],)) \
            if np.ndim(alpha) == 0 else np.asarray(alpha, dtype=np.float64)
        if alphas.shape != (prefs.shape[0],):
            raise ValueError(f"alpha must be a number or [B = {prefs.shape[0]}] numbers, got shape {alphas.shape}")
        rows = []
        for b in range(prefs.shape[0]):
            validate_preference(prefs[b], self.n, name=f"preference[{b}]")
            rows.append(self.coefficients(prefs[b], float(alphas[b])))
        return torch.tensor(np.stack(rows), dtype=torch.float32)

    def _refuse_reentry(self, what: str) -> None:
        # The lock is not re-entrant: on the thread that holds it, waiting would never end.
        if self._rows_thread == threading.get_ident():
            raise RuntimeError(f"{what} inside this soup's own rows() block (on the same thread) would wait forever "
                               "for it to end; pass every per-row preference to one rows() / guided_generate call")

    def set_preference(self, preference: Sequence[float], alpha: float = 0.0) -> list[float]:
        """The shared preference (rows without their own): no weight is written. Returns the coefficients."""
        c = self.coefficients(preference, alpha)
        self._refuse_reentry("set_preference")
        with self._lock:
            self._coeffs.set(torch.tensor(c, dtype=torch.float32, device=self.device))
            self.preference, self.alpha = [float(x) for x in preference], float(alpha)
            self.version += 1
        return [float(x) for x in c]

    def set_coefficients(self, coefficients: Sequence[float]) -> None:
        """Raw shared backbone coefficients [n] (e.g. per-objective extrapolation); the SFT's is 1 - sum."""
        c = torch.as_tensor([float(x) for x in coefficients], dtype=torch.float32)
        if c.shape != (self.n,) or not torch.isfinite(c).all():
            raise ValueError(f"coefficients must hold {self.n} finite numbers, got {coefficients!r}")
        self._refuse_reentry("set_coefficients")
        with self._lock:
            self._coeffs.set(c.to(self.device))
            self.preference, self.alpha = [], float("nan")
            self.version += 1

    @contextlib.contextmanager
    def rows(self, preference=None, alpha=0.0, *, coefficients=None) -> Iterator[torch.Tensor]:
        """Per-row coefficients for the forwards inside the block; the shared ones come back after.

        Give ``preference`` [B, n] (and ``alpha``, a number or [B]) or raw
        ``coefficients`` [B, n]. Every forward inside must have B rows.
        Yields the [B, n] coefficients. One block at a time per soup (a lock):
        the soup's state belongs to the forward that runs; other threads wait,
        while re-entry on the same thread (a nested ``rows()``, ``set_preference``)
        raises RuntimeError instead of waiting forever.
        """
        if (preference is None) == (coefficients is None):
            raise ValueError("rows() takes preference or coefficients, exactly one")
        if coefficients is not None:
            c = torch.as_tensor(coefficients, dtype=torch.float32)
            if c.dim() != 2 or c.shape[1] != self.n or not torch.isfinite(c).all():
                raise ValueError(f"coefficients must be a finite [B, {self.n}] array, got shape {tuple(c.shape)}")
        else:
            c = self.row_coefficients(preference, alpha)
        self._refuse_reentry("rows()")
        with self._lock:
            shared = self._coeffs.c
            self._coeffs.set(c.to(self.device))
            self._rows_thread = threading.get_ident()
            try:
                yield c
            finally:
                self._rows_thread = None
                self._coeffs.set(shared)

    # ------------------------------------------------------------------ lifecycle

    def remove(self) -> None:
        """Put the original layers back and detach the soup from the model."""
        for parent, child, layer in reversed(self._installed):
            setattr(parent, child, layer)
        self._installed = []
        if getattr(self.model, "adapter_soup", None) is self:
            del self.model.adapter_soup

    def __repr__(self) -> str:
        return (f"AdapterSoup(n={self.n}, method={self.method!r}, beta={self.beta}, layers={len(self._installed)}, "
                f"preference={self.preference}, alpha={self.alpha})")
