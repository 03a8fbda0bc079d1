"""The engine of ``bonesoup serve``: one worker thread owns the model, re-merges it and decodes.

Scheduling. Requests are queued. Each round the worker takes everything
queued, groups it by target weights (preference, alpha), serves the group of
the current weights first and then the other groups in order of their oldest
request, re-merging (``LiveSoup.set_preference``) before each group whose
target differs. A request is therefore generated at exactly its requested
weights, inside ``soup.reading()``, and reports that weights version; nothing
that arrives later overtakes it by more than one round.

Decoding goes through the one decode loop,
``guided_generate(model, [], [1.0], ids, mask, seed=<[B] keys>, ...,
on_invalid="stop")`` with ``ids, mask = left_pad(...)``: the fused sampler
(temperature, top-k, top-p, min-p), Philox draws keyed per row. Prompt i of a
request with ``seed: s`` and k prompts has the key ``row_seeds(s, k)[i]``,
the key ``guided_generate(seed=s)`` gives it on that request's own batch; a
request without a seed gets a random 63-bit ``s``. A row's tokens therefore
depend on its key, prompt and parameters only, never on its neighbours.

Exactness. With full-weight backbones greedy rows and seeded rows are
decoded alone by default: batching with padding changes the logits in the
last bits (5e-6 on the tiny GPT-2), which can flip a near-tie or a draw near
a boundary. Unseeded sampled rows are batched up to ``max_batch_size``;
``batch_greedy=True`` batches every row.

Adapter backbones. When ``soup`` is an :class:`~bonesoup.AdapterSoup`
(LoRA backbones on the SFT model) nothing is grouped and nothing is
re-merged: each round takes its jobs in arrival order (a ``/v1/preference``
job sets the shared default preference for the completions behind it),
gives every row the backbone coefficients of its own (preference, alpha),
and decodes all of them together, ``max_batch_size`` rows per
``guided_generate`` call inside ``soup.rows(coefficients=[B, n])``: each row
is the model merged at its own preference (to fp32 rounding). Greedy and
seeded rows are batched too unless ``batch_greedy=False``: we accept
a greedy row that differs from its merged model only at a near-tie (< 1e-4
in logit, from padding and the low-rank order of summation). Here
``weights_version`` counts changes of the shared default preference (no
weights are written); a row's text depends on its own preference only.
So that concurrent requests share a batch rather than the first running
alone, a round does not start while requests are still being validated and
tokenised (``arriving()``, entered by the app), for at most
``batch_wait_s`` (default 20 ms; 0 = start at once).

Isolation. A row the sampler cannot sample (its logits over the temperature
are not finite: ``GuidedGeneration.invalid``) fails its own request with a
422 naming the likely field; the other rows of the batch decode on.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from bonesoup.decode.batching import left_pad, resolve_stop_and_pad, row_seeds
from bonesoup.decode.guided import guided_generate
from bonesoup.merge.adapter_soup import AdapterSoup, adapter_soup_of
from bonesoup.merge.live import RemergeInfo
from bonesoup.serve.metrics import Metrics
from bonesoup.serve.protocol import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE, RequestError, bad_field

__all__ = ["CURRENT", "Engine", "completion_text"]

log = logging.getLogger(__name__)

CURRENT = object()  #: target of a request that omitted its preference: whatever is current


def completion_text(tokenizer, tokenizer_lock, tokens: Sequence[int], stop_ids, stops: Sequence[str],
                    reason: str = "length") -> tuple[str, str, int]:
    """A completion's ``(text, finish_reason, completion tokens)``, as every engine reports it.

    A final stop token is dropped (it ends the completion, it is not text); the text is then cut
    at the earliest occurrence of any of ``stops`` (OpenAI's ``stop``: the first one to appear,
    whatever its place in the list). ``reason`` is the decoder's own ("length" unless it stopped).
    """
    toks = list(tokens)
    if toks and toks[-1] in stop_ids:
        toks, reason = toks[:-1], "stop"
    with tokenizer_lock:
        text = tokenizer.decode(toks, skip_special_tokens=True)
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    if cuts:
        text, reason = text[:min(cuts)], "stop"
    return text, ("stop" if reason == "stop" else "length"), len(toks)


@dataclass
class _Row:
    """One prompt of one request."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int  # 0 = off
    min_p: float
    key: int  # Philox key, int64
    stop: list[str]
    exact: bool  # greedy or seeded: decoded alone unless batch_greedy
    job: "_Job" = field(repr=False, default=None)
    coeffs: list[float] | None = None  # adapter backbones: this row's backbone coefficients [n]
    result: tuple[str, str, int] | None = None  # text, finish_reason, completion tokens
    error: RequestError | None = None


@dataclass
class _Job:
    kind: str  # "completion" or "preference"
    target: Any  # (tuple(preference), alpha) or CURRENT
    rows: list[_Row]
    future: concurrent.futures.Future
    submitted: float = field(default_factory=time.perf_counter)
    #: adapter backbones: (weights_version, preference, alpha) the job was resolved to
    resolved: tuple | None = None


class Engine:
    """The single owner of the model: a queue, a worker thread, re-merges and ``guided_generate`` calls.

    ``submit`` is thread-safe and returns a ``concurrent.futures.Future``.
    ``step`` serves one round (everything queued at its start) in the calling
    thread; the worker thread (``start``) calls it in a loop.

    ``soup`` is a :class:`~bonesoup.LiveSoup` over ``model`` (full-weight
    backbones: grouped by preference, re-merged) or an
    :class:`~bonesoup.AdapterSoup` installed on it (LoRA backbones: one
    batch across preferences). ``batch_greedy`` None means False for a
    LiveSoup and True for an AdapterSoup.
    """

    def __init__(self, soup, model, tokenizer, *, metrics: Metrics | None = None, batch_greedy: bool | None = None,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_queue: int = DEFAULT_MAX_QUEUE,
                 autostart: bool = True, batch_wait_s: float | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.soup, self.model, self.tokenizer = soup, model, tokenizer
        self.metrics = metrics or Metrics()
        self.adapters = isinstance(soup, AdapterSoup)
        if self.adapters:
            if adapter_soup_of(model) is not soup:
                raise ValueError("soup is an AdapterSoup that is not installed on model")
            if not soup.preference:
                raise ValueError("the AdapterSoup holds raw coefficients (set_coefficients); the server needs a "
                                 "shared preference: call set_preference first")
            # The shared default, changed only by this engine (read lock-free: one tuple assignment).
            self._shared = (soup.version, [float(x) for x in soup.preference], float(soup.alpha),
                            [float(x) for x in soup.coefficients(soup.preference, soup.alpha)])
        self.batch_greedy = self.adapters if batch_greedy is None else bool(batch_greedy)
        # Grouped re-merges gain nothing from waiting; one mixed batch does (see the module docstring).
        self.batch_wait_s = (0.02 if self.adapters else 0.0) if batch_wait_s is None else float(batch_wait_s)
        if not self.batch_wait_s >= 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {batch_wait_s!r}")
        self._arriving = 0
        self.max_batch_size = int(max_batch_size)
        self.max_queue = int(max_queue)
        self.autostart = bool(autostart)  # False: nothing runs until step() is called (tests)
        self.tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to share between threads
        self.remerges: deque = deque(maxlen=100_000)  # (reason, RemergeInfo)
        self._queue: list[_Job] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        # The stop tokens guided_generate uses by default for this model, so a served row stops
        # exactly where guided_generate(model, ...) stops.
        self.stop_ids, pad = resolve_stop_and_pad(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else pad
        cfg = model.config
        self.context_length = next((int(v) for v in (getattr(cfg, a, None) for a in (
            "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")) if v), None)

    # -- state

    def current(self):
        """The weights the model holds: (tuple(preference), alpha), or None before the first re-merge.

        Adapter backbones: the shared default preference (rows without their own).
        """
        if self.adapters:
            _, pref, alpha, _ = self._shared
            return tuple(pref), alpha
        soup = self.soup
        return None if soup.preference is None else (tuple(float(x) for x in soup.preference), float(soup.alpha))

    def adapter_info(self) -> list[dict]:
        """``[{"path", "rank"}]`` of the adapter backbones (empty for full weights), for ``GET /v1/models``."""
        if not self.adapters:
            return []
        return [{"path": None if a.path is None else str(a.path), "rank": a.rank} for a in self.soup.adapters]

    def snapshot(self) -> tuple[int, list[float] | None, float]:
        """One consistent ``(weights_version, preference, alpha)`` (waits out a LiveSoup re-merge)."""
        if self.adapters:
            version, pref, alpha, _ = self._shared
            return version, list(pref), alpha
        with self.soup.reading() as version:
            return version, self.soup.preference, self.soup.alpha

    @property
    def queue_depth(self) -> int:
        with self._cv:
            return len(self._queue)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- tokenizer (called from a thread pool, never on the event loop)

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt (an empty prompt becomes the BOS token); 400 ``prompt`` on failure."""
        try:
            with self.tokenizer_lock:
                ids = self.tokenizer(list(prompts))["input_ids"]
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - pyo3 panics of the Rust tokenizers derive from BaseException
            raise bad_field("prompt", f"the tokenizer cannot encode it ({type(exc).__name__})") from None
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return [list(x) if len(x) else [bos] for x in ids]

    # -- queue

    @staticmethod
    def make_job(prompt_ids: Sequence[Sequence[int]], target=None, *, max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int | None = None,
                 stop: Sequence[str] = ()) -> _Job:
        """A completion job (already validated): one row per prompt.

        ``target`` is ``(tuple(preference), alpha)``, or None for "the current
        weights". Row i's Philox key is ``row_seeds(seed, len(prompt_ids))[i]``
        (``seed`` None: a random 63-bit seed); ``top_k`` -1 means off, like 0.
        """
        job = _Job("completion", CURRENT if target is None else target, [], concurrent.futures.Future())
        keys = row_seeds(secrets.randbits(63) if seed is None else int(seed), len(prompt_ids)).tolist()
        exact = temperature == 0 or seed is not None
        for ids, key in zip(prompt_ids, keys):
            job.rows.append(_Row(list(ids), int(max_tokens), float(temperature), float(top_p), max(0, int(top_k)),
                                 float(min_p), key, list(stop), exact, job=job))
        return job

    @staticmethod
    def preference_job(preference: Sequence[float], alpha: float = 0.0) -> _Job:
        """A "re-merge now" job; its future's result is the RemergeInfo."""
        return _Job("preference", (tuple(float(x) for x in preference), float(alpha)), [],
                    concurrent.futures.Future())

    def submit(self, job: _Job) -> concurrent.futures.Future:
        with self._cv:
            if len(self._queue) >= self.max_queue:
                raise RequestError(503, f"the server is busy ({len(self._queue)} requests queued); retry later",
                                   None, "server_busy")
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cv.notify()
        if self.autostart:
            self.start()
        return job.future

    @contextlib.contextmanager
    def arriving(self):
        """Mark a request as on its way (parsing, tokenising) until its job is submitted or refused."""
        with self._cv:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cv:
                self._arriving -= 1
                self._cv.notify_all()

    def start(self) -> None:
        with self._cv:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="bonesoup-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._cv:  # fail whatever is left
            left, self._queue = self._queue, []
        for job in left:
            if not job.future.done():
                job.future.set_exception(RequestError(503, "the server is shutting down", None, "server_shutdown"))

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                # Requests in the door join this round (bounded: a slow one cannot hold the others up).
                deadline = time.monotonic() + self.batch_wait_s
                while self._arriving and not self._stop and (left := deadline - time.monotonic()) > 0:
                    self._cv.wait(left)
                if self._stop:
                    return
            try:
                self.step()
            except Exception:  # pragma: no cover - step fails jobs itself; this is a last resort
                log.exception("engine round failed")

    # -- one round

    def step(self) -> int:
        """Serve everything queued now, grouped by target weights. Returns the number of jobs handled."""
        with self._cv:
            jobs, self._queue = self._queue, []
            self.metrics.queue_depth.set(0)
        if not jobs:
            return 0
        if self.adapters:
            self._step_adapters(jobs)
            return len(jobs)
        current = self.current()
        groups: dict[Any, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(current if job.target is CURRENT else job.target, []).append(job)
        for key in sorted(groups, key=lambda k: k != current):  # stable: current first, then by oldest job
            try:
                self._serve_group(key, groups[key])
            except Exception as exc:  # a failed re-merge or a bug: fail this group, keep serving
                log.exception("serving a group of %d requests failed", len(groups[key]))
                for job in groups[key]:
                    if not job.future.done():
                        job.future.set_exception(exc)
        return len(jobs)

    def _step_adapters(self, jobs: list[_Job]) -> None:
        """Adapter backbones: jobs in arrival order, every completion row at its own preference, batched."""
        comps = []
        for job in jobs:
            if job.kind == "preference":
                try:
                    job.future.set_result(self._set_shared(*job.target))
                except Exception as exc:  # validated by the protocol: not expected
                    log.exception("setting the shared preference failed")
                    job.future.set_exception(exc)
                continue
            version, pref, alpha, shared = self._shared
            try:
                if job.target is CURRENT:
                    coeffs = shared
                else:
                    pref, alpha = list(job.target[0]), float(job.target[1])
                    coeffs = [float(x) for x in self.soup.coefficients(pref, alpha)]
            except Exception as exc:
                job.future.set_exception(exc)
                continue
            job.resolved = (version, list(pref), alpha)
            for r in job.rows:
                r.coeffs = coeffs
            comps.append(job)
        if comps:
            self._generate_jobs(comps, None, None)

    def _set_shared(self, pref, alpha) -> RemergeInfo:
        """Adapter backbones: the shared default preference; coefficients only, no weight is written."""
        t0 = time.perf_counter()
        coeffs = self.soup.set_preference(list(pref), alpha=alpha)
        seconds = time.perf_counter() - t0
        version = self.soup.version
        self._shared = (version, [float(x) for x in pref], float(alpha), [float(x) for x in coeffs])
        self.metrics.weights_version.set(version)
        return RemergeInfo(version, [float(x) for x in pref], float(alpha), [float(x) for x in coeffs], seconds, 0, 0)

    def _remerge(self, key, reason: str):
        pref, alpha = key
        info = self.soup.set_preference(list(pref), alpha=alpha)
        self.metrics.count_remerge(reason, info.seconds)
        self.metrics.weights_version.set(info.version)
        self.remerges.append((reason, info))
        log.debug("re-merged to preference %s alpha %s: version %d in %.2f ms (%s)", list(pref), alpha,
                  info.version, info.seconds * 1e3, reason)
        return info

    def _serve_group(self, key, jobs: list[_Job]) -> None:
        prefs = [j for j in jobs if j.kind == "preference"]
        comps = [j for j in jobs if j.kind == "completion"]
        if prefs:  # "re-merge now": one re-merge answers every /v1/preference call of the round at this target
            info = self._remerge(key, "api")
            for j in prefs:
                j.future.set_result(info)
        for _attempt in range(3):
            if not comps:
                return
            if key is not None and key != self.current():
                self._remerge(key, "request")
            with self.soup.reading() as version:
                if key != self.current():  # someone outside the engine re-merged in between: again
                    continue
                self._generate_jobs(comps, version, key)
                return
        raise RuntimeError("the weights kept changing under the engine (another writer calls set_preference)")

    def _units(self, rows: list[_Row]) -> list[list[_Row]]:
        alone = [[r] for r in rows if r.exact and not self.batch_greedy]
        rest = [r for r in rows if not r.exact or self.batch_greedy]
        rest.sort(key=lambda r: (r.max_tokens, len(r.ids)))  # stable; limits padding and wasted steps
        return alone + [rest[i: i + self.max_batch_size] for i in range(0, len(rest), self.max_batch_size)]

    def _generate_jobs(self, jobs: list[_Job], version: int, key) -> None:
        rows = [r for j in jobs for r in j.rows]
        for unit in self._units(rows):
            try:
                self.generate_rows(unit)
            except Exception as exc:
                # Not expected (the protocol validated every row). Decode the rows alone, so that one
                # row's failure stays its own request's.
                log.exception("guided_generate failed for %d prompts", len(unit))
                for r in unit:
                    try:
                        if len(unit) > 1:
                            self.generate_rows([r])
                            continue
                    except Exception as alone_exc:  # noqa: BLE001
                        exc = alone_exc
                    r.error = RequestError(500, f"generation failed: {type(exc).__name__}: {exc}", None,
                                           "server_error")
        pref, alpha = (list(key[0]), key[1]) if key is not None else (None, float(self.soup.alpha))
        for job in jobs:
            error = next((r.error for r in job.rows if r.error is not None), None)
            if error is not None:
                job.future.set_exception(error)
                continue
            v, p, a = job.resolved if job.resolved is not None else (version, pref, alpha)
            job.future.set_result({"weights_version": v, "preference": p, "alpha": a,
                                   "rows": [r.result for r in job.rows]})

    def generate_rows(self, rows: Sequence[_Row]) -> None:
        """One ``guided_generate`` call over ``rows`` (left padded); fills each row's ``result`` or ``error``.

        A LiveSoup's caller holds ``soup.reading()``; with adapter backbones
        each row decodes at its own ``coeffs`` (``soup.rows``: per-row
        coefficients for every forward of the call, alpha folded in).
        """
        ids, mask = left_pad([r.ids for r in rows], self.pad_id)
        per_row = self.soup.rows(coefficients=[r.coeffs for r in rows]) if self.adapters \
            else contextlib.nullcontext()
        t0 = time.perf_counter()
        with per_row:
            out = guided_generate(
                self.model, [], [1.0], ids, mask, max_new_tokens=max(r.max_tokens for r in rows),
                temperature=[r.temperature for r in rows], top_k=[r.top_k for r in rows],
                top_p=[r.top_p for r in rows], min_p=[r.min_p for r in rows],
                seed=torch.tensor([r.key for r in rows], dtype=torch.int64),
                stop_token_ids=self.stop_ids, pad_token_id=self.pad_id, on_invalid="stop")
        self.metrics.generation.observe(time.perf_counter() - t0)
        self.metrics.batch_rows.observe(len(rows))
        new, lengths, invalid = out.new_tokens.tolist(), out.lengths.tolist(), out.invalid.tolist()
        for r, toks, n, bad in zip(rows, new, lengths, invalid):
            if bad and n < r.max_tokens:  # within this row's own max_tokens: its request fails
                r.error = self._invalid_row_error(r, n)
                continue
            r.result = completion_text(self.tokenizer, self.tokenizer_lock, toks[: min(n, r.max_tokens)],
                                       self.stop_ids, r.stop)
            self.metrics.count_tokens(len(r.ids), r.result[2])

    def _invalid_row_error(self, row: _Row, step: int) -> RequestError:
        # Finite logits z only overflow z / T when |z| > float32 max * T: plausible for T < 1e-30
        # (|z| > 3e8 is not), so a larger temperature is blamed only there; otherwise the weights are.
        if 0 < row.temperature < 1e-30:
            return RequestError(422, f"temperature: {row.temperature!r} is too small to sample with: at step "
                                f"{step} the logits divided by it are not finite, so no token can be drawn; "
                                "send 0 for greedy decoding or a larger temperature", "temperature")
        alpha = float(row.job.resolved[2] if row.job is not None and row.job.resolved else self.soup.alpha)
        param = "alpha" if alpha else "preference"
        return RequestError(422, f"{param}: the model's logits at these weights are not finite at step {step} "
                            "(NaN or inf), so no token can be drawn", param)
