"""Sampling and the single-sequence generation loop (prefill the prompt, then one token per step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from expert_store.errors import FateError

from .model import MoEModel


_MIN_TEMPERATURE = float(torch.finfo(torch.float32).tiny)  # ~1.18e-38


class SamplingError(FateError, ValueError):
    """Sampling parameters out of range (the message says which and the allowed range)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is generated."""

    max_new_tokens: int = 64
    """Tokens to generate at most."""
    temperature: float = 0.0
    """Sampling temperature; 0: greedy."""
    top_k: int = 0
    """Sample among the k likeliest tokens; 0: no top-k cut."""
    top_p: float = 1.0
    """Sample within the smallest set of this probability mass; 1: no nucleus cut."""
    seed: int | None = None
    """Seed of the sampler; None: nondeterministic when sampling."""
    stop_token_ids: tuple[int, ...] = ()
    """Stop on these besides the model's EOS."""
    ignore_eos: bool = False
    """Keep going past EOS (benchmarks, reference comparisons)."""

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0.0 and self.temperature == self.temperature):
            raise SamplingError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or below fp32's smallest normal number, where scaling is no longer defined), or top_k 1."""
        return self.temperature < _MIN_TEMPERATURE or self.top_k == 1


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g


def scaled_scores(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(logits - max) / temperature in fp32: the same distribution as logits / temperature, but it never
    overflows. A temperature so small that logits / temperature would overflow (1e-38) gives -inf to every
    token but the most likely ones, so it samples as greedy does: the limit of the distribution as the
    temperature goes to 0, rather than the NaNs of inf - inf."""
    x = logits.float()
    return (x - x.max()) / temperature


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token from logits [V]: greedy, or temperature -> top-k -> top-p (Hugging Face's order)."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = scaled_scores(logits, params.temperature)
    if params.top_k > 0 and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p; always keep the first
        drop = (cum - torch.softmax(sorted_scores, dim=-1)) >= params.top_p
        drop[0] = False
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    model: MoEModel, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams()
) -> Iterator[int]:
    """Yield new token ids; stops on EOS (unless ignore_eos), a stop token, or max_new_tokens."""
    params.validate()
    if not prompt_ids:
        raise SamplingError("the prompt is empty")
    limit = model.args.max_position_embeddings
    if len(prompt_ids) + params.max_new_tokens > limit:
        raise SamplingError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the context ({limit})"
        )
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(model.args.eos_token_ids))
    gen = make_generator(params)
    seq = model.new_sequence(capacity=len(prompt_ids) + params.max_new_tokens)
    logits = model.forward([seq], [torch.tensor(list(prompt_ids))])[0]
    for step in range(params.max_new_tokens):
        token = sample(logits, params, gen)
        yield token
        if token in stops or step == params.max_new_tokens - 1:
            return
        logits = model.forward([seq], [torch.tensor([token])])[0]
