"""Launcher for the C++ CPU merge kernel (csrc/merge.cpp).

:func:`merge_pointers` is the raw-buffer launcher (no torch: bonesoup's CPU
checkpoint merge feeds it memory-mapped files); :func:`merge_group_cpp` is the
torch-tensor one on top of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

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
    from soupkernels._dtypes import DTYPE_CODE

    merge_pointers(
        [o.data_ptr() for o in outs],
        DTYPE_CODE[outs[0].dtype],
        [t.data_ptr() for g in groups for t in g],
        [DTYPE_CODE[t.dtype] for t in groups[0]],
        coeffs,
        [o.numel() for o in outs],
        out_itemsize=outs[0].element_size(),
        nontemporal=nontemporal,
    )


def merge_pointers(
    out_ptrs: Sequence[int],
    out_code: int,
    in_ptrs: Sequence[int],
    in_codes: Sequence[int],
    coeffs: Sequence[float],
    sizes: Sequence[int],
    *,
    out_itemsize: int,
    nontemporal: bool | None = None,
) -> None:
    """``out[t] = sum_k coeffs[k] * in[t * n + k]`` over raw, contiguous, element-aligned CPU buffers.

    Parameters
    ----------
    out_ptrs : sequence of int, length T
        Addresses of the outputs, all of dtype code ``out_code`` (soupkernels._dtypes.NAME_CODE).
    in_ptrs : sequence of int, length T * n
        Input addresses, tensor-major: the n inputs of output 0, then of output 1, ...
    in_codes : sequence of int, length n
        Dtype code of input k (the same for every t).
    coeffs : sequence of float, length n
    sizes : sequence of int, length T
        Elements per output.
    out_itemsize : int
        Bytes per output element (for the streaming-store threshold).

    Validation is the caller's job; the buffers must stay alive for the call.
    """
    # The extension itself, not soupkernels.backend (which imports torch for its dispatch).
    from soupkernels import _C

    if nontemporal is None:
        nontemporal = sum(sizes) * out_itemsize >= NONTEMPORAL_MIN_BYTES
    _C.merge_many(list(out_ptrs), int(out_code), list(in_ptrs), [int(c) for c in in_codes],
                 [float(c) for c in coeffs], list(sizes), bool(nontemporal), 0)
