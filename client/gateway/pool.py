"""The workers behind the gateway: health checks, least-outstanding routing, one retry.

Each worker is polled with grpc.health.v1 Check every `health_interval_s`; a worker is routable
while its last check answered SERVING and it serves the same pack as the first worker that
answered (a worker with another pack is left out, with an error in the log). A request goes to
the routable worker with the fewest requests in flight (ties: the one picked least recently). A
generation that fails UNAVAILABLE before its first token marks its worker down until the next
health check and is retried once on another worker; after the first token an error ends it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Sequence

from ..api import AsyncWorkerClient, GenerationResult, ModelInfo, TokenEvent, WorkerError
from .metrics import GatewayMetrics
from .schema import ApiError, api_error_from_worker

log = logging.getLogger("client.gateway")


@dataclass
class Worker:
    address: str
    client: AsyncWorkerClient
    serving: bool = False
    info: ModelInfo | None = None
    outstanding: int = 0
    last_pick: int = 0
    mismatch: bool = False  # serves another pack than the pool's model


class NoWorkerError(ApiError):
    def __init__(self, message: str):
        super().__init__(503, message, code="no_worker_available")


class Stream:
    """One generation as the gateway relays it: iterate `tokens`, then read `result`; `worker` is the
    address that served it (the second one after a retry)."""

    def __init__(self, tokens: "Callable[[Stream], AsyncIterator[TokenEvent]]"):
        self.result: GenerationResult | None = None
        self.worker = ""
        self.tokens = tokens(self)


class WorkerPool:
    def __init__(self, addresses: Sequence[str], *, health_interval_s: float = 1.0, request_timeout_s: float = 600.0,
                 retry_unavailable: bool = True, metrics: GatewayMetrics | None = None):
        self.addresses = tuple(addresses)
        self.health_interval_s = health_interval_s
        self.request_timeout_s = request_timeout_s
        self.retry_unavailable = retry_unavailable
        self.metrics = metrics or GatewayMetrics()
        self.workers: list[Worker] = []
        self.model: ModelInfo | None = None
        self._picks = itertools.count(1)
        self._task: asyncio.Task | None = None
        self._checked = asyncio.Event()

    async def start(self) -> None:
        """Create the channels and start the health loop (does not wait for any worker)."""
        self.workers = [Worker(a, AsyncWorkerClient(a, timeout_s=self.request_timeout_s)) for a in self.addresses]
        for w in self.workers:
            self.metrics.outstanding.labels(w.address).set(0)
            self.metrics.worker_up.labels(w.address).set(0)
        self._task = asyncio.create_task(self._health_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for w in self.workers:
            await w.client.close()

    async def wait_checked(self, timeout_s: float) -> None:
        """Until the first round of health checks is done (at most timeout_s)."""
        try:
            await asyncio.wait_for(self._checked.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    # -- health ---------------------------------------------------------------------------------

    async def _check(self, w: Worker) -> None:
        try:
            serving = await w.client.health(timeout_s=min(2.0, max(0.2, self.health_interval_s))) == "SERVING"
            if serving and w.info is None:
                w.info = await w.client.model_info()
        except WorkerError as e:
            if w.serving:
                log.warning("worker %s is down (%s)", w.address, e)
            serving = False
        if serving and w.info is not None:
            if self.model is None:
                self.model = w.info
                log.info("model %s (pack %s, %s) from worker %s", w.info.model_name, w.info.pack_id[:12],
                         w.info.family, w.address)
            w.mismatch = w.info.pack_id != self.model.pack_id
            if w.mismatch:
                log.error("worker %s serves pack %s, not the pool's %s: left out", w.address, w.info.pack_id[:12],
                          self.model.pack_id[:12])
        if serving and not w.serving:
            log.info("worker %s is SERVING", w.address)
        w.serving = serving
        self.metrics.worker_up.labels(w.address).set(1 if serving and not w.mismatch else 0)

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(w) for w in self.workers))
        self._checked.set()

    async def _health_loop(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.health_interval_s)

    def routable(self) -> list[Worker]:
        return [w for w in self.workers if w.serving and not w.mismatch]

    @property
    def ready(self) -> bool:
        return bool(self.routable())

    def pick(self, exclude: Sequence[Worker] = ()) -> Worker:
        candidates = [w for w in self.routable() if w not in exclude]
        if not candidates:
            up = "another worker" if exclude else "a worker"
            raise NoWorkerError(f"no worker is available ({len(self.workers)} configured, none SERVING): "
                                f"start {up} or check the gateway's log")
        w = min(candidates, key=lambda c: (c.outstanding, c.last_pick))
        w.last_pick = next(self._picks)
        return w

    def _begin(self, w: Worker) -> None:
        w.outstanding += 1
        self.metrics.outstanding.labels(w.address).set(w.outstanding)

    def _end(self, w: Worker) -> None:
        w.outstanding -= 1
        self.metrics.outstanding.labels(w.address).set(w.outstanding)

    # -- requests -------------------------------------------------------------------------------

    async def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids from a routable worker (all serve one pack, so any tokenizes alike)."""
        w = self.pick()
        self._begin(w)
        try:
            return await w.client.tokenize(text, add_special_tokens=add_special_tokens)
        except WorkerError as e:
            raise api_error_from_worker(e) from None
        finally:
            self._end(w)

    def generate(self, prompt: str | None, token_ids: list[int] | None, sampling: dict) -> Stream:
        """Start a generation; iterate `stream.tokens`, then read `stream.result`. Raises ApiError (at the
        first iteration) for worker errors; leaving the iteration early cancels the worker's request."""
        return Stream(lambda stream: self._relay(prompt, token_ids, sampling, stream))

    async def _relay(self, prompt, token_ids, sampling, stream: Stream) -> AsyncIterator[TokenEvent]:
        tried: list[Worker] = []
        while True:
            w = self.pick(exclude=tried)
            tried.append(w)
            stream.worker = w.address
            self._begin(w)
            gen = w.client.generate(prompt, token_ids=token_ids, **sampling)
            started = done = False
            try:
                async for tok in gen:
                    started = True
                    yield tok
                stream.result = gen.result
                done = True
                return
            except WorkerError as e:
                if e.code == "UNAVAILABLE":
                    w.serving = False  # until its next health check says otherwise
                    self.metrics.worker_up.labels(w.address).set(0)
                can_retry = (e.code == "UNAVAILABLE" and not started and self.retry_unavailable and len(tried) < 2
                             and any(c not in tried for c in self.routable()))
                if not can_retry:
                    raise api_error_from_worker(e) from None
                log.info("worker %s: %s before the first token; retrying on another worker", w.address, e.code)
                self.metrics.retries.inc()
            finally:
                if not done:
                    gen.cancel()  # the client went away (or an error): the worker drops the request
                self._end(w)
