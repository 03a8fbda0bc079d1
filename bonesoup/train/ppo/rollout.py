"""Rollouts: left-padded prompts, KV-cache sampling, truncation after EOS, log-probs.

Layout of one batch of B rollouts (P prompt columns, T response columns)::

    [pad pad q q q | r r r EOS pad pad]     input ids (B, P + T)
    [ 0   0  1 1 1 | 1 1 1  1   0   0 ]     attention mask
    [ 0   0  0 1 2 | 3 4 5  6   6   6 ]     position ids (cumsum of the mask - 1, >= 0)

Prompts are padded on the left so every response starts in column P; the
position ids are given explicitly, so a padded row computes exactly the
logits of the same prompt without padding (GPT-2 would otherwise count the
pads as positions). The pad token must differ from EOS: otherwise a real EOS
could not be told from padding.

Sampling is per-sample seeded: row i of a batch draws its T uniforms from a
generator seeded by its own ``sample_seed``, and turns each into a token by
inverse-CDF, so its tokens do not depend on which other rows share its batch
(or its process, under data parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "check_special_tokens",
    "left_pad_prompts",
    "position_ids_from_mask",
    "sample_uniforms",
    "sample_from_uniform",
    "Rollout",
    "generate",
    "truncate_after_eos",
    "logprobs_from_logits",
    "response_logits",
    "sample_rollouts",
    "sample_texts",
    "decode_responses",
]


def check_special_tokens(tokenizer) -> tuple[int, int]:
    """``(pad_id, eos_id)``, refusing a tokenizer without them or with pad == EOS.

    With pad == EOS, a response's EOS looks like padding: the mask would drop
    it, and the score would land on the wrong token.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; PPO needs EOS to end responses")
    if pad is None:
        raise ValueError("tokenizer has no pad_token_id; add a pad token distinct from EOS "
                         "(tokenizer.add_special_tokens({'pad_token': '<|pad|>'}) and resize the embeddings)")
    if pad == eos:
        raise ValueError(f"tokenizer.pad_token_id equals eos_token_id ({eos}); PPO needs a pad token distinct from "
                         "EOS, or a real EOS would be masked as padding")
    return int(pad), int(eos)


def left_pad_prompts(tokenizer, prompts: Sequence[str], *, max_prompt_tokens: int | None = None,
                     width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise prompts (no special tokens added) and pad them on the left.

    Returns ``(input_ids, attention_mask)``, both (B, P) int64, P the longest
    prompt or ``width`` if that is larger (every process of a data-parallel
    run pads to the global width, so its batches look like the single
    process's). ``max_prompt_tokens`` keeps the last tokens of longer prompts.
    """
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError(f"prompts must be a non-empty sequence of strings, got {prompts!r}")
    pad, _ = check_special_tokens(tokenizer)
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if max_prompt_tokens is not None:
        rows = [r[-max_prompt_tokens:] for r in rows]
    for p, r in zip(prompts, rows):
        if not r:
            raise ValueError(f"prompt {p!r} tokenises to nothing; every prompt needs at least one token")
    width = max(max(map(len, rows)), width or 0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens: ``cumsum(mask) - 1``, clamped at 0 on left pads. (B, L) int64."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def sample_uniforms(sample_seeds: Sequence[int], length: int, device=None) -> torch.Tensor:
    """Row i: ``length`` uniforms in [0, 1) from a CPU generator seeded with ``sample_seeds[i]``. (B, length) fp32.

    Drawn on the CPU so the numbers are the same on every device and process.
    """
    out = torch.empty((len(sample_seeds), length), dtype=torch.float32)
    for i, s in enumerate(sample_seeds):
        out[i] = torch.rand(length, generator=torch.Generator().manual_seed(int(s)))
    return out.to(device) if device is not None else out


def sample_from_uniform(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
    """Draw one token per row from ``softmax(logits / temperature)`` by inverse CDF.

    logits (B, V) any float dtype; u (B,) fp32 in [0, 1). Returns (B,) int64.
    ``temperature == 0`` is greedy (lowest index on ties). A zero-probability
    token is never returned (the first index whose CDF exceeds ``u * total``).
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    cdf = probs.cumsum(-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(logits.shape[-1] - 1)


def truncate_after_eos(tokens: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace everything after each row's first EOS by pad.

    tokens (B, T) int64. Returns ``(tokens, mask)``: mask (B, T) int64 is 1 up
    to and including the first EOS (all T when there is none).
    """
    is_eos = tokens == eos_id
    # Number of EOS strictly before position t: > 0 means the response already ended.
    ended_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = (~ended_before).long()
    return tokens.masked_fill(ended_before, pad_id), mask


@dataclass
class Rollout:
    """A batch of sampled responses.

    Attributes
    ----------
    query, query_mask : (B, P) int64, left-padded prompts and their mask.
    response : (B, T) int64, sampled tokens, pad after the first EOS.
    response_mask : (B, T) int64, 1 up to and including the first EOS.
    has_eos : (B,) bool, whether the response ended with EOS within T tokens.
    """

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    has_eos: torch.Tensor

    def full(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, position_ids)`` of prompt + response, (B, P + T) each."""
        ids = torch.cat([self.query, self.response], 1)
        mask = torch.cat([self.query_mask, self.response_mask], 1)
        return ids, mask, position_ids_from_mask(mask)


@torch.no_grad()
def generate(model, query: torch.Tensor, query_mask: torch.Tensor, *, max_new_tokens: int, temperature: float,
             uniforms: torch.Tensor, eos_id: int, pad_id: int, autocast_dtype: torch.dtype | None = None) -> Rollout:
    """Sample exactly ``max_new_tokens`` columns with the KV cache, then truncate after the first EOS.

    Parameters
    ----------
    model : transformers causal LM (called with ``position_ids`` and ``past_key_values``).
    query, query_mask : (B, P) int64, left-padded.
    max_new_tokens : int, T.
    temperature : float, > 0 to sample, 0 for greedy.
    uniforms : (B, T) fp32, one uniform per row and step (see :func:`sample_uniforms`).
    eos_id, pad_id : int, distinct.
    autocast_dtype : torch.dtype or None, bf16 autocast on CUDA.

    Generation stops early once every row has emitted EOS; the remaining
    columns are pad, exactly as if they had been sampled and truncated.
    """
    B, device = query.shape[0], query.device
    if uniforms.shape != (B, max_new_tokens):
        raise ValueError(f"uniforms must have shape {(B, max_new_tokens)}, got {tuple(uniforms.shape)}")
    mask = query_mask.clone()
    pos = position_ids_from_mask(mask)
    ac = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
          else torch.autocast(device.type, enabled=False))
    with ac:
        out = model(input_ids=query, attention_mask=mask, position_ids=pos, use_cache=True)
    cache, logits, next_pos = out.past_key_values, out.logits[:, -1], pos[:, -1] + 1
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    u = uniforms.to(device)
    for t in range(max_new_tokens):
        tok = sample_from_uniform(logits, u[:, t], temperature)
        tok = tok.masked_fill(done, pad_id)
        tokens[:, t] = tok
        done |= tok == eos_id
        if t + 1 == max_new_tokens or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], 1)
        with ac:
            out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                        past_key_values=cache, use_cache=True)
        cache, logits, next_pos = out.past_key_values, out.logits[:, -1], next_pos + 1
    response, response_mask = truncate_after_eos(tokens, eos_id, pad_id)
    has_eos = (response == eos_id).any(1)
    return Rollout(query, query_mask, response, response_mask, has_eos)


def response_logits(logits: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """The logits that predict the response tokens: positions P-1 .. P+T-2 of a (B, P+T, V) output."""
    return logits[:, prompt_width - 1:-1]


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax(logits / temperature)`` at ``tokens``, (B, T) fp32.

    The same temperature as in sampling, for the policy and the reference
    alike: the rollout was drawn from the tempered distribution, so the PPO
    ratio and the KL must be of tempered distributions too.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for log-probabilities, got {temperature!r}")
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sample_rollouts(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 1.0,
                    seed: int = 0, batch_size: int = 64, device=None) -> list[Rollout]:
    """Sample one response per prompt, in chunks of ``batch_size`` (one :class:`Rollout` each).

    Per-sample seeded: response i depends on ``(seed, i)`` and the model only.
    """
    pad, eos = check_special_tokens(tokenizer)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        q, m = left_pad_prompts(tokenizer, chunk)
        u = sample_uniforms([seed * 1_000_003 + i + j for j in range(len(chunk))], max_new_tokens)
        out.append(generate(model, q.to(device), m.to(device), max_new_tokens=max_new_tokens,
                            temperature=temperature, uniforms=u, eos_id=eos, pad_id=pad))
    model.train(was_training)
    return out


def sample_texts(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 1.0,
                 seed: int = 0, batch_size: int = 64, device=None) -> tuple[list[str], torch.Tensor]:
    """:func:`sample_rollouts` decoded: the response texts (no prompt, no EOS) and ``has_eos`` (N,) bool."""
    _, eos = check_special_tokens(tokenizer)
    rollouts = sample_rollouts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                               seed=seed, batch_size=batch_size, device=device)
    texts = [t for r in rollouts for t in decode_responses(tokenizer, r.response, r.response_mask, eos)]
    return texts, torch.cat([r.has_eos.cpu() for r in rollouts])


def decode_responses(tokenizer, response: torch.Tensor, response_mask: torch.Tensor, eos_id: int) -> list[str]:
    """Texts of the response tokens, without EOS and padding."""
    keep = response_mask.bool() & (response != eos_id)
    return [tokenizer.decode(row[k].tolist(), skip_special_tokens=True) for row, k in zip(response.cpu(), keep.cpu())]
