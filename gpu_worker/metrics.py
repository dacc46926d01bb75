"""Prometheus metrics of the worker on an HTTP port (prometheus-client).

Counters and gauges are read at scrape time from the same sources GetStats reads
(the engine's, the cache's and the store client's counters), so /metrics and
GetStats never disagree. Only the latency histograms are observed as requests
finish. Each worker gets its own CollectorRegistry (tests run several in one
process).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .engine import EngineStats, FinalEvent

log = logging.getLogger("gpu_worker.metrics")

_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _Sources:
    """Callables returning the live counters (None when a part is not there yet)."""

    def __init__(self, engine_stats: Callable[[], EngineStats | None], cache_stats: Callable[[], object | None],
                 fetch_counters: Callable[[], object | None], store_connected: Callable[[], bool],
                 prediction_stats: Callable[[], object | None] = lambda: None):
        self.engine_stats = engine_stats
        self.cache_stats = cache_stats
        self.fetch_counters = fetch_counters
        self.store_connected = store_connected
        self.prediction_stats = prediction_stats


class _WorkerCollector(Collector):
    def __init__(self, src: _Sources):
        self.src = src

    def collect(self) -> Iterable[Metric]:
        def counter(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> CounterMetricFamily:
            m = CounterMetricFamily(name, doc, labels=list(labels) if labels else None)
            m.add_metric(list(labels.values()) if labels else [], value)
            return m

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        e = self.src.engine_stats()
        if e is not None:
            yield gauge("fate_worker_active_requests", "Requests in the decode batch now", e.active_requests)
            yield gauge("fate_worker_queued_requests", "Requests accepted and waiting for a batch slot",
                        e.queued_requests)
            yield counter("fate_worker_requests", "Requests accepted", e.requests_total)
            yield counter("fate_worker_requests_failed", "Requests ended by an error", e.requests_failed)
            yield counter("fate_worker_requests_cancelled", "Requests cancelled by their client",
                          e.requests_cancelled)
            tokens = CounterMetricFamily("fate_worker_tokens", "Tokens processed", labels=["kind"])
            tokens.add_metric(["prompt"], e.prompt_tokens_total)
            tokens.add_metric(["generated"], e.generated_tokens_total)
            yield tokens
            yield counter("fate_worker_steps", "Forward steps run (one per batch step)", e.steps_total)
        yield gauge("fate_worker_store_connected", "1 while the expert store is reachable",
                    1.0 if self.src.store_connected() else 0.0)
        c = self.src.cache_stats()
        if c is not None:
            t = c.total
            yield gauge("fate_worker_cache_budget_bytes", "Expert-cache budget", c.budget_bytes)
            yield gauge("fate_worker_cache_used_bytes", "Expert-cache bytes in use (resident + reserved)",
                        c.used_bytes)
            yield gauge("fate_worker_cache_high_water_bytes", "Largest used bytes since start-up",
                        c.high_water_bytes)
            yield gauge("fate_worker_cache_resident_experts", "Experts resident in the cache", t.resident)
            yield counter("fate_worker_cache_lookups", "Expert lookups (each expert once per layer and step)",
                          t.lookups)
            yield counter("fate_worker_cache_hits", "Lookups found resident (prefetch hits included)",
                          t.hits + t.prefetch_hits)
            yield counter("fate_worker_cache_prefetch_hits", "Lookups found resident thanks to a prefetch",
                          t.prefetch_hits)
            yield counter("fate_worker_cache_misses", "Lookups fetched on demand", t.misses)
            yield counter("fate_worker_cache_evictions", "Experts evicted", t.evictions)
            yield counter("fate_worker_fetch_wait_seconds", "Time compute waited for experts",
                          t.fetch_wait_ns / 1e9)
            yield gauge("fate_worker_cache_staging_slots", "Budget units kept for prefetched experts", c.staging_slots)
            yield counter("fate_worker_prefetched_experts", "Experts inserted by prefetch", t.prefetched)
            yield counter("fate_worker_prefetch_bytes", "Expert bytes fetched by prefetch", t.prefetch_bytes)
            yield counter("fate_worker_prefetch_wasted_bytes", "Bytes of prefetched experts evicted before any use",
                          t.prefetch_wasted_bytes)
            yield counter("fate_worker_prefetch_unused_evictions", "Prefetched experts evicted before any use",
                          t.prefetch_unused_evictions)
            yield counter("fate_worker_prefetch_late_hits", "Prefetch hits the compute waited for",
                          t.prefetch_late_hits)
            yield counter("fate_worker_prefetch_dropped", "Experts of prefetches dropped (their layer had run)",
                          t.prefetch_dropped)
            yield counter("fate_worker_int2_misses", "Prefill experts fetched as INT2 (never cached)", t.int2_misses)
            per_layer = {name: CounterMetricFamily(f"fate_worker_layer_{name}", doc, labels=["layer"])
                         for name, doc in (
                ("lookups", "Expert lookups per MoE layer"),
                ("hits", "Lookups found resident per MoE layer (prefetch hits included)"),
                ("prefetch_hits", "Lookups found resident thanks to a prefetch, per MoE layer"),
                ("misses", "Lookups fetched on demand per MoE layer"),
                ("prefetched_experts", "Experts inserted by prefetch per MoE layer"),
                ("prefetch_wasted_bytes", "Bytes of prefetched experts evicted unused, per MoE layer"),
                ("fetch_wait_seconds", "Time compute waited for experts, per MoE layer"),
            )}
            for layer, ls in sorted(c.layers.items()):
                values = dict(lookups=ls.lookups, hits=ls.hits + ls.prefetch_hits, prefetch_hits=ls.prefetch_hits,
                              misses=ls.misses, prefetched_experts=ls.prefetched,
                              prefetch_wasted_bytes=ls.prefetch_wasted_bytes, fetch_wait_seconds=ls.fetch_wait_ns / 1e9)
                for name, m in per_layer.items():
                    m.add_metric([str(layer)], values[name])
            yield from per_layer.values()
        p = self.src.prediction_stats()
        if p is not None:
            yield gauge("fate_worker_prefetch_width", "Experts per token the predictor proposes now", p.width)
            yield gauge("fate_worker_prefetch_measured_width", "Width before the throttle", p.measured_width)
            yield gauge("fate_worker_layer_compute_seconds", "EWMA of one MoE layer's compute time", p.layer_ns / 1e9)
            yield gauge("fate_worker_expert_fetch_seconds", "EWMA of one expert's fetch + build time",
                        p.expert_ns / 1e9)
            preds = CounterMetricFamily("fate_worker_predictions", "(token, MoE layer) pairs predicted",
                                        labels=["layer"])
            exact = CounterMetricFamily("fate_worker_predictions_exact",
                                        "Predictions whose top-k equals the routed top-k", labels=["layer"])
            routed = CounterMetricFamily("fate_worker_predicted_routed",
                                         "Routed experts inside the prediction list", labels=["layer"])
            for layer, v in sorted(p.layers.items()):
                preds.add_metric([str(layer)], v.predictions)
                exact.add_metric([str(layer)], v.exact)
                routed.add_metric([str(layer)], v.routed_in)
            yield from (preds, exact, routed)
        f = self.src.fetch_counters()
        if f is not None:
            by_bytes = CounterMetricFamily("fate_worker_fetch_bytes", "Expert bytes fetched from the store",
                                           labels=["transport"])
            by_time = CounterMetricFamily("fate_worker_fetch_seconds", "Time spent in fetches",
                                          labels=["transport"])
            by_count = CounterMetricFamily("fate_worker_fetched_experts", "Experts fetched", labels=["transport"])
            for transport in ("shm", "grpc", "local"):
                by_bytes.add_metric([transport], getattr(f, f"bytes_fetched_{transport}", 0))
                by_time.add_metric([transport], getattr(f, f"fetch_ns_{transport}", 0) / 1e9)
                by_count.add_metric([transport], getattr(f, f"experts_{transport}", 0))
            tiers = CounterMetricFamily("fate_worker_fetched_experts_by_tier",
                                        "Experts fetched, by the store tier that served them", labels=["tier"])
            tiers.add_metric(["ram"], getattr(f, "tier_ram", 0))
            tiers.add_metric(["nvme"], getattr(f, "tier_nvme", 0))
            yield from (by_bytes, by_time, by_count, tiers)


class WorkerMetrics:
    """The registry, the histograms observed per request, and the HTTP endpoint."""

    def __init__(
        self,
        engine_stats: Callable[[], EngineStats | None],
        cache_stats: Callable[[], object | None] = lambda: None,
        fetch_counters: Callable[[], object | None] = lambda: None,
        store_connected: Callable[[], bool] = lambda: True,
        prediction_stats: Callable[[], object | None] = lambda: None,
    ):
        self.registry = CollectorRegistry()
        self.request_latency = Histogram(
            "fate_worker_request_duration_seconds", "Accepted -> final message, finished requests",
            buckets=_LATENCY_BUCKETS_S, registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "fate_worker_time_to_first_token_seconds", "Accepted -> first token, finished requests",
            buckets=_LATENCY_BUCKETS_S, registry=self.registry,
        )
        self.registry.register(_WorkerCollector(_Sources(engine_stats, cache_stats, fetch_counters, store_connected,
                                                         prediction_stats)))
        self._server = None
        self.port = 0

    def observe_final(self, final: FinalEvent) -> None:
        """Engine callback (compute thread): the histograms are thread-safe."""
        self.request_latency.observe(final.timings.total_ns / 1e9)
        self.time_to_first_token.observe(final.timings.time_to_first_token_ns / 1e9)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint (a daemon thread); returns the bound port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
