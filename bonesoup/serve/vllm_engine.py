"""``bonesoup serve --engine vllm``: the same API (app.py, protocol.py) on vLLM's AsyncLLM.

Two modes, picked by the backbones:

- adapter backbones (peft LoRA directories): every request's preference is its
  own mixture adapter (:mod:`bonesoup.vllm.adapters`), all in one continuous
  batch; no re-merge, no pause. ``POST /v1/preference`` only sets the default
  preference (of requests that give none) and makes its adapter ready.
  ``weights_version`` is the id of the mixture adapter a request used (the
  same id, the same weights).
- full-weight backbones: ``bonesoup.vllm.AsyncSoup`` re-merges in place. Like
  the hf engine, requests are served in rounds grouped by target (the current
  weights' group first): a group whose target differs pauses (in-flight
  requests finish), re-merges, resumes. A request for the live target starts
  at once unless requests for another target are waiting (so those are not
  starved). ``weights_version`` counts re-merges (0: the SFT model).

The engine runs an asyncio loop of its own on a thread (vLLM's ``AsyncLLM``
lives there); ``submit`` hands it a job from any thread and returns a
``concurrent.futures.Future``, the interface the app expects of the hf
``Engine``. Tokenization, the OpenAI fields, limits and errors are the app's
and the protocol's; text is decoded from the token ids by the same tokenizer
call as the hf engine, stop strings cut the same way (vLLM also stops there).

Sampling: greedy requests are exact (vLLM's argmax on the merged model);
sampled rows use vLLM's sampler with the row's Philox key as vLLM's per-request
``seed`` (reproducible, but not the hf engine's draws).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from bonesoup.merge.live import RemergeInfo
from bonesoup.serve.engine import CURRENT, Engine, completion_text
from bonesoup.serve.metrics import Metrics
from bonesoup.serve.protocol import DEFAULT_MAX_QUEUE, RequestError

__all__ = ["VLLMSoup", "VLLMEngine", "build_vllm_app"]

log = logging.getLogger(__name__)


def _stop_ids(model_dir, tokenizer) -> set[int]:
    """EOS ids vLLM stops at (generation config + tokenizer): trimmed from the text, as the hf engine does."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    with contextlib.suppress(OSError, ValueError):
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return ids


class VLLMSoup:
    """What the app reads of the served soup: n, method, beta, the current target and version.

    Adapter mode: ``preference`` / ``alpha`` are the default target (requests
    that give none), ``version`` the id of its mixture adapter when last made.
    Full-weight mode: the live weights' target and re-merge count.
    """

    def __init__(self, *, sft, backbones: Sequence, adapters: bool, method: str, beta: float | None):
        self.sft, self.backbones, self.adapters = str(sft), [str(b) for b in backbones], bool(adapters)
        self.n, self.method, self.beta = len(self.backbones), method, beta
        self.preference: list[float] | None = None
        self.alpha = 0.0
        self.version = 0
        self.backend = None  # AsyncAdapterSoup or AsyncSoup, once the engine has started
        self._lock = threading.Lock()

    @property
    def mode(self) -> str:
        return "adapters" if self.adapters else "full"

    def coefficients(self, preference: Sequence[float], alpha: float = 0.0) -> list[float]:
        """Merge coefficients (n backbones, then the SFT model) of the target as it would be served."""
        if self.adapters:
            return self.backend.cache.coefficients(preference, alpha)
        return self.backend.coefficients(preference, alpha)

    def set_current(self, preference: Sequence[float], alpha: float, version: int) -> None:
        with self._lock:
            self.preference, self.alpha, self.version = [float(x) for x in preference], float(alpha), int(version)

    @contextlib.contextmanager
    def reading(self):
        """Hold the (preference, alpha, version) triple still; yields the version."""
        with self._lock:
            yield self.version

    def __repr__(self) -> str:
        return (f"VLLMSoup({self.mode}, n={self.n}, method={self.method!r}, beta={self.beta}, sft={self.sft!r}, "
                f"preference={self.preference}, alpha={self.alpha}, version={self.version})")


class VLLMEngine:
    """The hf ``Engine``'s interface (``submit``, ``start``, ``stop``, ``encode``, ...) over vLLM's AsyncLLM.

    Parameters
    ----------
    soup : VLLMSoup
        What to serve; ``soup.backend`` is created on the engine's loop by :meth:`start`.
    tokenizer : transformers tokenizer
        The SFT model's (left padding is irrelevant here: vLLM takes token ids).
    engine_kwargs : dict
        For ``AsyncAdapterSoup.create`` / ``AsyncSoup.create`` (``dtype``,
        ``max_model_len``, ``tensor_parallel_size``, ``max_loras``, ...).
    """

    encode = Engine.encode  # the same tokenization, BOS for empty prompts, 400 "prompt" on failure
    make_job = staticmethod(Engine.make_job)
    preference_job = staticmethod(Engine.preference_job)

    def __init__(self, soup: VLLMSoup, tokenizer, *, engine_kwargs: dict | None = None,
                 metrics: Metrics | None = None, max_queue: int = DEFAULT_MAX_QUEUE):
        self.soup, self.tokenizer = soup, tokenizer
        self.engine_kwargs = dict(engine_kwargs or {})
        self.metrics = metrics or Metrics()
        self.max_queue = int(max_queue)
        self.tokenizer_lock = threading.Lock()
        self.stop_ids = _stop_ids(soup.sft, tokenizer)
        self.context_length: int | None = None  # vLLM's max_model_len, once started
        self.remerges: list = []  # (reason, RemergeInfo), full-weight mode
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._outstanding: set = set()  # futures of jobs accepted and not finished (max_queue bounds it)
        self._count_lock = threading.Lock()
        # full-weight mode, touched on the loop only
        self._waiting: list = []
        self._taken: list = []  # the round being served
        self._running = 0
        self._idle: asyncio.Condition | None = None
        self._scheduler: asyncio.Task | None = None

    # -- what the app reads (the hf Engine's names)

    @property
    def adapters(self) -> bool:
        """True when the backbones are LoRA adapters (each request its own mixture adapter)."""
        return self.soup.adapters

    def adapter_info(self) -> list[dict]:
        """``[{"path", "rank"}]`` of the adapter backbones, for ``GET /v1/models``."""
        from bonesoup.merge.lora import load_adapter

        return [{"path": b, "rank": load_adapter(b).rank} for b in self.soup.backbones] if self.adapters else []

    def snapshot(self) -> tuple[int, list[float] | None, float]:
        """One consistent ``(weights_version, preference, alpha)``."""
        with self.soup.reading() as version:
            return version, self.soup.preference, self.soup.alpha

    @contextlib.contextmanager
    def arriving(self):
        """The hf engine's batching hint; vLLM batches continuously, so nothing waits here."""
        yield

    # -- life cycle

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def start(self, timeout: float = 900.0) -> None:
        """Start the loop thread and the vLLM engine on it; returns when it serves (raises what start-up raised)."""
        if self.alive:
            return
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="bonesoup-vllm", daemon=True)
        self._thread.start()
        ready.result(timeout)

    def _run(self, ready: concurrent.futures.Future) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._open())
        except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
            ready.set_exception(exc)
            loop.close()
            return
        self._loop = loop
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _open(self) -> None:
        soup, kw = self.soup, dict(self.engine_kwargs)
        self._idle = asyncio.Condition()
        if soup.adapters:
            from bonesoup.vllm.adapters import AsyncAdapterSoup

            soup.backend = await AsyncAdapterSoup.create(soup.sft, soup.backbones, beta=soup.beta, method=soup.method,
                                                         **kw)
        else:
            from bonesoup.vllm import AsyncSoup

            kw.pop("max_loras", None)
            soup.backend = await AsyncSoup.create(soup.sft, soup.backbones, beta=soup.beta, method=soup.method, **kw)
        self.context_length = int(soup.backend.engine.model_config.max_model_len)

    def stop(self, timeout: float = 60.0) -> None:
        """Fail what waits (503), shut vLLM down, stop the loop thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def close():
            self._waiting = []
            self._fail_outstanding()  # waiting, in a round or decoding: none of them finishes now
            with contextlib.suppress(Exception):
                await self.soup.backend.shutdown()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._loop = None
        self._fail_outstanding()  # close() timed out: the futures are thread-safe

    def _fail_outstanding(self) -> None:
        with self._count_lock:
            left = list(self._outstanding)
        for fut in left:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                if not fut.done():
                    fut.set_exception(RequestError(503, "the server is shutting down", None, "server_shutdown"))

    # -- jobs in

    def submit(self, job) -> concurrent.futures.Future:
        """Queue a job (from any thread); its future gets the hf engine's result shapes."""
        if not self.alive or self._loop is None:
            raise RequestError(503, "the vLLM engine is not running", None, "server_error")
        with self._count_lock:
            if len(self._outstanding) >= self.max_queue:
                raise RequestError(503, f"the server is busy ({len(self._outstanding)} requests in progress); "
                                   "retry later", None, "server_busy")
            self._outstanding.add(job.future)
        job.future.add_done_callback(self._done)
        try:
            self._loop.call_soon_threadsafe(self._accept, job)
        except (RuntimeError, AttributeError):  # stopped in between (loop closed, or gone)
            self._fail(job, RequestError(503, "the vLLM engine is not running", None, "server_error"))
        return job.future

    def _done(self, fut) -> None:
        with self._count_lock:
            self._outstanding.discard(fut)

    @staticmethod
    def _fail(job, exc: BaseException) -> None:
        if not job.future.done():
            job.future.set_exception(exc)

    def _live(self) -> tuple | None:
        """The current target (preference tuple, alpha); None before the first preference."""
        soup = self.soup
        return None if soup.preference is None else (tuple(soup.preference), soup.alpha)

    def _target(self, job) -> tuple | None:
        return self._live() if job.target is CURRENT else job.target

    def _accept(self, job) -> None:
        try:
            self._dispatch(job)
        except Exception as exc:  # noqa: BLE001 - a bug: fail the job rather than leave it waiting
            log.exception("accepting a job failed")
            self._fail(job, RequestError(500, f"internal error: {type(exc).__name__}", None, "server_error"))

    def _dispatch(self, job) -> None:
        if self.soup.adapters:
            coro = self._adapter_preference(job) if job.kind == "preference" else self._completion(job)
            asyncio.ensure_future(self._guard(job, coro))
        elif job.kind == "completion" and self._scheduler is None and self._live() is not None and \
                (job.target is CURRENT or job.target == self._live()):
            self._start_full(job, self._live())
        else:
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            if self._scheduler is None:
                self._scheduler = asyncio.ensure_future(self._schedule())

    async def _guard(self, job, coro) -> None:
        try:
            await coro
        except Exception as exc:  # noqa: BLE001 - the request's own failure, never the engine's
            if not isinstance(exc, (RequestError, ValueError)):
                log.exception("a vLLM request failed")
            self._fail(job, exc if isinstance(exc, RequestError) else RequestError(
                500, f"generation failed: {type(exc).__name__}: {exc}", None, "server_error"))

    # -- adapter mode

    async def _adapter_preference(self, job) -> None:
        pref, alpha = job.target
        t0 = time.perf_counter()
        backend = self.soup.backend
        async with backend.mixture(pref, alpha) as mix:  # made (or found) and cached for the next request
            # while pinned: once released a concurrent acquisition may evict it and delete its directory
            nbytes = sum(f.stat().st_size for f in mix.path.iterdir() if f.is_file())
        seconds = time.perf_counter() - t0
        self.soup.set_current(mix.preference, mix.alpha, mix.id)
        self.metrics.count_remerge("api", seconds)
        self.metrics.weights_version.set(mix.id)
        c_sft = 1.0 - sum(mix.coefficients)
        job.future.set_result(RemergeInfo(mix.id, mix.preference, mix.alpha, [*mix.coefficients, c_sft], seconds,
                                          nbytes, 0))

    # -- full-weight mode: rounds grouped by target

    def _start_full(self, job, key) -> None:
        self._running += 1

        async def run():
            try:
                await self._completion(job, key)
            finally:
                self._running -= 1
                async with self._idle:
                    self._idle.notify_all()

        asyncio.ensure_future(self._guard(job, run()))

    async def _remerge(self, key, reason: str) -> RemergeInfo:
        pref, alpha = key
        info = await self.soup.backend.set_preference(list(pref), alpha)
        out = RemergeInfo(info["version"], info["preference"], info["alpha"], info["coefficients"], info["seconds"],
                          info["bytes_moved"], info["launches"])
        self.soup.set_current(pref, alpha, info["version"])
        self.metrics.count_remerge(reason, out.seconds)
        self.metrics.weights_version.set(out.version)
        self.remerges.append((reason, out))
        return out

    async def _schedule(self) -> None:
        try:
            await self._rounds()
        except asyncio.CancelledError:  # stop(): it has failed every job already
            raise
        except BaseException as exc:  # a bug here must not leave requests waiting forever
            log.exception("the vLLM engine's scheduler failed")
            for job in [*self._taken, *self._waiting]:
                self._fail(job, RequestError(500, f"scheduling failed: {type(exc).__name__}", None, "server_error"))
            self._waiting = []
            raise
        finally:
            self._scheduler = None

    async def _rounds(self) -> None:
        while self._waiting:
            async with self._idle:  # in-flight requests run on the live weights: let them finish
                await self._idle.wait_for(lambda: self._running == 0)
            jobs, self._waiting = self._waiting, []
            self._taken = jobs
            self.metrics.queue_depth.set(0)
            live = self._live()
            groups: dict[Any, list] = {}
            for job in jobs:
                groups.setdefault(live if job.target is CURRENT else job.target, []).append(job)
            for key in sorted(groups, key=lambda k: k != live):  # stable: live first, then by oldest job
                group = groups[key]
                prefs = [j for j in group if j.kind == "preference"]
                comps = [j for j in group if j.kind == "completion"]
                try:
                    if key is None:  # CURRENT before any preference: the protocol refuses that; kept safe
                        raise RuntimeError("no current preference yet")
                    if prefs or key != self._live():
                        info = await self._remerge(key, "api" if prefs else "request")
                        for j in prefs:
                            j.future.set_result(info)
                except Exception as exc:  # noqa: BLE001 - a failed re-merge fails its group only
                    log.exception("re-merge to %s failed", key)
                    for j in group:
                        self._fail(j, RequestError(500, f"re-merge failed: {type(exc).__name__}: {exc}", None,
                                                   "server_error"))
                    continue
                for j in comps:
                    self._start_full(j, key)
                async with self._idle:
                    await self._idle.wait_for(lambda: self._running == 0)

    # -- one completion job (both modes)

    def _sampling_params(self, row):
        from vllm import SamplingParams

        kw = dict(max_tokens=row.max_tokens, temperature=row.temperature, top_p=row.top_p, top_k=row.top_k,
                  min_p=row.min_p, skip_special_tokens=True)
        if row.stop:  # vLLM stops there too (that needs its detokenizer); the text is cut below as the hf engine does
            kw.update(stop=list(row.stop), detokenize=True)
        else:
            kw["detokenize"] = False
        if row.temperature > 0:
            kw["seed"] = int(row.key) & (2**63 - 1)  # -1 would mean "no seed" to vLLM
        return SamplingParams(**kw)

    async def _row(self, row, key, expect_version: int | None):
        backend, prompt = self.soup.backend, {"prompt_token_ids": list(row.ids)}
        rid = f"bonesoup-{uuid.uuid4().hex}"
        if self.soup.adapters:
            stream = backend.generate(prompt, self._sampling_params(row), rid, preference=list(key[0]),
                                      alpha=key[1])
        else:
            stream = backend.generate(prompt, self._sampling_params(row), rid)
        t0, last = time.perf_counter(), None
        async for out in stream:
            last = out
        self.metrics.generation.observe(time.perf_counter() - t0)
        if expect_version is not None and last.weights_version != expect_version:
            raise RuntimeError(f"request decoded on weights version {last.weights_version}, expected {expect_version}")
        return last

    def _finish(self, row, out) -> tuple[str, str, int]:
        comp = out.outputs[0]
        text, reason, n = completion_text(self.tokenizer, self.tokenizer_lock, comp.token_ids, self.stop_ids, row.stop,
                                          comp.finish_reason or "length")
        self.metrics.count_tokens(len(row.ids), n)
        return text, reason, n

    async def _completion(self, job, key=None) -> None:
        key = self._target(job) if key is None else key
        expect = None if self.soup.adapters else self.soup.version
        outs = await asyncio.gather(*(self._row(r, key, expect) for r in job.rows))
        rows = await asyncio.to_thread(lambda: [self._finish(r, o) for r, o in zip(job.rows, outs)])
        self.metrics.batch_rows.observe(len(job.rows))
        if self.soup.adapters:
            mix = outs[0].mixture
            version, pref, alpha = mix.id, mix.preference, mix.alpha
        else:
            version, pref, alpha = expect, list(key[0]), float(key[1])
        if not job.future.done():
            job.future.set_result({"weights_version": version, "preference": pref, "alpha": alpha, "rows": rows})


def build_vllm_app(args):
    """``(app, soup, api_key)`` for ``bonesoup serve --engine vllm`` (parsed ``serve`` arguments).

    Starts the vLLM engine (seconds to a minute) and sets the initial
    preference before returning. Raises ValueError / FileNotFoundError on bad
    arguments, naming the flag.
    """
    import importlib.util
    import os

    from transformers import AutoTokenizer

    if importlib.util.find_spec("vllm") is None:
        raise ValueError("--engine vllm needs vLLM, which is not installed in this environment: make its own "
                         "environment with `bash scripts/setup-vllm-env.sh` and run bonesoup from there "
                         "(vLLM's pins conflict with the main environment's)")

    from bonesoup.merge.lora import is_adapter_dir, load_adapter
    from bonesoup.merge.methods import get_merge_method
    from bonesoup.serve.app import create_app
    from bonesoup.serve.protocol import check_target
    from bonesoup.tasks.tiny_qwen2 import make_tiny_qwen2_adapters

    for flag, value in (("--model-dir", args.model_dir), ("--device", args.device), ("--lora-rank", args.lora_rank),
                        ("--batch-greedy", args.batch_greedy), ("--batch-wait-ms", args.batch_wait_ms)):
        if value is not None:
            raise ValueError(f"{flag} is for --engine hf; --engine vllm serves the --sft model on vLLM's devices "
                             "(adapter backbones: --backbones or --adapters)")
    listed = args.backbones or args.adapters  # --adapters, as with --engine hf: adapter backbones
    if listed:
        backbones = [Path(b) for b in listed]
        for d in [*backbones, *([args.sft] if args.sft else [])]:
            if not Path(d).is_dir():
                raise FileNotFoundError(f"checkpoint directory {d} does not exist")
        if args.adapters and not all(is_adapter_dir(b) for b in backbones):
            raise ValueError(f"--adapters: {[str(b) for b in backbones if not is_adapter_dir(b)]} are not peft "
                             "LoRA adapter directories (full checkpoints go in --backbones)")
        kinds = {is_adapter_dir(b) for b in backbones}
        if len(kinds) > 1:
            raise ValueError("--backbones mixes LoRA adapter directories and full checkpoints")
        adapters, sft = kinds == {True}, args.sft
        if sft is None and adapters:
            base = load_adapter(backbones[0]).base
            sft = Path(base) if base and Path(base).is_dir() else None
        if sft is None:
            raise ValueError("--sft is required with --engine vllm: vLLM's model is the SFT checkpoint (the base of "
                             "adapter backbones)")
        beta = args.beta
        if get_merge_method(args.method).needs_beta and beta is None:
            raise ValueError(f"--beta is required for --method {args.method}")
    else:
        if args.sft is not None:
            raise ValueError("--sft needs --backbones (no --backbones: the embedded default)")
        sft, backbones = make_tiny_qwen2_adapters(Path(args.workdir) / "vllm-qwen2-lora", 2)
        adapters, beta = True, 0.7 if args.beta is None else args.beta
        log.warning("serving the embedded default on vLLM: a tiny Qwen2 and 2 LoRA backbones made in code under %s",
                    args.workdir)
    if args.max_tokens_limit < 1:
        raise ValueError(f"--max-tokens-limit must be >= 1, got {args.max_tokens_limit}")
    tokenizer = AutoTokenizer.from_pretrained(sft)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    engine_kwargs = {"dtype": args.dtype or "auto", "tensor_parallel_size": args.tensor_parallel_size}
    if args.max_model_len is not None:
        engine_kwargs["max_model_len"] = args.max_model_len
    if adapters:
        engine_kwargs["max_loras"] = args.max_loras
    soup = VLLMSoup(sft=sft, backbones=backbones, adapters=adapters, method=args.method, beta=beta)
    engine = VLLMEngine(soup, tokenizer, engine_kwargs=engine_kwargs)
    engine.start()
    try:
        pref = args.preference or [1.0 / soup.n] * soup.n
        try:
            check_target(soup, pref, args.alpha)
        except RequestError as exc:
            raise ValueError(f"--{exc.param or 'preference'}: {exc.message}") from None
        info = engine.submit(engine.preference_job(pref, args.alpha)).result()
        log.warning("initial target: preference %s alpha %s (version %d, %.1f ms, %s mode)", info.preference,
                    info.alpha, info.version, info.seconds * 1e3, soup.mode)
        api_key = args.api_key or os.environ.get("BONESOUP_API_KEY") or None
        app = create_app(soup, None, tokenizer, engine=engine, api_key=api_key, max_tokens_limit=args.max_tokens_limit,
                         model_name=args.served_model_name, default_alpha=args.alpha,
                         max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes,
                         backbones=backbones, sft=sft)
    except BaseException:
        engine.stop()
        raise
    return app, soup, api_key
