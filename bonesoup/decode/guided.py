"""Guided decoding: combine the next-token logits of several causal LMs.

MAGE stage 2 decodes from z = sum_m c_m z_m over a base model and guide
models (explicit value models, or a tuned policy and its reference for the
implicit value: coefficients [1, w, -w] over base, tuned, reference). Two
ways in:

- :func:`guided_generate`: our own batched decoding loop, gpt-fast style. One
  KV cache per model, exactly one forward per model per step (the prompt,
  then one token), and the draw is :func:`soupkernels.guided_sample` (the
  combination fused into the sampler, Philox draws keyed per row, so a row's
  tokens never depend on the other rows in the batch).
- :class:`GuidanceLogitsProcessor`: the combination alone, as a transformers
  ``LogitsProcessor`` for ``model.generate(..., logits_processor=[...])``;
  transformers then does the sampling.

Left-padded batches follow transformers' conventions exactly: position ids
are ``attention_mask.cumsum(-1) - 1`` on the prompt and count on by one per
new token; the attention mask grows by a column of ones per step (finished
rows keep emitting the pad token, which is attended to like ``generate``
does; their output is discarded).

The models must share a vocabulary (same logits width). Models are used as
they are: put them in ``eval()`` mode (dropout otherwise makes every run
differ).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers.generation.logits_process import LogitsProcessor

import soupkernels as sk
from bonesoup.decode.batching import (
    check_prompt,
    model_device,
    position_ids_from_mask,
    resolve_stop_and_pad,
    row_seeds,
)

__all__ = ["GuidanceLogitsProcessor", "GuidedGeneration", "guided_generate", "row_seeds"]

def _vocab_size(model) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    getter = getattr(config, "get_text_config", None)
    config = getter() if callable(getter) else config
    v = getattr(config, "vocab_size", None)
    return int(v) if isinstance(v, numbers.Integral) else None


def _check_guide_list(guide_models) -> list:
    """``guide_models`` as a list, refusing a lone model (a common slip) and non-lists."""
    if isinstance(guide_models, torch.nn.Module) and not isinstance(guide_models, torch.nn.ModuleList):
        raise TypeError("guide_models must be a list of models (pass [model] for one guide), got a single "
                        f"{type(guide_models).__name__}")
    if not isinstance(guide_models, (list, tuple, torch.nn.ModuleList)):
        raise TypeError(f"guide_models must be a list of models, got {type(guide_models).__name__}")
    guides = list(guide_models)
    if len(guides) + 1 > sk.sampling.MAX_INPUTS:
        raise ValueError(f"guide_models holds {len(guides)} models; at most {sk.sampling.MAX_INPUTS - 1} "
                         "guides are combined with the base in one step")
    for g, model in enumerate(guides):
        if not callable(model):
            raise TypeError(f"guide_models[{g}] must be a causal LM module, got {type(model).__name__}")
    return guides


def _check_vocab(models: Sequence, names: Sequence[str]) -> None:
    """Refuse models whose configs disagree on vocab_size (the logits' width is checked again on use)."""
    sizes = [(name, _vocab_size(m)) for m, name in zip(models, names)]
    sizes = [(name, v) for name, v in sizes if v is not None]
    for name, v in sizes[1:]:
        if v != sizes[0][1]:
            raise ValueError(f"{name} has vocab_size {v} but {sizes[0][0]} has {sizes[0][1]}; guided decoding "
                             "combines logits token by token, so the models must share a vocabulary")


def _check_coeffs(coeffs, n_models: int, batch_size: int | None, device: torch.device) -> torch.Tensor:
    """coeffs [M] or [B, M] -> fp32 tensor on ``device``; messages name the argument."""
    try:
        if isinstance(coeffs, torch.Tensor):
            c = coeffs.detach().float()
        else:
            c = torch.as_tensor(coeffs, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"coeffs must be numbers, a [M] or [B, M] sequence or tensor, got {coeffs!r}") from e
    want = f"1 + len(guide_models) = {n_models} (base first, then each guide)"
    if c.dim() == 1:
        if c.numel() != n_models:
            raise ValueError(f"coeffs has {c.numel()} entries; expected {want}")
    elif c.dim() == 2:
        if c.shape[1] != n_models:
            raise ValueError(f"coeffs has shape {tuple(c.shape)}; each row needs {want}")
        if batch_size is not None and c.shape[0] != batch_size:
            raise ValueError(f"coeffs has shape {tuple(c.shape)}; per-row coefficients need one row per "
                             f"sequence (B = {batch_size})")
    else:
        raise ValueError(f"coeffs must be [M] or [B, M], got shape {tuple(c.shape)}")
    if not torch.isfinite(c).all():
        raise ValueError(f"coeffs must be finite, got {c.tolist()}")
    return c.to(device)


class _CachedModel:
    """One causal LM and its KV cache: the prompt once, then one token per call."""

    def __init__(self, model, name: str):
        self.model = model
        self.name = name
        self.device = model_device(model)
        self.cache = None
        self.forwards = 0
        # Only the last position's logits are used; models that can skip the rest do.
        try:
            params = inspect.signature(model.forward).parameters
        except (AttributeError, TypeError, ValueError):
            params = {}
        self._logits_to_keep = "logits_to_keep" in params

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        """Logits [B, V] (the model's dtype, on its device) for the token after ``input_ids``."""
        kwargs = {}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=position_ids.to(self.device),
            past_key_values=self.cache,
            use_cache=True,
            **kwargs,
        )
        self.forwards += 1
        self.cache = getattr(out, "past_key_values", None)
        if self.cache is None:
            raise TypeError(f"{self.name} returned no past_key_values; guided decoding needs a causal LM with a "
                            "KV cache (use_cache=True)")
        return out.logits[:, -1, :]


def _same_vocab(logits: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    v0 = logits[0].shape[-1]
    for x, name in zip(logits[1:], names[1:]):
        if x.shape[-1] != v0:
            raise ValueError(f"{name} returns {x.shape[-1]} logits per token but {names[0]} returns {v0}; "
                             "the models must share a vocabulary")


class GuidanceLogitsProcessor(LogitsProcessor):
    """Replace the base model's scores by ``sum_m c_m z_m`` over [base, guide_1, ...].

    A transformers ``LogitsProcessor`` for ``base_model.generate(input_ids,
    attention_mask=..., logits_processor=[proc])``, greedy or sampled. Each
    guide keeps its own KV cache across calls: the first call runs the guides
    on the whole prompt, every later call on the one token ``generate``
    appended. Position ids and the attention mask follow ``generate``'s own
    (left padding supported), so with a zero guide coefficient the output is
    ``generate``'s token for token.

    Runs before transformers' temperature/top-k/top-p warpers (``generate``
    puts custom processors first), so those apply to the combined logits.
    Not for beam search (it reorders rows; refused) nor for
    ``num_return_sequences > 1`` unless ``attention_mask`` is expanded too.
    One processor serves one ``generate`` call; call :meth:`reset` (or make
    a new one) for the next.

    Parameters
    ----------
    guide_models : list of causal LMs
        Same vocabulary as the base; may be empty (then only ``c_0`` scales
        the base scores).
    coeffs : sequence or Tensor, [1 + G] or per-row [B, 1 + G]
        Coefficients over [base, guide_1, ..., guide_G]; negative allowed
        (implicit guidance: [1, w, -w] over base, tuned, reference).
    attention_mask : Tensor [B, P], optional
        The prompt's mask, as passed to ``generate`` (left padding). None:
        no padding.

    Attributes
    ----------
    forwards : int
        Guide forwards run so far (one per guide per call).

    Examples
    --------
    >>> proc = GuidanceLogitsProcessor([tuned, ref], [1.0, 2.0, -2.0], attention_mask=enc.attention_mask)
    >>> out = base.generate(**enc, logits_processor=[proc], do_sample=False, max_new_tokens=20)
    """

    def __init__(self, guide_models, coeffs, *, attention_mask: torch.Tensor | None = None):
        self.guide_models = _check_guide_list(guide_models)
        _check_vocab(self.guide_models, [f"guide_models[{g}]" for g in range(len(self.guide_models))])
        self._coeffs = _check_coeffs(coeffs, 1 + len(self.guide_models), None, torch.device("cpu"))
        self.forwards = 0
        self.reset(attention_mask)

    def reset(self, attention_mask: torch.Tensor | None = None) -> None:
        """Forget the caches; the next call starts a new prompt with this ``attention_mask``."""
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
            raise ValueError("attention_mask must be a [B, P] tensor (the prompt's mask, as passed to generate)")
        self._prompt_mask = attention_mask
        self._models = [_CachedModel(g, f"guide_models[{i}]") for i, g in enumerate(self.guide_models)]
        self._ids = None  # input_ids of the previous call
        self._mask = None  # attention mask of the previous call's input_ids
        self._pos = None  # position ids of the previous call's last token, [B, 1]

    def _advance(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Run every guide on what is new in ``input_ids``; their last logits."""
        B, L = input_ids.shape
        if self._ids is None:
            input_ids, mask = check_prompt(input_ids, self._prompt_mask)
            pos = position_ids_from_mask(mask)
            feed = input_ids
        else:
            if B != self._ids.shape[0] or L != self._ids.shape[1] + 1 or not torch.equal(input_ids[:, :-1], self._ids):
                raise RuntimeError(
                    f"GuidanceLogitsProcessor got input_ids of shape {tuple(input_ids.shape)} that do not extend "
                    f"the previous call's {tuple(self._ids.shape)} by one token per row; it keeps one KV cache per "
                    "guide for one generate call (no beam search): call reset(attention_mask=...) or make a new "
                    "processor for a new prompt"
                )
            mask = torch.cat([self._mask, self._mask.new_ones(B, 1)], dim=-1)
            pos = self._pos + 1
            feed = input_ids[:, -1:]
        logits = [m(feed, mask, pos) for m in self._models]
        self._ids, self._mask, self._pos = input_ids.clone(), mask, pos[:, -1:]
        self.forwards += len(self._models)
        return logits

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Combined logits [B, V] float32 from the base ``scores`` [B, V] and the guides."""
        with torch.inference_mode():
            guides = self._advance(input_ids)
        # The combination runs outside inference mode: generate's later steps may modify the
        # returned scores in place, which an inference tensor would refuse.
        with torch.no_grad():
            logits = [scores] + [g.to(scores.device) for g in guides]
            _same_vocab(logits, ["base_model (scores)"] + [m.name for m in self._models])
            c = self._coeffs.to(scores.device)
            if c.dim() == 2 and c.shape[0] != scores.shape[0]:
                raise ValueError(f"coeffs has shape {tuple(c.shape)} but generate runs B = {scores.shape[0]} rows")
            return sk.guided_logits(logits, c)


@dataclass
class GuidedGeneration:
    """What :func:`guided_generate` returns (T = decoding steps run, <= max_new_tokens)."""

    sequences: torch.Tensor  #: [B, P + T] int64: prompt then new tokens, like ``generate``
    new_tokens: torch.Tensor  #: [B, T] int64; pad after a row's stop token
    logprobs: torch.Tensor | None  #: [B, T] fp32 log-prob of each token (0 after the stop), or None
    lengths: torch.Tensor  #: [B] int64 new tokens per row, its stop token included
    finished: torch.Tensor  #: [B] bool: the row emitted a stop token (or was stopped as invalid)
    steps: int  #: T
    forwards: int  #: model forwards in all: (1 + len(guide_models)) * T
    invalid: torch.Tensor | None = None  #: [B] bool: no token could be drawn (``on_invalid="stop"``)


def _per_row_host(value, dtype):
    """Per-row parameters become one host tensor up front: guided_sample gathers its
    parameters on the host, so a device tensor here would cost a copy (a sync) per step."""
    if isinstance(value, numbers.Number):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return torch.tensor(list(value), dtype=dtype)


def _adapter_soups(models, names, preference) -> list:
    """The distinct adapter soups among ``models`` when ``preference`` is given (refused when there is none)."""
    if preference is None:
        return []
    from bonesoup.merge.adapter_soup import adapter_soup_of

    soups = []
    for m in models:
        soup = adapter_soup_of(m)
        if soup is not None and all(soup is not s for s in soups):
            soups.append(soup)
    if not soups:
        raise ValueError("preference= needs models whose backbones are LoRA adapters (an AdapterSoup installed on "
                         f"{names[0]} or a guide); for full-weight backbones merge first (LiveSoup, merge_checkpoints)")
    return soups


def _rows_of(preference, B: int, n: int):
    """``preference`` [n] (one for every row) or [B, n], as [B, n] (checked by the soup)."""
    p = preference.tolist() if hasattr(preference, "tolist") else preference
    if isinstance(p, (list, tuple)) and p and all(isinstance(x, numbers.Number) for x in p):
        return [list(p)] * B
    if not isinstance(p, (list, tuple)) or len(p) != B:
        raise ValueError(f"preference must be [{n}] (every row) or [B = {B}, {n}] (one row per sequence), got "
                         f"{len(p) if isinstance(p, (list, tuple)) else type(p).__name__} rows")
    return p


def guided_generate(
    base_model,
    guide_models,
    coeffs,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    seed=None,
    stop_token_ids=None,
    pad_token_id: int | None = None,
    return_logprobs: bool = False,
    on_invalid: str = "raise",
    preference=None,
) -> GuidedGeneration:
    """Batched guided decoding: sample from ``sum_m c_m z_m`` over [base, guide_1, ...].

    Step t (0-based): every model has seen the sequence so far (its KV cache
    holds it; the prompt in one prefill forward, then one token per
    forward), its last-position logits z_m [B, V] are combined and sampled
    by :func:`soupkernels.guided_sample` with row b's Philox key ``seed[b]``
    and offset t. Rows that emit a stop token are finished: later positions
    hold ``pad_token_id`` and log-prob 0. Decoding ends after
    ``max_new_tokens`` steps or when every row is finished. Each model runs
    exactly T forwards for T steps.

    Parameters
    ----------
    base_model : causal LM (transformers ``PreTrainedModel`` or alike)
        Called as ``model(input_ids=, attention_mask=, position_ids=,
        past_key_values=, use_cache=True)``; returns ``.logits`` [B, L, V]
        and ``.past_key_values``.
    guide_models : list of causal LMs
        Same vocabulary as the base (checked on config.vocab_size and on the
        logits' width). May be empty: plain sampling from the base.
    coeffs : sequence or Tensor, [1 + G] or per-row [B, 1 + G]
        Coefficients over [base, guide_1, ..., guide_G], shared or one row
        per sequence; negative allowed (implicit guidance: [1, w, -w] over
        base, tuned, reference; [0, 1] samples from the guide alone).
    input_ids : Tensor [B, P], integer
        Prompts, left-padded to a common length P.
    attention_mask : Tensor [B, P], 0/1, optional
        0 on the left padding. None: no padding. Position ids are
        ``attention_mask.cumsum(-1) - 1``, as ``generate`` makes them.
    max_new_tokens : int
        Decoding steps at most (>= 0).
    temperature, top_p, min_p : float or [B]
        As in :func:`soupkernels.guided_sample`; temperature 0 is greedy.
    top_k : int or [B]
        Keep the k largest; 0 = off.
    seed : int, [B] ints, or None
        An int derives row b's key as ``derive_seed(seed, b)``
        (:func:`~bonesoup.decode.batching.row_seeds`, the one seeding scheme): a
        row's tokens depend on (seed, its index, its prompt, its parameters),
        never on the other rows. A [B] sequence/tensor gives each row its own
        key (e.g. per request, independent of batch position). None draws
        the base seed from torch's global generator (``torch.manual_seed``
        makes it reproducible).
    stop_token_ids : int or list of int, optional
        Tokens that finish a row (kept in the output). Default: the base's
        ``eos_token_id`` (generation_config, then config); [] never stops.
    pad_token_id : int, optional
        Fills finished rows. Default: the base's pad token, else the first
        stop token.
    return_logprobs : bool
        Also return each token's log-prob under the final filtered,
        renormalised distribution (0 for greedy rows and after the stop).
    on_invalid : {"raise", "stop"}
        What a row whose combined logits hold a NaN or +inf or are all -inf
        gets: ``"raise"`` fails the call (ValueError naming the rows and the
        step); ``"stop"`` finishes that row only (``invalid[b]`` True, its
        length counts the steps before, pad after) and decodes the others on:
        a server answers that request alone with an error.
    preference : [n] or per-row [B, n] floats, optional
        For models that are adapter soups (:class:`bonesoup.AdapterSoup`,
        LoRA backbones): each row decodes with the backbones mixed at its
        own preference, in the same batch, with no re-merge (the soup's
        method, beta and alpha give the coefficients). Applied to the base
        and every guide that carries a soup; refused when none does.

    Returns
    -------
    GuidedGeneration
        ``sequences`` [B, P + T] int64, ``new_tokens`` [B, T] int64,
        ``logprobs`` [B, T] fp32 or None, ``lengths`` [B] int64,
        ``finished`` [B] bool, ``steps`` T, ``forwards`` (1 + G) * T. All on
        the base model's device; ordinary tensors (not inference tensors),
        usable in autograd code such as a PPO update.

    Examples
    --------
    >>> enc = tok(["Hi", "Tell me"], return_tensors="pt", padding=True)  # padding_side="left"
    >>> out = guided_generate(base, [tuned, ref], [1.0, 1.5, -1.5], enc.input_ids, enc.attention_mask,
    ...                       max_new_tokens=20, temperature=0.7, seed=0)
    >>> out.sequences.shape  # (2, P + T)
    """
    if not callable(base_model):
        raise TypeError(f"base_model must be a causal LM module, got {type(base_model).__name__}")
    models = [base_model, *_check_guide_list(guide_models)]
    names = ["base_model"] + [f"guide_models[{g}]" for g in range(len(models) - 1)]
    _check_vocab(models, names)
    input_ids, mask = check_prompt(input_ids, attention_mask)
    B, P = input_ids.shape
    device = model_device(base_model)
    input_ids, mask = input_ids.to(device), mask.to(device)
    c = _check_coeffs(coeffs, len(models), B, device)
    if on_invalid not in ("raise", "stop"):
        raise ValueError(f"on_invalid must be 'raise' or 'stop', got {on_invalid!r}")
    if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    soups = _adapter_soups(models, names, preference)
    stops, pad = resolve_stop_and_pad(base_model, stop_token_ids, pad_token_id)
    if seed is None:
        seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
    seeds = row_seeds(seed, B) if isinstance(seed, numbers.Integral) else seed
    # Validate every sampling argument once, before any forward, with the op's own checks and
    # messages (they name the argument): on a one-token vocabulary this costs microseconds.
    sk.guided_sample(torch.zeros(len(models), B, 1, device=device), c, temperature=temperature, top_k=top_k,
                     top_p=top_p, min_p=min_p, seed=seeds, offset=0)
    temperature = _per_row_host(temperature, torch.float32)
    top_k = _per_row_host(top_k, torch.int64)
    top_p = _per_row_host(top_p, torch.float32)
    min_p = _per_row_host(min_p, torch.float32)
    seeds = _per_row_host(seeds, torch.int64)

    new_tokens = torch.full((B, max_new_tokens), pad, dtype=torch.int64, device=device)
    logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device) if return_logprobs else None
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    invalid = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.int64, device=device)
    stop_ids = torch.tensor(stops, dtype=torch.int64, device=device)
    cached = [_CachedModel(m, name) for m, name in zip(models, names)]
    steps = 0
    with contextlib.ExitStack() as rows, torch.inference_mode():
        for soup in soups:  # per-row coefficients for every forward below, the shared ones back after
            rows.enter_context(soup.rows(preference=_rows_of(preference, B, soup.n),
                                         alpha=0.0 if math.isnan(soup.alpha) else soup.alpha))
        feed, pos = input_ids, position_ids_from_mask(mask)
        for t in range(max_new_tokens):
            # One forward per model: the whole prompt at t = 0, the previous token after.
            logits = [m(feed, mask, pos).to(device) for m in cached]
            if t == 0:
                _same_vocab(logits, names)
            tok, lp = sk.guided_sample(logits, c, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                       seed=seeds, offset=t, return_logprobs=True, check=False)
            # Finished rows' logits are never looked at, so a NaN there is not an error.
            bad_now = (tok < 0) & ~finished
            if on_invalid == "raise":
                bad = torch.nonzero(bad_now).flatten().tolist()
                if bad:
                    raise ValueError(f"step {t}: rows {bad} of the combined logits hold a NaN or +inf or are all "
                                     "-inf; no token can be drawn (check the models' outputs and coeffs)")
            else:
                invalid |= bad_now
                finished |= bad_now
            tok = tok.masked_fill(finished, pad)
            lengths += ~finished
            new_tokens[:, t] = tok
            if logprobs is not None:
                logprobs[:, t] = lp.masked_fill(finished, 0.0)
            finished |= torch.isin(tok, stop_ids)
            steps = t + 1
            if steps == max_new_tokens or bool(finished.all()):
                break
            feed = tok[:, None]
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=-1)
            pos = pos[:, -1:] + 1

    # Clones leave inference mode: inference tensors cannot be saved for backward or updated in place.
    new_tokens = new_tokens[:, :steps].clone()
    return GuidedGeneration(
        sequences=torch.cat([input_ids.clone(), new_tokens], dim=-1),
        new_tokens=new_tokens,
        logprobs=logprobs[:, :steps].clone() if logprobs is not None else None,
        lengths=lengths.clone(),
        finished=finished.clone(),
        steps=steps,
        forwards=sum(m.forwards for m in cached),
        invalid=invalid.clone(),
    )
