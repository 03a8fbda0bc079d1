"""``bonesoup serve``: OpenAI-compatible completions over a live Bone Soup.

    bonesoup serve                                   # embedded default: tiny checkpoints made in code
    bonesoup serve --backbones B1 B2 --sft S --beta 0.7 [--model-dir D] [--port 8000] [--api-key KEY]

Endpoints (DESIGN.md, "Serving API"):

- ``POST /v1/completions``: ``prompt`` (string or list of strings),
  ``max_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``top_k``,
  ``seed``, ``stop``, plus ``preference`` (n floats on the simplex; omitted =
  the current one) and ``alpha``. The response is the usual
  ``choices[].text`` / ``usage`` / ``id`` / ``object`` / ``model``, plus
  ``weights_version`` and the ``preference`` / ``alpha`` it was generated with.
- ``POST /v1/preference`` (``preference``, ``alpha``): re-merge now; returns
  the new ``weights_version`` and ``remerge_seconds``.
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

Scheduling. One worker thread owns the model: it generates and it re-merges.
Requests are queued. Each round the worker takes everything queued, groups it
by target weights (preference, alpha), serves the group of the current
weights first and then the other groups in order of their oldest request,
re-merging (``LiveSoup.set_preference``) before each group whose target
differs. A request is therefore always generated at exactly its requested
weights, inside ``soup.reading()``, and reports that weights version; and
nothing that arrives later overtakes it by more than one round.

Determinism. A greedy (``temperature: 0``) prompt, and a prompt sampled with
an explicit ``seed``, is generated in a ``generate`` call of its own, so its
text does not depend on what else is queued: batching with padding changes
the logits in the last bits (measured: 5e-6 on the tiny GPT-2), which can
flip a near-tie. Sampled prompts without a seed are batched (left padding,
attention mask), up to ``max_batch_size`` rows per call; ``batch_greedy=True``
(``--batch-greedy``) batches every prompt for throughput, trading away that
bit-exactness. Sampling uses a torch.Generator per prompt (seeded by
``seed`` and the prompt's index), so a row's draws do not depend on its
neighbours in the batch.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import concurrent.futures
import contextlib
import hmac
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

try:  # at module level: FastAPI resolves the handlers' (postponed) annotations in this module's globals
    from starlette.requests import Request
except ImportError:  # pragma: no cover - `bonesoup serve --help` works without the server packages
    Request = None

__all__ = [
    "DEFAULT_MAX_TOKENS_LIMIT",
    "Engine",
    "Metrics",
    "RequestError",
    "ServerThread",
    "add_serve_parser",
    "create_app",
    "load_live_soup",
    "main",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS_LIMIT = 256
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_QUEUE = 1024
MAX_PROMPTS_PER_REQUEST = 64
MAX_BODY_BYTES = 4 * 2**20
SERVE_DEMO_DIR = Path("out") / "serve-demo"


# ----------------------------------------------------------------------------- errors


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style JSON error."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


def _bad(param: str, message: str, status: int = 400) -> RequestError:
    return RequestError(status, f"{param}: {message}" if not message.startswith(param) else message, param)


# ----------------------------------------------------------------------------- metrics


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt(x: float) -> str:
    x = float(x)
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return str(int(x)) if x.is_integer() and abs(x) < 2**53 else repr(x)


class _Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float]):
        self.name, self.help, self.buckets = name, help, list(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, x: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, x)] += 1
        self.sum += x
        self.count += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for le, c in zip([*self.buckets, math.inf], self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{_fmt(le)}"}} {acc}')
        out += [f"{self.name}_sum {self.sum!r}", f"{self.name}_count {self.count}"]
        return out


_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_REMERGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Counters and histograms, rendered in the Prometheus text format (0.0.4)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.remerge = _Histogram("bonesoup_remerge_seconds", "Wall time of LiveSoup.set_preference re-merges.",
                                  _REMERGE_BUCKETS)
        self.generation = _Histogram("bonesoup_generation_seconds", "Wall time of one model.generate call.",
                                     _LATENCY_BUCKETS)
        self.request = _Histogram("bonesoup_completion_request_seconds",
                                  "End-to-end latency of /v1/completions requests (queueing included).",
                                  _LATENCY_BUCKETS)
        self.batch_rows = _Histogram("bonesoup_generation_batch_rows", "Prompts per model.generate call.",
                                     _ROWS_BUCKETS)
        self.requests: dict[tuple[str, str], int] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.remerges_by_reason: dict[str, int] = {}

    def observe(self, hist: str, value: float) -> None:
        with self._lock:
            getattr(self, hist).observe(value)

    def count_request(self, endpoint: str, code: int) -> None:
        key = (endpoint, str(code))
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1
            if code >= 400:
                self.errors[key] = self.errors.get(key, 0) + 1

    def count_remerge(self, reason: str, seconds: float) -> None:
        with self._lock:
            self.remerge.observe(seconds)
            self.remerges_by_reason[reason] = self.remerges_by_reason.get(reason, 0) + 1

    def count_tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def render(self, gauges: dict[str, tuple[str, float]] | None = None) -> str:
        with self._lock:
            lines: list[str] = []

            def counter(name, help, items, labels):
                lines.extend([f"# HELP {name} {help}", f"# TYPE {name} counter"])
                for key, v in sorted(items.items()):
                    lab = ",".join(f'{k}="{_esc(x)}"' for k, x in zip(labels, key))
                    lines.append(f"{name}{{{lab}}} {v}")

            counter("bonesoup_requests_total", "HTTP requests by endpoint and status code.", self.requests,
                    ("endpoint", "code"))
            counter("bonesoup_request_errors_total", "HTTP requests answered with a 4xx or 5xx status.",
                    self.errors, ("endpoint", "code"))
            counter("bonesoup_remerges_total", "Re-merges by reason (a request's preference, or /v1/preference).",
                    {(k,): v for k, v in self.remerges_by_reason.items()}, ("reason",))
            for name, help, v in (
                ("bonesoup_prompt_tokens_total", "Prompt tokens processed.", self.prompt_tokens),
                ("bonesoup_completion_tokens_total", "Completion tokens generated.", self.completion_tokens),
            ):
                lines += [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {v}"]
            for h in (self.remerge, self.generation, self.request, self.batch_rows):
                lines += h.render()
            for name, (help, v) in (gauges or {}).items():
                lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {_fmt(v)}"]
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the engine

_CURRENT = object()  # target of a request that omitted its preference: whatever is current


@dataclass
class _Row:
    """One prompt of one request."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None  # generator seed (None for greedy rows)
    stop: list[str]
    exact: bool  # greedy or seeded: generated alone unless batch_greedy
    job: "_Job" = field(repr=False, default=None)
    index: int = 0
    result: tuple[str, str, int] | None = None  # text, finish_reason, completion tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class _Job:
    kind: str  # "completion" or "preference"
    target: Any  # (tuple(preference), alpha) or _CURRENT
    rows: list[_Row]
    future: concurrent.futures.Future
    submitted: float = field(default_factory=time.perf_counter)
    error: BaseException | None = None


class _RowSampler:
    """Logits processor that draws each sampled row's token from its own torch.Generator.

    Greedy rows pass through (``generate`` runs with ``do_sample=False`` and
    takes the argmax); a sampled row's scores become -inf except the drawn
    token. Filtering follows DESIGN.md: temperature, top-k, top-p.
    """

    def __init__(self, rows: Sequence[_Row], device: torch.device):
        self.rows = list(rows)
        self.gens = [None if r.greedy else torch.Generator(device=device).manual_seed(r.seed) for r in rows]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores.clone()
        for b, (r, gen) in enumerate(zip(self.rows, self.gens)):
            if gen is None:
                continue
            z = scores[b].float() / r.temperature
            if 0 < r.top_k < z.numel():
                kth = torch.topk(z, r.top_k).values[-1]
                z = z.masked_fill(z < kth, -math.inf)
            if r.top_p < 1.0:
                p_sorted, idx = torch.softmax(z, -1).sort(descending=True)
                before = p_sorted.cumsum(-1) - p_sorted  # mass of the strictly more likely tokens
                drop = before >= r.top_p
                drop[0] = False
                z = z.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), -math.inf)
            tok = torch.multinomial(torch.softmax(z, -1), 1, generator=gen)
            out[b].fill_(-math.inf)
            out[b, tok] = 0.0
        return out


class Engine:
    """The single owner of the model: a queue, a worker thread, re-merges and batched ``generate``.

    ``submit`` is thread-safe and returns a ``concurrent.futures.Future``.
    ``step`` processes one round (everything queued at its start) in the
    calling thread; the worker thread (``start``) calls it in a loop.
    """

    def __init__(self, soup, model, tokenizer, *, metrics: Metrics | None = None, batch_greedy: bool = False,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_queue: int = DEFAULT_MAX_QUEUE,
                 autostart: bool = True):
        from transformers import GenerationConfig

        self.soup, self.model, self.tokenizer = soup, model, tokenizer
        self.metrics = metrics or Metrics()
        self.batch_greedy = bool(batch_greedy)
        self.max_batch_size = int(max_batch_size)
        self.max_queue = int(max_queue)
        self.autostart = bool(autostart)  # False: nothing runs until step() is called (tests)
        self.tokenizer_lock = threading.Lock()
        self.remerges: deque = deque(maxlen=100_000)  # (reason, RemergeInfo)
        self._queue: list[_Job] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.device = next(model.parameters()).device
        gc = getattr(model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self._gen_kwargs = dict(  # a complete config per call: no sampling defaults from the checkpoint
            do_sample=False, num_beams=1, pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) if len(self.eos_ids) > 1 else next(iter(self.eos_ids), None),
            bos_token_id=getattr(gc, "bos_token_id", None),
        )
        self._GenerationConfig = GenerationConfig
        cfg = model.config
        self.context_length = next((int(v) for v in (getattr(cfg, a, None) for a in (
            "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")) if v), None)

    # -- state

    def current(self):
        """The weights the model holds: (tuple(preference), alpha), or None before the first re-merge."""
        soup = self.soup
        return None if soup.preference is None else (tuple(float(x) for x in soup.preference), float(soup.alpha))

    @property
    def queue_depth(self) -> int:
        with self._cv:
            return len(self._queue)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- queue

    @staticmethod
    def make_job(prompt_ids: Sequence[Sequence[int]], target=None, *, max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: Sequence[str] = ()) -> _Job:
        """A completion job (already validated): one row per prompt.

        ``target`` is ``(tuple(preference), alpha)``, or None for "the
        current weights". Row i of a sampled job draws from a generator
        seeded by (``seed``, i); without ``seed``, by a random seed.
        """
        job = _Job("completion", _CURRENT if target is None else target, [], concurrent.futures.Future())
        base = secrets.randbits(63) if seed is None else seed % 2**63
        for i, ids in enumerate(prompt_ids):
            row_seed = None if temperature == 0 else (base * 1_000_003 + i) % 2**63
            job.rows.append(_Row(list(ids), int(max_tokens), float(temperature), float(top_p), max(0, int(top_k)),
                                 row_seed, list(stop), exact=temperature == 0 or seed is not None, job=job, index=i))
        return job

    def preference_job(self, preference: Sequence[float], alpha: float = 0.0) -> _Job:
        """A "re-merge now" job; its future's result is the RemergeInfo."""
        return _Job("preference", (tuple(float(x) for x in preference), float(alpha)), [],
                    concurrent.futures.Future())

    def submit(self, job: _Job) -> concurrent.futures.Future:
        with self._cv:
            if len(self._queue) >= self.max_queue:
                raise RequestError(503, f"the server is busy ({len(self._queue)} requests queued); retry later",
                                   None, "server_busy")
            self._queue.append(job)
            self._cv.notify()
        if self.autostart:
            self.start()
        return job.future

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
        if not jobs:
            return 0
        current = self.current()
        groups: dict[Any, list[_Job]] = {}
        for job in jobs:
            key = current if job.target is _CURRENT else job.target
            groups.setdefault(key, []).append(job)
        order = sorted(groups, key=lambda k: k != current)  # stable: current first, then by oldest job
        for key in order:
            try:
                self._serve_group(key, groups[key])
            except Exception as exc:  # a failed re-merge or a bug: fail this group, keep serving
                log.exception("serving a group of %d requests failed", len(groups[key]))
                for job in groups[key]:
                    if not job.future.done():
                        job.future.set_exception(exc)
        return len(jobs)

    def _remerge(self, key, reason: str):
        pref, alpha = key
        info = self.soup.set_preference(list(pref), alpha=alpha)
        self.metrics.count_remerge(reason, info.seconds)
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
                log.exception("generate failed for %d prompts", len(unit))
                for r in unit:
                    r.job.error = exc
        pref, alpha = (list(key[0]), key[1]) if key is not None else (None, float(self.soup.alpha))
        for job in jobs:
            if job.error is not None:
                job.future.set_exception(job.error)
            else:
                job.future.set_result({"weights_version": version, "preference": pref, "alpha": alpha,
                                       "rows": [r.result for r in job.rows]})

    @torch.no_grad()
    def generate_rows(self, rows: Sequence[_Row]) -> None:
        """One ``model.generate`` over ``rows`` (left padded); fills each row's ``result``.

        The caller holds ``soup.reading()``.
        """
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r.ids):] = torch.tensor(r.ids, dtype=torch.long)
            mask[b, width - len(r.ids):] = 1
        max_new = max(r.max_tokens for r in rows)
        kwargs = {}
        if any(not r.greedy for r in rows):
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([_RowSampler(rows, self.device)])
        t0 = time.perf_counter()
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  generation_config=self._GenerationConfig(**self._gen_kwargs, max_new_tokens=max_new),
                                  **kwargs)
        new = out[:, width:].tolist()
        seconds = time.perf_counter() - t0
        self.metrics.observe("generation", seconds)
        self.metrics.observe("batch_rows", len(rows))
        for r, toks in zip(rows, new):
            toks = toks[: r.max_tokens]
            reason = "length"
            for i, t in enumerate(toks):
                if t in self.eos_ids:
                    toks, reason = toks[:i], "stop"
                    break
            with self.tokenizer_lock:
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
            for s in r.stop:
                cut = text.find(s)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
            r.result = (text, reason, len(toks))
            self.metrics.count_tokens(len(r.ids), len(toks))


# ----------------------------------------------------------------------------- request parsing


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body: dict, name: str, default, *, lo=None, hi=None, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise _bad(name, f"must be a number, got {json.dumps(v)}")
    v = float(v)
    if not math.isfinite(v):
        raise _bad(name, f"must be finite, got {v!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise _bad(name, f"must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and v > hi:
        raise _bad(name, f"must be <= {hi}, got {v!r}")
    return v


def _integer(body: dict, name: str, default, *, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise _bad(name, f"must be an integer, got {json.dumps(v)}")
    if lo is not None and v < lo:
        raise _bad(name, f"must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise _bad(name, f"must be <= {hi}, got {v}")
    return v


def _parse_preference(body: dict, soup, *, required: bool):
    from bonesoup.merge.coefficients import validate_preference

    v = body.get("preference")
    if v is None:
        if required:
            raise _bad("preference", f"is required: a list of {soup.n} non-negative numbers summing to 1")
        return None
    if not isinstance(v, list) or not all(_is_number(x) for x in v):
        raise _bad("preference", f"must be a list of {soup.n} numbers, got {json.dumps(v)}")
    try:
        validate_preference(v, soup.n)
    except (TypeError, ValueError) as exc:
        raise _bad("preference", str(exc)) from None
    return tuple(float(x) for x in v)


def _check_target(soup, pref, alpha) -> None:
    try:
        soup.coefficients(list(pref), alpha)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        raise _bad("alpha" if "alpha" in msg or "sft" in msg else "preference", msg) from None


_IGNORED_IF_DEFAULT = {  # OpenAI fields accepted only at their default value
    "n": (1,), "best_of": (1,), "stream": (False,), "echo": (False,), "logprobs": (0,),
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "suffix": ("",), "logit_bias": ({},),
}
_COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                      "preference", "alpha", "user", *_IGNORED_IF_DEFAULT}


# ----------------------------------------------------------------------------- the app


def create_app(soup, model, tokenizer, *, api_key: str | None = None,
               max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, model_name: str = "bonesoup",
               default_alpha: float = 0.0, batch_greedy: bool = False,
               max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_queue: int = DEFAULT_MAX_QUEUE):
    """The FastAPI app serving ``model`` (whose weights ``soup`` re-merges) with ``tokenizer``.

    Parameters
    ----------
    soup : bonesoup.LiveSoup
        Built over ``model``. The app's engine is the only writer it expects;
        another writer is tolerated (the engine re-checks the weights inside
        ``soup.reading()`` and re-merges again if needed).
    api_key : str, optional
        When set, every endpoint but ``/health`` requires
        ``Authorization: Bearer <api_key>`` (401 otherwise). The command line
        also reads it from ``BONESOUP_API_KEY``; this function does not.
    max_tokens_limit : int
        Largest ``max_tokens`` accepted (400 naming ``max_tokens`` above it).
    default_alpha : float
        Extrapolation of a request that gives a ``preference`` but no ``alpha``.
    batch_greedy : bool
        Batch greedy and seeded prompts too (more throughput; a prompt's text
        may then depend, in near-ties, on the prompts it was batched with).

    The engine's worker thread starts with the app (lifespan) or at the first
    request, and stops at shutdown. ``app.state.engine`` and
    ``app.state.metrics`` are exposed for tests and benchmarks.
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if max_tokens_limit < 1:
        raise ValueError(f"max_tokens_limit must be >= 1, got {max_tokens_limit}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    metrics = Metrics()
    engine = Engine(soup, model, tokenizer, metrics=metrics, batch_greedy=batch_greedy,
                    max_batch_size=max_batch_size, max_queue=max_queue)
    created = int(time.time())
    expected = api_key.encode() if api_key else None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="bonesoup", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.soup = engine, metrics, soup
    known = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/preference"}

    def error(exc: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        path = request.url.path
        endpoint = path if path in known else "other"
        if expected is not None and path != "/health":
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
                metrics.count_request(endpoint, 401)
                return error(RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                          None, "authentication_error"))
        response = await call_next(request)
        metrics.count_request(endpoint, response.status_code)
        return response

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return error(RequestError(exc.status_code, str(exc.detail), None,
                                  "not_found" if exc.status_code == 404 else "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _server_error(request, exc):  # pragma: no cover - bugs only
        log.exception("unhandled error")
        return error(RequestError(500, f"internal error: {type(exc).__name__}: {exc}", None, "server_error"))

    async def read_json(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError(413, f"body: request body over {MAX_BODY_BYTES} bytes", "body")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad("body", f"malformed JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _bad("body", f"must be a JSON object, got {type(body).__name__}")
        return body

    def encode(prompt: str) -> list[int]:
        with engine.tokenizer_lock:
            ids = tokenizer(prompt)["input_ids"]
        if not ids:
            bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            ids = [bos]
        return list(ids)

    async def wait(fut: concurrent.futures.Future):
        try:
            return await asyncio.wrap_future(fut)
        except RequestError:
            raise
        except Exception as exc:
            raise RequestError(500, f"generation failed: {type(exc).__name__}: {exc}", None, "server_error") from exc

    @app.get("/health")
    async def health():
        if not engine.alive:
            engine.start()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "bonesoup",
            "n_objectives": soup.n, "method": soup.method, "beta": soup.beta,
            "weights_version": soup.version, "preference": soup.preference, "alpha": soup.alpha,
            "max_tokens_limit": max_tokens_limit, "context_length": engine.context_length,
        }]}

    @app.get("/metrics")
    async def metrics_endpoint():
        gauges = {
            "bonesoup_weights_version": ("Version of the live weights (re-merges so far).", soup.version),
            "bonesoup_queue_depth": ("Requests waiting for the engine.", engine.queue_depth),
        }
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/preference")
    async def set_preference(request: Request):
        body = await read_json(request)
        unknown = sorted(set(body) - {"preference", "alpha"})
        if unknown:
            raise _bad(unknown[0], "unrecognized field (this endpoint takes preference and alpha)")
        pref = _parse_preference(body, soup, required=True)
        alpha = _number(body, "alpha", float(default_alpha))
        _check_target(soup, pref, alpha)
        info = await wait(engine.submit(engine.preference_job(pref, alpha)))
        return {"object": "preference", "weights_version": info.version, "preference": info.preference,
                "alpha": info.alpha, "coefficients": info.coefficients, "remerge_seconds": info.seconds,
                "bytes_moved": info.bytes_moved}

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        body = await read_json(request)
        unknown = sorted(set(body) - _COMPLETION_FIELDS)
        if unknown:
            raise _bad(unknown[0], "unrecognized field")
        for name, allowed in _IGNORED_IF_DEFAULT.items():
            if body.get(name) is not None and body[name] not in allowed:
                raise _bad(name, f"only {json.dumps(allowed[0])} is supported, got {json.dumps(body[name])}")
        if body.get("model") is not None and body["model"] != model_name:
            raise RequestError(404, f"model: {json.dumps(body['model'])} is not served here; this server "
                               f"serves {json.dumps(model_name)}", "model", "model_not_found")
        if body.get("user") is not None and not isinstance(body["user"], str):
            raise _bad("user", "must be a string")
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        elif prompt is None:
            raise _bad("prompt", "is required (a string or a list of strings)")
        else:
            raise _bad("prompt", f"must be a string or a non-empty list of strings, got {json.dumps(prompt)[:80]}")
        if len(prompts) > MAX_PROMPTS_PER_REQUEST:
            raise _bad("prompt", f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(prompts)}")
        max_tokens = _integer(body, "max_tokens", min(16, max_tokens_limit), lo=1)
        if max_tokens > max_tokens_limit:
            raise _bad("max_tokens", f"must be <= {max_tokens_limit} (this server's --max-tokens-limit), "
                       f"got {max_tokens}")
        temperature = _number(body, "temperature", 1.0, lo=0.0)
        top_p = _number(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True)
        top_k = _integer(body, "top_k", 0, lo=-1)
        seed = _integer(body, "seed", None, lo=-(2**63), hi=2**64 - 1)
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
            raise _bad("stop", f"must be a non-empty string or a list of at most 4, got {json.dumps(body['stop'])}")
        pref = _parse_preference(body, soup, required=False)
        alpha = _number(body, "alpha", None)
        if pref is None:
            if alpha is not None and soup.preference is None:
                raise _bad("preference", "is required with alpha until the server has a preference")
            target = _CURRENT if alpha is None else (tuple(soup.preference), alpha)
        else:
            target = (pref, float(default_alpha) if alpha is None else alpha)
        if target is not _CURRENT:
            _check_target(soup, *target)
        ids = [encode(p) for p in prompts]
        ctx = engine.context_length
        if ctx is not None:
            for p_ids in ids:
                if len(p_ids) + max_tokens > ctx:
                    raise _bad("prompt" if len(p_ids) >= ctx else "max_tokens",
                               f"prompt ({len(p_ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                               f"context length {ctx}")
        job = engine.make_job(ids, target, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, seed=seed, stop=stop)
        res = await wait(engine.submit(job))
        choices, completion_tokens = [], 0
        for i, (text, reason, n_tok) in enumerate(res["rows"]):
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
            completion_tokens += n_tok
        prompt_tokens = sum(len(x) for x in ids)
        metrics.observe("request", time.perf_counter() - t0)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "weights_version": res["weights_version"], "preference": res["preference"], "alpha": res["alpha"],
        }

    return app


# ----------------------------------------------------------------------------- running it


class ServerThread:
    """Run an ASGI app with uvicorn on ``host`` in a background thread (port 0: an ephemeral port).

    >>> with ServerThread(app) as srv:          # doctest: +SKIP
    ...     urllib.request.urlopen(srv.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="bonesoup-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def load_live_soup(backbones: Sequence, *, beta: float | None, sft=None, model_dir=None, method: str = "bone",
                   device: str | None = None, dtype: str | None = None):
    """Load the live model (``model_dir``, default the first backbone) and build a LiveSoup over it.

    Returns ``(soup, model, tokenizer)``; the tokenizer is left-padding, with
    a pad token (the EOS token when the checkpoint has none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bonesoup.merge.checkpoint import parse_dtype
    from bonesoup.merge.live import LiveSoup

    model_dir = Path(model_dir if model_dir is not None else backbones[0])
    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = parse_dtype(dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device).eval()
    tok_dir = next((d for d in (model_dir, *backbones) if isinstance(d, (str, Path))
                    and any((Path(d) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))), None)
    if tok_dir is None:
        raise FileNotFoundError(f"no tokenizer files in {model_dir} or the backbone directories")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    soup = LiveSoup(model, list(backbones), beta=beta, sft=sft, method=method)
    return soup, model, tokenizer


def build_embedded_default(workdir: str | os.PathLike = SERVE_DEMO_DIR, *, n: int = 2, seed: int = 0,
                           delta: float = 0.3):
    """Tiny GPT-2 SFT + ``n`` backbones made in code under ``workdir``; returns (sft, backbones).

    ``delta`` = 0.3 (not tiny_models' 0.02) so that different preferences
    visibly generate different text.
    """
    from bonesoup.tasks.tiny_models import make_tiny_backbones

    import transformers

    transformers.logging.disable_progress_bar()
    return make_tiny_backbones(Path(workdir) / f"inputs-n{n}", n, seed=seed, delta=delta)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to a ``bonesoup`` sub-command parser; its ``func`` is :func:`cmd_serve`."""
    p = subparsers.add_parser(
        "serve",
        help="serve OpenAI-compatible completions with live re-merging (no directories: the embedded default)",
        description="Serve /v1/completions, /v1/preference, /v1/models, /health and /metrics. Each request may "
        "carry a preference; the server re-merges the live weights in place (LiveSoup) when the next request's "
        "preference differs from the current one. With no --backbones it builds tiny checkpoints in code (under "
        f"--workdir, default {SERVE_DEMO_DIR}) and serves those (n=2, beta 0.7).",
    )
    p.add_argument("--backbones", nargs="+", type=Path, metavar="DIR", help="backbone checkpoint directories")
    p.add_argument("--model-dir", type=Path, help="checkpoint giving the live model's architecture, config and "
                   "tokenizer (default: the first backbone)")
    p.add_argument("--sft", type=Path, help="SFT checkpoint directory (needed for alpha != 0)")
    p.add_argument("--beta", type=float, help="backbone mixing strength in (0.5, 1) (method bone; demo: 0.7)")
    p.add_argument("--method", choices=["bone", "rewarded"], default="bone")
    p.add_argument("--preference", type=float, nargs="+", help="initial preference (default: uniform)")
    p.add_argument("--alpha", type=float, default=0.0, help="initial alpha, and the alpha of requests that give "
                   "a preference but no alpha (default 0)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                   "(default: env BONESOUP_API_KEY)")
    p.add_argument("--max-tokens-limit", type=int, default=DEFAULT_MAX_TOKENS_LIMIT,
                   help=f"largest max_tokens accepted (default {DEFAULT_MAX_TOKENS_LIMIT})")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                   help="prompts per generate call for batched (unseeded sampled) prompts")
    p.add_argument("--batch-greedy", action="store_true", help="batch greedy and seeded prompts too (faster; "
                   "their text may then depend on the batch in near-ties)")
    p.add_argument("--served-model-name", default="bonesoup", help="the model id clients send and see")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="live model dtype (default: as saved)")
    p.add_argument("--workdir", type=Path, default=SERVE_DEMO_DIR, help="embedded default only: where the tiny "
                   "checkpoints go")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return p


def build_from_args(args):
    """(app, soup) from parsed ``serve`` arguments; raises ValueError on bad arguments."""
    if args.backbones:
        if args.method == "bone" and args.beta is None:
            raise ValueError("--beta is required for --method bone")
        backbones, sft, beta, model_dir = args.backbones, args.sft, args.beta, args.model_dir
        for d in [*backbones, *([sft] if sft else []), *([model_dir] if model_dir else [])]:
            if not Path(d).is_dir():
                raise FileNotFoundError(f"checkpoint directory {d} does not exist")
    else:
        if args.model_dir is not None or args.sft is not None:
            raise ValueError("--model-dir and --sft need --backbones (no --backbones: the embedded default)")
        sft, backbones = build_embedded_default(args.workdir)
        beta = 0.7 if args.beta is None else args.beta
        model_dir = sft
        log.warning("serving the embedded default: tiny GPT-2 backbones made in code under %s", args.workdir)
    if args.max_tokens_limit < 1:
        raise ValueError(f"--max-tokens-limit must be >= 1, got {args.max_tokens_limit}")
    soup, model, tokenizer = load_live_soup(backbones, beta=beta, sft=sft, model_dir=model_dir, method=args.method,
                                            device=args.device, dtype=args.dtype)
    pref = args.preference or [1.0 / soup.n] * soup.n
    info = soup.set_preference(pref, alpha=args.alpha)
    log.warning("initial weights: preference %s alpha %s (version %d, %.1f ms)", info.preference, info.alpha,
                info.version, info.seconds * 1e3)
    api_key = args.api_key or os.environ.get("BONESOUP_API_KEY") or None
    app = create_app(soup, model, tokenizer, api_key=api_key, max_tokens_limit=args.max_tokens_limit,
                     model_name=args.served_model_name, default_alpha=args.alpha, batch_greedy=args.batch_greedy,
                     max_batch_size=args.max_batch_size)
    return app, soup, api_key


def cmd_serve(args) -> int:
    """Run the server until interrupted."""
    import uvicorn

    logging.getLogger("bonesoup").setLevel(getattr(logging, args.log_level.upper()))
    app, soup, api_key = build_from_args(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("binding %s without an API key: anyone who can reach it can generate and re-merge", args.host)
    print(f"bonesoup serve: {soup!r} on http://{args.host}:{args.port} (auth: {'on' if api_key else 'off'})",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bonesoup.serve ...``: the same as ``bonesoup serve ...``."""
    import sys

    parser = argparse.ArgumentParser(prog="bonesoup")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"bonesoup serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
