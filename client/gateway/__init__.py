"""An OpenAI-compatible HTTP gateway in front of one or many workers (a gRPC client of them).

    python -m client gateway --worker 127.0.0.1:50061 [--worker ...] --listen 127.0.0.1:8000

Modules: `settings` (GatewaySettings, TOML), `app` (the Starlette routes), `schema` (OpenAI's
shapes <-> the worker's), `templates` (chat templates as transformers renders them), `pool`
(health checks, least-outstanding routing, retry), `metrics` (Prometheus), `server` (uvicorn).
"""
