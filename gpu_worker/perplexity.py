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


@torch.inference_mode()
def perplexity(model: MoEModel, ids: list[int], window: int = 512, max_tokens: int | None = None) -> PerplexityResult:
    """exp(mean next-token NLL) over windows of `window` tokens of ids[:max_tokens]."""
    ids = ids[:max_tokens] if max_tokens else ids
    if len(ids) < 2:
        raise TokenRangeError("need at least 2 tokens to score")
    nll, count, windows = 0.0, 0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[start : start + window])
        if chunk.numel() < 2:
            break
        logits = model.forward([model.new_sequence(chunk.numel())], [chunk], all_logits=True)  # [t, V]
        logp = torch.log_softmax(logits[:-1].double(), dim=-1)
        nll -= float(logp.gather(1, chunk[1:, None]).sum())
        count += chunk.numel() - 1
        windows += 1
    return PerplexityResult(math.exp(nll / count), count, windows)
