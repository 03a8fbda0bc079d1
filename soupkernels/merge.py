"""Public merge ops: ``sk.merge`` and ``sk.merge_many``.

Validation happens here, once, at the boundary; the kernels (csrc/ for CPU
tensors, triton_merge.py for CUDA tensors) assume valid input.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from typing import Sequence

import torch

from soupkernels._dtypes import DTYPE_CODE, dtype_code
from soupkernels._validate import check_finite_float32, check_storage
from soupkernels.backend import backend_for
from soupkernels.reference import merge_reference

__all__ = ["merge", "merge_many"]


def _coeff_list(coeffs, n: int | None) -> list[float]:
    if isinstance(coeffs, torch.Tensor):
        check_storage(coeffs, "coeffs")
        if coeffs.dim() != 1:
            raise ValueError(f"coeffs must be 1-D, got shape {tuple(coeffs.shape)}")
        vals = [float(c) for c in coeffs.detach().cpu().double().tolist()]
    else:
        try:
            vals = [float(c) for c in coeffs]
        except (TypeError, ValueError):
            raise TypeError(f"coeffs must be a sequence of numbers or a 1-D tensor, got {coeffs!r}") from None
    if not vals:
        raise ValueError("coeffs must not be empty")
    if n is not None and len(vals) != n:
        raise ValueError(f"coeffs has {len(vals)} entries but there are {n} input tensors")
    bad = [i for i, c in enumerate(vals) if not math.isfinite(c)]
    if bad:
        raise ValueError(f"coeffs must be finite; entries {bad} are {[vals[i] for i in bad]}")
    check_finite_float32(vals, "coeffs")  # the kernels multiply in float32
    return vals


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _explain_layout(t: torch.Tensor, name: str) -> None:
    if t.data_ptr() % t.element_size():
        raise ValueError(f"{name} starts at address {t.data_ptr():#x}, not a multiple of its element size "
                         f"{t.element_size()} (e.g. torch.frombuffer with an odd offset); copy it first")
    if t.is_neg() or t.is_conj():
        raise ValueError(f"{name} has a lazy negation/conjugation bit set; pass {name}.resolve_neg()")


def _explain_group(tensors, out, where: str) -> None:
    """Raise the error that names what is wrong with one merge's tensors."""
    first = tensors[0]
    for k, t in enumerate(tensors):
        name = f"{where}[{k}]"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_storage(t, name)  # first: the checks below read strides and addresses
        dtype_code(t.dtype, name)
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {where}[0] has {tuple(first.shape)}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {where}[0] is on {first.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} is not contiguous (strides {t.stride()}); pass {name}.contiguous()")
        _explain_layout(t, name)
    oname = f"out for {where}"
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{oname} must be a torch.Tensor, got {type(out).__name__}")
    check_storage(out, oname)
    dtype_code(out.dtype, oname)
    if out.shape != first.shape:
        raise ValueError(f"{oname} has shape {tuple(out.shape)} but the inputs have {tuple(first.shape)}")
    if out.device != first.device:
        raise ValueError(f"{oname} is on {out.device} but the inputs are on {first.device}")
    if not out.is_contiguous():
        raise ValueError(f"{oname} is not contiguous (strides {out.stride()})")
    _explain_layout(out, oname)
    o_lo, o_hi = _span(out)
    for k, t in enumerate(tensors):
        lo, hi = _span(t)
        if lo < o_hi and o_lo < hi and not (lo == o_lo and t.dtype == out.dtype):
            raise ValueError(
                f"{oname} partially overlaps {where}[{k}]; out may alias an input only exactly "
                "(same storage offset and dtype)"
            )
    raise AssertionError("unreachable: _check_group found a problem _explain_group did not")


def _check_group(tensors, out, where: str) -> None:
    """Shapes, devices, dtypes, contiguity and aliasing of one merge.

    A fast all-good test first (merge_many checks hundreds of groups per
    call); only a failing group pays for the detailed error.
    """
    try:
        # Sparse and nested tensors have no single data pointer (nested: not
        # even a shape); meta and storage-less zero tensors report data_ptr 0,
        # which the `!= 0` tests below catch. None may reach a kernel.
        ok = out.layout == torch.strided and not out.is_nested and not out.is_meta
        if ok:
            shape, dev = out.shape, out.device
            o_lo = out.data_ptr()
            ok = (out.dtype in DTYPE_CODE and out.is_contiguous() and o_lo % out.element_size() == 0
                  and not out.is_neg() and (o_lo != 0 or out.numel() == 0))
            o_hi = o_lo + out.numel() * out.element_size()
        for t in tensors if ok else ():
            if t.layout != torch.strided or t.is_nested:
                ok = False
                break
            lo = t.data_ptr()
            if not (t.shape == shape and t.device == dev and t.dtype in DTYPE_CODE and t.is_contiguous()
                    and lo % t.element_size() == 0 and not t.is_neg() and (lo != 0 or t.numel() == 0)):
                ok = False
                break
            # Exact aliasing (out IS an input) is safe: every element is read
            # before it is written. Partial overlap would read merged values.
            if lo < o_hi and o_lo < lo + t.numel() * t.element_size() and not (lo == o_lo and t.dtype == out.dtype):
                ok = False
                break
    except (AttributeError, RuntimeError):  # not a tensor, or one whose data pointer cannot be read
        ok = False
    if not ok:
        _explain_group(tensors, out, where)


def _check_across_groups(outs, groups) -> None:
    """merge_many: no output may overlap another output or another group's input.

    Groups run in an unspecified order (and in parallel), so such an overlap
    would read half-merged values: e.g. a model with tied weights listed twice
    (wte and lm_head share storage) merged in place. O(P log P) over spans.
    """
    spans = sorted((*_span(o), p) for p, o in enumerate(outs) if o.numel())
    for (lo_a, hi_a, p), (lo_b, _hi_b, q) in zip(spans, spans[1:]):
        if lo_b < hi_a:
            raise ValueError(f"outs[{p}] and outs[{q}] overlap in memory (tied or shared weights?); "
                             "merge each storage once")
    starts = [lo for lo, _, _ in spans]
    for q, g in enumerate(groups):
        for k, t in enumerate(g):
            if not t.numel():
                continue
            lo, hi = _span(t)
            i = bisect.bisect_left(starts, hi) - 1  # the last output starting before this input ends
            if i >= 0:
                o_lo, o_hi, p = spans[i]
                if p != q and o_hi > lo:
                    raise ValueError(f"outs[{p}] overlaps groups[{q}][{k}], an input of another parameter; "
                                     "its merge would read already-merged values")


def _mark_written(outs) -> None:
    # The kernels write through raw pointers; tell autograd, as an in-place
    # torch op would, so a graph that saved these tensors raises on backward.
    for o in outs:
        torch.autograd.graph.increment_version(o)


def _run(outs, groups, coeffs) -> None:
    """Dispatch validated work: one kernel call per (backend, signature)."""
    buckets: dict[tuple, list[int]] = defaultdict(list)
    backends: dict[torch.device, str] = {}
    for i, (o, g) in enumerate(zip(outs, groups)):
        if o.numel() == 0:
            continue
        if o.device not in backends:
            backends[o.device] = backend_for(o)
        key = (backends[o.device], o.device, o.dtype, tuple(t.dtype for t in g))
        buckets[key].append(i)
    for (backend, _dev, _odt, _idt), idx in buckets.items():
        sub_outs = [outs[i] for i in idx]
        sub_groups = [groups[i] for i in idx]
        if backend == "cpp":
            from soupkernels.cpp_merge import merge_group_cpp

            merge_group_cpp(sub_outs, sub_groups, coeffs)
            _mark_written(sub_outs)
        elif backend == "triton":
            from soupkernels.triton_merge import merge_group_triton

            merge_group_triton(sub_outs, sub_groups, coeffs)
            _mark_written(sub_outs)
        else:
            for o, g in zip(sub_outs, sub_groups):
                merge_reference(g, coeffs, out=o)


@torch.no_grad()
def merge(
    tensors: Sequence[torch.Tensor],
    coeffs: Sequence[float] | torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted sum of same-shaped tensors in one pass over memory.

    ``out = sum_k coeffs[k] * tensors[k]``, accumulated in fp32, rounded once
    to ``out.dtype`` (round-to-nearest-even). Not differentiable.

    Parameters
    ----------
    tensors : sequence of torch.Tensor, length n >= 1
        Same shape (any), same device, contiguous, dense with storage (sparse,
        nested, meta and storage-less zero tensors are refused); dtypes
        float32, bfloat16 or float16, mixed allowed.
    coeffs : sequence of float or torch.Tensor, shape (n,)
        Finite in float32 (the kernels' precision); negative values
        (extrapolation, Bone Soup) are fine.
    out : torch.Tensor, optional
        Destination, same shape and device, contiguous, float32/bfloat16/
        float16. It may be exactly one of the inputs (in-place re-merge) but
        must not partially overlap one. Default: a new ``tensors[0].dtype``
        tensor.

    Returns
    -------
    torch.Tensor
        ``out``, same shape as the inputs.

    Examples
    --------
    >>> import torch, soupkernels as sk
    >>> a, b = torch.ones(5), torch.full((5,), 2.0)
    >>> sk.merge([a, b], [1.75, -0.75]).tolist()
    [0.25, 0.25, 0.25, 0.25, 0.25]
    """
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence) or len(tensors) == 0:
        raise TypeError("tensors must be a non-empty sequence (list or tuple) of tensors")
    vals = _coeff_list(coeffs, len(tensors))
    if out is None:
        if not isinstance(tensors[0], torch.Tensor):
            raise TypeError(f"tensors[0] must be a torch.Tensor, got {type(tensors[0]).__name__}")
        check_storage(tensors[0], "tensors[0]")  # a nested tensor has no shape to allocate from
        out = torch.empty(tensors[0].shape, dtype=tensors[0].dtype, device=tensors[0].device)
    _check_group(tensors, out, "tensors")
    _run([out], [tensors], vals)
    return out


@torch.no_grad()
def merge_many(
    groups: Sequence[Sequence[torch.Tensor]],
    coeffs: Sequence[float] | torch.Tensor,
    *,
    outs: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``merge`` for many parameters at once (a whole model).

    ``outs[p] = sum_k coeffs[k] * groups[p][k]`` for every parameter p, with
    ONE kernel launch per (device, dtype signature) instead of one per tensor:
    the Triton path passes address and tile tables, the C++ path one call that
    splits all tensors' elements evenly across threads.

    Parameters
    ----------
    groups : sequence of P sequences of n tensors
        ``groups[p]`` holds parameter p of each of the n models. Within a
        group the rules of ``merge`` apply; groups may differ in shape.
    coeffs : sequence of float or torch.Tensor, shape (n,)
        The same coefficients for every parameter.
    outs : sequence of P tensors, optional
        Destinations (each may alias an input of its own group); default new
        tensors of ``groups[p][0].dtype``.

    Returns
    -------
    list of torch.Tensor, length P
    """
    if isinstance(groups, torch.Tensor) or not isinstance(groups, Sequence):
        raise TypeError("groups must be a sequence of sequences of tensors")
    if len(groups) == 0:
        return []
    n = None
    for p, g in enumerate(groups):
        if not isinstance(g, (list, tuple)) and (isinstance(g, torch.Tensor) or not isinstance(g, Sequence)) \
                or len(g) == 0:
            raise TypeError(f"groups[{p}] must be a non-empty sequence of tensors")
        if n is None:
            n = len(g)
        elif len(g) != n:
            raise ValueError(f"groups[{p}] has {len(g)} tensors but groups[0] has {n}")
    vals = _coeff_list(coeffs, n)
    if outs is None:
        outs = []
        for p, g in enumerate(groups):
            if not isinstance(g[0], torch.Tensor):
                raise TypeError(f"groups[{p}][0] must be a torch.Tensor, got {type(g[0]).__name__}")
            check_storage(g[0], f"groups[{p}][0]")
            outs.append(torch.empty(g[0].shape, dtype=g[0].dtype, device=g[0].device))
    else:
        outs = list(outs)
        if len(outs) != len(groups):
            raise ValueError(f"outs has {len(outs)} tensors but groups has {len(groups)}")
    for p, (o, g) in enumerate(zip(outs, groups)):
        _check_group(g, o, f"groups[{p}]")
    if len(outs) > 1:
        _check_across_groups(outs, groups)
    _run(outs, groups, vals)
    return outs
