"""Plain-torch twins of the guided-sampling ops: the specification in code.

``guided_logits_reference`` and ``guided_sample_reference`` implement the
sampling semantics of DESIGN.md row by row, with sorts and cumulative sums,
optionally in float64. Tests compare the C++ and Triton kernels against them
token for token; they are not meant to be fast.

Kept set (the transformers warpers' rule, written as one threshold): with
s = z / T, m = max(s), e_v = exp(s_v - m),

- top-k keeps v if fewer than k tokens have a larger s (ties at the k-th
  value are all kept, as ``TopKLogitsWarper`` does);
- top-p keeps v, among the top-k survivors K1, if the mass of K1 strictly
  above s_v is below ``top_p * sum(e over K1)`` (``TopPLogitsWarper``);
- min-p keeps v if ``s_v - m >= log(min_p)`` (``MinPLogitsWarper``).

Each filter keeps a prefix of the tokens sorted by value, so the final set is
``{v : s_v >= tau}``. The draw: u = ``philox_uniform(seed, offset)``; the token
is the first v, in vocabulary order, whose running sum of kept e_v exceeds
u * sum(kept e) (inverse CDF, one uniform per row).
"""

from __future__ import annotations

import math

import torch

from soupkernels.philox import philox_uniform

__all__ = ["guided_logits_reference", "guided_sample_reference", "kept_mask_reference"]


def guided_logits_reference(logits, coeffs: torch.Tensor, *, acc_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """z[b] = sum_m coeffs[b, m] * logits[m][b] in ``acc_dtype`` (m ascending).

    logits: sequence of M tensors [B, V] or a [M, B, V] tensor; coeffs: [B, M].
    Returns [B, V] in ``acc_dtype``.
    """
    coeffs = coeffs.to(acc_dtype)
    z = None
    for m in range(len(logits)):
        term = coeffs[:, m : m + 1] * logits[m].to(acc_dtype)
        z = term if z is None else z + term
    return z


def kept_mask_reference(s: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Boolean [V] mask of the tokens that survive top-k, top-p, min-p on scaled logits ``s`` [V]."""
    V = s.numel()
    m = s.max()
    keep = torch.ones(V, dtype=torch.bool, device=s.device)
    if 0 < top_k < V:
        kth = torch.topk(s, top_k).values[-1]
        keep &= s >= kth
    e = torch.exp(s - m)
    if top_p < 1.0:
        ek = torch.where(keep, e, torch.zeros_like(e))
        z1 = ek.sum()
        order = torch.argsort(s, descending=True, stable=True)
        sv, ev = s[order], ek[order]
        above = torch.cumsum(ev, 0) - ev  # mass of the tokens before each, in sorted order
        # Ties: the mass strictly above a value is the one at the first of its run.
        _, inverse, counts = torch.unique_consecutive(sv, return_inverse=True, return_counts=True)
        first = torch.cumsum(counts, 0) - counts
        above = above[first][inverse]
        keep_sorted = above < top_p * z1
        keep_p = torch.empty_like(keep)
        keep_p[order] = keep_sorted
        keep &= keep_p
    if min_p > 0.0:
        keep &= (s - m) >= math.log(min_p)
    return keep


def guided_sample_reference(
    logits,
    coeffs: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    *,
    acc_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row, per DESIGN.md; every argument already per row.

    Parameters: logits (M x [B, V]), coeffs [B, M], temperature/top_p/min_p [B]
    float, top_k/seed/offset [B] int64. Returns (tokens [B] int64, log-probs
    [B] float32); invalid rows (NaN, +inf, or all -inf) give -1 and NaN.
    """
    z_all = guided_logits_reference(logits, coeffs, acc_dtype=acc_dtype)
    B, V = z_all.shape
    tokens = torch.full((B,), -1, dtype=torch.int64)
    logprobs = torch.full((B,), float("nan"), dtype=torch.float32)
    for b in range(B):
        z = z_all[b]
        if torch.isnan(z).any() or torch.isposinf(z).any() or torch.isneginf(z).all():
            continue
        t = float(temperature[b])
        if t == 0.0:
            tokens[b] = int(torch.nonzero(z == z.max())[0, 0])
            logprobs[b] = 0.0
            continue
        s = z / t
        keep = kept_mask_reference(s, int(top_k[b]), float(top_p[b]), float(min_p[b]))
        m = s.max()
        e = torch.where(keep, torch.exp(s - m), torch.zeros_like(s))
        total = e.sum()
        u = float(philox_uniform(int(seed[b]), int(offset[b])))
        above = torch.nonzero(torch.cumsum(e, 0) > u * total)
        tok = int(above[0, 0]) if above.numel() else int(torch.nonzero(keep)[-1, 0])
        tokens[b] = tok
        logprobs[b] = float((s[tok] - m) - torch.log(total))
    return tokens, logprobs
