"""A workload's figures from its requests' records and the worker's counter deltas (bench/plan.py's
FIGURES): decode and prefill rates, TTFT, hit rates, fetch wait and bytes per token."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .plan import EXTRA_FIGURES, FIGURES, Workload


@dataclass
class RequestRecord:
    prompt_tokens: int
    completion_tokens: int
    t_first_s: float | None  # client clock, seconds since the workload started
    t_last_s: float | None
    prefill_ns: int
    decode_ns: int
    ttft_ns: int
    queue_ns: int
    hits: int
    lookups: int
    prefetch_hits: int
    bytes_fetched: int
    fetch_wait_ns: int
    decode_tokens_per_s: float


def stats_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Counters as differences; gauges and ratios (floats, used/high-water bytes) as their value after."""
    gauges = {"budget_bytes", "used_bytes", "high_water_bytes", "resident_experts", "active_requests",
              "queued_requests", "uptime_ms"}
    out: dict[str, Any] = {}
    for k, v in after.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, int) and k not in gauges and isinstance(before.get(k), int):
            out[k] = v - before[k]
        else:
            out[k] = v
    return out


def workload_figures(wl: Workload, records: Sequence[RequestRecord], delta: Mapping[str, Any], wall_s: float
                     ) -> dict[str, Any]:
    f: dict[str, Any] = {k: None for k in FIGURES + EXTRA_FIGURES}
    f["wall_s"] = wall_s
    generated = sum(r.completion_tokens for r in records)
    prompt = sum(r.prompt_tokens for r in records)
    tokens = prompt if wl.kind == "prefill" else generated
    if wl.kind == "decode":
        firsts = [r.t_first_s for r in records if r.t_first_s is not None]
        lasts = [r.t_last_s for r in records if r.t_last_s is not None]
        n = sum(max(0, r.completion_tokens - 1) for r in records)
        span = max(lasts) - min(firsts) if firsts and lasts else 0.0
        f["decode_tokens_per_s"] = n / span if n and span > 0 else None
        f["per_request_decode_tokens_per_s"] = statistics.median(r.decode_tokens_per_s for r in records)
    else:
        ns = sum(r.prefill_ns for r in records)
        f["prefill_tokens_per_s"] = prompt / (ns / 1e9) if ns else None
    f["ttft_ms"] = statistics.median(r.ttft_ns for r in records) / 1e6 if records else None
    d = delta.get
    if d("lookups"):
        f["hit_rate"] = d("hits", 0) / d("lookups")  # the worker counts prefetch hits among hits
        f["prefetch_hit_rate"] = d("prefetch_hits", 0) / d("lookups")
        f["cache_hit_rate"] = f["hit_rate"] - f["prefetch_hit_rate"]
        if "prefetch_late_hits" in delta:  # a late prefetch counts as a hit but the compute waited for it
            f["on_time_hit_rate"] = (d("hits", 0) - d("prefetch_late_hits", 0)) / d("lookups")
    if d("predictions"):
        f["strict_topk_accuracy"] = d("predictions_exact", 0) / d("predictions")
    if d("prefetch_hits", 0) + d("misses", 0):
        f["prefetch_recall"] = d("prefetch_hits", 0) / (d("prefetch_hits", 0) + d("misses", 0))
    if d("prefetches_issued"):
        f["prefetch_precision"] = d("prefetch_hits", 0) / d("prefetches_issued")
    ram, nvme = d("fetched_tier_ram", 0), d("fetched_tier_nvme", 0)
    if ram + nvme:  # how often a fetch (and a cache miss alone) found the expert in the store's RAM tier
        f["store_ram_hit_rate"] = ram / (ram + nvme)
    ram, nvme = d("fetched_tier_ram_demand", 0), d("fetched_tier_nvme_demand", 0)
    if ram + nvme:
        f["store_ram_demand_hit_rate"] = ram / (ram + nvme)
    if tokens:
        f["fetch_wait_ms_per_token"] = d("fetch_wait_ns", 0) / 1e6 / tokens
        f["bytes_fetched_per_token"] = (d("bytes_fetched_shm", 0) + d("bytes_fetched_grpc", 0)) / tokens
        if "prefetch_wasted_bytes" in delta:
            f["wasted_prefetch_bytes_per_token"] = d("prefetch_wasted_bytes", 0) / tokens
    return f


