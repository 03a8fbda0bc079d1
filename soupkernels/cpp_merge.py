"""Launcher for the C++ CPU merge kernel (csrc/merge.cpp)."""

from __future__ import annotations

from typing import Sequence

import torch

from soupkernels._dtypes import DTYPE_CODE
from soupkernels.backend import _C

# Streaming (non-temporal) stores skip the read-for-ownership of output lines
# that will not be re-read soon; they only pay off once the output is well
# beyond the last-level cache. See benchmarks/RESULTS.md for the measurement.
NONTEMPORAL_MIN_BYTES = 64 << 20


def merge_group_cpp(
    outs: Sequence[torch.Tensor],
    groups: Sequence[Sequence[torch.Tensor]],
    coeffs: Sequence[float],
    *,
    nontemporal: bool | None = None,
) -> None:
    """One kernel call for many tensors sharing one dtype signature.

    ``outs[t] = sum_k coeffs[k] * groups[t][k]``; all tensors contiguous on the
    CPU, ``groups[t][k].dtype`` the same for every t. Validation is the
    caller's job (soupkernels.merge).
    """
    out_ptrs = [o.data_ptr() for o in outs]
    in_ptrs = [t.data_ptr() for g in groups for t in g]
    sizes = [o.numel() for o in outs]
    if nontemporal is None:
        nontemporal = sum(sizes) * outs[0].element_size() >= NONTEMPORAL_MIN_BYTES
    _C.merge_many(
        out_ptrs,
        DTYPE_CODE[outs[0].dtype],
        in_ptrs,
        [DTYPE_CODE[t.dtype] for t in groups[0]],
        [float(c) for c in coeffs],
        sizes,
        bool(nontemporal),
        0,
    )
