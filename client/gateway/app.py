"""The HTTP application (Starlette): OpenAI's routes over the worker pool.

    GET  /v1/models, /v1/models/{id}   the served model
    POST /v1/completions               prompt (text or token ids) -> text
    POST /v1/chat/completions          messages -> the chat template -> token ids -> text
    GET  /health                       200 while a worker is SERVING, else 503
    GET  /metrics                      Prometheus text format

Every /v1 route checks `Authorization: Bearer KEY` when a key is set. A streamed request that
fails before its first token gets a plain HTTP error (400/429/503, ...); after that the error
comes as an SSE `data: {"error": ...}` event, as OpenAI's SDKs expect. A client that disconnects
mid-stream cancels the generation on the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..api import TokenEvent
from . import schema
from .metrics import GatewayMetrics
from .pool import NoWorkerError, WorkerPool
from .schema import ApiError
from .settings import GatewaySettings
from .templates import ChatTemplate, ChatTemplateError

log = logging.getLogger("client.gateway")

OWNER = "fate-moe"
T = TypeVar("T")


@dataclass
class Gateway:
    """What the routes share: settings, the pool, the metrics, the chat template."""

    settings: GatewaySettings
    pool: WorkerPool
    metrics: GatewayMetrics
    api_key: str | None
    template_override: ChatTemplate | None = None
    _templates: dict[str, ChatTemplate | None] = field(default_factory=dict)  # pack id -> the model's

    @property
    def model_id(self) -> str:
        m = self.pool.model
        if m is None:
            raise NoWorkerError("no worker has answered yet: start a worker or check the gateway's log")
        return self.settings.model_name or m.model_name

    def check_model(self, requested: str) -> None:
        served = self.model_id
        if requested != served:
            raise ApiError(404, f"the model {requested!r} does not exist: this gateway serves {served!r}",
                           param="model", code="model_not_found")

    def chat_template(self) -> ChatTemplate:
        m = self.pool.model
        assert m is not None  # check_model ran first
        special = {"bos_token": m.bos_token, "eos_token": m.eos_token, "pad_token": m.pad_token,
                   "unk_token": m.unk_token}
        if self.template_override is not None:
            if not self.template_override.special_tokens:
                self.template_override.special_tokens = {k: v for k, v in special.items() if v}
            return self.template_override
        if m.pack_id not in self._templates:
            self._templates[m.pack_id] = ChatTemplate(m.chat_template, special) if m.chat_template else None
        t = self._templates[m.pack_id]
        if t is None:
            raise ApiError(400, f"the model {self.model_id!r} has no chat template: start the gateway with "
                           "--chat-template FILE (a Jinja template, or `chat_template` in gateway.toml), "
                           "or use /v1/completions with a prompt", code="no_chat_template")
        return t


def _gone(gw: Gateway, endpoint: str) -> Response:
    """What is "sent" to a client that has gone: nothing reaches it; 499 as nginx counts it."""
    log.info("%s: the client closed its connection before the response started: its request is cancelled on the "
             "worker", endpoint)
    gw.metrics.requests.labels(endpoint, "499").inc()
    gw.metrics.cancelled.inc()
    return Response(status_code=499)


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body once the response ends, also when the client went away mid-stream, so the
    worker's request is cancelled at once rather than when the generator is collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Timer:
    """Time to first token and inter-token latency of one request, into the histograms."""

    def __init__(self, metrics: GatewayMetrics, endpoint: str):
        self.m, self.endpoint = metrics, endpoint
        self.t0 = self.last = time.perf_counter()
        self.first = True

    def token(self) -> None:
        t = time.perf_counter()
        if self.first:
            self.m.ttft.labels(self.endpoint).observe(t - self.t0)
            self.first = False
        else:
            self.m.itl.labels(self.endpoint).observe(t - self.last)
        self.last = t

    def done(self) -> None:
        self.m.duration.labels(self.endpoint).observe(time.perf_counter() - self.t0)


# -- request handling ---------------------------------------------------------------------------


async def _body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None


def _authorize(gw: Gateway, request: Request) -> None:
    if gw.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing API key: send `Authorization: Bearer KEY`", code="missing_api_key")
    if not hmac.compare_digest(token.strip().encode(), gw.api_key.encode()):
        raise ApiError(401, "incorrect API key", code="invalid_api_key")


async def _prepare(gw: Gateway, request: Request, endpoint: str):
    """(parsed request, prompt text, prompt ids, sampling kwargs) of a completion or chat request."""
    _authorize(gw, request)
    body = await _body(request)
    limit = gw.settings.max_tokens_limit
    if endpoint == "chat":
        r = schema.parse(schema.ChatRequest, body)
        gw.check_model(r.model)
        messages = schema.chat_messages(r)
        sampling = schema.sampling_of(r, max_tokens=r.max_completion_tokens or r.max_tokens,
                                      logprobs=bool(r.logprobs), max_tokens_limit=limit)
        try:
            text = gw.chat_template().render(messages, add_generation_prompt=r.add_generation_prompt,
                                             **(r.chat_template_kwargs or {}))
        except ChatTemplateError as e:
            raise ApiError(400, str(e), param="messages", code="chat_template_error") from None
        if not text:
            raise ApiError(400, "the chat template rendered an empty prompt", param="messages", code="invalid_value")
        # the rendered template already holds its special tokens (BOS): tokenized without adding them
        ids = await gw.pool.tokenize(text, add_special_tokens=False)
        return r, None, ids, sampling
    r = schema.parse(schema.CompletionRequest, body)
    gw.check_model(r.model)
    text, ids = schema.completion_prompt(r)
    sampling = schema.sampling_of(r, max_tokens=r.max_tokens, logprobs=r.logprobs is not None, max_tokens_limit=limit)
    return r, text, ids, sampling


class _ClientGone(Exception):
    """The HTTP client disconnected before its response started."""


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the request body has been read: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or _ClientGone (with `work` cancelled: its gRPC stream with it) when the client
    goes first: a queued or non-streamed request must not keep a worker busy for nobody."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and not gone.cancelled() and gone.exception() is not None:
            # the watch failed (not an http.disconnect): that says nothing about the client; the work decides
            log.warning("cannot watch the client's connection (%r): the request goes on", gone.exception())
            await asyncio.wait({task})
        client_left = not task.done()  # only an http.disconnect ends the watch first
    finally:
        for t in (task, gone):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)
    if client_left:
        raise _ClientGone
    if task.cancelled():  # cancelled from below (the gRPC layer), not by us
        raise ApiError(503, "the worker call was cancelled", code="worker_cancelled")
    return task.result()


async def _generate(request: Request, endpoint: str) -> Response:
    gw: Gateway = request.app.state.gateway
    timer = _Timer(gw.metrics, endpoint)
    try:
        r, text, ids, sampling = await _prepare(gw, request, endpoint)
        stream = gw.pool.generate(text, ids, sampling.kwargs())
        tokens = stream.tokens.__aiter__()

        async def first_token() -> TokenEvent | None:
            try:  # errors before the first token are plain HTTP errors
                return await tokens.__anext__()
            except StopAsyncIteration:
                return None

        first = await _unless_disconnected(request, first_token())
        if first is not None:
            timer.token()
    except ApiError as e:
        gw.metrics.requests.labels(endpoint, str(e.status)).inc()
        return error_response(e)
    except _ClientGone:
        return _gone(gw, endpoint)
    rid = schema.new_id("chatcmpl" if endpoint == "chat" else "cmpl")
    meta = {"id": rid, "created": schema.now(), "model": gw.model_id,
            "system_fingerprint": f"fp_{gw.pool.model.pack_id[:12]}" if gw.pool.model else None}
    if r.stream:
        gw.metrics.requests.labels(endpoint, "200").inc()
        include_usage = bool(r.stream_options and r.stream_options.include_usage)
        events = _stream_chat if endpoint == "chat" else _stream_completion
        body = events(gw, stream, first, tokens, meta, sampling.details, include_usage, timer)
        return _ClosingStreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    got = [first] if first is not None else []

    async def rest() -> None:
        async for tok in tokens:
            timer.token()
            got.append(tok)

    try:
        await _unless_disconnected(request, rest())
    except ApiError as e:
        gw.metrics.requests.labels(endpoint, str(e.status)).inc()
        return error_response(e)
    except _ClientGone:
        return _gone(gw, endpoint)
    res = stream.result
    timer.done()
    gw.metrics.requests.labels(endpoint, "200").inc()
    gw.metrics.prompt_tokens.inc(res.usage.prompt_tokens)
    gw.metrics.completion_tokens.inc(res.usage.completion_tokens)
    out = "".join(t.text for t in got) + res.trailing_text
    if endpoint == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": out, "refusal": None},
                  "logprobs": schema.chat_logprobs(got) if sampling.details else None,
                  "finish_reason": schema.finish_reason(res)}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": out, "logprobs": schema.completion_logprobs(got) if sampling.details else None,
                  "finish_reason": schema.finish_reason(res)}
        obj = "text_completion"
    return JSONResponse({**meta, "object": obj, "choices": [choice], "usage": schema.usage(res)})


async def _relay_events(gw: Gateway, stream, first, tokens, timer: _Timer) -> AsyncIterator[TokenEvent | None]:
    """The tokens (first included), then None once the result is in; an error mid-stream is raised as
    ApiError. Leaving early (the client disconnected) cancels the worker's request."""
    ended = False  # the worker's stream is over (its result, or its error)
    try:
        if first is not None:
            yield first
        try:
            async for tok in tokens:
                timer.token()
                yield tok
        except ApiError:
            ended = True
            raise
        ended = True
        res = stream.result
        gw.metrics.prompt_tokens.inc(res.usage.prompt_tokens)
        gw.metrics.completion_tokens.inc(res.usage.completion_tokens)
        yield None
    finally:
        if not ended:  # the client went away mid-stream
            with contextlib.suppress(Exception):
                await tokens.aclose()  # cancels the gRPC stream
            gw.metrics.cancelled.inc()
        timer.done()


async def _stream_chat(gw, stream, first, tokens, meta, logprobs: bool, include_usage: bool, timer) -> AsyncIterator[str]:
    base = {**meta, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict, finish: str | None = None, lp: list[TokenEvent] | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": schema.chat_logprobs(lp) if lp else None,
                  "finish_reason": finish}
        return _sse({**base, "choices": [choice], **extra})

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for tok in _relay_events(gw, stream, first, tokens, timer):
            if tok is None:
                res = stream.result
                if res.trailing_text:
                    yield chunk({"content": res.trailing_text})
                yield chunk({}, schema.finish_reason(res))
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": schema.usage(res)})
            elif tok.text or logprobs:
                yield chunk({"content": tok.text}, lp=[tok] if logprobs else None)
    except ApiError as e:
        yield _sse(e.body())
    yield "data: [DONE]\n\n"


async def _stream_completion(gw, stream, first, tokens, meta, logprobs: bool, include_usage: bool,
                             timer) -> AsyncIterator[str]:
    base = {**meta, "object": "text_completion"}
    extra = {"usage": None} if include_usage else {}

    def chunk(text: str, finish: str | None = None, lp: list[TokenEvent] | None = None) -> str:
        choice = {"index": 0, "text": text, "logprobs": schema.completion_logprobs(lp) if lp else None,
                  "finish_reason": finish}
        return _sse({**base, "choices": [choice], **extra})

    try:
        async for tok in _relay_events(gw, stream, first, tokens, timer):
            if tok is None:
                res = stream.result
                yield chunk(res.trailing_text, schema.finish_reason(res))
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": schema.usage(res)})
            elif tok.text or logprobs:
                yield chunk(tok.text, lp=[tok] if logprobs else None)
    except ApiError as e:
        yield _sse(e.body())
    yield "data: [DONE]\n\n"


# -- routes ---------------------------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    return await _generate(request, "chat")


async def completions(request: Request) -> Response:
    return await _generate(request, "completions")


def _model_card(gw: Gateway) -> dict:
    m = gw.pool.model
    return {"id": gw.model_id, "object": "model", "created": 0, "owned_by": OWNER,
            "max_model_len": m.max_context_tokens if m else None}


async def list_models(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    try:
        _authorize(gw, request)
        body = {"object": "list", "data": [_model_card(gw)]}
    except ApiError as e:
        gw.metrics.requests.labels("models", str(e.status)).inc()
        return error_response(e)
    gw.metrics.requests.labels("models", "200").inc()
    return JSONResponse(body)


async def get_model(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    try:
        _authorize(gw, request)
        gw.check_model(request.path_params["model"])
        body = _model_card(gw)
    except ApiError as e:
        gw.metrics.requests.labels("models", str(e.status)).inc()
        return error_response(e)
    gw.metrics.requests.labels("models", "200").inc()
    return JSONResponse(body)


async def health(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    workers = [{"address": w.address, "serving": w.serving and not w.mismatch, "outstanding": w.outstanding}
               for w in gw.pool.workers]
    ready = gw.pool.ready
    return JSONResponse({"status": "ok" if ready else "unavailable", "workers": workers},
                        status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    return Response(gw.metrics.render(), media_type=gw.metrics.content_type)


async def not_found(request: Request, exc: Exception) -> Response:
    return error_response(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found"))


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    return JSONResponse(ApiError(405, f"{request.method} is not allowed on {request.url.path}").body(),
                        status_code=405)


def create_app(settings: GatewaySettings, pool: WorkerPool | None = None) -> Starlette:
    """The ASGI app; the pool's health loop runs for the app's lifetime."""
    gm = pool.metrics if pool is not None else GatewayMetrics()
    pool = pool or WorkerPool(settings.workers, health_interval_s=settings.health_interval_s,
                              request_timeout_s=settings.request_timeout_s,
                              retry_unavailable=settings.retry_unavailable, metrics=gm)
    override = ChatTemplate.from_file(settings.chat_template) if settings.chat_template else None
    gw = Gateway(settings, pool, gm, settings.resolved_api_key(), override)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await pool.start()
        await pool.wait_checked(timeout_s=5.0)
        if not pool.ready:
            log.warning("no worker is SERVING yet (%s): requests get 503 until one is", ", ".join(settings.workers))
        try:
            yield
        finally:
            await pool.close()

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: method_not_allowed})
    app.state.gateway = gw
    return app
