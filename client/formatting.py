"""How the client CLI and the demo print results and statistics: tidy numbers, n/a where a figure
does not apply (prediction rates without a predictor), the same values as text and as JSON."""

from __future__ import annotations

import dataclasses
from typing import Any

from .results import GenerationResult, LayerStats, WorkerStats

NA = "n/a"


def tidy(name: str, value: Any) -> Any:
    """Nanoseconds as whole numbers; other floats to 6 significant digits (a float32 0.3 stays 0.3)."""
    if isinstance(value, float) and not isinstance(value, bool):
        return round(value) if name.endswith("_ns") else float(f"{value:.6g}")
    return value


def prediction_rates(s: WorkerStats | LayerStats) -> dict[str, float | None]:
    """Predictor figures, None where they do not apply (no predictions made, nothing prefetched)."""
    return {
        "strict_topk_accuracy": s.strict_topk_accuracy if s.predictions else None,
        "prefetch_recall": s.prefetch_recall if s.prefetches_issued else None,
        "prefetch_precision": s.prefetch_precision if s.prefetches_issued else None,
    }


def derived_stats(s: WorkerStats) -> dict[str, float | None]:
    tokens = max(1, s.generated_tokens_total)
    return {
        "hit_rate": s.hit_rate, **prediction_rates(s),
        "wasted_bytes_per_token": s.prefetch_wasted_bytes / tokens if s.prefetches_issued else None,
        "fetch_wait_ms_per_token": s.fetch_wait_ns / 1e6 / tokens,
    }  # fmt: skip


def stats_json(s: WorkerStats) -> dict[str, Any]:
    """The statistics and the derived rates, numbers tidied (None for n/a)."""
    raw = {**s.to_dict(), **derived_stats(s)}
    out = {k: tidy(k, v) for k, v in raw.items() if k != "layers"}
    out["layers"] = [{k: tidy(k, v) for k, v in {**layer, **prediction_rates(l)}.items()}
                     for layer, l in zip(raw["layers"], s.layers)]
    return out


def _pct(x: float | None, width: int) -> str:
    return f"{NA:>{width}}" if x is None else f"{100 * x:>{width}.2f}"


def stats_lines(s: WorkerStats) -> list[str]:
    """`client stats`: one `name value` line per figure, then the per-layer table when it was asked for."""
    lines = []
    for f in dataclasses.fields(s):
        if f.name != "layers":
            lines.append(f"{f.name:26} {tidy(f.name, getattr(s, f.name))}")
    for name, value in derived_stats(s).items():
        lines.append(f"{name:26} {NA if value is None else f'{value:.4f}'}")
    if s.layers:
        lines.append(f"{'layer':>5} {'slots':>5} {'resid':>5} {'lookups':>8} {'hit%':>6} {'cache':>7} {'prefetch':>8} "
                     f"{'miss':>6} {'evict':>6} {'pf_in':>6} {'wasted':>6} {'late':>5} {'strict%':>7} {'recall%':>7} "
                     f"{'prec%':>6} {'wait_ms':>8}")
        for l in s.layers:
            r = prediction_rates(l)
            lines.append(
                f"{l.layer:>5} {l.slots:>5} {l.resident_experts:>5} {l.lookups:>8} {100 * l.hit_rate:>6.2f} "
                f"{l.cache_hits:>7} {l.prefetch_hits:>8} {l.misses:>6} {l.evictions:>6} {l.prefetches_issued:>6} "
                f"{l.prefetch_unused_evictions:>6} {l.prefetch_late_hits:>5} {_pct(r['strict_topk_accuracy'], 7)} "
                f"{_pct(r['prefetch_recall'], 7)} {_pct(r['prefetch_precision'], 6)} {l.fetch_wait_ns / 1e6:>8.1f}")
    return lines


def summary_line(result: GenerationResult) -> str:
    """One line: finish reason, usage, timings and the request's expert statistics."""
    t, e, u = result.timings, result.experts, result.usage
    finish = result.finish_reason + (f" {result.stop_string!r}" if result.stop_string else "") + (
        f" (token {result.stop_token_id})" if result.finish_reason in ("eos", "stop_token") else "")
    rate = f"{result.decode_tokens_per_s:.1f} tokens/s" if result.decode_tokens_per_s else NA
    return (
        f"[finish {finish}; {u.completion_tokens} tokens, prompt {u.prompt_tokens}; "
        f"queue {t.queue_ns / 1e6:.1f} ms, prefill {t.prefill_ns / 1e6:.1f} ms, "
        f"first token {t.time_to_first_token_ns / 1e6:.1f} ms, decode {rate}, total {t.total_ns / 1e6:.1f} ms; "
        f"experts: {e.lookups} lookups, {e.hits} hits ({100 * e.hit_rate:.1f}%, {e.prefetch_hits} by prefetch), "
        f"{e.misses} misses, {e.bytes_fetched / 2**20:.2f} MiB fetched on demand, "
        f"{e.prefetch_bytes / 2**20:.2f} MiB prefetched, fetch wait {e.fetch_wait_ns / 1e6:.1f} ms"
        + (f", strict top-k {100 * e.strict_topk_accuracy:.1f}%" if e.predictions else "")
        + f"; seed {result.seed}]"
    )
