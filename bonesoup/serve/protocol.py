"""The request/response protocol of ``bonesoup serve``: pydantic models and OpenAI error objects.

One pydantic model per request type (vLLM's ``protocol.py`` shape): unknown
fields are refused, types are strict (no ``"8"`` for 8, no ``true`` for 1),
numbers must be finite, and every failure becomes an OpenAI error object
``{"error": {"message", "type", "param", "code"}}`` whose ``param`` is the
field's name taken from the error's ``loc`` (``"body"`` for the body itself).

Limits that depend on the server (the number of objectives, ``max_tokens``'
ceiling) come in through pydantic's validation ``context``::

    CompletionRequest.model_validate(body, context={"n": 2, "max_tokens_limit": 256})
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_MAX_TOKENS_LIMIT",
    "MAX_PROMPTS_PER_REQUEST",
    "MAX_STOP_SEQUENCES",
    "CompletionRequest",
    "PreferenceRequest",
    "RequestError",
    "check_target",
    "error_from_validation",
    "parse_json_body",
]

# Server limits (the defaults of create_app and `bonesoup serve`).
DEFAULT_MAX_TOKENS_LIMIT = 256
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_QUEUE = 1024
MAX_PROMPTS_PER_REQUEST = 64
MAX_STOP_SEQUENCES = 4
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32
_INT64 = (-(2**63), 2**63 - 1)


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI error object with HTTP ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


def bad_field(param: str, message: str, status: int = 400) -> RequestError:
    """A 4xx naming ``param``; the message starts with it so logs read on their own."""
    return RequestError(status, f"{param}: {message}", param)


def error_from_validation(exc: ValidationError) -> RequestError:
    """The first error of ``exc`` as a 400 whose ``param`` is the top-level field of its ``loc``.

    The message is pydantic's, never the input (which may be megabytes, or
    hold text that cannot be encoded as UTF-8).
    """
    err = exc.errors(include_url=False, include_input=False, include_context=False)[0]
    loc = err.get("loc") or ()
    param = str(loc[0]) if loc and isinstance(loc[0], str) else "body"
    msg = err.get("msg", "invalid value")
    if err.get("type") == "extra_forbidden":
        msg = "unrecognized field"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    where = "".join(f"[{x}]" for x in loc[1:] if isinstance(x, int))  # not union member names
    return bad_field(param, f"{where + ': ' if where else ''}{msg}")


def parse_json_body(raw: bytes) -> Any:
    """Bytes -> a JSON value; malformed, non-UTF-8, too deeply nested or over-long numbers -> 400 ``body``.

    The stdlib parser (not pydantic's) so that ``NaN`` / ``Infinity`` parse
    and are then refused by the field they sit in, naming it.
    """
    try:
        return json.loads(raw)
    except RecursionError:
        raise bad_field("body", "JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, int digit limit, bad UTF-8
        raise bad_field("body", f"malformed JSON: {str(exc)[:200]}") from None


def _utf8(s: str, what: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800" in JSON): no tokenizer can take it
        raise ValueError(f"{what} holds text that is not valid Unicode (position {exc.start}: a lone "
                         "surrogate); send UTF-8 text") from None
    return s


def _check_preference(cls, v: list[float] | None, info: ValidationInfo) -> list[float] | None:
    from bonesoup.merge.coefficients import validate_preference

    if v is None:
        return None
    n = (info.context or {}).get("n")
    validate_preference(v, n)  # ValueError naming "preference": wrong length, negative, not summing to 1
    return [float(x) for x in v]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class CompletionRequest(_Strict):
    """``POST /v1/completions``: OpenAI completions with Bone Soup's ``preference`` and ``alpha``."""

    prompt: str | list[str]
    """One prompt, or up to MAX_PROMPTS_PER_REQUEST (one choice each)."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    """New tokens at most; default min(16, the server's limit)."""
    temperature: float = Field(1.0, ge=0.0)
    """0 = greedy; otherwise finite and positive in float32."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=2**31 - 1)
    """0 or -1 = off."""
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=_INT64[0], le=2**64 - 1)
    """Prompt i samples with key ``row_seeds(seed, len(prompts))[i]``; omitted: a random 63-bit seed."""
    stop: str | list[str] | None = None
    preference: list[float] | None = None
    """n non-negative numbers summing to 1; omitted = the current weights."""
    alpha: float | None = None
    """Extrapolation; omitted = the server's default alpha (with a preference) or the current one."""
    user: str | None = None
    # OpenAI fields accepted at their default value only.
    n: int | None = None
    best_of: int | None = None
    stream: bool | None = None
    echo: bool | None = None
    logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("prompt")
    @classmethod
    def check_prompt(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if not prompts:
            raise ValueError("must be a string or a non-empty list of strings")
        if len(prompts) > MAX_PROMPTS_PER_REQUEST:
            raise ValueError(f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(prompts)}")
        for i, p in enumerate(prompts):
            _utf8(p, f"prompt[{i}]" if isinstance(v, list) else "prompt")
        return v

    @field_validator("max_tokens")
    @classmethod
    def check_max_tokens(cls, v, info: ValidationInfo):
        limit = (info.context or {}).get("max_tokens_limit")
        if v is not None and limit is not None and v > limit:
            raise ValueError(f"must be <= {limit} (this server's --max-tokens-limit), got {v}")
        return v

    @field_validator("temperature")
    @classmethod
    def check_temperature(cls, v):
        # The sampler's rule (soupkernels' boundary): 0 (greedy) or a normal float32. Above float32's
        # max the temperature is inf; below its smallest normal, 1/T is inf (or T rounds to 0 and
        # would silently become greedy decoding).
        if v > _FLOAT32_MAX:
            raise ValueError(f"must be <= {_FLOAT32_MAX:.6g} (float32), got {v!r}")
        if 0 < v < _FLOAT32_TINY:
            raise ValueError(f"{v!r} is below float32's smallest normal number ({_FLOAT32_TINY:.4g}); "
                             "send 0 for greedy decoding or a larger temperature")
        return v

    @field_validator("top_p")
    @classmethod
    def check_top_p(cls, v):
        if float(np.float32(v)) == 0.0:
            raise ValueError(f"{v!r} rounds to 0 in float32; top_p must be in (0, 1]")
        return v

    @field_validator("stop")
    @classmethod
    def check_stop(cls, v):
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP_SEQUENCES or not all(stops):
            raise ValueError(f"must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES}")
        for s in stops:
            _utf8(s, "stop")
        return stops

    @field_validator("user", "suffix")
    @classmethod
    def check_text(cls, v, info: ValidationInfo):
        return v if v is None else _utf8(v, info.field_name)

    check_preference = field_validator("preference")(_check_preference)

    @field_validator("n", "best_of", "stream", "echo", "logprobs", "presence_penalty", "frequency_penalty",
                     "suffix", "logit_bias")
    @classmethod
    def check_default_only(cls, v, info: ValidationInfo):
        allowed = _DEFAULT_ONLY[info.field_name]
        if v is not None and (v != allowed or type(v) is not type(allowed)) and not (
                isinstance(allowed, float) and isinstance(v, int) and v == allowed):
            raise ValueError(f"only {json.dumps(allowed)} is supported")
        return v

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


_DEFAULT_ONLY = {"n": 1, "best_of": 1, "stream": False, "echo": False, "logprobs": 0, "presence_penalty": 0.0,
                 "frequency_penalty": 0.0, "suffix": "", "logit_bias": {}}


class PreferenceRequest(_Strict):
    """``POST /v1/preference``: re-merge now."""

    preference: list[float]
    alpha: float | None = None

    check_preference = field_validator("preference")(_check_preference)


def check_target(soup, preference, alpha: float) -> list[float]:
    """The merge coefficients of (``preference``, ``alpha``) on ``soup``, refused unless finite in float32.

    The merge kernel accumulates in float32: a coefficient over its range
    (alpha = 1e39 scales every backbone by ~1e39) would write inf into every
    weight, so it is refused here, naming ``alpha`` (or ``preference``).
    """
    from bonesoup.merge.coefficients import merge_coefficients

    param = "alpha" if alpha else "preference"
    try:
        c, c_sft = merge_coefficients(list(preference), method=soup.method, beta=soup.beta, alpha=alpha, n=soup.n)
        coeffs = soup.coefficients(list(preference), alpha)  # also refuses alpha without an SFT model
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        raise bad_field("alpha" if ("alpha" in msg or "sft" in msg) else "preference", msg) from None
    with np.errstate(over="ignore"):
        c32 = np.asarray([*c, c_sft, *coeffs], dtype=np.float64).astype(np.float32)
    if not np.isfinite(c32).all() or not all(math.isfinite(x) for x in coeffs):
        raise bad_field(param, f"gives merge coefficients {[float(x) for x in c]} (SFT {float(c_sft)!r}) that "
                        "are not finite in float32; the merge could not represent them")
    return coeffs
