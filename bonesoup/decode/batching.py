"""Batching helpers of the one decode loop: left padding, position ids, stop/pad ids, per-row seeds.

Every path that puts prompts into a batch (``guided_generate``, PPO rollouts,
value-model sampling, the experiment's evaluator, the server's engine) uses
these, so there is ONE rule for each:

- prompts are padded on the LEFT (every continuation starts in the same column);
- position ids count real tokens only: ``cumsum(mask) - 1``, clamped at 0 (pads,
  masked anyway, get position 0 on the left and repeat the last position on the right);
- a row's sampling key comes from ONE scheme, :func:`derive_seed` (SplitMix64
  chained over integers): ``derive_seed(seed, b)`` for row b of a request
  (:func:`row_seeds`), ``derive_seed(seed, step, index)`` for PPO rollout ``index``
  of ``step``, ``derive_seed(key, t, k)`` for chunk-search candidate k; a row's
  draws never depend on the other rows, the batch or the process.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

__all__ = ["derive_seed", "row_seeds", "splitmix64", "check_prompt", "position_ids_from_mask", "left_pad",
           "left_pad_prompts", "resolve_stop_and_pad", "model_device"]

_M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """SplitMix64 finaliser: a bijective 64-bit mix (Steele et al., 2014)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def derive_seed(*keys: int) -> int:
    """One Philox key (a signed int64 Python int) from a tuple of integers: the project's ONE seeding scheme.

    ``h = splitmix64(keys[0]); h = splitmix64(h ^ k)`` for each further key
    (every key taken mod 2^64, so negative ints are fine). Nearby tuples,
    such as ``(seed, b)`` and ``(seed + 1, b - 1)``, give unrelated keys,
    which ``seed + b`` style mixing would not.
    """
    if not keys:
        raise ValueError("derive_seed needs at least one integer")
    h = splitmix64(int(keys[0]) & _M64)
    for k in keys[1:]:
        h = splitmix64(h ^ (int(k) & _M64))
    return h - (1 << 64) if h >= 1 << 63 else h  # Philox keys travel as int64 tensors


def row_seeds(seed: int, batch_size: int) -> torch.Tensor:
    """Per-row Philox keys of one request's ``seed``: int64 [batch_size], row b's is ``derive_seed(seed, b)``.

    Depends only on ``(seed, b)``, so a row keeps its draws whatever the other rows are.
    """
    return torch.tensor([derive_seed(seed, b) for b in range(batch_size)], dtype=torch.int64)


def model_device(model) -> torch.device:
    """The device of ``model``'s parameters (``model.device`` if it has one; CPU for a parameterless callable)."""
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens: ``cumsum(mask) - 1`` clamped at 0. [B, L] int64.

    Left pads get 0, as ``generate`` makes them; they are masked, so any value would do.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, *, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> ``(input_ids, attention_mask)``, both [B, P] int64, padded on the left.

    ``P`` is the longest row, or ``width`` if that is larger (data-parallel
    processes pad to one global width). Every row needs at least one token.
    """
    if not len(rows):
        raise ValueError("left_pad needs at least one row")
    for b, r in enumerate(rows):
        if not len(r):
            raise ValueError(f"row {b} has no tokens; every prompt needs at least one token")
    P = max(max(len(r) for r in rows), width or 0)
    ids = torch.full((len(rows), P), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, P - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
        mask[b, P - len(r):] = 1
    return ids, mask


def left_pad_prompts(tokenizer, prompts: Sequence[str], *, max_prompt_tokens: int | None = None,
                     width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise ``prompts`` (no special tokens added) and :func:`left_pad` them with the tokenizer's pad token.

    Returns ``(input_ids, attention_mask)``, both [B, P] int64; P is the
    longest prompt or ``width`` if that is larger. ``max_prompt_tokens``
    keeps the last tokens of longer prompts.
    """
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError(f"prompts must be a non-empty sequence of strings, got {prompts!r}")
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        raise ValueError("tokenizer has no pad_token_id; set one (tokenizer.pad_token = ...) to pad prompts")
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if max_prompt_tokens is not None:
        rows = [r[-max_prompt_tokens:] for r in rows]
    for p, r in zip(prompts, rows):
        if not r:
            raise ValueError(f"prompt {p!r} tokenises to nothing; every prompt needs at least one token")
    return left_pad(rows, pad, width=width)


def check_prompt(input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated (input_ids [B, P] int64, attention_mask [B, P] int64), left padding only."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor [B, P], got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape [B, P] with B, P >= 1, got {tuple(input_ids.shape)} "
                         "(for one prompt pass ids[None])")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    input_ids = input_ids.long()
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor [B, P], got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                         f"{tuple(input_ids.shape)}")
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    empty = torch.nonzero(mask.sum(-1) == 0).flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask rows {empty} are all padding; every prompt needs at least one token")
    # Left padding: once a row's mask is 1 it stays 1 (nondecreasing along the row).
    right = torch.nonzero((mask[:, 1:] < mask[:, :-1]).any(-1)).flatten().tolist()
    if right:
        raise ValueError(f"attention_mask rows {right} have padding after a token; decoding appends after the "
                         "last column, so prompts must be left-padded (tokenizer.padding_side = 'left')")
    return input_ids, mask


def resolve_stop_and_pad(base_model, stop_token_ids=None, pad_token_id=None) -> tuple[list[int], int]:
    """``(stop ids, pad id)``: the arguments if given, else the model's generation_config, then config.

    Stop ids default to ``eos_token_id`` ([] if the model has none: never stops);
    the pad id to ``pad_token_id``, else the first stop id, else 0 (as ``generate`` does).
    """
    gen = getattr(base_model, "generation_config", None)
    cfg = getattr(base_model, "config", None)

    def first_set(attr):
        for src in (gen, cfg):
            v = getattr(src, attr, None) if src is not None else None
            if v is not None:
                return v
        return None

    if stop_token_ids is None:
        stop_token_ids = first_set("eos_token_id")
        stop_token_ids = [] if stop_token_ids is None else stop_token_ids
    if isinstance(stop_token_ids, torch.Tensor):
        stop_token_ids = stop_token_ids.flatten().tolist()
    if isinstance(stop_token_ids, numbers.Integral):
        stop_token_ids = [int(stop_token_ids)]
    if not isinstance(stop_token_ids, (list, tuple)) or not all(
        isinstance(t, numbers.Integral) and t >= 0 for t in stop_token_ids
    ):
        raise ValueError(f"stop_token_ids must be a token id or a list of token ids >= 0, got {stop_token_ids!r}")
    stops = [int(t) for t in stop_token_ids]
    if pad_token_id is None:
        pad_token_id = first_set("pad_token_id")
    if pad_token_id is None:
        pad_token_id = stops[0] if stops else 0  # as generate does; unused when no row can stop
    if not isinstance(pad_token_id, numbers.Integral) or pad_token_id < 0:
        raise ValueError(f"pad_token_id must be a token id >= 0, got {pad_token_id!r}")
    return stops, int(pad_token_id)
