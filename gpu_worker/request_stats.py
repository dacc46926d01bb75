"""Per-request expert statistics: one forward step's cache outcome split over the requests in it.

Two views of a step are combined:
  - the model's routings (`StepAttribution` is a `RoutingObserver`: ids [T, K] per MoE layer),
    split by the step's token -> request map, and
  - the provider's step outcome (which experts of each layer were hits or misses in this
    forward, bytes fetched, time compute waited on fetches), normalized to `StepExperts`.
A request's lookups in a step are the distinct (layer, expert) pairs its tokens routed to (the
cache looks each expert up once per step, so a request running alone has exactly the cache's
counts); each is a hit or a miss as the expert was in that step. Bytes fetched and fetch wait
are per step, not per expert owner: they are charged in full to every request in the step (a
shared decode step stalls every request in it), so they do not sum across requests; so are the
step's prefetched experts, prefetched bytes, wasted prefetch bytes and INT2 misses. What the
predictions scored (the prefetch controller's `StepPredictions`) is added per request and layer.
Each request also keeps its counts per MoE layer and over its decode steps alone
(`ExpertStats.decode`: its prefill left out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .events import ExpertStats, LayerExpertStats


@dataclass
class StepExperts:
    """The provider's view of one forward, normalized for attribution."""

    hits: dict[int, set[int]] = field(default_factory=dict)  # layer -> experts found resident
    misses: dict[int, set[int]] = field(default_factory=dict)  # layer -> experts fetched on demand
    prefetch_hits: dict[int, set[int]] = field(default_factory=dict)
    prefetches_issued: int = 0
    bytes_fetched: int = 0
    fetch_wait_ns: int = 0
    prefetch_bytes: int = 0
    prefetch_wasted_bytes: int = 0
    int2_misses: int = 0


def step_experts_from(outcome) -> StepExperts:
    """Normalize a provider's step outcome: a StepExperts as is, or the cache's StepOutcome
    (`hits`, `prefetch_hits`, `misses`: {layer: [expert]}, and `bytes_fetched`, `fetch_wait_ns` totals).
    Hits include prefetch hits, as in ExpertStats."""
    if outcome is None:
        return StepExperts()
    if isinstance(outcome, StepExperts):
        return outcome

    def sets(name: str) -> dict[int, set[int]]:
        return {int(layer): {int(e) for e in es} for layer, es in (getattr(outcome, name, None) or {}).items()}

    pre = sets("prefetch_hits")
    hits = sets("hits")
    for layer, es in pre.items():
        hits.setdefault(layer, set()).update(es)
    return StepExperts(
        hits=hits,
        misses=sets("misses"),
        prefetch_hits=pre,
        prefetches_issued=int(getattr(outcome, "prefetches_issued", 0) or 0),
        bytes_fetched=int(outcome.bytes_fetched),
        fetch_wait_ns=int(outcome.fetch_wait_ns),
        prefetch_bytes=int(getattr(outcome, "prefetch_bytes", 0) or 0),
        prefetch_wasted_bytes=int(getattr(outcome, "prefetch_wasted_bytes", 0) or 0),
        int2_misses=int(getattr(outcome, "int2_misses", 0) or 0),
    )


class StepAttribution:
    """The engine's per-request attribution: a RoutingObserver keeping this step's routings, and
    `attribute` charging the step's outcome and predictions to the requests' ExpertStats."""

    def __init__(self) -> None:
        self.ids: dict[int, torch.Tensor] = {}  # layer -> [T, K] on the CPU

    def begin_step(self) -> None:
        self.ids.clear()

    def on_gate_input(self, layer: int, gate_input: torch.Tensor) -> None:
        pass

    def on_routing(self, layer: int, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
        self.ids[layer] = expert_ids.detach().to("cpu")

    def attribute(self, stats: Sequence[ExpertStats], decode: Sequence[bool], lengths: Sequence[int],
                  outcome: StepExperts | None, predictions=None, rids: Sequence[int] = ()) -> None:
        """Charge one step. stats[j], decode[j] (the request was past its prefill), lengths[j] (its token
        rows in the step, in the forward's order), rids[j] (its id in `predictions.by_request`)."""
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        for layer, ids in self.ids.items():
            hits = outcome.hits.get(layer, set()) if outcome else set()
            misses = outcome.misses.get(layer, set()) if outcome else set()
            pre = outcome.prefetch_hits.get(layer, set()) if outcome else set()
            for j, s in enumerate(stats):
                mine = set(ids[starts[j]: starts[j + 1]].reshape(-1).tolist())
                n_hits, n_misses, n_pre = len(mine & hits), len(mine & misses), len(mine & pre)
                s.lookups += len(mine)
                s.hits += n_hits
                s.misses += n_misses
                s.prefetch_hits += n_pre
                for ls in (s.layers.setdefault(layer, LayerExpertStats()),) + ((s.decode,) if decode[j] else ()):
                    ls.lookups += len(mine)
                    ls.hits += n_hits
                    ls.misses += n_misses
                    ls.prefetch_hits += n_pre
        if predictions is not None:
            for j, s in enumerate(stats):
                for layer, c in predictions.by_request.get(rids[j], {}).items():
                    s.predictions += c.predictions
                    s.predictions_exact += c.exact
                    s.predicted_routed += c.routed_in
                    for ls in (s.layers.setdefault(layer, LayerExpertStats()),) + ((s.decode,) if decode[j] else ()):
                        ls.predictions += c.predictions
                        ls.predictions_exact += c.exact
                        ls.predicted_routed += c.routed_in
        if outcome is not None:
            for s in stats:
                s.bytes_fetched += outcome.bytes_fetched
                s.fetch_wait_ns += outcome.fetch_wait_ns
                s.prefetches_issued += outcome.prefetches_issued
                s.prefetch_bytes += outcome.prefetch_bytes
                s.prefetch_wasted_bytes += outcome.prefetch_wasted_bytes
                s.int2_misses += outcome.int2_misses
