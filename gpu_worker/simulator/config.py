"""What a simulation is asked (SimConfig) and what it answers (SimResult); budgets in experts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from expert_store.errors import FateError

from ..traces import Trace

SIM_POLICIES = ("lru", "lfu", "lfu_decay", "arc", "belady")
SEMANTICS = ("worker", "flat")
PREFETCH_ROOMS = ("wait", "gate")
PIN_MODES = ("reference", "all", "none")
_REFERENCE_PINNED = frozenset({"lfu", "lfu_decay", "arc"})
INF = float("inf")


class SimulationError(FateError, ValueError):
    """A simulation that cannot run as asked (unknown name, budget below top-k, a predictor that cannot
    be replayed from this trace)."""



@dataclass(frozen=True)
class SimConfig:
    policy: str
    """lru, lfu, lfu_decay, arc (gpu_worker.policy) or belady."""

    total_slots: int
    """The budget in experts (the cache's budget_bytes // expert_bytes)."""

    allocation: str = "uniform"
    """uniform, shallow_favoring, or learned:PATH (a fate-allocation/1 file)."""

    predictor: str = "none"
    """none, prev_token, eap (gpu_worker.predictors), or recorded (the trace's `predicted`)."""

    prefetch_width: int = 0
    """Experts proposed per token row and layer; 0: the model's top-k."""

    semantics: str = "worker"
    """worker (ExpertCache's step semantics) or flat (the (token, expert) sequence)."""

    pin: str = "reference"
    """flat only: which policies protect the current token's experts (reference, all, none)."""

    staging_slots: int = 0
    """Budget units kept out of the allocation for prefetched experts (the cache's staging_slots)."""

    prefetch_room: str = "wait"
    """When a prefetch takes its room: wait (the prefetch thread: what has no room when proposed waits for
    the layer's trim; the replay lands it just before its layer) or gate (the copy engine: room is taken
    when the proposal is made, at the previous layer's gate input; what has none is not prefetched)."""

    lfu_decay: float = 0.9
    full_layers: int | None = None
    slots_override: tuple[tuple[int, int], ...] | None = None
    """(MoE column, slots) pairs used instead of the allocation (the worker's recorded slots)."""

    def label(self) -> str:
        return f"{self.allocation}/{self.policy}/{self.predictor}@{self.total_slots}"


@dataclass
class SimResult:
    trace: str
    config: SimConfig
    slots: list[int]  # per MoE column
    lookups: np.ndarray  # [L] per layer (worker: distinct experts per step; flat: routed cells)
    hits: np.ndarray  # [L]
    prefetch_hits: np.ndarray  # [L]
    misses: np.ndarray  # [L]
    evictions: np.ndarray  # [L]
    prefetched: np.ndarray  # [L] experts inserted by prefetch
    prefetch_unused: np.ndarray  # [L] prefetched experts evicted before any use
    step_lookups: np.ndarray  # [S, L]
    step_misses: np.ndarray  # [S, L]
    step_waves: np.ndarray  # [S, L]
    step_prefetched: np.ndarray  # [S, L]
    step_prefetch_hits: np.ndarray  # [S, L]
    step_tokens: np.ndarray  # [S] rows per step
    step_decode: np.ndarray  # [S] bool: every row of the step is decode
    cells: int  # token-layer cells replayed (N x L)
    seconds: float
    notes: list[str] = field(default_factory=list)
    resident: list[list[int]] = field(default_factory=list)  # per layer, at the end of the replay (sorted)
    step_prefetch_waiting: np.ndarray | None = None
    """[S, L] of the prefetched experts, those that found no room when their job was queued (at the previous
    layer's gate input, before its demand call and trim): the worker's prefetch thread waits for room."""

    @property
    def hit_rate(self) -> float:
        lk = int(self.lookups.sum())
        return float(self.hits.sum() + self.prefetch_hits.sum()) / lk if lk else 0.0

    def layer_hit_rate(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.lookups > 0, (self.hits + self.prefetch_hits) / np.maximum(self.lookups, 1), np.nan)

    @property
    def cells_per_s(self) -> float:
        return self.cells / self.seconds if self.seconds > 0 else INF

    def summary(self) -> dict[str, Any]:
        return {"trace": self.trace, **asdict(self.config), "slots": self.slots,
                "lookups": int(self.lookups.sum()), "hits": int(self.hits.sum()),
                "prefetch_hits": int(self.prefetch_hits.sum()), "misses": int(self.misses.sum()),
                "evictions": int(self.evictions.sum()), "prefetched": int(self.prefetched.sum()),
                "prefetch_unused": int(self.prefetch_unused.sum()), "hit_rate": round(self.hit_rate, 6),
                "layer_hit_rate": [None if math.isnan(x) else round(float(x), 6) for x in self.layer_hit_rate()],
                "cells": self.cells, "seconds": round(self.seconds, 6), "cells_per_s": round(self.cells_per_s),
                "notes": self.notes}


def parse_budget(text: str, num_layers: int, num_experts: int) -> int:
    """'25%' of every expert, or a plain number of experts, -> slots (as the worker rounds a % budget)."""
    t = text.strip()
    total = num_layers * num_experts
    try:
        if t.endswith("%"):
            pct = float(t[:-1])
            if not 0 < pct <= 100:
                raise ValueError
            return int(pct / 100.0 * total)
        n = int(t)
        if n < 0:
            raise ValueError
        return min(n, total)
    except ValueError:
        raise SimulationError(f"budget {text!r}: expected a share like 25% (0-100] or a number of experts") from None


def worker_config_of(trace: Trace) -> SimConfig | None:
    """The recording worker's own cache configuration (meta "cache"), for the fidelity replay."""
    c = trace.meta.get("cache")
    if not c:
        return None
    col = {layer: j for j, layer in enumerate(trace.layer_ids)}
    slots = tuple(sorted((col[int(k)], int(v)) for k, v in c["slots"].items() if int(k) in col))
    return SimConfig(policy=c.get("policy") or "lru", total_slots=int(c["total_slots"]),
                     allocation=c.get("allocation") or "uniform", staging_slots=int(c.get("staging_slots", 0)),
                     slots_override=slots)
