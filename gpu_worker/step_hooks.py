"""What a forward step drives besides the model: the hooks the engine takes at construction.

Per step, in order: `tracker.begin_step()` (the expert cache starts a step outcome), then each
listener's `begin_step(rids, prefill)` (one entry per token row, in the forward's order: the trace
recorder, then the prefetch controller); the forward, during which every `RoutingObserver`
(the engine's attribution, the recorder, the controller) sees each MoE layer's gate input and
routing; then `tracker.end_step()` -> the step's outcome, the controller's `end_step(outcome)` ->
its predictions, the recorder's `end_step()`. Requests' lifetimes go to `start_request(rid)` /
`end_request(rid)` of each listener.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch


@dataclass(frozen=True)
class StepTiming:
    """One engine step, for an `on_step` callback (benchmarks, measurement)."""

    wall_ns: int  # the whole step: hooks, forward, attribution, sampling, emission
    sequences: int  # sequences in the batch
    rows: int  # token rows of the forward
    decode: bool  # every sequence was past its prefill


class StepTracker(Protocol):
    """A provider that reports per step (gpu_worker.cache.ExpertCache)."""

    def begin_step(self) -> None: ...

    def end_step(self): ...  # -> an outcome `request_stats.step_experts_from` understands


class StepListener(Protocol):
    """Sees each step's token rows and requests' lifetimes (the prefetch controller, the trace recorder)."""

    def start_request(self, rid: int) -> None: ...

    def end_request(self, rid: int) -> None: ...

    def begin_step(self, rids: Sequence[int], prefill: Sequence[bool]) -> None: ...

    def end_step(self, outcome=None): ...  # the controller returns StepPredictions (.by_request)


StepController = StepListener  # the prefetch controller's role


class RoutingFanout:
    """One RoutingObserver calling several, in order (what the engine passes to each forward)."""

    def __init__(self, observers: Sequence[object]):
        self.observers = tuple(o for o in observers if o is not None)

    def on_gate_input(self, layer: int, gate_input: torch.Tensor) -> None:
        for o in self.observers:
            o.on_gate_input(layer, gate_input)

    def on_routing(self, layer: int, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
        for o in self.observers:
            o.on_routing(layer, expert_ids, weights)
