"""A request inside the engine: its handle, its sequence state, and the text rules of its stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .events import ExpertStats, GenerationRequest, Sink
from .generate import SamplingParams, scaled_scores
from .model import SequenceKV
from .tokenizer import IncrementalDecoder


class RequestHandle:
    """The caller's side of a submitted request: cancel it (client gone)."""

    def __init__(self, wake: Callable[[], None], request_id: str):
        self._wake = wake  # the engine's: its loop notices the cancellation at the next step
        self.request_id = request_id
        self.cancelled = False
        self.done = False

    def cancel(self) -> None:
        """Drop the request at the next step (its KV cache is freed); no further events."""
        if not self.done and not self.cancelled:
            self.cancelled = True
            self._wake()


@dataclass
class ActiveRequest:
    req: GenerationRequest
    sink: Sink
    handle: RequestHandle
    seed: int
    t_accepted: int
    stops: frozenset[int] = frozenset()
    seq: SequenceKV | None = None
    generator: torch.Generator | None = None
    decoder: IncrementalDecoder | None = None
    next_input: list[int] = field(default_factory=list)
    generated: int = 0
    held: str = ""  # decoded text not yet streamed (a possible stop-string prefix)
    prefilled: bool = False
    t_admitted: int = 0
    prefill_ns: int = 0
    t_first_token: int = 0
    t_decode_start: int = 0
    t_last_token: int = 0
    experts: ExpertStats = field(default_factory=ExpertStats)
    rid: int = 0  # the engine's integer id (predictors, traces)
    started: bool = False  # the step listeners saw start_request


def held_suffix(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def logprob(logits: torch.Tensor, params: SamplingParams, token: int) -> float:
    """log P(token) under the distribution `sample` draws from (greedy: the model's softmax)."""
    if params.greedy:
        return float(torch.log_softmax(logits.float(), -1)[token])
    scores = scaled_scores(logits, params.temperature)
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        p = torch.softmax(sorted_scores, dim=-1)
        drop = (p.cumsum(-1) - p) >= params.top_p
        drop[0] = False
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    return float(torch.log_softmax(scores, -1)[token])
