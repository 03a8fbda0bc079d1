"""Triton pieces shared by the merge and sampling kernels (private).

Both ops take their inputs as a table of raw addresses grouped by dtype
(fp32, then bf16, then fp16), so one compiled kernel knows every input's
element type at compile time whatever order the caller passed them in; the
launchers reorder the coefficients to match.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import triton
import triton.language as tl

from soupkernels._dtypes import SUPPORTED_DTYPES

#: The order inputs are grouped in (dtype code order: fp32, bf16, fp16); a
#: kernel's N_F32 / N_BF16 / N_F16 constexprs count them.
DTYPE_GROUPS = SUPPORTED_DTYPES


def group_by_dtype(dtypes: Sequence[torch.dtype]) -> tuple[list[int], list[int]]:
    """(order, counts): input indices sorted into DTYPE_GROUPS order (stable), and the size of each group."""
    order = sorted(range(len(dtypes)), key=lambda k: DTYPE_GROUPS.index(dtypes[k]))
    counts = [sum(1 for d in dtypes if d == g) for g in DTYPE_GROUPS]
    return order, counts


def device_ctx(dev: torch.device):
    """Make ``dev`` the current CUDA device for a launch (Triton launches on the current one; the
    address tables belong to ``dev``); a no-op for interpreted CPU tensors."""
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


@triton.jit
def as_ptr(addr, CODE: tl.constexpr, ALIGNED: tl.constexpr):
    # Addresses come from a table, so Triton cannot see their alignment. The
    # launcher checked 16-byte alignment; the hint on the pointer (a hint on
    # the integer is lost, checked in the PTX) lets the compiler emit 128-bit
    # loads and stores instead of one per element. CODE: soupkernels._dtypes.
    if CODE == 0:
        p = addr.to(tl.pointer_type(tl.float32))
    elif CODE == 1:
        p = addr.to(tl.pointer_type(tl.bfloat16))
    else:
        p = addr.to(tl.pointer_type(tl.float16))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p
