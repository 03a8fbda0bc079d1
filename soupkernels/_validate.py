"""Boundary checks shared by the public ops, run before any kernel sees a pointer.

The kernels (csrc/, Triton) read and write through raw addresses. A tensor
whose memory is not a plain strided buffer (sparse, nested, meta, torch's
storage-less efficient zero tensors) would hand them a NULL or meaningless
address, so it is refused here by name. Scalars are checked in the precision
the kernels compute in (float32): 1e39 is finite in float64 but inf in the
kernel, and would turn a whole output into inf/NaN.
"""

from __future__ import annotations

import math
import struct

import torch

#: Largest finite float32.
FLOAT32_MAX = torch.finfo(torch.float32).max
#: Smallest positive normal float32.
FLOAT32_TINY = torch.finfo(torch.float32).tiny
# |v| at and above which round-to-nearest-even float64 -> float32 gives inf:
# the midpoint between FLOAT32_MAX = 2^128 - 2^104 and 2^128 (a tie goes to
# the even neighbour, inf). Exact in float64.
_FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
_F32 = struct.Struct("<f")


def storage_problem(t: torch.Tensor) -> str | None:
    """Why ``t``'s memory cannot be passed to a kernel as one raw pointer, or None when it can."""
    if t.layout != torch.strided:
        return (f"is a {str(t.layout).replace('torch.', '')} tensor; the kernels take dense strided tensors "
                "(convert with .to_dense())")
    if t.is_nested:
        return "is a nested tensor; the kernels take dense strided tensors (pad it, e.g. .to_padded_tensor(0.0))"
    if t.is_meta:
        return "is on the meta device and holds no data"
    if t._is_zerotensor():
        return ("is one of torch's storage-less efficient zero tensors (data_ptr 0); "
                "materialise it first, e.g. torch.zeros_like(t)")
    try:
        ptr = t.data_ptr()
    except RuntimeError as exc:  # functorch (vmap/grad) wrappers, other storage-less subclasses
        return f"has no storage a kernel can read ({exc}); pass a plain tensor"
    if t.numel() and ptr == 0:
        return "has no storage (data_ptr is 0)"
    return None


def check_storage(t: torch.Tensor, name: str) -> None:
    """Raise ValueError naming ``name`` unless ``t`` is a dense tensor with real storage."""
    problem = storage_problem(t)
    if problem is not None:
        raise ValueError(f"{name} {problem}")


def float32_value(v: float) -> float:
    """``v`` rounded to float32 (inf when out of its range), as a Python float.

    struct, not numpy: this runs on every sampling call and numpy's scalar
    path (with its error-state context) costs microseconds.
    """
    try:
        return _F32.unpack(_F32.pack(v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def check_finite_float32(values, name: str) -> None:
    """Raise ValueError naming ``name[i]`` for the first value that is not finite once rounded to float32.

    ``values``: a sequence of Python floats (already finite in float64 or not).
    """
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite; {name}[{i}] is {v!r}")
        if abs(v) >= _FLOAT32_OVERFLOW:
            raise ValueError(f"{name}[{i}] = {v!r} is not finite in float32, the precision the kernels use "
                             f"(|value| must stay below {FLOAT32_MAX:.4g})")
