"""Run the gateway under uvicorn on a TCP address or a unix socket until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os

import uvicorn

from .app import create_app
from .settings import GatewaySettings

log = logging.getLogger("client.gateway")


def uvicorn_config(settings: GatewaySettings) -> uvicorn.Config:
    app = create_app(settings)
    common = dict(log_level=settings.log_level.lower(), access_log=settings.log_level.lower() == "debug",
                  lifespan="on", timeout_graceful_shutdown=10)
    if settings.listen.startswith("unix:"):
        path = settings.listen[len("unix:"):]
        if os.path.exists(path):
            os.unlink(path)  # a socket left by a previous run
        return uvicorn.Config(app, uds=path, **common)
    host, _, port = settings.listen.rpartition(":")
    return uvicorn.Config(app, host=host.strip("[]"), port=int(port), **common)


def run(settings: GatewaySettings) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = uvicorn.Server(uvicorn_config(settings))
    server.run()
    return 0 if server.started else 1
