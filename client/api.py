"""Python API of the worker: stream generations and read its statistics.

    with WorkerClient("127.0.0.1:50061") as w:
        gen = w.generate("The command", max_new_tokens=32)
        for tok in gen:                      # TokenEvent, as the worker sends them
            print(tok.text, end="", flush=True)
        print(gen.result.finish_reason, gen.result.experts.hits)
        print(w.generate_text("Hello", max_new_tokens=8).text)
        print(w.stats().high_water_bytes)

`AsyncWorkerClient` is the same over grpc.aio (`async for tok in gen`). Protobuf
stays at this edge: callers get the frozen dataclasses below. A gRPC error is
raised as `WorkerError`, whose `code` is the status code's name
("INVALID_ARGUMENT", "UNAVAILABLE", ...).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe.v1 import worker_pb2 as pb
from moe.v1 import worker_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50061"

_FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: "unspecified",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_STOP_STRING: "stop_string",
    pb.FINISH_REASON_STOP_TOKEN: "stop_token",
}


class WorkerError(Exception):
    """A call to the worker failed; `code` is the gRPC status name, `details` the worker's message."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> "WorkerError":
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else str(e)
        return cls(code.name if code is not None else "UNKNOWN", details or "")


# -- domain types ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenEvent:
    index: int  # position among the generated tokens
    id: int
    text: str  # text this token adds (may be empty, or carry earlier tokens' held-back text)
    logprob: float | None = None  # when requested with details=True


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # generated, including a stopping token that was not streamed


@dataclass(frozen=True)
class Timings:
    queue_ns: int
    prefill_ns: int
    decode_ns: int
    time_to_first_token_ns: int
    total_ns: int


class _Rates:
    """Derived rates shared by the request, layer and worker statistics."""

    @property
    def hit_rate(self) -> float:
        """(cache hits + prefetch hits) / lookups."""
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def cache_hits(self) -> int:
        """Hits on experts the cache held before this use (not brought by a prefetch)."""
        return self.hits - self.prefetch_hits

    @property
    def strict_topk_accuracy(self) -> float:
        """Share of predicted (token, layer) pairs whose predicted top-k equals the routed top-k as sets."""
        return self.predictions_exact / self.predictions if self.predictions else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Of the lookups the cache did not already hold, the share a prefetch brought:
        prefetch hits / (prefetch hits + misses)."""
        n = self.prefetch_hits + self.misses
        return self.prefetch_hits / n if n else 0.0


@dataclass(frozen=True)
class RequestLayerStats(_Rates):
    layer: int
    lookups: int
    hits: int
    misses: int
    prefetch_hits: int
    predictions: int = 0
    predictions_exact: int = 0
    predicted_routed: int = 0


@dataclass(frozen=True)
class ExpertStats(_Rates):
    """The request's expert-cache statistics. Bytes fetched, fetch wait, prefetches and wasted bytes are
    those of the steps the request took part in (a step shared by batched requests counts in each of them)."""

    lookups: int
    hits: int  # prefetch hits included
    misses: int
    prefetch_hits: int
    prefetches_issued: int
    bytes_fetched: int  # demand fetches
    fetch_wait_ns: int
    predictions: int = 0  # (token, layer) pairs predicted
    predictions_exact: int = 0  # predicted top-k == routed top-k
    predicted_routed: int = 0  # routed experts inside the predictions
    prefetch_bytes: int = 0
    prefetch_wasted_bytes: int = 0
    int2_misses: int = 0
    layers: tuple[RequestLayerStats, ...] = ()
    decode: RequestLayerStats | None = None  # the same counts over decode steps only (layer 0)


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    finish_reason: str  # "length", "eos", "stop_string", "stop_token"
    stop_string: str
    stop_token_id: int
    seed: int
    usage: Usage
    timings: Timings
    experts: ExpertStats
    trailing_text: str  # held-back text released at the end (belongs after the streamed tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second of decoding (0 when fewer than two)."""
        n = self.usage.completion_tokens - 1
        return n / (self.timings.decode_ns / 1e9) if n > 0 and self.timings.decode_ns else 0.0


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]  # streamed tokens (a stopping token is not among them)
    result: GenerationResult


@dataclass(frozen=True)
class LayerStats(_Rates):
    layer: int
    slots: int
    resident_experts: int
    lookups: int
    hits: int  # prefetch hits included
    misses: int
    prefetch_hits: int
    evictions: int
    prefetches_issued: int = 0
    prefetch_unused_evictions: int = 0
    prefetch_bytes: int = 0
    prefetch_wasted_bytes: int = 0
    prefetch_late_hits: int = 0
    prefetch_dropped: int = 0
    fetch_wait_ns: int = 0
    predictions: int = 0
    predictions_exact: int = 0
    predicted_routed: int = 0
    int2_misses: int = 0
    demand_bytes: int = 0

    @property
    def prefetch_precision(self) -> float:
        """Prefetched experts used / prefetched experts."""
        return self.prefetch_hits / self.prefetches_issued if self.prefetches_issued else 0.0


@dataclass(frozen=True)
class WorkerStats(_Rates):
    worker_id: str
    model_family: str
    device: str
    expert_format: str
    cache_policy: str
    predictor: str
    uptime_ms: int
    store_connected: bool
    active_requests: int
    queued_requests: int
    requests_total: int
    requests_failed: int
    requests_cancelled: int
    prompt_tokens_total: int
    generated_tokens_total: int
    budget_bytes: int
    used_bytes: int
    high_water_bytes: int
    resident_experts: int
    lookups: int
    hits: int
    misses: int
    prefetch_hits: int
    prefetches_issued: int
    evictions: int
    bytes_fetched_shm: int
    bytes_fetched_grpc: int
    fetch_wait_ns: int
    layers: tuple[LayerStats, ...] = ()
    allocation: str = ""
    top_k: int = 0
    total_slots: int = 0
    staging_slots: int = 0
    prefetch_width: int = 0
    measured_width: int = 0
    lookahead: int = 0
    int2_tail: float = 0.0
    layer_compute_ns: float = 0.0
    expert_fetch_ns: float = 0.0
    prefetch_bytes: int = 0
    prefetch_wasted_bytes: int = 0
    prefetch_unused_evictions: int = 0
    prefetch_late_hits: int = 0
    prefetch_dropped: int = 0
    predictions: int = 0
    predictions_exact: int = 0
    predicted_routed: int = 0
    int2_misses: int = 0
    int2_bytes: int = 0
    demand_bytes: int = 0
    steps_total: int = 0

    @property
    def prefetch_precision(self) -> float:
        """Prefetched experts used / prefetched experts (those still resident and unused count as unused)."""
        return self.prefetch_hits / self.prefetches_issued if self.prefetches_issued else 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelInfo:
    """The served model as a front end needs it (GetModelInfo)."""

    model_name: str
    pack_id: str  # workers with equal ids serve the same model
    family: str
    max_context_tokens: int
    vocab_size: int
    has_tokenizer: bool
    chat_template: str  # Jinja source of the default template; "" when the model has none
    named_chat_templates: dict[str, str]
    bos_token: str
    eos_token: str
    pad_token: str
    unk_token: str
    eos_token_ids: tuple[int, ...]
    default_max_new_tokens: int


# -- protobuf <-> domain (the only place that touches *_pb2) -------------------------------------


def build_request(
    prompt: str | None = None,
    token_ids: Sequence[int] | None = None,
    *,
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    details: bool = False,
    request_id: str = "",
) -> pb.GenerateRequest:
    """Exactly one of prompt / token_ids. Zero values mean the worker's defaults (greedy, its max)."""
    if (prompt is None) == (token_ids is None):
        raise ValueError("give exactly one of prompt (text) or token_ids")
    req = pb.GenerateRequest(
        request_id=request_id, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_strings=list(stop), stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos, details=details,
    )  # fmt: skip
    if prompt is not None:
        req.prompt = prompt
    else:
        req.token_ids.ids.extend(int(t) for t in token_ids)  # type: ignore[union-attr]
    if seed is not None:
        req.seed = seed
    return req


def _token_from_pb(t: pb.GeneratedToken) -> TokenEvent:
    return TokenEvent(t.index, t.id, t.text, t.logprob if t.HasField("logprob") else None)


def _layer_from_pb(l: pb.RequestLayerExpertStats) -> RequestLayerStats:
    return RequestLayerStats(l.layer, l.lookups, l.hits, l.misses, l.prefetch_hits, l.predictions,
                             l.predictions_exact, l.predicted_routed)


def _result_from_pb(f: pb.GenerateFinal) -> GenerationResult:
    u, t, e = f.usage, f.timings, f.experts
    return GenerationResult(
        request_id=f.request_id,
        finish_reason=_FINISH_REASONS.get(f.finish_reason, "unspecified"),
        stop_string=f.stop_string,
        stop_token_id=f.stop_token_id,
        seed=f.seed,
        usage=Usage(u.prompt_tokens, u.completion_tokens),
        timings=Timings(t.queue_ns, t.prefill_ns, t.decode_ns, t.time_to_first_token_ns, t.total_ns),
        experts=ExpertStats(
            e.lookups, e.hits, e.misses, e.prefetch_hits, e.prefetches_issued, e.bytes_fetched, e.fetch_wait_ns,
            e.predictions, e.predictions_exact, e.predicted_routed, e.prefetch_bytes, e.prefetch_wasted_bytes,
            e.int2_misses,
            tuple(_layer_from_pb(l) for l in e.layers), _layer_from_pb(e.decode) if e.HasField("decode") else None),
        trailing_text=f.trailing_text,
    )


def _model_info_from_pb(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(m.model_name, m.pack_id, m.family, m.max_context_tokens, m.vocab_size, m.has_tokenizer,
                     m.chat_template, dict(m.named_chat_templates), m.bos_token, m.eos_token, m.pad_token,
                     m.unk_token, tuple(m.eos_token_ids), m.default_max_new_tokens)


def _stats_from_pb(s: pb.WorkerStats) -> WorkerStats:
    scalar = {f.name: getattr(s, f.name) for f in dataclasses.fields(WorkerStats) if f.name != "layers"}
    layers = tuple(LayerStats(**{f.name: getattr(l, f.name) for f in dataclasses.fields(LayerStats)})
                   for l in s.layers)
    return WorkerStats(**scalar, layers=layers)


# -- sync ------------------------------------------------------------------------------------


class Generation:
    """One streaming generation: iterate for TokenEvents; then `result` holds the final message."""

    def __init__(self, call):
        self._call = call
        self.result: GenerationResult | None = None
        self.tokens: list[TokenEvent] = []

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            for msg in self._call:
                if msg.HasField("token"):
                    tok = _token_from_pb(msg.token)
                    self.tokens.append(tok)
                    yield tok
                elif msg.HasField("final"):
                    self.result = _result_from_pb(msg.final)
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None
        if self.result is None:
            raise WorkerError("UNKNOWN", "the stream ended without a final message")

    def cancel(self) -> None:
        """Stop the generation (the worker drops the request at its next step)."""
        self._call.cancel()

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens) + (self.result.trailing_text if self.result else "")

    def complete(self) -> Completion:
        """Consume what is left of the stream and return the whole completion."""
        for _ in self:
            pass
        assert self.result is not None  # __iter__ raised otherwise
        return Completion(self.text, tuple(t.id for t in self.tokens), self.result)


class WorkerClient:
    """Synchronous client (thread-safe: one channel, calls may run from several threads)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout_s: float | None = None):
        self.address = address
        self.timeout_s = timeout_s  # deadline of each call; None: none
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.WorkerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None, **sampling) -> Generation:
        """Start a generation (keyword arguments as build_request's)."""
        return Generation(self._stub.Generate(build_request(prompt, token_ids, **sampling), timeout=self.timeout_s))

    def generate_text(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
                      **sampling) -> Completion:
        return self.generate(prompt, token_ids=token_ids, **sampling).complete()

    def stats(self, include_layers: bool = False) -> WorkerStats:
        try:
            reply = self._stub.GetStats(pb.GetWorkerStatsRequest(include_layers=include_layers),
                                        timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None
        return _stats_from_pb(reply)

    def model_info(self) -> ModelInfo:
        try:
            return _model_info_from_pb(self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout_s))
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (add_special_tokens=False: as for a rendered chat template)."""
        try:
            reply = self._stub.Tokenize(pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
                                        timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None
        return list(reply.ids)

    def health(self, timeout_s: float = 1.0) -> str:
        """The health service's status name ("SERVING", "NOT_SERVING", ...)."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the worker reports SERVING; WorkerError("DEADLINE_EXCEEDED") after timeout_s."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health(timeout_s=min(1.0, max(0.05, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except WorkerError as e:
                last = str(e)
            time.sleep(0.05)
        raise WorkerError("DEADLINE_EXCEEDED", f"worker at {self.address} not SERVING within {timeout_s:g} s ({last})")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- async -----------------------------------------------------------------------------------


class AsyncGeneration:
    """`async for tok in gen`; then `gen.result`."""

    def __init__(self, call):
        self._call = call
        self.result: GenerationResult | None = None
        self.tokens: list[TokenEvent] = []

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[TokenEvent]:
        try:
            async for msg in self._call:
                if msg.HasField("token"):
                    tok = _token_from_pb(msg.token)
                    self.tokens.append(tok)
                    yield tok
                elif msg.HasField("final"):
                    self.result = _result_from_pb(msg.final)
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None
        if self.result is None:
            raise WorkerError("UNKNOWN", "the stream ended without a final message")

    def cancel(self) -> None:
        self._call.cancel()

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens) + (self.result.trailing_text if self.result else "")

    async def complete(self) -> Completion:
        async for _ in self:
            pass
        assert self.result is not None
        return Completion(self.text, tuple(t.id for t in self.tokens), self.result)


class AsyncWorkerClient:
    """The same API on grpc.aio; create it inside a running event loop."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout_s: float | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = pb_grpc.WorkerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
                 **sampling) -> AsyncGeneration:
        return AsyncGeneration(self._stub.Generate(build_request(prompt, token_ids, **sampling),
                                                   timeout=self.timeout_s))

    async def generate_text(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
                            **sampling) -> Completion:
        return await self.generate(prompt, token_ids=token_ids, **sampling).complete()

    async def stats(self, include_layers: bool = False) -> WorkerStats:
        try:
            reply = await self._stub.GetStats(pb.GetWorkerStatsRequest(include_layers=include_layers),
                                              timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None
        return _stats_from_pb(reply)

    async def model_info(self) -> ModelInfo:
        try:
            reply = await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None
        return _model_info_from_pb(reply)

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            reply = await self._stub.Tokenize(pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
                                              timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None
        return list(reply.ids)

    async def health(self, timeout_s: float = 1.0) -> str:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = await self.health(timeout_s=min(1.0, max(0.05, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except WorkerError as e:
                last = str(e)
            await asyncio.sleep(0.05)
        raise WorkerError("DEADLINE_EXCEEDED", f"worker at {self.address} not SERVING within {timeout_s:g} s ({last})")

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncWorkerClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
