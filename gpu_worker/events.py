"""What a generation request is and what comes back: the engine's public types and errors.

A request (`GenerationRequest`) streams `TokenEvent`s and ends with one `FinalEvent` (finish
reason, usage, timings, the request's `ExpertStats`) or an `ErrorEvent`. How the expert
counts are attributed to requests: `gpu_worker.request_stats`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Callable

from expert_store.errors import FateError

from .generate import SamplingParams


# -- errors -------------------------------------------------------------------------------


class RequestError(FateError, ValueError):
    """A request the engine refuses as given (bad prompt, stop strings, token ids)."""


class ContextLengthError(RequestError):
    """The prompt plus max_new_tokens do not fit the model's context."""


class QueueFullError(FateError):
    """Too many requests waiting: retry later or raise --max-queue."""


class EngineStoppedError(FateError):
    """The engine is shutting down (or has stopped): the request was not (fully) served."""


# -- domain types -------------------------------------------------------------------------


class FinishReason(enum.Enum):
    LENGTH = "length"  # reached max_new_tokens
    EOS = "eos"  # the model's end-of-sequence token
    STOP_STRING = "stop_string"
    STOP_TOKEN = "stop_token"


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams  # max_new_tokens already resolved (no "0 = default" here)
    stop_strings: tuple[str, ...] = ()
    details: bool = False  # fill TokenEvent.logprob
    request_id: str = ""  # "" -> the engine assigns one


@dataclass
class LayerExpertStats:
    """One request's counts at one MoE layer (attribution: gpu_worker.request_stats)."""

    lookups: int = 0
    hits: int = 0  # prefetch hits included
    misses: int = 0
    prefetch_hits: int = 0
    predictions: int = 0  # token rows a prediction was made for
    predictions_exact: int = 0  # predicted top-k == routed top-k (as sets)
    predicted_routed: int = 0  # routed experts inside the row's prediction


@dataclass
class ExpertStats:
    """One request's expert-cache statistics (attribution: gpu_worker.request_stats)."""

    lookups: int = 0
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    prefetches_issued: int = 0
    bytes_fetched: int = 0
    fetch_wait_ns: int = 0
    predictions: int = 0
    predictions_exact: int = 0
    predicted_routed: int = 0
    prefetch_bytes: int = 0  # step-charged, like bytes_fetched
    prefetch_wasted_bytes: int = 0  # step-charged: prefetched experts evicted unused during its steps
    int2_misses: int = 0  # step-charged: INT2 tail experts fetched during its steps
    layers: dict[int, LayerExpertStats] = field(default_factory=dict)  # decoder layer -> counts
    decode: LayerExpertStats = field(default_factory=LayerExpertStats)  # all layers, decode steps only

    def copy(self) -> "ExpertStats":
        return replace(self, layers={k: replace(v) for k, v in self.layers.items()}, decode=replace(self.decode))


@dataclass(frozen=True)
class Timings:
    queue_ns: int  # accepted -> admitted
    prefill_ns: int  # the forward that ran the prompt
    decode_ns: int  # first decode forward started -> last token sampled
    time_to_first_token_ns: int  # accepted -> first token sampled
    total_ns: int  # accepted -> finished


@dataclass(frozen=True)
class TokenEvent:
    index: int  # position among generated tokens
    id: int
    text: str  # may be "" (incomplete UTF-8, held back for a stop string) or carry earlier tokens' text
    logprob: float | None = None


@dataclass(frozen=True)
class FinalEvent:
    request_id: str
    finish_reason: FinishReason
    seed: int
    prompt_tokens: int
    completion_tokens: int  # generated, including a stopping token that was not streamed
    timings: Timings
    experts: ExpertStats
    stop_string: str = ""
    stop_token_id: int | None = None
    trailing_text: str = ""  # held-back text released at the end (not carried by any token event)


@dataclass(frozen=True)
class ErrorEvent:
    error: BaseException


Event = TokenEvent | FinalEvent | ErrorEvent
Sink = Callable[[Event], None]


@dataclass(frozen=True)
class EngineStats:
    active_requests: int
    queued_requests: int
    requests_total: int  # accepted
    requests_failed: int
    requests_cancelled: int
    prompt_tokens_total: int
    generated_tokens_total: int
    steps_total: int
