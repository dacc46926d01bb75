"""What the worker answers, as plain frozen dataclasses (no protobuf): tokens, results, statistics.

client.convert builds them from the worker's messages; derived rates are properties.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

@dataclass(frozen=True)
class TokenEvent:
    index: int  # position among the generated tokens
    id: int
    text: str  # text this token adds (may be empty, or carry earlier tokens' held-back text)
    logprob: float | None = None  # when requested with details=True


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # generated, including a stopping token that was not streamed


@dataclass(frozen=True)
class Timings:
    queue_ns: int
    prefill_ns: int
    decode_ns: int
    time_to_first_token_ns: int
    total_ns: int


class _Rates:
    """Derived rates shared by the request, layer and worker statistics."""

    @property
    def hit_rate(self) -> float:
        """(cache hits + prefetch hits) / lookups."""
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def cache_hits(self) -> int:
        """Hits on experts the cache held before this use (not brought by a prefetch)."""
        return self.hits - self.prefetch_hits

    @property
    def strict_topk_accuracy(self) -> float:
        """Share of predicted (token, layer) pairs whose predicted top-k equals the routed top-k as sets."""
        return self.predictions_exact / self.predictions if self.predictions else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Of the lookups the cache did not already hold, the share a prefetch brought:
        prefetch hits / (prefetch hits + misses)."""
        n = self.prefetch_hits + self.misses
        return self.prefetch_hits / n if n else 0.0


@dataclass(frozen=True, kw_only=True)
class PhaseStats(_Rates):
    """A request's expert counts over a set of steps (its decode steps, or one layer's lookups)."""

    lookups: int
    hits: int  # prefetch hits included
    misses: int
    prefetch_hits: int
    predictions: int = 0
    predictions_exact: int = 0
    predicted_routed: int = 0


@dataclass(frozen=True, kw_only=True)
class RequestLayerStats(PhaseStats):
    """A request's counts at one MoE layer."""

    layer: int


@dataclass(frozen=True)
class ExpertStats(_Rates):
    """The request's expert-cache statistics. Bytes fetched, fetch wait, prefetches and wasted bytes are
    those of the steps the request took part in (a step shared by batched requests counts in each of them)."""

    lookups: int
    hits: int  # prefetch hits included
    misses: int
    prefetch_hits: int
    prefetches_issued: int
    bytes_fetched: int  # demand fetches
    fetch_wait_ns: int
    predictions: int = 0  # (token, layer) pairs predicted
    predictions_exact: int = 0  # predicted top-k == routed top-k
    predicted_routed: int = 0  # routed experts inside the predictions
    prefetch_bytes: int = 0
    prefetch_wasted_bytes: int = 0
    int2_misses: int = 0
    layers: tuple[RequestLayerStats, ...] = ()
    decode: PhaseStats | None = None  # the same counts over decode steps only


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    finish_reason: str  # "length", "eos", "stop_string", "stop_token"
    stop_string: str
    stop_token_id: int
    seed: int
    usage: Usage
    timings: Timings
    experts: ExpertStats
    trailing_text: str  # held-back text released at the end (belongs after the streamed tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second of decoding (0 when fewer than two)."""
        n = self.usage.completion_tokens - 1
        return n / (self.timings.decode_ns / 1e9) if n > 0 and self.timings.decode_ns else 0.0


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]  # streamed tokens (a stopping token is not among them)
    result: GenerationResult


@dataclass(frozen=True)
class LayerStats(_Rates):
    layer: int
    slots: int
    resident_experts: int
    lookups: int
    hits: int  # prefetch hits included
    misses: int
    prefetch_hits: int
    evictions: int
    prefetches_issued: int = 0
    prefetch_unused_evictions: int = 0
    prefetch_bytes: int = 0
    prefetch_wasted_bytes: int = 0
    prefetch_late_hits: int = 0
    prefetch_dropped: int = 0
    fetch_wait_ns: int = 0
    predictions: int = 0
    predictions_exact: int = 0
    predicted_routed: int = 0
    int2_misses: int = 0
    demand_bytes: int = 0

    @property
    def prefetch_precision(self) -> float:
        """Prefetched experts used / prefetched experts."""
        return self.prefetch_hits / self.prefetches_issued if self.prefetches_issued else 0.0


@dataclass(frozen=True)
class WorkerStats(_Rates):
    worker_id: str
    model_family: str
    device: str
    expert_format: str
    cache_policy: str
    predictor: str
    uptime_ms: int
    store_connected: bool
    active_requests: int
    queued_requests: int
    requests_total: int
    requests_failed: int
    requests_cancelled: int
    prompt_tokens_total: int
    generated_tokens_total: int
    budget_bytes: int
    used_bytes: int
    high_water_bytes: int
    resident_experts: int
    lookups: int
    hits: int
    misses: int
    prefetch_hits: int
    prefetches_issued: int
    evictions: int
    bytes_fetched_shm: int
    bytes_fetched_grpc: int
    fetch_wait_ns: int
    layers: tuple[LayerStats, ...] = ()
    allocation: str = ""
    top_k: int = 0
    total_slots: int = 0
    staging_slots: int = 0
    prefetch_width: int = 0
    measured_width: int = 0
    lookahead: int = 0
    int2_tail: float = 0.0
    layer_compute_ns: float = 0.0
    expert_fetch_ns: float = 0.0
    prefetch_bytes: int = 0
    prefetch_wasted_bytes: int = 0
    prefetch_unused_evictions: int = 0
    prefetch_late_hits: int = 0
    prefetch_dropped: int = 0
    predictions: int = 0
    predictions_exact: int = 0
    predicted_routed: int = 0
    int2_misses: int = 0
    int2_bytes: int = 0
    demand_bytes: int = 0
    steps_total: int = 0
    store_hints_sent: int = 0
    store_hint_experts: int = 0
    store_hint_errors: int = 0
    fetched_tier_ram: int = 0
    fetched_tier_nvme: int = 0
    fetched_tier_ram_demand: int = 0
    fetched_tier_nvme_demand: int = 0

    @property
    def prefetch_precision(self) -> float:
        """Prefetched experts used / prefetched experts (those still resident and unused count as unused)."""
        return self.prefetch_hits / self.prefetches_issued if self.prefetches_issued else 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelInfo:
    """The served model as a front end needs it (GetModelInfo)."""

    model_name: str
    pack_id: str  # workers with equal ids serve the same model
    family: str
    max_context_tokens: int
    vocab_size: int
    has_tokenizer: bool
    chat_template: str  # Jinja source of the default template; "" when the model has none
    named_chat_templates: dict[str, str]
    bos_token: str
    eos_token: str
    pad_token: str
    unk_token: str
    eos_token_ids: tuple[int, ...]
    default_max_new_tokens: int
