"""Per-request preferences in vLLM: every distinct preference is one mixture adapter in vLLM's multi-LoRA.

With adapter backbones (the SFT model plus LoRA deltas ``D_j``) the merge at a
preference is ``W + sum_j c_j D_j`` exactly (:mod:`bonesoup.merge.lora`), i.e.
ONE adapter of rank ``R = sum_j r_j``. vLLM serves many adapters in one batch
(a ``LoRARequest`` per request), so requests at different preferences decode
together on a plain vLLM engine over the SFT model (``enable_lora=True``,
``max_lora_rank >= R``): no re-merge, no pause.

Precision. A preference is served at its components rounded to multiples of
``precision`` (default 1e-4) and renormalised to sum to 1; alpha is rounded to
a multiple of ``precision`` too. Two requests whose rounded values agree share
one adapter; the served (rounded) values are what outputs report.

The cache. :class:`MixtureCache` holds at most ``capacity`` adapters (vLLM's
``max_loras`` slots, by default): least recently used first out. Each is
written once (atomically) into ``cache_dir`` and gets a fresh ``lora_int_id``
(ids are never reused: vLLM caches adapters by id). An adapter in use by a
request in flight is pinned; an eviction removes the adapter from vLLM
(``remove_lora``) and then from disk. When every slot is pinned, a new
preference waits for a slot (:class:`AsyncAdapterSoup`) or goes to the next
chunk of the batch (:class:`AdapterSoupLLM`).

Outputs are tagged: ``out.mixture`` (the :class:`Mixture`: served preference,
alpha, coefficients, adapter id) and ``out.weights_version`` = the adapter id
(the same id, the same weights; a preference evicted and asked for again gets
a new id).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import tempfile
import threading
import typing
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import numpy as np

from bonesoup.merge.coefficients import merge_coefficients, validate_beta, validate_preference
from bonesoup.merge.lora import ADAPTER_CONFIG, load_adapters, mixture_adapter
from bonesoup.merge.methods import get_merge_method

__all__ = ["PRECISION", "Mixture", "MixtureCache", "SlotsBusy", "AdapterSoupLLM", "AsyncAdapterSoup",
           "lora_engine_kwargs", "round_target"]

#: Default rounding of preference components and alpha.
PRECISION = 1e-4
_SUM_TOLERANCE = 1e-9  # coefficients of an exact mixture: sum_j c_j + c_sft == 1


class SlotsBusy(RuntimeError):
    """Every adapter slot is pinned by a request in flight; retry once one is released."""


def round_target(preference: Sequence[float], alpha: float = 0.0, *, precision: float = PRECISION,
                 n: int | None = None) -> tuple[tuple[int, ...], int]:
    """The cache key of (``preference``, ``alpha``): integer multiples of ``precision``.

    ``preference`` is validated first (ValueError naming ``preference``); the
    served preference is ``key / sum(key)`` and the served alpha ``key_alpha *
    precision`` (see :meth:`MixtureCache.served`).
    """
    mu = validate_preference(preference, n)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    q = np.rint(mu / precision).astype(np.int64)
    if q.sum() <= 0:  # unreachable for a preference summing to 1 with precision <= 1/n; kept as a guard
        raise ValueError(f"preference {mu.tolist()} rounds to zero at precision {precision}")
    return tuple(int(x) for x in q), int(round(float(alpha) / precision))


@dataclass
class Mixture:
    """One cached mixture adapter (a served preference)."""

    preference: list[float]  #: served preference (rounded, sums to 1)
    alpha: float  #: served alpha (rounded)
    coefficients: list[float]  #: backbone coefficients; the SFT's is 1 - sum (exact mixture)
    lora: Any  #: the ``vllm.lora.request.LoRARequest``
    path: Path
    key: tuple = field(repr=False, default=())
    refs: int = field(repr=False, default=0)

    @property
    def id(self) -> int:
        """The vLLM ``lora_int_id`` (unique for the cache's life)."""
        return int(self.lora.lora_int_id)


def _allowed_ranks() -> list[int]:
    from vllm.config.lora import MaxLoRARanks

    return sorted(typing.get_args(MaxLoRARanks))


class MixtureCache:
    """An LRU of mixture adapters for one set of adapter backbones (thread-safe; knows no engine).

    Parameters
    ----------
    adapters : list of adapter directories, length n
        peft LoRA adapters on the SFT model, in preference order (checked
        compatible by :func:`bonesoup.merge.lora.load_adapters`).
    sft : path, optional
        The SFT checkpoint; adapters that record another base are refused.
    method, beta : merge method (registry name) and its beta.
    capacity : int
        Adapters kept (vLLM's ``max_loras``, or ``max_cpu_loras`` if larger).
    cache_dir : path, optional
        Where the adapters are written; default a temporary directory removed
        by :meth:`close`.
    precision : float
        Rounding of preference components and alpha (see :func:`round_target`).
    """

    def __init__(self, adapters: Sequence, *, sft=None, method: str = "bone", beta: float | None = None,
                 capacity: int = 4, cache_dir=None, precision: float = PRECISION):
        from bonesoup.fingerprint import checkpoint_fingerprint, fingerprint

        spec = get_merge_method(method)
        if spec.needs_beta:
            if beta is None:
                raise ValueError(f"beta is required for method={method!r}")
            beta = validate_beta(beta)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity (max_loras) must be an integer >= 1, got {capacity!r}")
        if not (isinstance(precision, float) and 0 < precision <= 0.01):
            raise ValueError(f"precision must be a float in (0, 0.01], got {precision!r}")
        self.adapter_dirs = [str(Path(a)) for a in adapters]
        self.adapters = load_adapters(self.adapter_dirs, sft=sft)
        if len(self.adapters) < 2:
            raise ValueError(f"adapters must hold at least 2 adapter directories, got {len(self.adapters)}")
        self.n, self.method, self.beta = len(self.adapters), method, beta
        self.capacity, self.precision = capacity, precision
        #: The mixture's rank: the largest total rank over the modules (sum of the backbones' ranks).
        self.rank = max(sum(a.modules[m].rank for a in self.adapters) for m in self.adapters[0].modules)
        self._own_dir = cache_dir is None
        self.cache_dir = Path(tempfile.mkdtemp(prefix="bonesoup-mixtures-") if cache_dir is None else cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Names depend on everything the content does, so a directory left by an earlier run is reusable.
        self._tag = fingerprint({"adapters": [checkpoint_fingerprint(d) for d in self.adapter_dirs],
                                 "method": method, "beta": beta, "precision": precision})
        self._lru: OrderedDict[tuple, Mixture] = OrderedDict()
        self._lock = threading.Lock()
        self._next_id = 1
        self.created = 0  #: adapters made (misses)
        self.evicted = 0

    # -- keys

    def key(self, preference: Sequence[float], alpha: float = 0.0) -> tuple:
        """The cache key (ValueError naming ``preference`` / ``alpha`` when invalid)."""
        q, a = round_target(preference, alpha, precision=self.precision, n=self.n)
        return (q, a)

    def served(self, key: tuple) -> tuple[list[float], float]:
        """The (preference, alpha) a key is served at."""
        q, a = key
        total = sum(q)
        return [x / total for x in q], a * self.precision

    def coefficients(self, preference: Sequence[float], alpha: float = 0.0) -> list[float]:
        """Merge coefficients at the SERVED target: n backbones, then the SFT model (validated)."""
        pref, a = self.served(self.key(preference, alpha))
        c, c_sft = merge_coefficients(pref, method=self.method, beta=self.beta, alpha=a, n=self.n)
        return [float(x) for x in c] + [float(c_sft)]

    # -- the LRU

    def acquire(self, preference: Sequence[float], alpha: float = 0.0) -> tuple[Mixture, list[Mixture]]:
        """Pin the mixture of (``preference``, ``alpha``), making it if needed.

        Returns ``(mixture, evicted)``: the caller removes each evicted adapter
        from the engine, then calls :meth:`discard` on it. Raises
        :class:`SlotsBusy` when a new adapter is needed and every slot is pinned.
        """
        hit = self.pin_cached(preference, alpha)
        if hit is not None:
            return hit, []
        key = self.key(preference, alpha)
        with self._lock:
            hit = self._lru.get(key)  # made by another thread in between
            if hit is not None:
                self._lru.move_to_end(key)
                hit.refs += 1
                return hit, []
            evicted = []
            victim = None
            if len(self._lru) >= self.capacity:
                victim = next((k for k, m in self._lru.items() if m.refs == 0), None)
                if victim is None:
                    raise SlotsBusy(f"all {self.capacity} adapter slots (max_loras) are in use by requests in "
                                    "flight")
            mix = self._make(key)  # first: if making fails, nothing was evicted
            if victim is not None:
                evicted.append(self._lru.pop(victim))
                self.evicted += 1
            mix.refs = 1
            self._lru[key] = mix
            return mix, evicted

    def pin_cached(self, preference: Sequence[float], alpha: float = 0.0) -> Mixture | None:
        """Pin and return the cached mixture of (``preference``, ``alpha``), or None (nothing made or evicted)."""
        key = self.key(preference, alpha)
        with self._lock:
            hit = self._lru.get(key)
            if hit is not None:
                self._lru.move_to_end(key)
                hit.refs += 1
            return hit

    def release(self, mixture: Mixture) -> None:
        """Unpin (a request using ``mixture`` finished)."""
        with self._lock:
            if mixture.refs <= 0:
                raise RuntimeError(f"mixture {mixture.id} released more often than acquired")
            mixture.refs -= 1

    def discard(self, mixture: Mixture) -> None:
        """Delete an evicted adapter's directory (after the engine has dropped it).

        Kept when the same target was made again in between: the new mixture
        (a new id) reuses the directory.
        """
        with self._lock:
            if all(m.path != mixture.path for m in self._lru.values()):
                shutil.rmtree(mixture.path, ignore_errors=True)

    def cached(self) -> list[Mixture]:
        """The cached mixtures, least recently used first."""
        with self._lock:
            return list(self._lru.values())

    def _make(self, key: tuple) -> Mixture:
        from vllm.lora.request import LoRARequest

        from bonesoup.fingerprint import fingerprint

        pref, a = self.served(key)
        c, c_sft = merge_coefficients(pref, method=self.method, beta=self.beta, alpha=a, n=self.n)
        c = [float(x) for x in c]
        if abs(sum(c) + float(c_sft) - 1.0) > _SUM_TOLERANCE:
            raise ValueError(f"method {self.method!r} gives coefficients {c} (SFT {float(c_sft)}) that do not sum to "
                             "1, so its merge is not the SFT model plus one mixture adapter")
        path = self.cache_dir / f"mix-{fingerprint([self._tag, list(key[0]), key[1]])}"
        if not (path / ADAPTER_CONFIG).is_file():  # written atomically: present means complete
            mixture_adapter(self.adapters, c, path)
        lora_id, self._next_id = self._next_id, self._next_id + 1
        self.created += 1
        lora = LoRARequest(lora_name=f"bonesoup-mix-{lora_id}", lora_int_id=lora_id, lora_path=str(path))
        return Mixture(pref, a, c, lora, path, key)

    def close(self) -> None:
        """Forget every adapter; remove the cache directory if it was made here."""
        with self._lock:
            self._lru.clear()
        if self._own_dir:
            shutil.rmtree(self.cache_dir, ignore_errors=True)


def lora_engine_kwargs(sft_dir, cache: MixtureCache, *, tensor_parallel_size: int = 1, **engine_kwargs) -> dict:
    """vLLM engine arguments (``LLM`` or ``AsyncEngineArgs``) serving ``cache``'s mixtures over ``sft_dir``.

    ``enable_lora``, ``max_loras`` = ``max_cpu_loras`` = the cache's capacity and
    ``max_lora_rank`` = the smallest rank vLLM allows that holds the mixture's
    rank are set here. ``enforce_eager`` defaults to True on CPU (compiling takes
    about a minute there and was not verified with LoRA).
    """
    if not (Path(sft_dir) / "config.json").is_file():
        raise FileNotFoundError(f"sft_dir={str(sft_dir)!r} is not a checkpoint directory (no config.json)")
    for taken in ("model", "enable_lora", "max_loras", "max_cpu_loras", "max_lora_rank"):
        if taken in engine_kwargs:
            raise ValueError(f"{taken!r} is set by bonesoup.vllm.adapters; do not pass it")
    ranks = [r for r in _allowed_ranks() if r >= cache.rank]
    if not ranks:
        raise ValueError(f"the mixture's rank {cache.rank} (the sum of the backbones' ranks) is above vLLM's "
                         f"largest max_lora_rank {_allowed_ranks()[-1]}")
    from vllm.platforms import current_platform

    kwargs = dict(model=str(Path(sft_dir).resolve()), enable_lora=True, max_loras=cache.capacity,
                  max_cpu_loras=cache.capacity, max_lora_rank=ranks[0], tensor_parallel_size=int(tensor_parallel_size))
    if current_platform.is_cpu():
        kwargs["enforce_eager"] = True
    kwargs.update(engine_kwargs)
    return kwargs


def _per_prompt(values, count: int, what: str, scalar) -> list:
    """``values`` for each of ``count`` prompts: one shared value, or one per prompt."""
    if scalar(values):
        return [values] * count
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{what} must be one value or one per prompt ({count}), got {len(values)}")
    return values


def _is_preference(v) -> bool:
    return len(v) > 0 and not hasattr(v[0], "__len__")


def _tag(out, mixture: Mixture):
    out.mixture, out.weights_version = mixture, mixture.id
    return out


class AdapterSoupLLM:
    """vLLM's offline ``LLM`` over the SFT model, a preference per prompt through mixture adapters.

    >>> llm = AdapterSoupLLM(sft, [a0, a1], beta=0.7, dtype="float32", max_model_len=256)  # doctest: +SKIP
    >>> outs = llm.generate(prompts, SamplingParams(temperature=0), preference=[[0.3, 0.7], [1.0, 0.0]])

    Parameters: those of :class:`MixtureCache` (``max_loras`` is its capacity)
    and ``**llm_kwargs`` for ``vllm.LLM``. ``self.llm`` is the engine,
    ``self.cache`` the :class:`MixtureCache`.
    """

    def __init__(self, sft_dir, adapters: Sequence, *, beta: float | None = None, method: str = "bone",
                 max_loras: int = 4, cache_dir=None, precision: float = PRECISION, tensor_parallel_size: int = 1,
                 **llm_kwargs):
        from vllm import LLM

        self.cache = MixtureCache(adapters, sft=sft_dir, method=method, beta=beta, capacity=max_loras,
                                  cache_dir=cache_dir, precision=precision)
        try:
            self.llm = LLM(**lora_engine_kwargs(sft_dir, self.cache, tensor_parallel_size=tensor_parallel_size,
                                                **llm_kwargs))
        except BaseException:
            self.cache.close()
            raise
        self._lock = threading.Lock()

    @property
    def n(self) -> int:
        return self.cache.n

    def generate(self, prompts, sampling_params=None, *, preference, alpha: float | Sequence[float] = 0.0,
                 **kwargs) -> list:
        """``vllm.LLM.generate`` with a preference per prompt; outputs in prompt order, tagged.

        ``preference``: one [n] preference for every prompt, or one per prompt;
        ``alpha``: one float or one per prompt. A call with more distinct
        preferences than adapter slots runs as several ``LLM.generate`` calls.
        """
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        prefs = _per_prompt(preference, len(prompts), "preference", _is_preference)
        alphas = _per_prompt(alpha, len(prompts), "alpha", lambda v: not hasattr(v, "__len__"))
        params = _per_prompt(sampling_params, len(prompts), "sampling_params", lambda v: not isinstance(v, list))
        keys = [self.cache.key(p, a) for p, a in zip(prefs, alphas)]  # validates all before anything runs
        kwargs.setdefault("use_tqdm", False)
        outs: list = [None] * len(prompts)
        with self._lock:
            order = list(dict.fromkeys(keys))  # distinct targets, first-seen order
            for start in range(0, len(order), self.cache.capacity):
                chunk = set(order[start: start + self.cache.capacity])
                rows = [i for i, k in enumerate(keys) if k in chunk]
                mixes = {}
                try:
                    firsts = {keys[i]: i for i in reversed(rows)}  # one row per target
                    for k, i in firsts.items():  # pin what is cached first: making the rest never evicts those
                        hit = self.cache.pin_cached(prefs[i], alphas[i])
                        if hit is not None:
                            mixes[k] = hit
                    for k, i in firsts.items():
                        if k not in mixes:
                            mix, evicted = self.cache.acquire(prefs[i], alphas[i])
                            for old in evicted:
                                self.llm.llm_engine.remove_lora(old.id)
                                self.cache.discard(old)
                            mixes[k] = mix
                    got = self.llm.generate([prompts[i] for i in rows], [params[i] for i in rows],
                                            lora_request=[mixes[keys[i]].lora for i in rows], **kwargs)
                finally:
                    for mix in mixes.values():
                        self.cache.release(mix)
                for i, out in zip(rows, got):
                    outs[i] = _tag(out, mixes[keys[i]])
        return outs

    def close(self) -> None:
        """Remove the cache directory (if made here); the engine is freed with this object."""
        self.cache.close()


class AsyncAdapterSoup:
    """vLLM's ``AsyncLLM`` over the SFT model; each request's preference is its own mixture adapter.

    Create with ``await AsyncAdapterSoup.create(sft_dir, adapters, beta=..., max_loras=..., **engine_kwargs)``
    (the parameters of :class:`AdapterSoupLLM`; ``**engine_kwargs`` go to
    ``AsyncEngineArgs``). ``eng.engine`` is the ``AsyncLLM``, ``eng.cache`` the
    :class:`MixtureCache`.
    """

    def __init__(self, engine, cache: MixtureCache):
        self.engine, self.cache = engine, cache
        self._slots = asyncio.Condition()
        self._evicted: list[Mixture] = []  # out of the cache, still to be removed from the engine and disk

    @classmethod
    async def create(cls, sft_dir, adapters: Sequence, *, beta: float | None = None, method: str = "bone",
                     max_loras: int = 4, cache_dir=None, precision: float = PRECISION, tensor_parallel_size: int = 1,
                     **engine_kwargs) -> "AsyncAdapterSoup":
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        cache = MixtureCache(adapters, sft=sft_dir, method=method, beta=beta, capacity=max_loras,
                             cache_dir=cache_dir, precision=precision)
        try:
            kwargs = lora_engine_kwargs(sft_dir, cache, tensor_parallel_size=tensor_parallel_size, **engine_kwargs)
            engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        except BaseException:
            cache.close()
            raise
        return cls(engine, cache)

    @property
    def n(self) -> int:
        return self.cache.n

    @contextlib.asynccontextmanager
    async def mixture(self, preference: Sequence[float], alpha: float = 0.0):
        """Pin the mixture of (``preference``, ``alpha``) for the block (waits while every slot is pinned)."""
        mix = self.cache.pin_cached(preference, alpha)  # the common case: no wait, no thread; ValueError if bad
        if mix is None:
            mix = await self._make(preference, alpha)
        try:
            yield mix
        finally:
            self.cache.release(mix)
            await self._notify()

    async def _notify(self) -> None:
        async with self._slots:  # a slot may be free: waiting acquisitions try again
            self._slots.notify_all()

    async def _make(self, preference, alpha) -> Mixture:
        async with self._slots:
            while True:
                # Writing a new adapter is file I/O: off the event loop. Callers hold _slots, so
                # acquisitions run one at a time and the thread only ever holds the cache lock briefly.
                made = asyncio.ensure_future(asyncio.to_thread(self.cache.acquire, preference, alpha))
                try:
                    mix, evicted = await asyncio.shield(made)
                    break
                except SlotsBusy:
                    await self._slots.wait()
                except asyncio.CancelledError:  # the thread runs on: unpin what it made, queue what it evicted
                    made.add_done_callback(self._abandoned)
                    raise
            self._evicted.extend(evicted)
            try:
                await self._drop_evicted()
            except BaseException:  # cancelled or failed: do not leave the new adapter pinned
                self.cache.release(mix)
                raise
        return mix

    def _abandoned(self, made: asyncio.Future) -> None:
        if made.cancelled() or made.exception() is not None:
            return
        mix, evicted = made.result()
        self.cache.release(mix)
        self._evicted.extend(evicted)  # removed from the engine by the next acquisition
        asyncio.ensure_future(self._notify())

    async def _drop_evicted(self) -> None:
        """Remove evicted adapters from the engine, then from disk (one at a time: a failure keeps the rest)."""
        while self._evicted:
            old = self._evicted[0]
            await self.engine.remove_lora(old.id)
            self._evicted.pop(0)
            self.cache.discard(old)

    async def generate(self, prompt, sampling_params, request_id: str, *, preference: Sequence[float],
                       alpha: float = 0.0, **kwargs: Any) -> AsyncIterator:
        """``AsyncLLM.generate`` with the mixture adapter of (``preference``, ``alpha``); outputs tagged."""
        async with self.mixture(preference, alpha) as mix:
            async for out in self.engine.generate(prompt, sampling_params, request_id, lora_request=mix.lora,
                                                  **kwargs):
                yield _tag(out, mix)

    async def shutdown(self) -> None:
        """Stop the engine (its processes too) and remove the cache directory (if made here)."""
        self.engine.shutdown()
        self.cache.close()
