"""Calls into soupkernels._C for guided sampling on CPU tensors (arguments already validated)."""

from __future__ import annotations

import torch

from soupkernels._dtypes import DTYPE_CODE
from soupkernels.backend import _C


def _table(xs: list[torch.Tensor]):
    return [x.data_ptr() for x in xs], [DTYPE_CODE[x.dtype] for x in xs], [x.stride(0) for x in xs]


def guided_sample_cpp_packed(xs, coeffs, fp, ip, tokens, logprobs, num_threads: int = 0) -> int:
    """Fills ``tokens`` [B] int64 (and ``logprobs`` [B] fp32 unless None) in place.

    The per-row parameters sit in two contiguous host numpy arrays: ``fp``
    float32 [3, B] (temperature, top_p, min_p), ``ip`` int64 [3, B] (top_k,
    seed, offset). 0 threads = all. Returns the number of rows given token -1.
    """
    ptrs, dts, strides = _table(xs)
    B, V = xs[0].shape
    f, i = fp.ctypes.data, ip.ctypes.data
    return _C.guided_sample(ptrs, dts, strides, B, V, coeffs.data_ptr(), f, i, f + 4 * B, f + 8 * B, i + 8 * B,
                            i + 16 * B, tokens.data_ptr(), 0 if logprobs is None else logprobs.data_ptr(), num_threads)


def guided_logits_cpp(xs, coeffs, out) -> None:
    """Fills ``out`` [B, V] fp32 (contiguous) in place."""
    ptrs, dts, strides = _table(xs)
    B, V = xs[0].shape
    _C.guided_logits(ptrs, dts, strides, B, V, coeffs.data_ptr(), out.data_ptr())
