"""Shared helpers for the sampling tests: transformers' warpers as the oracle, chi-square."""

from __future__ import annotations

import torch


def warped_probs(z: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """transformers' TemperatureLogitsWarper, TopK, TopP, MinP (that order) then softmax, in float64.

    z: [B, V] combined logits. Returns [B, V] float64 probabilities.
    """
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = [TemperatureLogitsWarper(temperature)]
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    if min_p > 0.0:
        procs.append(MinPLogitsWarper(min_p))
    out = LogitsProcessorList(procs)(None, z.double().clone())
    return torch.softmax(out, dim=-1)


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson chi-square p-value of ``counts`` [V] against ``probs`` [V].

    Cells with expected count < 5 are pooled into one (the usual validity
    rule); a sampled token of probability 0 gives p = 0 outright.
    Returns (p-value, degrees of freedom).
    """
    counts = counts.double()
    n = counts.sum()
    if (counts[probs == 0] > 0).any():
        return 0.0, 0
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    if df == 0:
        return 1.0, 0
    p = torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2)
    return float(p), df
