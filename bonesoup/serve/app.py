"""The FastAPI app of ``bonesoup serve``: routes only (the protocol validates, the engine schedules).

Endpoints (DESIGN.md, "Serving API"): ``POST /v1/completions``,
``POST /v1/preference``, ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

Everything that costs CPU time per byte of input -- JSON parsing, validation,
tokenization -- runs in a worker thread (``anyio.to_thread``), never on the
event loop, so a multi-megabyte prompt does not hold up ``/health``; decoding
runs on the engine's thread. Limits are enforced before anything is queued:
the body size (413 ``body``), the prompt length in tokens and the model's
context length (prompt + max_tokens; 400 ``prompt`` / ``max_tokens``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Sequence

import anyio.to_thread
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from bonesoup.serve.engine import CURRENT, Engine
from bonesoup.serve.metrics import CONTENT_TYPE, Metrics
from bonesoup.serve.protocol import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_TOKENS_LIMIT,
    CompletionRequest,
    PreferenceRequest,
    RequestError,
    bad_field,
    check_target,
    error_from_validation,
    parse_json_body,
)

__all__ = ["create_app"]

log = logging.getLogger(__name__)

_ENDPOINTS = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/preference"}


def _finite_or_none(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def create_app(soup, model, tokenizer, *, api_key: str | None = None,
               max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, max_prompt_tokens: int | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, model_name: str = "bonesoup",
               default_alpha: float = 0.0, batch_greedy: bool | None = None,
               max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_queue: int = DEFAULT_MAX_QUEUE,
               backbones: Sequence | None = None, sft=None, batch_wait_s: float | None = None,
               engine=None) -> FastAPI:
    """The FastAPI app serving ``model`` (whose weights ``soup`` re-merges) with ``tokenizer``.

    Parameters
    ----------
    soup : bonesoup.LiveSoup or bonesoup.AdapterSoup
        Built over ``model``. A LiveSoup (full-weight backbones): requests are
        grouped by preference and the weights re-merged in place; the app's
        engine is the only writer it expects, another is tolerated (the engine
        re-checks the weights inside ``soup.reading()``). An AdapterSoup (LoRA
        backbones): requests of all preferences decode in one batch, each row
        at its own mixture, nothing re-merged; ``/v1/preference`` then sets
        the shared default preference only (``bytes_moved`` 0), and
        ``weights_version`` counts those changes. The engine must be its only
        writer.
    api_key : str, optional
        When set, every endpoint but ``/health`` requires
        ``Authorization: Bearer <api_key>`` (401 otherwise).
    max_tokens_limit : int
        Largest ``max_tokens`` accepted.
    max_prompt_tokens : int, optional
        Longest prompt accepted, in tokens; default the model's context length
        minus one (a prompt must leave room for a token).
    max_body_bytes : int
        Largest request body (413 above it, read no further).
    default_alpha : float
        Extrapolation of a request that gives a ``preference`` but no ``alpha``.
    batch_greedy : bool, optional
        Batch greedy and seeded prompts too (more throughput; a prompt's text
        may then depend, in near-ties, on the prompts it was batched with).
        Default: off for a LiveSoup, on for an AdapterSoup.
    batch_wait_s : float, optional
        How long a round may wait for requests still being parsed and
        tokenised, so that they join its batch (default 0.02 for an
        AdapterSoup, 0 for a LiveSoup).
    backbones, sft : directories, optional
        What ``soup`` was built from (adapter directories for an
        AdapterSoup), reported by ``GET /v1/models``.
    engine : optional
        A ready engine with the hf :class:`Engine`'s interface, used instead of
        making one (``--engine vllm`` passes its ``VLLMEngine``; ``model`` and
        the batching options are then unused).

    The engine's worker thread starts with the app (lifespan) or at the first
    request, and stops at shutdown. ``app.state.engine`` and
    ``app.state.metrics`` are exposed for tests and benchmarks.
    """
    if max_tokens_limit < 1:
        raise ValueError(f"max_tokens_limit must be >= 1, got {max_tokens_limit}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if engine is None:
        engine = Engine(soup, model, tokenizer, metrics=Metrics(), batch_greedy=batch_greedy,
                        max_batch_size=max_batch_size, max_queue=max_queue, batch_wait_s=batch_wait_s)
    metrics = engine.metrics
    ctx = engine.context_length
    if max_prompt_tokens is None:
        max_prompt_tokens = ctx - 1 if ctx else 8192
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    created = int(time.time())
    expected = api_key.encode() if api_key else None
    validation = {"n": soup.n, "max_tokens_limit": max_tokens_limit}
    served = {"backbones": [str(Path(b)) if isinstance(b, (str, Path)) else None for b in backbones]
              if backbones is not None else None,
              "sft": str(Path(sft)) if isinstance(sft, (str, Path)) else None,
              "backbone_kind": "lora" if engine.adapters else "full",
              "adapters": engine.adapter_info() if engine.adapters else None}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(engine.stop)

    app = FastAPI(title="bonesoup", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.soup = engine, metrics, soup

    def error(exc: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        path = request.url.path
        endpoint = path if path in _ENDPOINTS else "other"
        if expected is not None and path != "/health":
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
                metrics.count_request(endpoint, 401)
                return error(RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                          None, "authentication_error"))
        try:
            response = await call_next(request)
        except Exception:
            metrics.count_request(endpoint, 500)
            raise
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
    async def _server_error(request, exc):  # bugs only
        log.exception("unhandled error")
        return error(RequestError(500, f"internal error: {type(exc).__name__}", None, "server_error"))

    async def read_body(request: Request) -> bytes:
        too_big = RequestError(413, f"body: request body over {max_body_bytes} bytes (this server's limit)",
                               "body")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def validate(request: Request, schema):
        raw = await read_body(request)

        def parse():
            try:
                return schema.model_validate(parse_json_body(raw), context=validation)
            except ValidationError as exc:
                raise error_from_validation(exc) from None
            except RecursionError:
                raise bad_field("body", "JSON nested too deeply") from None

        return await anyio.to_thread.run_sync(parse)

    async def wait(fut):
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
        # One consistent (version, preference, alpha): waits out a re-merge, so off the loop.
        version, pref, alpha = await anyio.to_thread.run_sync(engine.snapshot)
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "bonesoup",
            "n_objectives": soup.n, "method": soup.method, "beta": soup.beta, **served,
            "weights_version": version, "preference": pref, "alpha": _finite_or_none(alpha),
            "default_alpha": default_alpha, "max_tokens_limit": max_tokens_limit,
            "max_prompt_tokens": max_prompt_tokens, "context_length": ctx, "max_body_bytes": max_body_bytes,
        }]}

    @app.get("/metrics")
    async def metrics_endpoint():
        metrics.weights_version.set(soup.version)
        metrics.queue_depth.set(engine.queue_depth)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/preference")
    async def set_preference(request: Request):
        req = await validate(request, PreferenceRequest)
        alpha = float(default_alpha) if req.alpha is None else req.alpha
        check_target(soup, req.preference, alpha)
        info = await wait(engine.submit(engine.preference_job(req.preference, alpha)))
        return {"object": "preference", "weights_version": info.version, "preference": info.preference,
                "alpha": info.alpha, "coefficients": info.coefficients, "remerge_seconds": info.seconds,
                "bytes_moved": info.bytes_moved}

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        # Adapter backbones: the engine's next round waits (briefly) for requests still in the door.
        with engine.arriving():
            req = await validate(request, CompletionRequest)
            if req.model is not None and req.model != model_name:
                raise RequestError(404, f"model: {json.dumps(req.model)[:100]} is not served here; this server "
                                   f"serves {json.dumps(model_name)}", "model", "model_not_found")
            if req.preference is None:
                if req.alpha is not None and soup.preference is None:
                    raise bad_field("preference", "is required with alpha until the server has a preference")
                target = CURRENT if req.alpha is None else (tuple(soup.preference), req.alpha)
            else:
                target = (tuple(req.preference), float(default_alpha) if req.alpha is None else req.alpha)
            if target is not CURRENT:
                check_target(soup, *target)
            max_tokens = min(16, max_tokens_limit) if req.max_tokens is None else req.max_tokens
            ids = await anyio.to_thread.run_sync(engine.encode, req.prompts)
            for i, p in enumerate(ids):
                where = f"prompt[{i}]" if isinstance(req.prompt, list) else "prompt"
                if len(p) > max_prompt_tokens:
                    raise bad_field("prompt", f"{where} has {len(p)} tokens; this server takes at most "
                                    f"{max_prompt_tokens}")
                if ctx is not None and len(p) + max_tokens > ctx:
                    raise bad_field("max_tokens", f"{where} ({len(p)} tokens) + max_tokens ({max_tokens}) exceeds "
                                    f"the model's context length {ctx}")
            job = engine.make_job(ids, None if target is CURRENT else target, max_tokens=max_tokens,
                                  temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                                  seed=req.seed, stop=req.stop or [])
            fut = engine.submit(job)
        res = await wait(fut)
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason, _) in enumerate(res["rows"])]
        completion_tokens = sum(n for _, _, n in res["rows"])
        prompt_tokens = sum(len(x) for x in ids)
        metrics.request.observe(time.perf_counter() - t0)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "weights_version": res["weights_version"], "preference": res["preference"], "alpha": res["alpha"],
        }

    return app
