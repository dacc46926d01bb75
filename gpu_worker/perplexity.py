"""Perplexity of a pack on a text file: non-overlapping windows, each scored from scratch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .model import MoEModel, TokenRangeError


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens_scored: int
    windows: int
    window_nll: tuple[float, ...] = ()  # summed next-token NLL of each window, in text order
    window_tokens: tuple[int, ...] = ()  # tokens scored in each window

    def first(self, windows: int) -> float:
        """The perplexity of the first `windows` windows alone (a prefix of the text)."""
        return math.exp(sum(self.window_nll[:windows]) / sum(self.window_tokens[:windows]))


@torch.inference_mode()
def perplexity(model: MoEModel, ids: list[int], window: int = 512, max_tokens: int | None = None,
               batch: int = 8) -> PerplexityResult:
    """exp(mean next-token NLL) over non-overlapping windows of `window` tokens of ids[:max_tokens],
    each scored from scratch; `batch` windows go through the model in one forward (one pass over
    the experts per batch instead of per window; the same figure up to float rounding)."""
    ids = ids[:max_tokens] if max_tokens else ids
    if len(ids) < 2:
        raise TokenRangeError("need at least 2 tokens to score")
    chunks = [torch.tensor(ids[s : s + window]) for s in range(0, len(ids) - 1, window)]
    chunks = [c for c in chunks if c.numel() >= 2]
    nll: list[float] = []
    count: list[int] = []
    for b in range(0, len(chunks), max(1, batch)):
        group = chunks[b : b + max(1, batch)]
        logits = model.forward([model.new_sequence(c.numel()) for c in group], group, all_logits=True)  # [sum t, V]
        start = 0
        for c in group:
            logp = torch.log_softmax(logits[start : start + c.numel() - 1].double(), dim=-1)
            nll.append(-float(logp.gather(1, c[1:, None].to(logp.device)).sum()))
            count.append(c.numel() - 1)
            start += c.numel()
    return PerplexityResult(math.exp(sum(nll) / sum(count)), sum(count), len(chunks), tuple(nll), tuple(count))
