"""Python API of the worker: stream generations and read its statistics.

    with WorkerClient("unix:/run/fate-moe/worker.sock") as w:
        gen = w.generate("The command", max_new_tokens=32)
        for tok in gen:                      # TokenEvent, as the worker sends them
            print(tok.text, end="", flush=True)
        print(gen.result.finish_reason, gen.result.experts.hits)
        print(w.generate_text("Hello", max_new_tokens=8).text)
        print(w.stats().high_water_bytes)

`AsyncWorkerClient` is the same over grpc.aio (`async for tok in gen`, `await w.stats()`).
Protobuf stays at this edge (client.convert): callers get the frozen dataclasses of
client.results. A gRPC error is raised as `WorkerError`, whose `code` is the status code's
name ("INVALID_ARGUMENT", "UNAVAILABLE", ...). The sync and async clients share everything
but the calls themselves: a new option goes into `_Channel`, a new call into both classes.

Security: `token=` (or the file named by FATE_WORKER_TOKEN_FILE) is sent as
`authorization: Bearer <token>` on every call; `tls_ca=` (or FATE_WORKER_TLS_CA)
turns TLS on and trusts that CA (`tls=True` alone trusts the system's roots), and
`tls_cert=` / `tls_key=` present a client certificate.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe.v1 import worker_pb2 as pb
from moe.v1 import worker_pb2_grpc as pb_grpc

from .convert import build_request, model_info_from_pb, result_from_pb, stats_from_pb, token_from_pb
from .errors import WorkerError
from .results import (
    Completion,
    ExpertStats,
    GenerationResult,
    LayerStats,
    ModelInfo,
    PhaseStats,
    RequestLayerStats,
    Timings,
    TokenEvent,
    Usage,
    WorkerStats,
)

__all__ = [
    "ADDRESS_ENV", "DEFAULT_ADDRESS", "AsyncGeneration", "AsyncWorkerClient", "Completion", "ExpertStats",
    "Generation", "GenerationResult", "LayerStats", "ModelInfo", "PhaseStats", "RequestLayerStats", "Timings", "TokenEvent",
    "Usage", "WorkerClient", "WorkerError", "WorkerStats", "build_request", "default_address",
]  # fmt: skip

DEFAULT_ADDRESS = "unix:/run/fate-moe/worker.sock"
ADDRESS_ENV = "FATE_WORKER_ADDRESS"


def default_address() -> str:
    """$FATE_WORKER_ADDRESS when set, else unix:/run/fate-moe/worker.sock (the worker's default --listen)."""
    return os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


def _not_ready(address: str, timeout_s: float, last: str) -> WorkerError:
    return WorkerError("DEADLINE_EXCEEDED", f"worker at {address} not SERVING within {timeout_s:g} s ({last})")


# -- streams ----------------------------------------------------------------------------------


class _Stream:
    """What the sync and async generations share: the messages' meaning and the text so far."""

    def __init__(self, call: Any):
        self._call = call
        self.result: GenerationResult | None = None
        self.tokens: list[TokenEvent] = []

    def _take(self, msg: pb.GenerateResponse) -> TokenEvent | None:
        if msg.HasField("token"):
            tok = token_from_pb(msg.token)
            self.tokens.append(tok)
            return tok
        if msg.HasField("final"):
            self.result = result_from_pb(msg.final)
        return None

    def _check_ended(self) -> None:
        if self.result is None:
            raise WorkerError("UNKNOWN", "the stream ended without a final message")

    def _completion(self) -> Completion:
        assert self.result is not None  # _check_ended raised otherwise
        return Completion(self.text, tuple(t.id for t in self.tokens), self.result)

    def cancel(self) -> None:
        """Stop the generation (the worker drops the request at its next step)."""
        self._call.cancel()

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens) + (self.result.trailing_text if self.result else "")


class Generation(_Stream):
    """One streaming generation: iterate for TokenEvents; then `result` holds the final message."""

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            for msg in self._call:
                tok = self._take(msg)
                if tok is not None:
                    yield tok
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None
        self._check_ended()

    def complete(self) -> Completion:
        """Consume what is left of the stream and return the whole completion."""
        for _ in self:
            pass
        return self._completion()


class AsyncGeneration(_Stream):
    """`async for tok in gen`; then `gen.result`."""

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[TokenEvent]:
        try:
            async for msg in self._call:
                tok = self._take(msg)
                if tok is not None:
                    yield tok
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None
        self._check_ended()

    async def complete(self) -> Completion:
        async for _ in self:
            pass
        return self._completion()


# -- clients ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Security:
    """TLS credentials (or None) and the call metadata carrying the token."""

    credentials: grpc.ChannelCredentials | None
    metadata: tuple[tuple[str, str], ...]


def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise WorkerError("INVALID_ARGUMENT", f"{what} {str(path)!r}: cannot read it ({e.strerror})") from None


def _security(token: str | None, tls: bool, tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> _Security:
    if token is None and os.environ.get("FATE_WORKER_TOKEN_FILE"):
        token = _read(os.environ["FATE_WORKER_TOKEN_FILE"], "FATE_WORKER_TOKEN_FILE").decode().strip()
    tls_ca = tls_ca or os.environ.get("FATE_WORKER_TLS_CA") or None
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    if not (tls or tls_ca or tls_cert):
        return _Security(None, metadata)
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(tls_ca, "tls_ca") if tls_ca else None,
        private_key=_read(tls_key, "tls_key") if tls_key else None,
        certificate_chain=_read(tls_cert, "tls_cert") if tls_cert else None,
    )
    return _Security(creds, metadata)


class _Channel:
    """The channel, stubs and options of a client (sync or async by the channel factory)."""

    def __init__(self, address: str | None, timeout_s: float | None, aio: bool, *, token: str | None = None,
                 tls: bool = False, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None):
        self.address = address or default_address()
        self.timeout_s = timeout_s  # deadline of each call; None: none
        sec = _security(token, tls, tls_ca, tls_cert, tls_key)
        self._metadata = sec.metadata
        mod = grpc.aio if aio else grpc
        self._channel = (mod.secure_channel(self.address, sec.credentials) if sec.credentials is not None
                         else mod.insecure_channel(self.address))
        self._stub = pb_grpc.WorkerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _generate_call(self, prompt: str | None, token_ids: Sequence[int] | None, sampling: dict) -> Any:
        return self._stub.Generate(build_request(prompt, token_ids, **sampling), timeout=self.timeout_s,
                                   metadata=self._metadata)

    def _stats_call(self, include_layers: bool) -> Any:
        return self._stub.GetStats(pb.GetWorkerStatsRequest(include_layers=include_layers), timeout=self.timeout_s,
                                   metadata=self._metadata)

    def _model_info_call(self) -> Any:
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout_s, metadata=self._metadata)

    def _tokenize_call(self, text: str, add_special_tokens: bool) -> Any:
        return self._stub.Tokenize(pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
                                   timeout=self.timeout_s, metadata=self._metadata)

    def _health_call(self, timeout_s: float) -> Any:
        return self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)


def _status_name(reply: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class WorkerClient(_Channel):
    """Synchronous client (thread-safe: one channel, calls may run from several threads).
    address None: $FATE_WORKER_ADDRESS, else unix:/run/fate-moe/worker.sock. Security options: see the
    module's docstring."""

    def __init__(self, address: str | None = None, timeout_s: float | None = None, **security: Any):
        super().__init__(address, timeout_s, aio=False, **security)

    def generate(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None, **sampling) -> Generation:
        """Start a generation (keyword arguments as client.convert.build_request's)."""
        return Generation(self._generate_call(prompt, token_ids, sampling))

    def generate_text(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
                      **sampling) -> Completion:
        return self.generate(prompt, token_ids=token_ids, **sampling).complete()

    def stats(self, include_layers: bool = False) -> WorkerStats:
        try:
            return stats_from_pb(self._stats_call(include_layers))
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None

    def model_info(self) -> ModelInfo:
        try:
            return model_info_from_pb(self._model_info_call())
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (add_special_tokens=False: as for a rendered chat template)."""
        try:
            return list(self._tokenize_call(text, add_special_tokens).ids)
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None

    def health(self, timeout_s: float = 1.0) -> str:
        """The health service's status name ("SERVING", "NOT_SERVING", ...)."""
        try:
            return _status_name(self._health_call(timeout_s))
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None

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
        raise _not_ready(self.address, timeout_s, last)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncWorkerClient(_Channel):
    """The same API on grpc.aio; create it inside a running event loop."""

    def __init__(self, address: str | None = None, timeout_s: float | None = None, **security: Any):
        super().__init__(address, timeout_s, aio=True, **security)

    def generate(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
                 **sampling) -> AsyncGeneration:
        return AsyncGeneration(self._generate_call(prompt, token_ids, sampling))

    async def generate_text(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
                            **sampling) -> Completion:
        return await self.generate(prompt, token_ids=token_ids, **sampling).complete()

    async def stats(self, include_layers: bool = False) -> WorkerStats:
        try:
            return stats_from_pb(await self._stats_call(include_layers))
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None

    async def model_info(self) -> ModelInfo:
        try:
            return model_info_from_pb(await self._model_info_call())
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return list((await self._tokenize_call(text, add_special_tokens)).ids)
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None

    async def health(self, timeout_s: float = 1.0) -> str:
        try:
            return _status_name(await self._health_call(timeout_s))
        except grpc.RpcError as e:
            raise WorkerError.from_rpc(e) from None

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
        raise _not_ready(self.address, timeout_s, last)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncWorkerClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
