"""Guided sampling: combine M models' next-token logits and draw, in one op.

``guided_sample`` is the fused path (C++ on CPU tensors, Triton on CUDA
tensors, torch reference anywhere; see :func:`soupkernels.backend_for`);
``guided_logits`` is the combination alone. Semantics (normative, DESIGN.md):
for row b, z = sum_m c[b, m] * logits[m][b] in fp32; then temperature (z / T;
T == 0 is greedy argmax, lowest index on ties), top-k, top-p, min-p as
transformers' warpers apply them, renormalise, draw one token with a Philox
uniform keyed by (seed, offset) of that row. See
:mod:`soupkernels.sampling_reference` for the rule in code.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np
import torch

from soupkernels import backend as _backend
from soupkernels._dtypes import DTYPE_CODE
from soupkernels._validate import FLOAT32_TINY, check_storage, float32_value
from soupkernels.cpp_sampling import guided_sample_cpp_packed

__all__ = ["guided_sample", "guided_logits", "MAX_INPUTS"]

#: Most logit tensors one call combines (the kernels unroll over them).
MAX_INPUTS = 16


def _inputs(logits) -> list[torch.Tensor]:
    """M tensors [B, V] from a [M, B, V] tensor or a sequence of [B, V] tensors."""
    if isinstance(logits, torch.Tensor):
        check_storage(logits, "logits")
        if logits.dim() != 3:
            raise ValueError(
                f"logits must be a [M, B, V] tensor or a list of M [B, V] tensors, got a tensor of shape "
                f"{tuple(logits.shape)} (for one model pass [logits] or logits[None])"
            )
        xs = list(logits.unbind(0))
    elif isinstance(logits, (list, tuple)):
        xs = list(logits)
    else:
        raise TypeError(f"logits must be a tensor or a list of tensors, got {type(logits).__name__}")
    if not xs:
        raise ValueError("logits is empty: need at least one [B, V] tensor")
    if len(xs) > MAX_INPUTS:
        raise ValueError(f"logits holds {len(xs)} tensors; at most {MAX_INPUTS} are combined in one call")
    first = xs[0]
    for m, x in enumerate(xs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"logits[{m}] must be a torch.Tensor, got {type(x).__name__}")
        check_storage(x, f"logits[{m}]")  # before any stride or address is read
        if not x.is_floating_point():
            raise TypeError(f"logits[{m}] has dtype {x.dtype}; logits must be floating point")
        if x.dim() != 2:
            raise ValueError(f"logits[{m}] has shape {tuple(x.shape)}; expected [B, V]")
        if x.shape != first.shape:
            raise ValueError(f"logits[{m}] has shape {tuple(x.shape)} but logits[0] has {tuple(first.shape)}")
        if x.device != first.device:
            raise ValueError(f"logits[{m}] is on {x.device} but logits[0] is on {first.device}")
    if first.shape[1] < 1:
        raise ValueError("logits have an empty vocabulary dimension (V = 0)")
    # The kernels read rows of unit stride in fp32/bf16/fp16; anything else is
    # converted once here (float64 inputs: the accumulation is fp32 anyway).
    out = []
    for x in xs:
        if x.dtype not in DTYPE_CODE:
            x = x.float()
        if x.stride(1) != 1 or x.data_ptr() % x.element_size():
            x = x.contiguous()
        out.append(x)
    return out


def _coeff_rows(coeffs, B: int, M: int, device: torch.device) -> torch.Tensor:
    """coeffs [M] or [B, M] (sequence or tensor) -> contiguous fp32 [B, M] on ``device``."""
    if isinstance(coeffs, (list, tuple)) and all(type(v) in _PY_NUMBERS or isinstance(v, numbers.Real)
                                                 for v in coeffs):
        # The common case (one preference for the batch), checked without torch ops.
        if len(coeffs) != M:
            raise ValueError(f"coeffs has {len(coeffs)} entries but logits holds M = {M} tensors")
        for m, v in enumerate(coeffs):
            if not math.isfinite(v):
                raise ValueError(f"coeffs must be finite; coeffs[{m}] is {v}")
            if not math.isfinite(float32_value(v)):  # the kernels combine in float32
                raise ValueError(f"coeffs[{m}] = {v!r} is not finite in float32, the precision the kernels use")
        rows = np.empty((B, M), dtype=np.float32)
        rows[:] = coeffs
        rows = torch.from_numpy(rows)
        return rows if device.type == "cpu" else rows.to(device)
    if isinstance(coeffs, torch.Tensor):
        check_storage(coeffs, "coeffs")
        # Checked in float32 (1e39 in float64 is inf there), on the host when it is on the host.
        c = coeffs.detach().float()
    else:
        c = torch.as_tensor(coeffs, dtype=torch.float32)
    if c.dim() == 1:
        if c.numel() != M:
            raise ValueError(f"coeffs has {c.numel()} entries but logits holds M = {M} tensors")
        c = c.expand(B, M)
    elif c.dim() == 2:
        if tuple(c.shape) != (B, M):
            raise ValueError(f"coeffs has shape {tuple(c.shape)}; expected [M] = [{M}] or [B, M] = [{B}, {M}]")
    else:
        raise ValueError(f"coeffs must be [M] or [B, M], got shape {tuple(c.shape)}")
    if c.device.type == "cpu" and not torch.isfinite(c).all():
        bad = torch.nonzero(~torch.isfinite(c))[0].tolist()
        raise ValueError(f"coeffs must be finite in float32 (the kernels' precision); coeffs at {bad} is "
                         f"{c[tuple(bad)].item()} there")
    return c.to(device).contiguous()


class _Range:
    """A per-row parameter's valid range, checked on a Python number or a numpy array."""

    def __init__(self, text: str, ok):
        self.text, self.ok = text, ok

    def check(self, name: str, values: np.ndarray, given: np.ndarray | None = None) -> None:
        """``values`` as the kernel sees them; ``given``, if not None, what the caller passed."""
        with np.errstate(invalid="ignore"):
            bad = ~np.asarray(self.ok(values), dtype=bool)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            shown = values[row].item() if given is None else given[min(row, given.shape[0] - 1)].item()
            there = f"; it is {values[row].item()!r} in float32" if given is not None else ""
            raise ValueError(f"{name}[{row}] = {shown!r} is out of range ({self.text}){there}")


# Float parameters are range-checked after rounding to float32, as the kernels
# read them: 1e39 is inf there, 1e-50 is 0. A positive temperature below
# float32's smallest normal would make 1/T inf and every logit inf or NaN.
_TEMPERATURE = _Range(f"0 (greedy) or in [{FLOAT32_TINY:.4g}, float32 max]",
                      lambda t: (t == 0) | ((t >= FLOAT32_TINY) & (t < math.inf)))
_TOP_K = _Range("an integer >= 0; 0 means off", lambda t: t >= 0)
_TOP_P = _Range("in (0, 1]; 1 means off", lambda t: (t > 0) & (t <= 1))
_MIN_P = _Range("in [0, 1]; 0 means off", lambda t: (t >= 0) & (t <= 1))
_ANY_INT = _Range("any 64-bit integer", lambda t: np.ones(np.shape(t), dtype=bool) if np.ndim(t) else True)
_OFFSET = _Range("an integer >= 0", lambda t: t >= 0)
_INT64 = (-(2**63), 2**63)
_PY_NUMBERS = (int, float)  # exact-type fast path before the (slow) ABC checks


def _fill_row(dst: np.ndarray, value, name: str, rng: _Range) -> None:
    """Write a scalar or a [B] sequence/array/tensor into ``dst`` [B] (float32 or int64), range-checked.

    Per-row parameters are gathered on the host (a CUDA tensor here costs one
    copy): the C++ kernel reads them from there, the Triton kernel gets them
    in two small uploads for all six.
    """
    B = dst.shape[0]
    integral = dst.dtype == np.int64
    if type(value) in _PY_NUMBERS or (isinstance(value, numbers.Number)
                                      and not isinstance(value, (torch.Tensor, np.ndarray))):
        # The common case, checked in plain Python (a numpy check costs more than the kernel at B = 1).
        if integral and not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        if integral and not _INT64[0] <= value < _INT64[1]:
            raise ValueError(f"{name}[0] = {value!r} is out of range (a 64-bit integer)")
        if not bool(rng.ok(value)):
            raise ValueError(f"{name}[0] = {value!r} is out of range ({rng.text})")
        if not integral:
            v32 = float32_value(value)
            if not bool(rng.ok(v32)):
                raise ValueError(f"{name}[0] = {value!r} is out of range ({rng.text}); it is {v32!r} in float32")
        dst.fill(value)
        return
    else:
        if isinstance(value, torch.Tensor):
            check_storage(value, name)
            if integral and value.is_floating_point():
                raise TypeError(f"{name} must hold integers, got dtype {value.dtype}")
            arr = value.detach().cpu().numpy()
        elif isinstance(value, (Sequence, np.ndarray)):
            if integral and not all(isinstance(v, numbers.Integral) for v in value):
                raise TypeError(f"{name} must hold integers, got {list(value)!r}")
            arr = np.asarray(value)
        else:
            raise TypeError(f"{name} must be a number, a sequence or a tensor, got {type(value).__name__}")
        if arr.ndim == 0:
            arr = arr.reshape(1)
        elif arr.ndim != 1 or arr.shape[0] != B:
            what = f"{len(arr)} entries" if arr.ndim == 1 else f"shape {arr.shape}"
            raise ValueError(f"{name} has {what}; expected a scalar or one per row (B = {B})")
        if integral:
            arr = arr.astype(np.int64)  # out-of-range Python ints already failed in np.asarray
    rng.check(name, arr)
    if integral:
        dst[:] = arr
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            dst[:] = arr
        rng.check(name, dst, given=arr)


def guided_logits(logits, coeffs) -> torch.Tensor:
    """Combined logits ``z[b] = sum_m coeffs[b, m] * logits[m][b]`` in fp32.

    Parameters
    ----------
    logits : Tensor [M, B, V] or sequence of M Tensors [B, V]
        fp32, bf16 or fp16 (others are converted to fp32); dtypes may differ
        between the M inputs; rows may be strided.
    coeffs : sequence or Tensor, [M] or [B, M]
        One coefficient per model, shared by all rows or per row.

    Returns
    -------
    Tensor [B, V], float32, on the logits' device.
    """
    xs = _inputs(logits)
    B, V = xs[0].shape
    dev = xs[0].device
    c = _coeff_rows(coeffs, B, len(xs), dev)
    out = torch.empty((B, V), dtype=torch.float32, device=dev)
    if B == 0:
        return out
    which = _backend.backend_for(xs[0])
    if which == "cpp":
        from soupkernels.cpp_sampling import guided_logits_cpp

        guided_logits_cpp(xs, c, out)
    elif which == "triton":
        from soupkernels.triton_sampling import guided_logits_triton

        guided_logits_triton(xs, c, out)
    else:
        from soupkernels.sampling_reference import guided_logits_reference

        out.copy_(guided_logits_reference(xs, c))
    return out


def guided_sample(
    logits,
    coeffs,
    *,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    seed=None,
    offset=0,
    return_logprobs: bool = False,
    check: bool | None = None,
):
    """Sample one token per row from the combination of M models' logits.

    For row b: z = sum_m coeffs[b, m] * logits[m][b] (fp32), then
    temperature, top-k, top-p, min-p in transformers' order and rules,
    renormalise, draw by inverse CDF with the Philox uniform of
    (seed[b], offset[b]) (Triton's ``tl.rand``). A row's token depends only
    on its own logits and parameters, never on the other rows.

    Parameters
    ----------
    logits : Tensor [M, B, V] or sequence of M Tensors [B, V]
        Any float dtype (fp32/bf16/fp16 read directly, mixed allowed).
    coeffs : [M] or [B, M]
        Weights of the M models, shared or per row; negative allowed.
    temperature : float or [B]
        0 = greedy (argmax, lowest index on ties; log-prob 0), else at least
        float32's smallest normal (1.2e-38) and finite in float32.
    top_k : int or [B]
        Keep the k largest (ties at the k-th value kept); 0 = off.
    top_p : float or [B]
        In (0, 1]: keep the smallest top set whose mass reaches p; 1 = off.
    min_p : float or [B]
        In [0, 1]: keep tokens with p >= min_p * p_max; 0 = off.
    seed : int or [B] int64, optional
        Philox key per row. A scalar is shared by all rows (rows with equal
        logits then draw equal tokens; pass per-row seeds or offsets for
        independent rows). None draws B seeds from torch's global generator.
    offset : int or [B] int64
        Philox counter per row (e.g. the decoding step), >= 0.
    return_logprobs : bool
        Also return the log-probability of each chosen token under the final
        filtered, renormalised distribution (fp32 [B]).
    check : bool, optional
        Raise ValueError naming the rows whose combined logits hold a NaN or
        +inf or are all -inf (they get token -1 and log-prob NaN otherwise).
        Default: on for CPU tensors, off on GPU (checking costs a sync).

    Returns
    -------
    tokens : Tensor [B] int64 (and logprobs : Tensor [B] float32)
    """
    xs = _inputs(logits)
    B, V = xs[0].shape
    dev = xs[0].device
    c = _coeff_rows(coeffs, B, len(xs), dev)
    fp = np.empty((3, B), dtype=np.float32)  # temperature, top_p, min_p
    ip = np.empty((3, B), dtype=np.int64)  # top_k, seed, offset
    _fill_row(fp[0], temperature, "temperature", _TEMPERATURE)
    _fill_row(fp[1], top_p, "top_p", _TOP_P)
    _fill_row(fp[2], min_p, "min_p", _MIN_P)
    _fill_row(ip[0], top_k, "top_k", _TOP_K)
    if seed is None:
        seed = torch.randint(-(2**63), 2**63 - 1, (B,), dtype=torch.int64)
    _fill_row(ip[1], seed, "seed", _ANY_INT)
    _fill_row(ip[2], offset, "offset", _OFFSET)
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    logprobs = torch.empty(B, dtype=torch.float32, device=dev)
    which = _backend.backend_for(xs[0]) if B else "none"
    n_invalid = None  # unknown until counted
    if which == "cpp":  # reads the host arrays in place
        n_invalid = guided_sample_cpp_packed(xs, c, fp, ip, tokens, logprobs if return_logprobs else None)
    elif which != "none":
        fp_t, ip_t = torch.from_numpy(fp).to(dev, non_blocking=True), torch.from_numpy(ip).to(dev, non_blocking=True)
        temp, tp, mp = fp_t.unbind(0)
        tk, sd, off = ip_t.unbind(0)
        if which == "triton":
            from soupkernels.triton_sampling import guided_sample_triton

            guided_sample_triton(xs, c, temp, tk, tp, mp, sd, off, tokens, logprobs)
        else:  # batched torch ops on the tensors' device (CUDA without Triton, or forced)
            from soupkernels.torch_sampling import guided_sample_torch

            tok, lp = guided_sample_torch(xs, c, temp, tk, tp, mp, sd, off)
            tokens.copy_(tok)
            logprobs.copy_(lp)
    if check is None:
        check = dev.type == "cpu"
    if check and B and (n_invalid if n_invalid is not None else bool((tokens < 0).any())):
        bad = torch.nonzero(tokens < 0).flatten().tolist()
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise ValueError(
            f"rows {shown} of the combined logits hold a NaN or +inf or are all -inf; "
            "no token can be drawn (pass check=False to get token -1 for them instead)"
        )
    return (tokens, logprobs) if return_logprobs else tokens
