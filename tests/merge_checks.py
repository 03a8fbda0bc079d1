"""Shared helpers for the merge tests: float64 reference and tolerances."""

import torch

from soupkernels.reference import merge_reference

# mantissa bits and smallest normal of the low-precision outputs
_FMT = {torch.bfloat16: (7, 2.0**-126), torch.float16: (10, 2.0**-14)}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unit in the last place of ``dtype`` at each |x| (float64 tensor)."""
    if dtype == torch.float32:
        bits, tiny = 23, 2.0**-126
    else:
        bits, tiny = _FMT[dtype]
    mag = x.abs().clamp_min(tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - bits)


def assert_merged(out: torch.Tensor, tensors, coeffs, *, ulps: float = 1.0) -> None:
    """out equals the float64 reference within fp32-accumulation error.

    fp32 output: |out - ref| <= 1e-6 * sum_k |c_k x_k| (relative to the size
    of the terms: with cancelling coefficients the result itself can be ~0)
    plus one subnormal spacing (2^-149) per term.
    bf16 / fp16 output: at most ``ulps`` ulp of the reference plus that term.
    Every element must be finite (outputs are poisoned with NaN beforehand).
    """
    ref = merge_reference(tensors, coeffs, acc_dtype=torch.float64, out=torch.empty(out.shape, dtype=torch.float64))
    scale = sum(abs(float(c)) * t.double().abs() for c, t in zip(coeffs, tensors))
    got = out.double()
    assert torch.isfinite(got).all(), f"{(~torch.isfinite(got)).sum().item()} elements not written or not finite"
    # Below 2^-126 fp32 is subnormal: every fp32 multiply-add then rounds to a multiple of 2^-149, an
    # absolute error that no relative bound covers (hypothesis found c = 1.01e-40).
    tol = 1e-6 * scale + len(tensors) * 2.0**-149
    if out.dtype != torch.float32:
        tol = tol + ulps * ulp(ref, out.dtype)
    err = (got - ref).abs()
    bad = err > tol
    if bad.any():
        i = int(torch.nonzero(bad.reshape(-1))[0])
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} elements out of tolerance; first at {i}: "
            f"got {got.reshape(-1)[i].item()!r}, ref {ref.reshape(-1)[i].item()!r}, tol {tol.reshape(-1)[i].item()!r}"
        )
