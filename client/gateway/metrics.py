"""The gateway's Prometheus metrics (served at GET /metrics), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("fate_gateway_requests", "HTTP requests by endpoint and status code",
                                ("endpoint", "status"), registry=r)
        self.ttft = Histogram("fate_gateway_time_to_first_token_seconds",
                              "Request received -> first generated token (as the gateway sees it)", ("endpoint",),
                              buckets=_LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram("fate_gateway_inter_token_latency_seconds", "Time between consecutive tokens",
                             ("endpoint",), buckets=_ITL_BUCKETS_S, registry=r)
        self.duration = Histogram("fate_gateway_request_duration_seconds", "Request received -> last byte",
                                  ("endpoint",), buckets=_LATENCY_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("fate_gateway_prompt_tokens", "Prompt tokens (the workers' counts)", registry=r)
        self.completion_tokens = Counter("fate_gateway_completion_tokens", "Generated tokens (the workers' counts)",
                                         registry=r)
        self.retries = Counter("fate_gateway_retries", "Requests retried on another worker (UNAVAILABLE before "
                               "the first token)", registry=r)
        self.outstanding = Gauge("fate_gateway_worker_outstanding_requests", "Requests in flight per worker",
                                 ("worker",), registry=r)
        self.worker_up = Gauge("fate_gateway_worker_up", "1 when the worker's health check answers SERVING",
                               ("worker",), registry=r)
        self.cancelled = Counter("fate_gateway_client_disconnects", "Generations cancelled because the HTTP client "
                                 "went away", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
