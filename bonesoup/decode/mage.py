"""MAGE decoding: the merged base steered by ONE merged guidance proxy; MOD as the baseline.

- :func:`mage_generate`: ``z = z_base + w * z_guide`` per step, sampled by
  the fused :func:`soupkernels.guided_sample` (coefficients ``[1, w, -w]``
  over base, merged tuned policy, reference for implicit guidance;
  ``[1, w]`` over base, merged value model for explicit guidance). The base
  is the Bone Soup merge at the preference (a :class:`~bonesoup.LiveSoup`
  or a merged checkpoint); the guidance a :class:`~bonesoup.decode.values.Guidance`,
  usually ``ValueSoup(...).guidance``.
- ``search=ChunkSearch(value, K, L)``: chunk-level search. Each step samples
  K candidate chunks of L tokens per row (guided as above) and keeps the one
  whose last token the explicit value model scores highest,
  ``Q(s + chunk[:-1], chunk[-1])``, the expected final reward of the prefix.
- :func:`mod_generate`: MOD, the decoding-time baseline: sample from
  ``sum_i mu_i z_i`` over the n experts' logits -- n forwards per step.

LoRA backbones: when the base and/or the guidance models are adapter soups
(:class:`~bonesoup.AdapterSoup`, e.g. the implicit value's tuned policy an
AdapterSoup over the backbones with ``method="rewarded"``), ``preference=``
[B, n] gives every row its own mixture in every such model, in one batch
(:func:`bonesoup.guided_generate`'s ``preference``).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass

import torch

from .batching import check_prompt, derive_seed, model_device, position_ids_from_mask, resolve_stop_and_pad, row_seeds
from .guided import GuidedGeneration, guided_generate
from .values import Guidance

__all__ = ["ChunkSearch", "mage_generate", "mod_generate"]


@dataclass(frozen=True)
class ChunkSearch:
    """Chunk-level search: K sampled chunks of L tokens per step, the best by the explicit value.

    value : a Q-value model (outputs [B, L, V] are expected final rewards);
        ``ValueSoup(kind="explicit").model`` for the merged one.
    num_candidates : K >= 1 (1: plain guided sampling, chunk by chunk).
    chunk_tokens : L >= 1.
    """

    value: object
    num_candidates: int = 4
    chunk_tokens: int = 4

    def __post_init__(self):
        for name in ("num_candidates", "chunk_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"ChunkSearch.{name} must be an integer >= 1, got {v!r}")
        if not callable(self.value):
            raise TypeError("ChunkSearch.value must be a causal LM module (the explicit value model)")


def mage_generate(base_model, guidance: Guidance | None, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, *, w=1.0, max_new_tokens: int = 32,
                  temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, stop_token_ids=None,
                  pad_token_id: int | None = None, return_logprobs: bool = False,
                  search: ChunkSearch | None = None, preference=None) -> GuidedGeneration:
    """Guided decoding of the merged base with one guidance proxy: ``z = z_base + w * z_guide``.

    Parameters
    ----------
    base_model : causal LM
        The preference's base policy (Bone Soup merge at mu).
    guidance : Guidance or None
        From :func:`~bonesoup.decode.values.implicit_guidance`,
        :func:`~bonesoup.decode.values.explicit_guidance` or ``ValueSoup.guidance``.
        None: the base alone.
    input_ids, attention_mask : [B, P]
        Left-padded prompts (as :func:`bonesoup.guided_generate`).
    w : float or [B]
        Guidance strength (per row allowed); 0 reproduces the base exactly
        (its coefficient multiplies the guide's logits by 0 inside the kernel).
    max_new_tokens, temperature, top_k, top_p, min_p, seed, stop_token_ids, pad_token_id, return_logprobs
        As :func:`bonesoup.guided_generate`.
    search : ChunkSearch, optional
        Chunk-level search scored by an explicit value model. Decodes chunk
        by chunk (each chunk re-reads its prefix: no KV cache across
        chunks); ``forwards`` counts every model call, scoring included.
    preference : [n] or per-row [B, n] floats, optional
        For base and guidance models that are adapter soups (LoRA
        backbones): each row decodes, and is scored, with every soup at its
        own preference, no re-merge; refused when no model carries a soup.

    Returns
    -------
    GuidedGeneration, as :func:`bonesoup.guided_generate` (``logprobs`` are the
    sampled tokens' log-probs under the guided, filtered distribution).
    """
    guides = list(guidance.models) if guidance is not None else []
    if guidance is not None:
        coeffs = guidance.coefficients(w)
    else:
        coeffs = torch.ones(1, dtype=torch.float64)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, stop_token_ids=stop_token_ids,
              pad_token_id=pad_token_id, return_logprobs=return_logprobs)
    if search is None:
        return guided_generate(base_model, guides, coeffs, input_ids, attention_mask,
                               max_new_tokens=max_new_tokens, seed=seed, preference=preference, **kw)
    kw["preference"] = preference
    return _chunk_search(base_model, guides, coeffs, input_ids, attention_mask, search,
                         max_new_tokens=max_new_tokens, seed=seed, **kw)


def mod_generate(experts, preference, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs) -> GuidedGeneration:
    """MOD: sample from ``sum_i mu_i z_i`` over the experts' logits (n forwards per step).

    ``preference`` [n] (or per row [B, n]); every other argument as
    :func:`bonesoup.guided_generate`.
    """
    experts = list(experts)
    if not experts:
        raise ValueError("experts must hold at least one model")
    return guided_generate(experts[0], experts[1:], preference, input_ids, attention_mask, **kwargs)


def _per_row(x, B: int):
    """Scalar -> itself; per-row [B] sequence/tensor -> tensor (so rows can be selected)."""
    if isinstance(x, (numbers.Number, type(None))):
        return x
    return torch.as_tensor(x)


def _take(x, idx: torch.Tensor):
    return x if not isinstance(x, torch.Tensor) or x.ndim == 0 else x[idx.to(x.device)]


def _soup_rows(soup, preference):
    """The soup's per-row coefficients at ``preference`` [B, n] (its shared alpha), or nothing when no soup."""
    if soup is None:
        return contextlib.nullcontext()
    alpha = 0.0 if math.isnan(soup.alpha) else soup.alpha  # NaN: raw shared coefficients, no alpha to apply
    return soup.rows(preference=preference, alpha=alpha)


def _preference_rows(preference, B: int):
    """``preference`` [n] or [B, n] as a float64 [B, n] tensor (None stays None)."""
    if preference is None:
        return None
    p = torch.as_tensor(preference.tolist() if hasattr(preference, "tolist") else preference, dtype=torch.float64)
    if p.ndim == 1:
        p = p.expand(B, -1)
    if p.ndim != 2 or p.shape[0] != B:
        raise ValueError(f"preference must be [n] (every row) or [B = {B}, n] (one row per prompt), got shape "
                         f"{tuple(p.shape)}")
    return p


@torch.no_grad()
def _chunk_search(base_model, guides, coeffs, input_ids, attention_mask, search: ChunkSearch, *,
                  max_new_tokens, seed, temperature, top_k, top_p, min_p, stop_token_ids, pad_token_id,
                  return_logprobs, preference) -> GuidedGeneration:
    from bonesoup.merge.adapter_soup import adapter_soup_of

    input_ids, mask = check_prompt(input_ids, attention_mask)
    device = model_device(base_model)
    input_ids, mask = input_ids.to(device), mask.to(device)
    B, P = input_ids.shape
    K, L = search.num_candidates, search.chunk_tokens
    stops, pad = resolve_stop_and_pad(base_model, stop_token_ids, pad_token_id)
    if seed is None:
        seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
    seeds = row_seeds(seed, B) if isinstance(seed, numbers.Integral) else torch.as_tensor(seed, dtype=torch.int64)
    if seeds.shape != (B,):
        raise ValueError(f"seed must be an int or hold one seed per row ({B}), got shape {tuple(seeds.shape)}")
    params = {k: _per_row(v, B) for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                                    min_p=min_p).items()}
    coeffs = torch.as_tensor(coeffs, dtype=torch.float64)
    prefs = _preference_rows(preference, B)
    value_soup = adapter_soup_of(search.value) if prefs is not None else None

    new = torch.full((B, max_new_tokens), pad, dtype=torch.int64, device=device)
    lps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.zeros(B, dtype=torch.int64, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    forwards, t = 0, 0
    while t < max_new_tokens and not bool(finished.all()):
        active = torch.nonzero(~finished).flatten()
        A, steps = active.numel(), min(L, max_new_tokens - t)
        rep = active.repeat_interleave(K)  # candidate k of active row a is row a * K + k
        ids = torch.cat([input_ids[rep], new[rep, :t]], dim=1)
        m = torch.cat([mask[rep], mask.new_ones(A * K, t)], dim=1)
        # Candidate k of row b draws with its own key derive_seed(row key, chunk start, k): not on K,
        # not on the other rows.
        cand_seeds = torch.tensor([derive_seed(int(seeds[b]), t, k) for b in active.tolist() for k in range(K)],
                                  dtype=torch.int64)
        c = coeffs if coeffs.ndim == 1 else coeffs[rep.cpu()]
        p = None if prefs is None else prefs[rep.cpu()]  # candidate k of row b decodes at row b's preference
        g = guided_generate(base_model, guides, c, ids, m, max_new_tokens=steps, seed=cand_seeds,
                            stop_token_ids=stops, pad_token_id=pad, return_logprobs=True, preference=p,
                            **{k: _take(v, rep.cpu()) for k, v in params.items()})
        forwards += g.forwards
        # Score each candidate by Q(prefix + chunk[:-1], chunk[-1]) at its last real token.
        seq, sm = g.sequences, torch.cat([m, (torch.arange(g.steps, device=device) < g.lengths[:, None]).long()], 1)
        pos = position_ids_from_mask(sm)
        with _soup_rows(value_soup, p):
            q = search.value(input_ids=seq, attention_mask=sm, position_ids=pos).logits.float()
        forwards += 1
        last = ids.shape[1] + g.lengths - 1  # column of the chunk's last real token
        score = q[torch.arange(A * K, device=device), last - 1, seq[torch.arange(A * K, device=device), last]]
        best = score.view(A, K).argmax(dim=1)
        pick = torch.arange(A, device=device) * K + best
        chunk = g.new_tokens[pick]
        n_new = g.lengths[pick]
        new[active, t:t + g.steps] = chunk
        lps[active, t:t + g.steps] = g.logprobs[pick]
        lengths[active] += n_new
        finished[active] = g.finished[pick]
        t += steps
    new = new[:, :t]
    return GuidedGeneration(sequences=torch.cat([input_ids, new], dim=-1), new_tokens=new,
                            logprobs=lps[:, :t] if return_logprobs else None, lengths=lengths,
                            finished=finished, steps=t, forwards=forwards)
