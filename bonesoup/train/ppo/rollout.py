"""Rollouts: PPO's view of the one decode loop, plus the log-probs of full-sequence forwards.

Layout of one batch of B rollouts (P prompt columns, T response columns)::

    [pad pad q q q | r r r EOS pad pad]     input ids (B, P + T)
    [ 0   0  1 1 1 | 1 1 1  1   0   0 ]     attention mask
    [ 0   0  0 1 2 | 3 4 5  6   6   6 ]     position ids (cumsum of the mask - 1, >= 0)

Prompts are padded on the left so every response starts in column P; the
position ids are given explicitly, so a padded row computes exactly the
logits of the same prompt without padding (GPT-2 would otherwise count the
pads as positions). The pad token must differ from EOS: otherwise a real EOS
could not be told from padding.

Sampling is :func:`bonesoup.decode.guided.guided_generate` (KV cache,
``soupkernels.guided_sample``) with one Philox key per rollout from
:func:`bonesoup.decode.batching.derive_seed`, so a rollout's tokens depend
on its key, its prompt and the model only, never on which other rows share
its batch (or its process, under data parallelism). :func:`generate_rollout`
turns the decode loop's output into PPO's fixed-width tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from bonesoup.decode.batching import derive_seed, left_pad_prompts, position_ids_from_mask

__all__ = [
    "check_special_tokens",
    "Rollout",
    "generate_rollout",
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


def generate_rollout(model, query: torch.Tensor, query_mask: torch.Tensor, *, seeds, max_new_tokens: int,
                     temperature: float, eos_id: int, pad_id: int) -> Rollout:
    """Sample one response per row with :func:`~bonesoup.decode.guided.guided_generate`, as a :class:`Rollout`.

    Parameters
    ----------
    model : causal LM, in eval mode (wrap the call in ``torch.autocast`` for bf16).
    query, query_mask : (B, P) int64, left-padded prompts.
    seeds : (B,) int64 tensor or B ints, one Philox key per row (:func:`~bonesoup.decode.batching.derive_seed`).
    max_new_tokens : int, T; the response always has T columns (pad after EOS,
        and after the last step when every row stopped early).
    temperature : float, > 0 to sample, 0 for greedy.
    eos_id, pad_id : int, distinct; EOS is the only stop token.
    """
    from bonesoup.decode.guided import guided_generate  # imports transformers: `import bonesoup` stays light

    g = guided_generate(model, [], [1.0], query, query_mask, seed=seeds, temperature=temperature,
                        max_new_tokens=max_new_tokens, stop_token_ids=[eos_id], pad_token_id=pad_id)
    B, dev = g.new_tokens.shape[0], g.new_tokens.device
    response = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    response[:, :g.steps] = g.new_tokens
    response_mask = (torch.arange(max_new_tokens, device=dev)[None, :] < g.lengths[:, None]).long()
    return Rollout(query.to(dev), query_mask.to(dev), response, response_mask, g.finished)


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
                    seed: int = 0, batch_size: int = 64) -> list[Rollout]:
    """Sample one response per prompt, in chunks of ``batch_size`` (one :class:`Rollout` each, on the model's device).

    Per-sample seeded: response i draws with key ``derive_seed(seed, i)``, so
    it depends on ``(seed, i)``, its prompt and the model only (not on
    ``batch_size``).
    """
    pad, eos = check_special_tokens(tokenizer)
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i:i + batch_size])
            q, m = left_pad_prompts(tokenizer, chunk)
            keys = [derive_seed(seed, i + j) for j in range(len(chunk))]
            out.append(generate_rollout(model, q, m, seeds=keys, max_new_tokens=max_new_tokens,
                                        temperature=temperature, eos_id=eos, pad_id=pad))
    finally:
        model.train(was_training)
    return out


def sample_texts(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 1.0,
                 seed: int = 0, batch_size: int = 64) -> tuple[list[str], torch.Tensor]:
    """:func:`sample_rollouts` decoded: the response texts (no prompt, no EOS) and ``has_eos`` (N,) bool."""
    _, eos = check_special_tokens(tokenizer)
    rollouts = sample_rollouts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                               seed=seed, batch_size=batch_size)
    texts = [t for r in rollouts for t in decode_responses(tokenizer, r.response, r.response_mask, eos)]
    return texts, torch.cat([r.has_eos.cpu() for r in rollouts])


def decode_responses(tokenizer, response: torch.Tensor, response_mask: torch.Tensor, eos_id: int) -> list[str]:
    """Texts of the response tokens, without EOS and padding."""
    keep = response_mask.bool() & (response != eos_id)
    return [tokenizer.decode(row[k].tolist(), skip_special_tokens=True) for row, k in zip(response.cpu(), keep.cpu())]
