"""The worker's gRPC edge in this process: the real WorkerServicer, EdgeInterceptor and Engine over a
model read straight from the pack (no store), served by grpc.aio on a loop in a background thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace

import grpc
from grpc_health.v1 import health_pb2_grpc

from expert_store.edge import EdgeInterceptor, ServerSecurity, bind
from gpu_worker.config import WorkerConfig
from gpu_worker.engine import Engine
from gpu_worker.runtime import load_local
from gpu_worker.server import WorkerServicer, _Health, status_for
from moe.v1 import worker_pb2_grpc as pb_grpc


class InProcessWorker:
    def __init__(self, pack: Path, listen: str, security: ServerSecurity = ServerSecurity(), **config):
        local = load_local(pack, "int4", "cpu")
        self.config = WorkerConfig(store="unix:/nonexistent.sock", listen=listen, **config)
        self.engine = Engine(local.model, local.tokenizer, max_batch_size=self.config.max_batch_size,
                             max_queue=self.config.max_queue).start()
        self.rt = SimpleNamespace(config=self.config, model=local.model, tokenizer=local.tokenizer,
                                  engine=self.engine, store=SimpleNamespace(pack_changed=False),
                                  store_connected=True)
        self._security = security
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inproc-worker", daemon=True)
        self._error: BaseException | None = None
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        self.address = self.listener.address

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._loop.run_forever()

    async def _start(self) -> None:
        try:
            self.server = grpc.aio.server(
                options=[("grpc.max_receive_message_length", self.config.max_request_bytes)],
                interceptors=[EdgeInterceptor(status_for, self._security.token)])
            pb_grpc.add_WorkerServicer_to_server(WorkerServicer(self.rt), self.server)
            self.health = _Health()
            health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.server)
            self.listener = bind(self.server, self.config.listen, self._security, "listen")
            await self.server.start()
            await self.health.set(True)
        except BaseException as e:  # noqa: BLE001 - re-raised in the constructor
            self._error = e
        self._ready.set()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self.engine.shutdown()
        self.listener.remove_socket()
