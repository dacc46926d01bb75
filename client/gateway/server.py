"""Run the gateway under uvicorn on a TCP address or a unix socket until SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import threading

import uvicorn

from .app import create_app
from .settings import GatewaySettings

log = logging.getLogger("client.gateway")


class _Server(uvicorn.Server):
    """uvicorn's server without re-raising SIGTERM/SIGINT after the graceful shutdown, so a stopped
    gateway exits 0 as the store and the worker do."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def uvicorn_config(settings: GatewaySettings) -> uvicorn.Config:
    app = create_app(settings)
    # asyncio's own loop: the one grpc.aio is built and tested for (uvloop is not needed at these rates)
    common = dict(log_level=settings.log_level.lower(), access_log=settings.log_level.lower() == "debug",
                  lifespan="on", timeout_graceful_shutdown=10, loop="asyncio")
    if settings.listen.startswith("unix:"):
        path = settings.listen[len("unix:"):]
        if os.path.exists(path):
            os.unlink(path)  # a socket left by a previous run
        return uvicorn.Config(app, uds=path, **common)
    host, _, port = settings.listen.rpartition(":")
    return uvicorn.Config(app, host=host.strip("[]"), port=int(port), **common)


def run(settings: GatewaySettings) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    faulthandler.enable()  # a crash in native code (grpc) leaves its Python stack in the log
    if hasattr(signal, "SIGPIPE"):
        # a server gets EPIPE as an error on the one connection: `python -m client` sets SIGPIPE to its
        # default for the CLI's pipes, under which a write to a closed socket (a client gone, a killed
        # worker's gRPC connection) would end the whole gateway silently, with every open request
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    server = _Server(uvicorn_config(settings))
    server.run()
    return 0 if server.started else 1
