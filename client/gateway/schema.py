"""OpenAI's request and response shapes, and their conversion to and from the worker's terms.

Requests are parsed by pydantic in strict mode (a string where a number belongs is a 400, as
OpenAI answers), unknown fields are ignored as OpenAI ignores them, and parameters the worker
cannot honour are refused with a 400 that names them rather than silently dropped.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..api import GenerationResult, TokenEvent, WorkerError

# -- errors ------------------------------------------------------------------------------------

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                429: "rate_limit_error", 500: "server_error", 503: "service_unavailable", 504: "timeout"}


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


# gRPC status name -> (HTTP status, error code)
_GRPC_TO_HTTP = {
    "INVALID_ARGUMENT": (400, "invalid_request"),
    "OUT_OF_RANGE": (400, "context_length_exceeded"),
    "RESOURCE_EXHAUSTED": (429, "worker_queue_full"),
    "UNAVAILABLE": (503, "worker_unavailable"),
    "DEADLINE_EXCEEDED": (504, "worker_timeout"),
    "CANCELLED": (503, "worker_cancelled"),
}


def api_error_from_worker(e: WorkerError) -> ApiError:
    status, code = _GRPC_TO_HTTP.get(e.code, (500, "worker_error"))
    return ApiError(status, f"worker: {e.details or e.code}", code=code)


def api_error_from_validation(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    param = loc[0] if loc else None
    where = ".".join(loc)
    if err["type"] == "missing":
        return ApiError(400, f"missing required parameter: {where!r}", param=param, code="missing_required_parameter")
    return ApiError(400, f"invalid type or value for {where!r}: {err['msg']} (got {err.get('input')!r:.80})",
                    param=param, code="invalid_type")


# -- requests ----------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # an extension (vLLM, llama.cpp)
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = False  # an extension (vLLM): fixed-length benchmarks
    user: str | None = None  # ignored


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # extra keys (name, tool_call_id) reach the template
    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # an extension (vLLM): extra template variables
    add_generation_prompt: bool = True  # an extension (vLLM)


def parse(model: type[_Request], body: Any) -> Any:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise api_error_from_validation(e) from None


def _refuse(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


@dataclass(frozen=True)
class Sampling:
    """What the worker is asked (client.api.build_request's keywords)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool
    details: bool  # logprobs wanted

    def kwargs(self) -> dict[str, Any]:
        return dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k, seed=self.seed, stop=self.stop, ignore_eos=self.ignore_eos,
                    details=self.details)


def sampling_of(r: _Sampling, *, max_tokens: int | None, logprobs: bool, max_tokens_limit: int) -> Sampling:
    """Check what the worker cannot do (n > 1, penalties, logit_bias) and build its sampling request."""
    if r.n not in (None, 1):
        raise _refuse("n", "only n = 1 is supported (send n requests)")
    if r.presence_penalty or r.frequency_penalty:
        raise _refuse("presence_penalty" if r.presence_penalty else "frequency_penalty",
                      "penalties are not supported (send 0 or leave it out)")
    if r.logit_bias:
        raise _refuse("logit_bias", "not supported")
    stop = (r.stop,) if isinstance(r.stop, str) else tuple(r.stop or ())
    if any(not s for s in stop):
        raise ApiError(400, "stop: stop strings must not be empty", param="stop", code="invalid_value")
    if max_tokens_limit and max_tokens is not None and max_tokens > max_tokens_limit:
        raise ApiError(400, f"max_tokens: {max_tokens} is above this gateway's limit {max_tokens_limit}",
                       param="max_tokens", code="invalid_value")
    temperature = 1.0 if r.temperature is None else r.temperature  # OpenAI's default
    return Sampling(max_new_tokens=max_tokens or max_tokens_limit or 0, temperature=temperature,
                    top_p=r.top_p if r.top_p is not None else 1.0, top_k=r.top_k or 0, seed=r.seed, stop=stop,
                    ignore_eos=bool(r.ignore_eos), details=logprobs)


def completion_prompt(r: CompletionRequest) -> tuple[str | None, list[int] | None]:
    """(text, token ids): exactly one is set."""
    if r.echo:
        raise _refuse("echo", "not supported")
    if r.suffix:
        raise _refuse("suffix", "not supported")
    if r.best_of not in (None, 1):
        raise _refuse("best_of", "only best_of = 1 is supported")
    if r.logprobs:
        raise _refuse("logprobs", "only logprobs = 0 (the sampled tokens' log-probabilities) is supported")
    p = r.prompt
    if isinstance(p, str):
        text, ids = p, None
    elif p and all(isinstance(x, int) for x in p):
        text, ids = None, list(p)  # type: ignore[arg-type]
    elif len(p) == 1:
        text, ids = (p[0], None) if isinstance(p[0], str) else (None, list(p[0]))  # type: ignore[arg-type]
    else:
        raise _refuse("prompt", "one prompt per request (a string or a list of token ids); send one request each")
    if text == "" or ids == []:
        raise ApiError(400, "prompt: the prompt is empty", param="prompt", code="invalid_value")
    return text, ids


def chat_messages(r: ChatRequest) -> list[dict[str, Any]]:
    """Messages as the template sees them; text-only content parts joined into one string."""
    if r.top_logprobs:
        raise _refuse("top_logprobs", "only the sampled token's log-probability is available (top_logprobs 0)")
    if r.tools:
        raise _refuse("tools", "tool calls are not supported")
    if r.response_format and r.response_format.get("type") not in (None, "text"):
        raise _refuse("response_format", "only {\"type\": \"text\"} is supported")
    out = []
    for i, m in enumerate(r.messages):
        d = m.model_dump(exclude_none=False)
        if isinstance(m.content, list):
            texts = []
            for part in m.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _refuse(f"messages.{i}.content", "only text content parts are supported")
                texts.append(part["text"])
            d["content"] = "\n".join(texts)
        out.append(d)
    return out


# -- responses ---------------------------------------------------------------------------------


def finish_reason(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def usage(result: GenerationResult) -> dict[str, int]:
    u = result.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def completion_logprobs(tokens: list[TokenEvent]) -> dict[str, Any]:
    """The legacy completions logprobs object (logprobs = 0: no alternatives)."""
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": None, "text_offset": offsets}


def chat_logprobs(tokens: list[TokenEvent]) -> dict[str, Any]:
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()), "top_logprobs": []}
                        for t in tokens], "refusal": None}
