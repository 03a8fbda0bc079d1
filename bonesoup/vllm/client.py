"""Client side: ``SoupLLM`` (vLLM's offline ``LLM``) and ``AsyncSoup`` (its ``AsyncLLM``).

Both start the engine with the ``bonesoup`` loader and worker extension, turn a
preference into merge coefficients through the merge-method registry, and keep
one rule: no request decodes on two weight sets, and every output says which
weights it used. How outputs are tagged:

- ``out.weights_version`` (int), set on every ``RequestOutput`` we hand back:
  0 is the SFT model as loaded, each successful ``set_preference`` adds 1;
- vLLM's own tag: the engine's weight version is set to ``str(version)``, so
  each finished ``CompletionOutput.weight_versions`` holds one span of that
  version (checked against ours; more than one span would be a bug and raises).

A preference change: (1) new requests wait and in-flight ones finish
(``AsyncSoup``: our gate plus ``pause_generation(mode="wait")``; ``SoupLLM``: a
lock, since its ``generate`` blocks); (2) every rank merges in place and
republishes (one ``collective_rpc``); (3) the prefix cache is reset (cached KV
blocks were computed by the old weights); (4) the version is tagged; (5)
generation resumes. If the RPC fails the version does not move, the old weights
stay live and the engine keeps serving: workers report a failure in their reply
(never raise: see ``SoupWorkerExtension``), and if only some ranks failed the
others are merged back to the served coefficients before the error is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from bonesoup.merge.coefficients import merge_coefficients, validate_beta
from bonesoup.merge.methods import get_merge_method

from .loader import BACKBONES_KEY, LOAD_FORMAT, PUBLISH_KEY
from .worker import WORKER_EXTENSION

__all__ = ["SoupLLM", "AsyncSoup", "soup_engine_kwargs"]

_RPC = "bonesoup_set_coefficients"


def soup_engine_kwargs(sft_dir, backbones: Sequence, *, tensor_parallel_size: int = 1, publish: str = "repack",
                       **engine_kwargs) -> dict:
    """vLLM engine arguments that load ``sft_dir`` + ``backbones`` into arenas (for ``LLM`` or ``AsyncEngineArgs``).

    ``publish`` (CPU backend): ``"repack"`` re-runs vLLM's post-load processing
    after each merge (fresh oneDNN-packed copies: fast decode, the repack costs
    about as much as the merge again); ``"views"`` runs the linear layers with
    ``F.linear`` on the arena (the merge is the whole change; decode is slower).

    ``enforce_eager`` defaults to True on CPU (start-up in seconds instead of a
    ~40 s compile). Compiled mode also follows re-merges (checked by hand on the
    tiny Qwen2, both publish modes, three switches), but the tests run eager.
    """
    sft = _checkpoint_dir(sft_dir, "sft_dir")
    if isinstance(backbones, (str, os.PathLike)) or len(backbones) < 2:
        raise ValueError(f"backbones must be a sequence of at least 2 checkpoint directories, got {backbones!r}")
    dirs = [_checkpoint_dir(b, f"backbones[{j}]") for j, b in enumerate(backbones)]
    for taken in ("model", "load_format", "worker_extension_cls"):
        if taken in engine_kwargs:
            raise ValueError(f"{taken!r} is set by bonesoup.vllm; do not pass it")
    extra = dict(engine_kwargs.pop("model_loader_extra_config", None) or {})
    extra[BACKBONES_KEY] = dirs
    if publish not in ("repack", "views"):
        raise ValueError(f"publish must be 'repack' or 'views', got {publish!r}")
    extra[PUBLISH_KEY] = publish
    kwargs = dict(model=sft, load_format=LOAD_FORMAT, worker_extension_cls=WORKER_EXTENSION,
                  model_loader_extra_config=extra, tensor_parallel_size=int(tensor_parallel_size))
    if _on_cpu():
        kwargs["enforce_eager"] = True
    kwargs.update(engine_kwargs)
    return kwargs


def _checkpoint_dir(path, what: str) -> str:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{what}={str(path)!r} is not a checkpoint directory (no config.json)")
    return str(p.resolve())


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class _Preferences:
    """Preference -> coefficients over the stored rows (backbones, then SFT), via the registry."""

    def __init__(self, n: int, method: str, beta: float | None):
        spec = get_merge_method(method)  # ValueError naming the known methods
        if spec.needs_beta:
            if beta is None:
                raise ValueError(f"beta is required for method={method!r}")
            beta = validate_beta(beta)
        self.n, self.method, self.beta = n, method, beta

    def coefficients(self, preference: Sequence[float], alpha: float) -> list[float]:
        c, c_sft = merge_coefficients(preference, method=self.method, beta=self.beta, alpha=alpha, n=self.n)
        return [float(x) for x in c] + [float(c_sft)]


class _Served:
    """What both clients share: the preference -> coefficients map and the served weights' state."""

    def __init__(self, prefs: _Preferences, sft_dir: str, backbones: list[str]):
        self._prefs, self.sft_dir, self.backbones = prefs, sft_dir, backbones
        self.version = 0
        self.preference: list[float] | None = None
        self.alpha = 0.0
        self._coefficients = [0.0] * len(backbones) + [1.0]  # version 0: the SFT model as loaded

    @property
    def n(self) -> int:
        """Number of backbones (objectives)."""
        return self._prefs.n

    @property
    def method(self) -> str:
        return self._prefs.method

    @property
    def beta(self) -> float | None:
        return self._prefs.beta

    def coefficients(self, preference: Sequence[float], alpha: float = 0.0) -> list[float]:
        """The merge coefficients of ``preference`` and ``alpha``: n backbones, then SFT (validated)."""
        return self._prefs.coefficients(preference, alpha)

    def _served(self, coeffs, preference, alpha: float) -> None:
        """Record what the live weights now are (after every rank switched and the version was tagged)."""
        self._coefficients = [float(x) for x in coeffs]
        self.preference = None if preference is None else [float(x) for x in preference]
        self.alpha = float(alpha)


def _report(results: list[dict], version: int, coeffs: list[float], preference, alpha: float, t0: float) -> dict:
    return {"version": version, "merge_s": max(r["merge_s"] for r in results),
            "publish_s": max(r["publish_s"] for r in results), "seconds": time.perf_counter() - t0,
            "coefficients": coeffs, "preference": None if preference is None else [float(x) for x in preference],
            "alpha": float(alpha), "ranks": len(results), "launches": results[0]["launches"],
            "bytes_moved": results[0]["bytes_moved"]}


def _failures(results: list[dict]) -> tuple[list[dict], bool]:
    """The ranks whose merge failed, and whether others switched (and must be put back)."""
    failed = [r for r in results if "error" in r]
    return failed, 0 < len(failed) < len(results)


def _rpc_error(failed: list[dict]) -> Exception:
    """One exception for the failed ranks, of the workers' type where it is a plain argument/memory error."""
    kinds = {"ValueError": ValueError, "TypeError": TypeError, "MemoryError": MemoryError}
    cls = kinds.get(failed[0]["error_type"], RuntimeError)
    msgs = "; ".join(f"rank {r['rank']}: {r['error']}" for r in failed)
    return cls(f"re-merge failed, the previous weights are still served ({msgs})")


def _check_rollback(results: list[dict]) -> None:
    """Raise if putting the ranks back on the served weights failed too (the weights are then undefined)."""
    failed, _ = _failures(results)
    if failed:
        msgs = "; ".join(f"rank {r['rank']}: {r['error']}" for r in failed)
        raise RuntimeError(f"re-merge failed and restoring the served weights failed too ({msgs}): the ranks' "
                           "weights are undefined; restart the engine")


def _tag(out, version: int):
    """Set ``out.weights_version``; check vLLM's spans on a finished output agree."""
    for comp in getattr(out, "outputs", None) or ():
        spans = getattr(comp, "weight_versions", None)
        if spans and {s.version for s in spans} != {str(version)}:
            raise RuntimeError(f"request {out.request_id} decoded on weight versions "
                               f"{[(s.version, s.start, s.end) for s in spans]}, expected only {version}")
    out.weights_version = version
    return out


class SoupLLM(_Served):
    """vLLM's offline ``LLM`` serving a Bone Soup merge that re-merges in place.

    Parameters
    ----------
    sft_dir : path
        The SFT checkpoint (HF layout): the engine's model (config, tokenizer), and
        the last stored row (extrapolation, ``alpha != 0``, moves away from it).
    backbones : sequence of paths, length n >= 2
        The backbone checkpoints, in preference order, same architecture as ``sft_dir``.
    beta : float, optional
        Bone Soup's beta in (0.5, 1); required where the method reads it (``"bone"``).
    method : str
        A name in the merge-method registry (``"bone"``, ``"rewarded"``, ...).
    tensor_parallel_size : int
        vLLM's; every rank holds its own shard of the k = n + 1 rows.
    dtype : str or torch.dtype
        vLLM's ``dtype`` (the stored rows are kept in it).
    **llm_kwargs
        Passed to ``vllm.LLM`` (``max_model_len``, ``enable_lora``, ...).

    Memory: each rank holds (n + 2) x its shard of the weights (n + 1 stored rows +
    the live arena), plus on CPU the packed copies vLLM's kernels run on; checked
    before allocation (MemoryError).

    Serves the SFT weights (version 0) until the first :meth:`set_preference`.
    """

    def __init__(self, sft_dir, backbones, *, beta: float | None = None, method: str = "bone",
                 tensor_parallel_size: int = 1, dtype="auto", **llm_kwargs):
        from vllm import LLM

        kwargs = soup_engine_kwargs(sft_dir, backbones, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                                    **llm_kwargs)
        super().__init__(_Preferences(len(backbones), method, beta), kwargs["model"],
                         list(kwargs["model_loader_extra_config"][BACKBONES_KEY]))
        self.llm = LLM(**kwargs)
        self._lock = threading.Lock()
        self.llm.llm_engine.set_weight_version("0")

    def set_preference(self, preference: Sequence[float], alpha: float = 0.0) -> dict:
        """Re-merge every rank in place for ``preference`` [n] (on the simplex) and ``alpha``.

        Returns a dict: ``version`` (int, the new weights version), ``merge_s`` and
        ``publish_s`` (slowest rank), ``seconds`` (the whole change, prefix-cache
        reset included), ``coefficients`` (backbones, then SFT), ``preference``,
        ``alpha``, ``ranks``, ``launches`` (per rank), ``bytes_moved`` (per rank).
        A bad preference raises ValueError before anything changes.
        """
        return self._apply(self.coefficients(preference, alpha), preference, alpha)

    def set_coefficients(self, coefficients: Sequence[float]) -> dict:
        """Re-merge with raw coefficients over the stored rows: n backbones, then SFT.

        For merges a preference and one alpha do not describe (per-objective
        extrapolation, one stored model as is). Checked on every rank before
        anything is written; a bad one raises ValueError and changes nothing.
        """
        return self._apply(list(coefficients), None, float("nan"))

    def _apply(self, coeffs: list, preference, alpha: float) -> dict:
        with self._lock:
            t0 = time.perf_counter()
            results = self.llm.collective_rpc(_RPC, args=(coeffs, self.version + 1))
            failed, partial = _failures(results)
            if failed:
                if partial:  # the others switched: put them back on the served weights
                    _check_rollback(self.llm.collective_rpc(_RPC, args=(self._coefficients, self.version)))
                raise _rpc_error(failed)
            try:
                if not self.llm.reset_prefix_cache():
                    raise RuntimeError("vLLM refused to reset its prefix cache after the re-merge")
                self.llm.llm_engine.set_weight_version(str(self.version + 1))
            except BaseException:  # every rank switched but the change is not complete: put them back
                _check_rollback(self.llm.collective_rpc(_RPC, args=(self._coefficients, self.version)))
                self.llm.llm_engine.set_weight_version(str(self.version))
                raise
            self.version += 1
            self._served(coeffs, preference, alpha)
            return _report(results, self.version, self._coefficients, preference, alpha, t0)

    def generate(self, prompts, sampling_params=None, lora_request=None, **kwargs) -> list:
        """``vllm.LLM.generate`` on the current weights; each output gets ``weights_version``."""
        kwargs.setdefault("use_tqdm", False)
        with self._lock:
            outs = self.llm.generate(prompts, sampling_params, lora_request=lora_request, **kwargs)
            return [_tag(o, self.version) for o in outs]

    def info(self) -> list[dict]:
        """Each rank's arena (k, sources, bytes, dtypes, version, coefficients)."""
        return self.llm.collective_rpc("bonesoup_info")


class _Gate:
    """Requests in, or one weight change: a change waits for in-flight requests and holds new ones back."""

    def __init__(self):
        self._cond = asyncio.Condition()
        self._inflight = 0
        self._changing = False

    @contextlib.asynccontextmanager
    async def request(self):
        async with self._cond:
            await self._cond.wait_for(lambda: not self._changing)
            self._inflight += 1
        try:
            yield
        finally:
            async with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def change(self):
        async with self._cond:
            await self._cond.wait_for(lambda: not self._changing)
            self._changing = True  # from here new requests wait
            try:
                await self._cond.wait_for(lambda: self._inflight == 0)
            except BaseException:  # cancelled while draining: open the gate again, or every request waits forever
                self._changing = False
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            async with self._cond:
                self._changing = False
                self._cond.notify_all()


class AsyncSoup(_Served):
    """vLLM's ``AsyncLLM`` serving a Bone Soup merge; preference changes pause, re-merge and resume.

    Create with ``await AsyncSoup.create(sft_dir, backbones, beta=..., ...)``
    (same parameters as :class:`SoupLLM`; ``**engine_kwargs`` go to
    ``AsyncEngineArgs``). ``eng.engine`` is the ``AsyncLLM``.
    """

    def __init__(self, engine, prefs: _Preferences, sft_dir: str, backbones: list[str]):
        super().__init__(prefs, sft_dir, backbones)
        self.engine = engine
        self._gate = _Gate()

    @classmethod
    async def create(cls, sft_dir, backbones, *, beta: float | None = None, method: str = "bone",
                     tensor_parallel_size: int = 1, dtype="auto", **engine_kwargs) -> "AsyncSoup":
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = soup_engine_kwargs(sft_dir, backbones, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                                    **engine_kwargs)
        prefs = _Preferences(len(backbones), method, beta)
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        try:
            await engine.update_weight_version("0")
        except BaseException:
            engine.shutdown()
            raise
        return cls(engine, prefs, kwargs["model"], list(kwargs["model_loader_extra_config"][BACKBONES_KEY]))

    async def set_preference(self, preference: Sequence[float], alpha: float = 0.0) -> dict:
        """Pause (in-flight requests finish on the old weights), re-merge, reset the prefix cache, tag, resume.

        Returns the same dict as :meth:`SoupLLM.set_preference`; ``seconds``
        counts from the pause (the wait for in-flight requests not included),
        ``pause_s`` is that wait. A bad preference raises ValueError and pauses nothing.
        """
        return await self._apply(self.coefficients(preference, alpha), preference, alpha)

    async def set_coefficients(self, coefficients: Sequence[float]) -> dict:
        """Raw coefficients over the stored rows (n backbones, then SFT); see :meth:`SoupLLM.set_coefficients`."""
        return await self._apply(list(coefficients), None, float("nan"))

    async def _apply(self, coeffs: list, preference, alpha: float) -> dict:
        t_wait = time.perf_counter()
        async with self._gate.change():
            # Once the RPC is sent the workers merge whatever the caller does; a cancelled
            # call waits for the switch to end (weights, version and tags agree), then re-raises.
            switch = asyncio.ensure_future(self._switch(coeffs, preference, alpha))
            cancelled = False
            while not switch.done():
                try:
                    await asyncio.shield(switch)
                except asyncio.CancelledError:
                    cancelled = True
                except BaseException:
                    break  # the switch's own failure: raised below
            if cancelled:
                if not switch.cancelled():
                    switch.exception()  # retrieved: the caller sees the cancellation
                raise asyncio.CancelledError
            info, t0 = switch.result()
        info["pause_s"] = t0 - t_wait
        return info

    async def _switch(self, coeffs: list, preference, alpha: float) -> tuple[dict, float]:
        # Also drains requests sent to self.engine directly, around our gate.
        await self.engine.pause_generation(mode="wait", clear_cache=True)
        try:
            t0 = time.perf_counter()
            results = await self.engine.collective_rpc(_RPC, args=(coeffs, self.version + 1))
            failed, partial = _failures(results)
            if failed:
                if partial:  # the others switched: put them back on the served weights
                    _check_rollback(await self.engine.collective_rpc(_RPC, args=(self._coefficients, self.version)))
                raise _rpc_error(failed)
            try:
                await self.engine.reset_prefix_cache()
                await self.engine.update_weight_version(str(self.version + 1))
            except BaseException:  # every rank switched but the change is not complete: put them back
                _check_rollback(await self.engine.collective_rpc(_RPC, args=(self._coefficients, self.version)))
                await self.engine.update_weight_version(str(self.version))
                raise
            self.version += 1
            self._served(coeffs, preference, alpha)
            return _report(results, self.version, self._coefficients, preference, alpha, t0), t0
        finally:
            await self.engine.resume_generation()

    async def generate(self, prompt, sampling_params, request_id: str, lora_request=None,
                       **kwargs: Any) -> AsyncIterator:
        """``AsyncLLM.generate`` on one weights version; each streamed output gets ``weights_version``.

        A request admitted while a re-merge waits is held back until the new
        weights are live, so its version is known when it starts. Read the stream
        to its end or close it: an open stream counts as in flight and holds a
        pending re-merge back.
        """
        async with self._gate.request():
            version = self.version
            async for out in self.engine.generate(prompt, sampling_params, request_id,
                                                  lora_request=lora_request, **kwargs):
                yield _tag(out, version)

    async def info(self) -> list[dict]:
        """Each rank's arena (k, sources, bytes, dtypes, version, coefficients)."""
        return await self.engine.collective_rpc("bonesoup_info")

    async def shutdown(self) -> None:
        """Stop the engine (its processes too)."""
        self.engine.shutdown()
