"""Guided sampling in batched torch ops: the fallback where no kernel runs.

CUDA tensors without Triton (or ``SOUPKERNELS_BACKEND=torch``) come here. The
rule is :mod:`soupkernels.sampling_reference`'s, written over the whole batch
at once (one sort of [B, V], cumulative sums along rows) instead of a Python
loop over rows, so it runs on the tensors' device. The reference stays the
specification; tests hold this path to it: the same kept sets, and the same
token for the same Philox uniform.
"""

from __future__ import annotations

import torch

from soupkernels.philox import philox_uniform
from soupkernels.sampling_reference import guided_logits_reference

__all__ = ["kept_mask_torch", "guided_sample_torch"]


def kept_mask_torch(s: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Boolean [B, V] mask of the tokens that survive top-k, top-p and min-p.

    Parameters
    ----------
    s : Tensor [B, V] float32
        Scaled logits (z / T) of valid rows (no NaN or +inf, not all -inf).
    top_k : Tensor [B] int64 (0 or >= V: off)
    top_p : Tensor [B] float32 (1: off)
    min_p : Tensor [B] float32 (0: off)

    Row by row equal to ``kept_mask_reference(s[b], top_k[b], top_p[b], min_p[b])``.
    """
    B, V = s.shape
    m = s.max(1, keepdim=True).values
    sv, order = torch.sort(s, dim=1, descending=True, stable=True)
    keep = torch.ones_like(s, dtype=torch.bool)
    k_on = (top_k > 0) & (top_k < V)
    if bool(k_on.any()):
        kth = sv.gather(1, (top_k.clamp(1, V) - 1)[:, None])
        keep &= (s >= kth) | ~k_on[:, None]
    p_on = top_p < 1.0
    if bool(p_on.any()):
        ek = torch.where(keep, torch.exp(s - m), torch.zeros_like(s))
        z1 = ek.sum(1, keepdim=True)
        ev = ek.gather(1, order)
        above = torch.cumsum(ev, 1) - ev  # mass before each token in sorted order
        # Ties: a run of equal values takes the mass strictly above it, the
        # one at the run's first position (cummax of the run starts).
        pos = torch.arange(V, device=s.device).expand(B, V)
        starts = torch.ones_like(sv, dtype=torch.bool)
        starts[:, 1:] = sv[:, 1:] != sv[:, :-1]
        first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values
        keep_sorted = above.gather(1, first) < top_p[:, None] * z1
        keep_p = torch.empty_like(keep).scatter_(1, order, keep_sorted)
        keep &= keep_p | ~p_on[:, None]
    mp_on = min_p > 0.0
    if bool(mp_on.any()):
        # log in float64 then rounded to fp32: what the reference's math.log(min_p) becomes in the comparison
        log_minp = torch.log(min_p.double().clamp_min(1e-300)).float()
        keep &= ((s - m) >= log_minp[:, None]) | ~mp_on[:, None]
    return keep


def guided_sample_torch(xs, coeffs, temperature, top_k, top_p, min_p, seed, offset, *,
                        uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row, per DESIGN.md, in batched torch ops on the inputs' device.

    Parameters
    ----------
    xs : sequence of M Tensors [B, V]
        Logits, any float dtype, on one device.
    coeffs : Tensor [B, M] float32
    temperature, top_p, min_p : Tensor [B] float32
    top_k, seed, offset : Tensor [B] int64
        Already validated per-row parameters (soupkernels.sampling does it).
    uniforms : Tensor [B] float32, optional
        The draw's uniforms; default ``philox_uniform(seed[b], offset[b])``.

    Returns
    -------
    tokens : Tensor [B] int64 (-1 on invalid rows)
    logprobs : Tensor [B] float32 (NaN on invalid rows)
    """
    z = guided_logits_reference(xs, coeffs.to(xs[0].device))
    B, V = z.shape
    dev = z.device
    temperature, top_k, top_p, min_p = (t.to(dev) for t in (temperature, top_k, top_p, min_p))
    invalid = torch.isnan(z).any(1) | torch.isposinf(z).any(1) | torch.isneginf(z).all(1)
    greedy = temperature == 0.0
    # Invalid rows are computed on zeros (then overwritten), so no NaN reaches the sort.
    z = torch.where(invalid[:, None], torch.zeros_like(z), z)
    s = z / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    keep = kept_mask_torch(s, top_k, top_p, min_p)
    m = s.max(1, keepdim=True).values
    e = torch.where(keep, torch.exp(s - m), torch.zeros_like(s))
    total = e.sum(1)
    if uniforms is None:
        # One Philox call per row on the host (B Python calls, no [B, V] work).
        uniforms = torch.tensor([float(philox_uniform(int(a), int(o))) for a, o in zip(seed.tolist(), offset.tolist())],
                                dtype=torch.float32)
    target = uniforms.to(dev, torch.float32) * total
    hit = torch.cumsum(e, 1) > target[:, None]
    # argmax returns the first maximal index: the first hit; rows where
    # rounding left u * total beyond the sum take the last kept token.
    last_kept = (V - 1) - keep.flip(1).to(torch.int8).argmax(1)
    tokens = torch.where(hit.any(1), hit.to(torch.int8).argmax(1), last_kept)
    logprobs = (s.gather(1, tokens[:, None]).squeeze(1) - m.squeeze(1)) - torch.log(total)
    tokens = torch.where(greedy, z.argmax(1), tokens)
    logprobs = torch.where(greedy, torch.zeros_like(logprobs), logprobs)
    tokens = torch.where(invalid, torch.full_like(tokens, -1), tokens)
    logprobs = torch.where(invalid, torch.full_like(logprobs, float("nan")), logprobs)
    return tokens, logprobs.float()
