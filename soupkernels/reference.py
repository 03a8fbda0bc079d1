"""Plain-torch twins of the public ops: what tests and benchmarks compare with.

``merge_reference`` is also the production ``torch`` backend (with fp32
accumulation); tests call it with ``acc_dtype=torch.float64``.
"""

from __future__ import annotations

from typing import Sequence

import torch

# The torch path materialises an fp32 accumulator; chunking bounds that
# temporary to 64 MiB however large the tensor is.
_CHUNK = 1 << 24


@torch.no_grad()
def merge_reference(
    tensors: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    *,
    out: torch.Tensor | None = None,
    acc_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``out = sum_k coeffs[k] * tensors[k]`` accumulated in ``acc_dtype``.

    Parameters
    ----------
    tensors : sequence of torch.Tensor, each the same shape, any float dtype
    coeffs : sequence of float, ``len(tensors)`` entries
    out : torch.Tensor, optional
        Written in place (may alias an input); default a new tensor of
        ``tensors[0].dtype``.
    acc_dtype : torch.dtype
        Accumulation dtype (float32 as the kernels do, float64 for tests).

    Returns
    -------
    torch.Tensor  same shape as the inputs, dtype of ``out``
    """
    if out is None:
        out = torch.empty_like(tensors[0], memory_format=torch.contiguous_format)
    flat_in = [t.reshape(-1) for t in tensors]
    flat_out = out.view(-1)
    n = flat_out.numel()
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        acc = flat_in[0][s:e].to(acc_dtype) * float(coeffs[0])
        for t, c in zip(flat_in[1:], coeffs[1:]):
            acc.add_(t[s:e].to(acc_dtype), alpha=float(c))
        flat_out[s:e].copy_(acc)
    return out


def merge_naive(tensors: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """The expression people write: ``sum(c * t for c, t in zip(coeffs, tensors))``.

    Kept for benchmarks (it allocates a temporary per operation and computes
    in the inputs' dtype, so bf16 inputs accumulate in bf16).
    """
    return sum(float(c) * t for c, t in zip(coeffs, tensors))


def merge_inplace_chain(tensors: Sequence[torch.Tensor], coeffs: Sequence[float], out: torch.Tensor) -> torch.Tensor:
    """The best plain torch chain: ``out.copy_(x0).mul_(c0)`` then ``add_(x, alpha=c)``.

    For benchmarks. It passes over ``out`` once per input (reads and writes it
    n times) and rounds to ``out.dtype`` after every step.
    """
    out.copy_(tensors[0]).mul_(float(coeffs[0]))
    for t, c in zip(tensors[1:], coeffs[1:]):
        out.add_(t, alpha=float(c))
    return out
