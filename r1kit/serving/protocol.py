"""The HTTP protocol: OpenAI/DeepSeek request models, their validation, error and response shapes.

Requests are parsed from the raw body with pydantic in strict JSON mode (no "5" for 5, no true for 1,
no NaN), and every failure becomes an `APIError` with OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`, `param` naming the field at fault.

Accepted and honoured: model, messages / prompt, max_tokens (max_completion_tokens), n, temperature,
top_p, stop, seed, stream, stream_options.include_usage, user (ignored), and r1kit's `ignore_eos`.
Fields r1kit cannot honour (tools, logprobs, logit_bias, non-zero penalties, a JSON response format, echo,
suffix, best_of) are refused with a 400 naming them rather than silently ignored; unknown fields are ignored,
as OpenAI's and DeepSeek's APIs do.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An error answered to the client: HTTP status + OpenAI's error body."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each breach is a 400/413 naming the limit."""

    max_body_bytes: int = 2 * 1024 * 1024
    max_messages: int = 512
    max_n: int = 16
    max_tokens: int | None = None  # cap on max_tokens; None = the model's context
    max_stop: int = 4
    max_stop_chars: int = 256
    max_prompts: int = 64  # /v1/completions: prompts in one request


_STRICT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(BaseModel):
    model_config = _STRICT
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    reasoning_content: str | None = None  # sent back by clients; left out of the context (as DeepSeek-R1)
    name: str | None = None

    def text(self, where: str) -> str:
        if self.content is None:
            if self.role == "assistant":
                return ""
            raise APIError(400, f"{where}.content: a {self.role} message needs content", f"{where}.content",
                           "invalid_value")
        if isinstance(self.content, str):
            return self.content
        parts = []
        for j, p in enumerate(self.content):
            if p.type != "text" or p.text is None:
                raise APIError(400, f"{where}.content[{j}]: only text parts are supported (got type {p.type!r})",
                               f"{where}.content[{j}].type", "invalid_value")
            parts.append(p.text)
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = _STRICT
    model: str
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # r1kit extension (as vLLM): sample exactly max_tokens, for benchmarks
    # refused unless left at their defaults
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    response_format: Any = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        return [v] if isinstance(v, str) else v

    def unsupported(self) -> list[str]:
        bad = [f for f in ("presence_penalty", "frequency_penalty") if getattr(self, f) != 0]
        bad += [f for f in ("logit_bias", "tools", "functions", "top_logprobs") if getattr(self, f)]
        bad += [f for f in ("tool_choice",) if getattr(self, f) not in (None, "none", "auto")]
        if self.logprobs not in (None, False, 0):
            bad.append("logprobs")
        rf = self.response_format
        if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
            bad.append("response_format")
        return bad


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    reasoning_effort: Any = None  # accepted and ignored (the model decides how long it thinks)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        bad += [f for f in ("echo", "suffix") if getattr(self, f)]
        if self.best_of not in (None, self.n):
            bad.append("best_of")
        return bad


def parse_request(cls: type[_Sampling], body: bytes, limits: Limits) -> _Sampling:
    """Raw body -> a validated request, or APIError(400) naming the first field at fault."""
    if not body.strip():
        raise APIError(400, "the request body is empty: send a JSON object", code="invalid_json")
    try:
        req = cls.model_validate_json(body, strict=True)
    except ValidationError as e:
        raise _validation_error(e) from None
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    bad = req.unsupported()
    if bad:
        raise APIError(400, f"{bad[0]} is not supported by r1kit serve", bad[0], "unsupported_parameter")
    _check_limits(req, limits)
    return req


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    if err["type"] in ("json_invalid", "json_type", "recursion_loop"):
        return APIError(400, f"the request body is not valid JSON: {err['msg']}", code="invalid_json")
    loc = [x for x in err["loc"] if not (isinstance(x, str) and ("[" in x or x.startswith("function-")))]
    param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".") or None
    if err["type"] == "model_type" and not loc:
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    msg = err["msg"]
    if err["type"] == "missing":
        msg = "a required field is missing"
    return APIError(400, f"{param or 'body'}: {msg}" + _got(err), param, "invalid_value")


def _got(err: dict) -> str:
    v = err.get("input")
    if err["type"] == "missing" or isinstance(v, (dict, list)):
        return ""
    r = repr(v)
    return f" (got {r[:60] + '...' if len(r) > 60 else r})"


def _check_limits(req: _Sampling, limits: Limits) -> None:
    if req.n > limits.max_n:
        raise APIError(400, f"n={req.n} is over this server's limit of {limits.max_n} samples per request", "n",
                       "limit_exceeded")
    stops = req.stop or []
    if len(stops) > limits.max_stop:
        raise APIError(400, f"stop: at most {limits.max_stop} stop strings (got {len(stops)})", "stop", "limit_exceeded")
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise APIError(400, f"stop: each stop string is at most {limits.max_stop_chars} characters", "stop",
                       "limit_exceeded")
    if isinstance(req, ChatCompletionRequest) and len(req.messages) > limits.max_messages:
        raise APIError(400, f"messages: at most {limits.max_messages} messages per request (got {len(req.messages)})",
                       "messages", "limit_exceeded")
    if isinstance(req, CompletionRequest):
        if isinstance(req.prompt, list) and not req.prompt:
            raise APIError(400, "prompt: an empty list", "prompt", "invalid_value")
        n_prompts = len(req.prompt) if isinstance(req.prompt, list) and not isinstance(req.prompt[0], int) else 1
        if n_prompts > limits.max_prompts:
            raise APIError(400, f"prompt: at most {limits.max_prompts} prompts per request (got {n_prompts})",
                           "prompt", "limit_exceeded")


def check_token_budget(prompt_len: int, requested: int | None, context: int, cap: int | None,
                       param: str = "max_tokens", prompt_param: str = "messages") -> int:
    """max_tokens for a prompt of `prompt_len` tokens, or APIError(400) naming the limit it breaks."""
    if prompt_len < 1:
        raise APIError(400, "the prompt is empty (0 tokens)", prompt_param, "invalid_value")
    room = context - prompt_len
    if room < 1:
        raise APIError(400, f"this model's maximum context length is {context} tokens, and the prompt alone has "
                            f"{prompt_len} tokens: shorten it", prompt_param, "context_length_exceeded")
    if requested is None:
        return room if cap is None else min(room, cap)
    if cap is not None and requested > cap:
        raise APIError(400, f"{param}={requested} is over this server's limit of {cap}", param, "limit_exceeded")
    if requested > room:
        raise APIError(400, f"this model's maximum context length is {context} tokens; you requested "
                            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the "
                            f"completion): reduce {param} or the prompt", param, "context_length_exceeded")
    return requested


# ---- responses ----

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached: int, reasoning_tokens: int | None) -> dict:
    """OpenAI's usage plus DeepSeek's cache fields: hit + miss = prompt_tokens."""
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens,
         "prompt_cache_hit_tokens": cached, "prompt_cache_miss_tokens": prompt_tokens - cached,
         "prompt_tokens_details": {"cached_tokens": cached}}
    if reasoning_tokens is not None:
        u["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return u
