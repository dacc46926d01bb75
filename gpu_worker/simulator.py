"""Offline replay of expert traces through the worker's own policy, allocation and predictor classes.

    python -m gpu_worker simulate TRACE... --policies lru,lfu,lfu_decay,arc,belady \\
        --allocations uniform,shallow_favoring --budgets 10%,25%,50%,75% \\
        [--predictors none,prev_token,eap,recorded] [--prefetch-width W] [--hardware PROFILE] [--json OUT]

Two replay semantics:

- `worker` (default): exactly what `gpu_worker.cache.ExpertCache` does with the trace's forward
  steps, for load on demand (the fidelity test holds it to the worker's counters; the cache's
  docstring, steps 1-5, is the specification). Per step and MoE layer the model asks for the
  distinct experts its rows routed to, most token assignments first (ties: lower id); resident
  ones are hits (on_hit, in that order) and are released before any fetch; the misses go in
  waves of (free units + this layer's residents) experts, or, only when that is 0, of (every
  other layer's residents): each reserved in turn (on_miss, then a victim when no unit is free:
  this layer's, else another layer's, the one most over its slots first), then inserted
  (on_insert); the layer is trimmed back to its slots at the end; every policy's on_step runs
  once per forward. A layer may use budget other layers leave free as scratch, so layers
  interact (cold start, 0-slot layers).
  Prefetch (a predictor) follows `PrefetchController` + `ExpertCache.prefetch` without timing:
  the proposals for layer m + 1 (predicted before layer m is observed, rows merged by
  `prefetch.merge_ranked`) land just before layer m + 1's lookup, within free units and that
  layer's residents outside the proposal.
- `flat`: the (token, expert) sequence of the published studies (../shared/traces/README.md):
  each trace row is its own step, each routed cell an access, per-layer caches of fixed slots,
  demand insertion. `pin` says whether the current token's experts are protected from eviction:
  "reference" (the README's convention: LFU, LFU-decay and ARC pin; LRU and Belady do not),
  "all" or "none".

Belady (`belady`): evicts the resident expert whose next use is farthest (future-aware, here
only), driven through the same calls as every other policy: the upper bound of demand caching.

Results carry per (step, layer) counts that `estimate_cost` turns into time on a hardware profile.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Collection, Iterable, Sequence

import numpy as np

from expert_store.errors import FateError

from .policies import (
    Allocation, PolicyError, ReplacementPolicy, make_allocation, make_policy_factory,
)
from .traces import Trace, TraceError, concat_traces, load_trace

SIM_POLICIES = ("lru", "lfu", "lfu_decay", "arc", "belady")
SEMANTICS = ("worker", "flat")
PIN_MODES = ("reference", "all", "none")
_REFERENCE_PINNED = frozenset({"lfu", "lfu_decay", "arc"})
INF = float("inf")


class SimulationError(FateError, ValueError):
    """A simulation that cannot run as asked (unknown name, budget below top-k, a predictor that cannot
    be replayed from this trace)."""


# -- Belady ---------------------------------------------------------------------------------------


class BeladyPolicy(ReplacementPolicy):
    """Belady's MIN: evict the candidate whose next use is farthest in the future.

    `occurrences[e]`: the sorted clock values (flat: access index; worker: step) at which expert e
    is used in this layer; the driver sets `now` to the clock of the access being served, so the
    next use of a resident expert is its first occurrence after `now`. Ties (e.g. never used
    again) go to the smallest id.
    """

    name = "belady"

    def __init__(self, occurrences: dict[int, list[int]]):
        self._occ = occurrences
        self.now = -1

    def next_use(self, expert: int) -> float:
        occ = self._occ.get(expert)
        if not occ:
            return INF
        i = bisect_right(occ, self.now)
        return occ[i] if i < len(occ) else INF

    def on_hit(self, expert: int) -> None:
        pass

    def on_insert(self, expert: int, prefetch: bool = False) -> None:
        pass

    def on_evict(self, expert: int) -> None:
        pass

    def victim(self, candidates: Collection[int]) -> int:
        best, best_key = None, None
        for e in candidates:
            key = (self.next_use(e), -e)
            if best_key is None or key > best_key:
                best, best_key = e, key
        if best is None:
            raise PolicyError("belady: no victim among no candidates (a simulator bug)")
        return best


# -- configuration and results --------------------------------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    policy: str
    """lru, lfu, lfu_decay, arc (gpu_worker.policies) or belady."""

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

    lfu_decay: float = 0.9
    full_layers: int = 4
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


# -- the prepared trace -----------------------------------------------------------------------------


class Replay:
    """A trace prepared once for many simulations: per layer the sorted distinct experts of every
    step (worker semantics), the rows as tuples (flat), and Belady's occurrence lists."""

    def __init__(self, trace: Trace):
        self.trace = trace
        ex = trace.experts
        self.N, self.L, self.K = ex.shape
        self.E = trace.num_experts
        steps = trace.steps()
        N = self.N
        if N:
            starts = np.flatnonzero(np.r_[True, steps[1:] != steps[:-1]])
        else:
            starts = np.zeros(0, np.int64)
        self.step_starts = starts
        self.step_ends = np.r_[starts[1:], N].astype(np.int64)
        self.S = len(starts)
        self.step_tokens = (self.step_ends - self.step_starts).astype(np.int32)
        phase = trace.phase
        if phase is not None and self.S:
            decode_rows = (phase == 1).astype(np.int64)
            per_step = np.add.reduceat(decode_rows, starts) if N else np.zeros(0)
            self.step_decode = per_step == self.step_tokens
        else:
            self.step_decode = np.ones(self.S, bool)
        self.step_of_row = np.repeat(np.arange(self.S), self.step_tokens)
        self._uniq: list[list[tuple[int, ...]]] | None = None
        self._by_step: list[list[tuple[int, ...]]] | None = None
        self._step_lookups: np.ndarray | None = None
        self._flat: list[list[tuple[int, ...]]] | None = None
        self._occ_step: list[dict[int, list[int]]] | None = None
        self._occ_flat: list[dict[int, list[int]]] | None = None
        req = trace.request
        self.rids = req.tolist() if req is not None else [0] * N

    @property
    def uniq(self) -> list[list[tuple[int, ...]]]:
        """[layer][step] -> the distinct experts the step routed to, in the order the model asks the cache
        for them: most token assignments in the step first, ties: lower id (gpu_worker.model._moe)."""
        if self._uniq is None:
            E, S = self.E, self.S
            out = []
            for col in range(self.L):
                cells = self.trace.experts[:, col, :].astype(np.int64)
                valid = cells >= 0
                key, counts = np.unique((self.step_of_row[:, None] * E + cells)[valid], return_counts=True)
                st, e = key // E, key % E
                order = np.lexsort((e, -counts, st))  # by step, then popularity, then id
                st, e = st[order], e[order].tolist()
                b = np.searchsorted(st, np.arange(S + 1)).tolist()
                out.append([tuple(e[b[i]:b[i + 1]]) for i in range(S)])
            self._uniq = out
        return self._uniq

    @property
    def by_step(self) -> list[list[tuple[int, ...]]]:
        """[step][layer] -> the same as `uniq`, step-major (the worker's loop order)."""
        if self._by_step is None:
            self._by_step = [list(x) for x in zip(*self.uniq)] if self.L else [[] for _ in range(self.S)]
        return self._by_step

    @property
    def step_lookups(self) -> np.ndarray:
        """[S, L] distinct experts each step asks each layer for."""
        if self._step_lookups is None:
            self._step_lookups = np.array([[len(x) for x in col] for col in self.uniq], np.int32).T.reshape(
                self.S, self.L)
        return self._step_lookups

    @property
    def flat_rows(self) -> list[list[tuple[int, ...]]]:
        """[layer][row] -> the row's experts in routing order (-1 dropped, duplicates dropped)."""
        if self._flat is None:
            out = []
            for col in range(self.L):
                cells = self.trace.experts[:, col, :]
                rows = [tuple(r) for r in cells.tolist()]
                srt = np.sort(cells, axis=1)
                if (cells < 0).any() or (self.K > 1 and (srt[:, 1:] == srt[:, :-1]).any()):
                    rows = [tuple(dict.fromkeys(x for x in r if x >= 0)) for r in rows]
                out.append(rows)
            self._flat = out
        return self._flat

    def occurrences(self, semantics: str) -> list[dict[int, list[int]]]:
        """Per layer: expert -> sorted clock values of its uses (steps, or flat access indices)."""
        if semantics == "worker":
            if self._occ_step is None:
                self._occ_step = [_group([(s, e) for s, ids in enumerate(col) for e in ids]) for col in self.uniq]
            return self._occ_step
        if self._occ_flat is None:
            occ = []
            for rows in self.flat_rows:
                flat = [e for r in rows for e in r]
                occ.append(_group([(i, e) for i, e in enumerate(flat)]))
            self._occ_flat = occ
        return self._occ_flat


def _group(pairs: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for clock, e in pairs:
        out.setdefault(e, []).append(clock)
    return out


# -- policies, allocations, predictors ---------------------------------------------------------------


def make_sim_allocation(name: str, full_layers: int = 4) -> Allocation:
    if name.startswith("learned:"):
        from .learned_allocation import LearnedAllocation

        return LearnedAllocation.load(name[len("learned:"):])
    try:
        return make_allocation(name, full_layers)
    except PolicyError as e:
        raise SimulationError(f"{e} (or learned:PATH)") from None


def layer_slots(replay: Replay, cfg: SimConfig) -> list[int]:
    if cfg.slots_override is not None:
        d = dict(cfg.slots_override)
        return [int(d.get(c, 0)) for c in range(replay.L)]
    alloc = make_sim_allocation(cfg.allocation, cfg.full_layers)
    ids = replay.trace.layer_ids
    slots = alloc.slots(max(0, cfg.total_slots - min(cfg.staging_slots, cfg.total_slots)), ids, replay.E)
    return [int(slots.get(layer, 0)) for layer in ids]


def _policy_factory(name: str, lfu_decay: float) -> Callable[[int], ReplacementPolicy]:
    if name == "belady":
        raise SimulationError("belady is built per layer from the trace")
    try:
        return make_policy_factory(name, lfu_decay)
    except PolicyError as e:
        raise SimulationError(f"{e}, belady") from None


def _overrides_on_step(p: ReplacementPolicy) -> bool:
    return type(p).on_step is not ReplacementPolicy.on_step


class _RecordedPredictor:
    """Replays the trace's `predicted` field: what the worker's predictor proposed, row by row."""

    name = "recorded"
    needs_gate_input = False

    def __init__(self, trace: Trace):
        if trace.predicted is None:
            raise SimulationError(f"{trace.path}: predicted: the trace has no recorded predictions")
        self.pred = trace.predicted
        self.rows: range = range(0)

    def start_request(self, rid: int) -> None:
        pass

    def end_request(self, rid: int) -> None:
        pass

    def observe(self, moe_layer: int, rids: Sequence[int], experts: Sequence[Sequence[int]]) -> None:
        pass

    def predict(self, moe_layer: int, rids: Sequence[int], width: int, gate_input=None) -> list[list[int]]:
        block = self.pred[self.rows.start:self.rows.stop, moe_layer, :width].tolist()
        return [[e for e in r if e >= 0] for r in block]


def make_sim_predictor(name: str, trace: Trace, top_k: int, num_experts: int, moe_layers: Sequence[int]):
    """(predictor or None, note). Predictors that need hidden states cannot be replayed from a trace."""
    if name == "none":
        return None, ""
    if name == "recorded":
        if trace.predicted is None:
            return None, f"{trace.name}: predictor 'recorded' skipped: the trace has no `predicted` field"
        return _RecordedPredictor(trace), ""
    from . import predictors as P  # issue 4's module: the worker's own classes

    known = tuple(P.PREDICTOR_NAMES) + tuple(getattr(P, "BASELINE_PREDICTOR_NAMES", ()))
    if name not in known:
        raise SimulationError(f"unknown predictor {name!r}; known: recorded, {', '.join(known)}")
    try:
        pred = P.make_predictor(name, num_moe_layers=len(moe_layers), num_experts=num_experts)
    except P.PredictorError as e:
        return None, f"{trace.name}: predictor {name!r} skipped: {e}"
    if getattr(pred, "needs_gate_input", False):
        return None, (f"{trace.name}: predictor {name!r} skipped: it needs hidden states (gate inputs), which "
                      f"traces do not carry")
    return pred, ""


# -- the replays ------------------------------------------------------------------------------------


def simulate(trace_or_replay: Trace | Replay, cfg: SimConfig) -> SimResult:
    rp = trace_or_replay if isinstance(trace_or_replay, Replay) else Replay(trace_or_replay)
    if cfg.semantics not in SEMANTICS:
        raise SimulationError(f"unknown semantics {cfg.semantics!r}; known: {', '.join(SEMANTICS)}")
    if cfg.pin not in PIN_MODES:
        raise SimulationError(f"unknown pin mode {cfg.pin!r}; known: {', '.join(PIN_MODES)}")
    if cfg.policy not in SIM_POLICIES:
        raise SimulationError(f"unknown policy {cfg.policy!r}; known: {', '.join(SIM_POLICIES)}")
    if cfg.total_slots < 0:
        raise SimulationError(f"total_slots must be >= 0, got {cfg.total_slots}")
    slots = layer_slots(rp, cfg)
    if cfg.policy == "belady":
        occ = rp.occurrences(cfg.semantics)
        policies: list[ReplacementPolicy] = [BeladyPolicy(occ[c]) for c in range(rp.L)]
    else:
        factory = _policy_factory(cfg.policy, cfg.lfu_decay)
        policies = [factory(s) for s in slots]
    if cfg.semantics == "flat":
        if cfg.predictor != "none":
            raise SimulationError("flat semantics replays caching only: use --semantics worker with a predictor")
        return _run_flat(rp, cfg, slots, policies)
    if cfg.total_slots < rp.K and rp.N:
        raise SimulationError(f"a budget of {cfg.total_slots} experts is below one layer's top-{rp.K}: the worker "
                              f"refuses it")
    return _run_worker(rp, cfg, slots, policies)


def _empty_result(rp: Replay, cfg: SimConfig, slots: list[int], S: int) -> dict[str, Any]:
    L = rp.L
    z = lambda: np.zeros(L, np.int64)  # noqa: E731
    zs = lambda: np.zeros((S, L), np.int32)  # noqa: E731
    return dict(trace=rp.trace.name, config=cfg, slots=slots, lookups=z(), hits=z(), prefetch_hits=z(), misses=z(),
                evictions=z(), prefetched=z(), prefetch_unused=z(), step_lookups=zs(), step_misses=zs(),
                step_waves=zs(), step_prefetched=zs(), step_prefetch_hits=zs())


def _run_flat(rp: Replay, cfg: SimConfig, slots: list[int], policies: list[ReplacementPolicy]) -> SimResult:
    t0 = time.perf_counter()
    N, L = rp.N, rp.L
    r = _empty_result(rp, cfg, slots, N)
    pin = cfg.pin == "all" or (cfg.pin == "reference" and cfg.policy in _REFERENCE_PINNED)
    for col in range(L):
        pol, cap, rows = policies[col], slots[col], rp.flat_rows[col]
        res: set[int] = set()
        hits = evictions = lookups = 0
        on_hit, on_miss, on_insert, on_evict, victim = pol.on_hit, pol.on_miss, pol.on_insert, pol.on_evict, pol.victim
        step = pol.on_step if _overrides_on_step(pol) else None
        belady = pol if isinstance(pol, BeladyPolicy) else None
        clock = 0
        miss_rows = np.zeros(N, np.int32)
        for n, row in enumerate(rows):
            lookups += len(row)
            for e in row:
                if belady is not None:
                    belady.now = clock
                clock += 1
                if e in res:
                    hits += 1
                    on_hit(e)
                    continue
                miss_rows[n] += 1
                if not cap:
                    continue
                if len(res) >= cap:
                    cands = res.difference(row) if pin else res
                    if not cands:  # every resident expert is needed by this token (slots < top-k): evict anyway
                        cands = res
                    on_miss(e)
                    v = victim(cands)
                    res.remove(v)
                    on_evict(v)
                    evictions += 1
                else:
                    on_miss(e)
                res.add(e)
                on_insert(e)
            if step is not None:
                step()
        r["lookups"][col], r["hits"][col], r["evictions"][col] = lookups, hits, evictions
        r["misses"][col] = lookups - hits
        r["step_misses"][:, col] = miss_rows
        r["step_lookups"][:, col] = [len(x) for x in rows]
    r["step_waves"] = (r["step_misses"] > 0).astype(np.int32)
    phase = rp.trace.phase
    return SimResult(**r, step_tokens=np.ones(N, np.int32),
                     step_decode=(phase == 1) if phase is not None else np.ones(N, bool),
                     cells=N * L, seconds=time.perf_counter() - t0)


def _run_worker(rp: Replay, cfg: SimConfig, slots: list[int], policies: list[ReplacementPolicy]) -> SimResult:
    """ExpertCache.iter_experts / prefetch / end_step, step by step (see the module docstring)."""
    t0 = time.perf_counter()
    S, L = rp.S, rp.L
    r = _empty_result(rp, cfg, slots, S)
    notes: list[str] = []
    Q = cfg.total_slots
    by_step = rp.by_step
    res: list[set[int]] = [set() for _ in range(L)]
    pref: list[set[int]] = [set() for _ in range(L)]
    hits = [0] * L
    phits = [0] * L
    misses = [0] * L
    evictions = [0] * L
    prefetched = [0] * L
    unused = [0] * L
    miss_events: list[tuple[int, int, int, int]] = []  # (step, layer, misses, waves)
    pf_events: list[tuple[int, int, int]] = []  # (step, layer, prefetched)
    phit_events: list[tuple[int, int, int]] = []  # (step, layer, prefetch hits)
    steppers = [p.on_step for p in policies if _overrides_on_step(p)]
    miss_hook = [type(p).on_miss is not ReplacementPolicy.on_miss for p in policies]  # LRU's is a no-op
    belady = bool(policies) and isinstance(policies[0], BeladyPolicy)
    used = 0  # resident experts over all layers (nothing is reserved between the cache's calls)

    def evict(j: int, v: int) -> None:
        nonlocal used
        res[j].remove(v)
        policies[j].on_evict(v)
        evictions[j] += 1
        if v in pref[j]:
            pref[j].discard(v)
            unused[j] += 1
        used -= 1

    def evict_one(col: int) -> None:
        """ExpertCache._evict_one(borrow=True): this layer's victim, else another layer's (most over its
        slots first; ties in layer order)."""
        if res[col]:
            evict(col, policies[col].victim(res[col]))
            return
        for j in sorted(range(L), key=lambda j: slots[j] - len(res[j])):
            if j != col and res[j]:
                evict(j, policies[j].victim(res[j]))
                return
        raise SimulationError(f"layer {col}: no room for one expert in {Q} slots (a simulator bug)")

    predictor = None
    if cfg.predictor == "cross_layer":
        notes.append(f"{rp.trace.name}: predictor 'cross_layer' skipped: it needs hidden states (gate inputs), "
                     f"which traces do not carry; its recorded proposals replay as 'recorded'")
    elif cfg.predictor != "none":
        predictor, note = make_sim_predictor(cfg.predictor, rp.trace, rp.K, rp.E, rp.trace.layer_ids)
        if note:
            notes.append(note)
    K = rp.K
    width = cfg.prefetch_width or (rp.trace.predicted.shape[2] if isinstance(predictor, _RecordedPredictor) else K)
    phases = rp.trace.phase.tolist() if rp.trace.phase is not None else [1] * rp.N
    if predictor is not None:
        from .prefetch import merge_ranked  # the controller's own merge (imports torch)
    layer_ids = rp.trace.layer_ids
    rids_all = rp.rids
    last_step_of: dict[int, int] = {}
    starts, ends = rp.step_starts.tolist(), rp.step_ends.tolist()
    if predictor is not None:
        for s in range(S):
            for rid in set(rids_all[starts[s]:ends[s]]):
                last_step_of[rid] = s
    started: set[int] = set()
    experts_np = rp.trace.experts
    rids: list[int] = []

    for s in range(S):
        step_ids = by_step[s]
        proposals: list[int] = []
        if predictor is not None:
            a, b = starts[s], ends[s]
            rids = rids_all[a:b]
            for rid in dict.fromkeys(rids):
                if rid not in started:
                    started.add(rid)
                    predictor.start_request(rid)
            if isinstance(predictor, _RecordedPredictor):
                predictor.rows = range(a, b)
            prefill_rows = [p == 0 for p in phases[a:b]]
            any_prefill = any(prefill_rows)
            call_width = max(width if not all(prefill_rows) else 0, K if any_prefill else 0)
        for col in range(L):
            ids = step_ids[col]
            R, pol = res[col], policies[col]
            if proposals:
                # ExpertCache.prefetch / _reserve_prefetch, landed before the layer runs: in rank order, a
                # free unit, else one of this layer's residents outside the proposal; never another layer's
                if belady:
                    pol.now = s - 1  # this step's use of the layer is still ahead
                protect = set(proposals)
                wave = []
                for e in proposals:
                    if e in R:
                        continue
                    if used < Q:
                        pol.on_miss(e, True)
                    else:
                        cands = R - protect
                        if not cands:
                            break
                        pol.on_miss(e, True)
                        evict(col, pol.victim(cands))
                    used += 1
                    wave.append(e)
                if wave:
                    P = pref[col]
                    for e in wave:
                        R.add(e)
                        pol.on_insert(e, True)
                        P.add(e)
                    prefetched[col] += len(wave)
                    pf_events.append((s, col, len(wave)))
            if predictor is not None:
                # gpu_worker.prefetch.PrefetchController: predict(m + 1) with layer m's gate input (prefill rows
                # cut to top-k, rows merged into one ranked list), then observe(m)
                if col + 1 < L:
                    lists = predictor.predict(col + 1, rids, call_width)
                    if any_prefill:
                        lists = [row[:K] if pre else row for row, pre in zip(lists, prefill_rows)]
                    proposals = merge_ranked(lists, K)
                else:
                    proposals = []
                rows = experts_np[starts[s]:ends[s], col, :].tolist()
                predictor.observe(col, rids, [[e for e in row if e >= 0] for row in rows])
            if not ids:
                continue
            if belady:
                pol.now = s
            if R.issuperset(ids):
                ready = ids
                remaining = None
            else:
                ready = [e for e in ids if e in R]
                remaining = [e for e in ids if e not in R]
            P = pref[col]
            if P:
                ph = [e for e in ready if e in P]
                if ph:
                    P.difference_update(ph)
                    phits[col] += len(ph)
                    phit_events.append((s, col, len(ph)))
                hits[col] += len(ready) - len(ph)
            else:
                hits[col] += len(ready)
            on_hit = pol.on_hit
            for e in ready:
                on_hit(e)
            if remaining:
                n_miss = len(remaining)
                waves = 0
                while remaining:
                    # ExpertCache._reserve: free units + this layer's residents (all released by now); only
                    # when that is 0, every other layer's residents (borrowing)
                    room = Q - used + len(R)
                    if room == 0:
                        room = used - len(R)
                    wave, remaining = remaining[:room], remaining[room:]
                    on_miss = pol.on_miss if miss_hook[col] else None
                    victim = pol.victim
                    for e in wave:
                        if on_miss is not None:
                            on_miss(e, False)
                        if used < Q:
                            used += 1
                        elif R:  # this layer's victim (inlined evict(): the unit changes hands)
                            v = victim(R)
                            R.remove(v)
                            pol.on_evict(v)
                            evictions[col] += 1
                            if P and v in P:
                                P.discard(v)
                                unused[col] += 1
                        else:
                            evict_one(col)
                            used += 1
                    on_insert = pol.on_insert
                    for e in wave:
                        R.add(e)
                        on_insert(e, False)
                    waves += 1
                misses[col] += n_miss
                miss_events.append((s, col, n_miss, waves))
            cap = slots[col]
            if len(R) > cap:  # trim back to the layer's slots (scratch returned to the budget)
                while len(R) > cap:
                    evict(col, pol.victim(R))
        for f in steppers:
            f()
        if predictor is not None:
            for rid in dict.fromkeys(rids):
                if last_step_of.get(rid) == s:
                    predictor.end_request(rid)
    a64 = lambda x: np.array(x, np.int64)  # noqa: E731
    r.update(lookups=rp.step_lookups.sum(axis=0).astype(np.int64), hits=a64(hits), prefetch_hits=a64(phits),
             misses=a64(misses), evictions=a64(evictions), prefetched=a64(prefetched), prefetch_unused=a64(unused),
             step_lookups=rp.step_lookups)
    for name, events, k in (("step_misses", miss_events, 2), ("step_waves", miss_events, 3),
                            ("step_prefetched", pf_events, 2), ("step_prefetch_hits", phit_events, 2)):
        if events:
            ev = np.array(events, np.int64)
            r[name][ev[:, 0], ev[:, 1]] = ev[:, k]
    return SimResult(**r, step_tokens=rp.step_tokens, step_decode=rp.step_decode, cells=rp.N * rp.L,
                     seconds=time.perf_counter() - t0, notes=notes, resident=[sorted(x) for x in res])


# -- budgets ----------------------------------------------------------------------------------------


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


# -- cost model -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HardwareProfile:
    """Times that turn a replay's counts into seconds. Per forward step s with T rows and per MoE layer:
    the layer's dense part (attention, norms, router) takes `layer_s + (T - 1) * layer_token_s`, each
    distinct expert it uses `expert_compute_s` (extra rows routed to it are folded into layer_token_s);
    a demand wave of n experts takes `link_latency_s + n * (bytes /
    link_bandwidth_Bps + expert_setup_s)` with compute stalled; prefetches use the link after the
    previous layer's demand fetches and overlap with compute (see CostModel)."""

    name: str
    description: str
    link_bandwidth_Bps: float  # host (store) -> device, for expert blobs
    link_latency_s: float  # per fetch call (one batched wave)
    expert_setup_s: float  # per expert on arrival: building its compute form (dequantize, copy, register)
    layer_s: float  # one MoE layer's dense part for one token row, experts excluded
    layer_token_s: float  # per extra row in the step, per layer (batched decode / prefill)
    expert_compute_s: float  # one resident expert used in a layer step (T = 1)
    step_s: float  # per forward: embedding, LM head, sampling, scheduling
    expert_bytes: int = 0  # bytes per expert transfer; 0: the trace's meta expert_bytes[format]
    measured: str = ""  # how the numbers were obtained

    def transfer_s(self, n: int, expert_bytes: int) -> float:
        if n <= 0:
            return 0.0
        return self.link_latency_s + n * (expert_bytes / self.link_bandwidth_Bps + self.expert_setup_s)


# "this-machine": the dev box (2 shared CPU cores, torch 1 thread, tiny-mixtral int4 as int4_fused, store over
# shared memory), medians of three gpu_worker.hardware.measure_profile runs by bench/sim_validate.py. The
# compute terms are tiny-mixtral's: for another model measure it (`simulate --measure PACK`).
PROFILES: dict[str, HardwareProfile] = {
    "this-machine": HardwareProfile(
        "this-machine", "the dev box: 2 shared CPU cores, experts from the store over shared memory, "
                        "tiny-mixtral int4 (int4_fused) compute",
        link_bandwidth_Bps=2.53e8, link_latency_s=1.2e-3, expert_setup_s=0.0, layer_s=3.0e-4,
        layer_token_s=7.5e-5, expert_compute_s=1.75e-5, step_s=3.6e-4, expert_bytes=124416,
        measured="demand wave 1.2 ms + 0.49 ms/expert (fetch + build); medians of 3 runs of bench/sim_validate.py"),
    # Nominal profiles (not measured here: no such machine), for Mixtral / Qwen-MoE-class models with int4
    # experts (~2-90 MB each: pass --expert-bytes or let the trace's meta say). Measure the real target.
    "pcie3-desktop": HardwareProfile(
        "pcie3-desktop", "nominal: RTX 3090-class GPU, PCIe 3.0 x16 (~12 GB/s pinned), experts from host RAM",
        link_bandwidth_Bps=12.0e9, link_latency_s=3.0e-5, expert_setup_s=2.0e-5, layer_s=6.0e-4,
        layer_token_s=5.0e-6, expert_compute_s=5.0e-5, step_s=3.0e-3),
    "pcie1-old-gpu": HardwareProfile(
        "pcie1-old-gpu", "nominal: GTX 1080 Ti-class GPU on a PCIe 1.0 x16 link (~3 GB/s), experts from host RAM",
        link_bandwidth_Bps=3.0e9, link_latency_s=5.0e-5, expert_setup_s=3.0e-5, layer_s=1.0e-3,
        layer_token_s=1.0e-5, expert_compute_s=8.0e-5, step_s=4.0e-3),
    "nvme-host": HardwareProfile(
        "nvme-host", "nominal: CPU-only host, 8 cores, cold experts read from NVMe (~2.5 GB/s, 80 us per read)",
        link_bandwidth_Bps=2.5e9, link_latency_s=8.0e-5, expert_setup_s=2.0e-4, layer_s=2.0e-3,
        layer_token_s=1.0e-4, expert_compute_s=1.5e-3, step_s=5.0e-3),
}


def load_profile(spec: str) -> HardwareProfile:
    """A built-in name, or a JSON file with HardwareProfile's fields."""
    if spec in PROFILES:
        return PROFILES[spec]
    p = Path(spec)
    if p.is_file():
        try:
            data = json.loads(p.read_text())
            return HardwareProfile(**{k: v for k, v in data.items() if k in HardwareProfile.__dataclass_fields__})
        except (json.JSONDecodeError, TypeError) as e:
            raise SimulationError(f"{p}: not a hardware profile ({' '.join(str(e).split())})") from None
    raise SimulationError(f"unknown hardware profile {spec!r}; known: {', '.join(PROFILES)} (or a JSON file)")


@dataclass
class CostEstimate:
    profile: str
    expert_bytes: int
    decode_tokens: int
    decode_s: float
    decode_stall_s: float
    prefill_tokens: int
    prefill_s: float
    prefill_stall_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def stall_ms_per_decode_token(self) -> float:
        return 1e3 * self.decode_stall_s / self.decode_tokens if self.decode_tokens else 0.0

    def summary(self) -> dict[str, Any]:
        return {"profile": self.profile, "expert_bytes": self.expert_bytes, "decode_tokens": self.decode_tokens,
                "decode_s": round(self.decode_s, 6), "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
                "stall_ms_per_decode_token": round(self.stall_ms_per_decode_token, 4),
                "prefill_tokens": self.prefill_tokens, "prefill_s": round(self.prefill_s, 6)}


def resolve_expert_bytes(profile: HardwareProfile, trace: Trace, fmt: str) -> int:
    if profile.expert_bytes:
        return profile.expert_bytes
    eb = trace.expert_bytes
    if fmt in eb:
        return eb[fmt]
    if eb:
        return next(iter(eb.values()))
    raise SimulationError(f"{trace.path}: meta.expert_bytes has no {fmt!r} entry: give the profile's expert_bytes")


def estimate_cost(result: SimResult, profile: HardwareProfile, expert_bytes: int) -> CostEstimate:
    """Wall-clock of the replayed steps on `profile`.

    As the worker runs a layer: its dense part (a = t + dense(T)); the resident and prefetched experts
    compute first (waiting for the prefetch to land if one is used); then the misses are fetched in
    waves, the compute thread blocked (the stall), and computed. The next layer's proposals go on
    the link when this layer's router ran, overlapping this layer's compute; a demand fetch
    outranks them.
    """
    S, L = result.step_misses.shape
    tokens = result.step_tokens.astype(np.float64)
    dense = profile.layer_s + np.maximum(tokens - 1, 0) * profile.layer_token_s  # [S]
    per = expert_bytes / profile.link_bandwidth_Bps + profile.expert_setup_s
    lat = profile.link_latency_s
    lk, ms, wv = result.step_lookups, result.step_misses, result.step_waves
    pf, ph = result.step_prefetched, result.step_prefetch_hits
    step_time = np.empty(S)
    step_stall = np.empty(S)
    ec = profile.expert_compute_s
    if not pf.any():  # load on demand: closed form, vectorized
        fetch = wv * lat + ms * per  # [S, L]
        step_stall = fetch.sum(axis=1)
        step_time = profile.step_s + L * dense + (lk * ec).sum(axis=1) + step_stall
    else:
        for s in range(S):
            t = profile.step_s
            link_free = 0.0
            arrival = 0.0  # when this layer's prefetched experts are all in
            stall = 0.0
            for l in range(L):
                a = t + dense[s]
                ready = arrival if ph[s, l] and arrival > a else a
                stall += ready - a
                p_end = 0.0
                if l + 1 < L and pf[s, l + 1]:  # the next layer's proposals go out once this router ran
                    p_end = max(a, link_free) + lat + pf[s, l + 1] * per
                    link_free = p_end
                hit_done = ready + (lk[s, l] - ms[s, l]) * ec
                end = hit_done
                fetch = wv[s, l] * lat + ms[s, l] * per
                if fetch:
                    # a demand fetch outranks prefetches: it waits for at most the expert in flight,
                    # and pushes the queued prefetch back by its own duration
                    d_start = max(hit_done, min(link_free, hit_done + per))
                    d_end = d_start + fetch
                    if p_end > d_start:
                        p_end += fetch
                    link_free = max(link_free, p_end, d_end)
                    stall += d_end - hit_done
                    end = d_end + ms[s, l] * ec
                arrival = p_end
                t = end
            step_time[s] = t
            step_stall[s] = stall
    dec = result.step_decode
    return CostEstimate(profile.name, expert_bytes, int(tokens[dec].sum()), float(step_time[dec].sum()),
                        float(step_stall[dec].sum()), int(tokens[~dec].sum()), float(step_time[~dec].sum()),
                        float(step_stall[~dec].sum()))


# -- the command line ---------------------------------------------------------------------------------


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_simulate_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("simulate", help="replay expert traces through the cache policies, allocations and "
                                        "predictors (with Belady's optimum) and project decode speed",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+", metavar="TRACE", help="moe-trace/1 .npz files")
    p.add_argument("--policies", default="lru,lfu,lfu_decay,arc,belady", help="comma-separated")
    p.add_argument("--allocations", default="uniform,shallow_favoring",
                   help="comma-separated: uniform, shallow_favoring, learned:PATH")
    p.add_argument("--budgets", default="10%,25%,50%,75%",
                   help="comma-separated shares of all experts (25%%) or expert counts; 'worker' = the "
                        "recording worker's own budget and slots (meta.cache)")
    p.add_argument("--predictors", default="none", help="comma-separated: none, prev_token, eap, recorded")
    p.add_argument("--prefetch-width", type=int, default=0, help="experts proposed per row and layer (0: top-k)")
    p.add_argument("--semantics", default="worker", choices=SEMANTICS,
                   help="worker: the ExpertCache's step semantics (default); flat: (token, expert) accesses")
    p.add_argument("--pin", default="reference", choices=PIN_MODES, help="flat semantics: current-token pinning")
    p.add_argument("--lfu-decay", type=float, default=0.9)
    p.add_argument("--full-layers", type=int, default=4, help="shallow_favoring: MoE layers kept whole")
    p.add_argument("--hardware", default="this-machine",
                   help=f"cost model profile: {', '.join(PROFILES)}, or a JSON file (from --measure)")
    p.add_argument("--format", default="int4", help="expert format whose bytes the link moves (meta.expert_bytes)")
    p.add_argument("--expert-bytes", type=int, default=0,
                   help="bytes one expert transfer moves (default: the trace's meta.expert_bytes[--format])")
    p.add_argument("--measure", metavar="PACK", default=None,
                   help="measure this machine's compute and expert set-up times on PACK first and use them")
    p.add_argument("--concat", action="store_true", help="treat the traces as one (files of one session)")
    p.add_argument("--json", dest="json_out", default=None, help="write every result as JSON here")
    p.set_defaults(func=cmd_simulate)
    return p


def cmd_simulate(a: argparse.Namespace) -> int:
    traces = [load_trace(t) for t in a.traces]
    if a.concat:
        traces = [concat_traces(traces)]
    policies = _split(a.policies)
    for pol in policies:
        if pol not in SIM_POLICIES:
            raise SimulationError(f"unknown policy {pol!r}; known: {', '.join(SIM_POLICIES)}")
    allocations = _split(a.allocations)
    for al in allocations:
        make_sim_allocation(al, a.full_layers)
    predictors = _split(a.predictors)
    if a.measure:
        from .hardware import measure_profile

        profile = measure_profile(a.measure, fmt=a.format)
        print(f"[measured: {profile.measured}]", file=sys.stderr)
    else:
        profile = load_profile(a.hardware)
    out: list[dict[str, Any]] = []
    for t in traces:
        rp = Replay(t)
        budgets = _split(a.budgets)
        eb = a.expert_bytes
        if not eb:
            try:
                eb = resolve_expert_bytes(profile, t, a.format)
            except SimulationError as e:
                print(f"note: {e} (or pass --expert-bytes); no time projection")
        print(f"\n== {t.path}: {t.model}, {t.num_tokens} rows x {t.num_layers} MoE layers, {t.num_experts} experts, "
              f"top-{t.top_k}; {rp.S} forward steps ({'recorded' if t.step is not None else 'inferred'}); "
              f"semantics {a.semantics}")
        runs: list[SimResult] = []
        notes: set[str] = set()
        for bud in budgets:
            if bud == "worker":
                wc = worker_config_of(t)
                if wc is None:
                    notes.add(f"{t.name}: budget 'worker' skipped: the trace has no meta.cache")
                    continue
                configs = [SimConfig(policy=pol, total_slots=wc.total_slots, allocation=wc.allocation,
                                     predictor=pr, prefetch_width=a.prefetch_width, semantics=a.semantics,
                                     pin=a.pin, lfu_decay=a.lfu_decay, full_layers=a.full_layers,
                                     slots_override=wc.slots_override)
                           for pol in policies for pr in predictors]
            else:
                q = parse_budget(bud, t.num_layers, t.num_experts)
                configs = [SimConfig(policy=pol, total_slots=q, allocation=al, predictor=pr,
                                     prefetch_width=a.prefetch_width, semantics=a.semantics, pin=a.pin,
                                     lfu_decay=a.lfu_decay, full_layers=a.full_layers)
                           for al in allocations for pol in policies for pr in predictors]
            for cfg in configs:
                if cfg.semantics == "worker" and cfg.total_slots < t.top_k:
                    notes.add(f"budget {bud} = {cfg.total_slots} experts is below top-{t.top_k}: skipped")
                    continue
                if cfg.semantics == "flat" and cfg.predictor != "none":
                    notes.add("flat semantics replays caching only: predictors skipped")
                    continue
                res = simulate(rp, cfg)
                notes.update(res.notes)
                if res.notes and cfg.predictor != "none" and not res.prefetched.any() and \
                        any("skipped" in n for n in res.notes):
                    continue
                runs.append(res)
                row = res.summary()
                row["budget"] = bud
                if eb:
                    row["cost"] = estimate_cost(res, profile, eb).summary()
                out.append(row)
        _print_tables(runs, t.num_layers * t.num_experts, eb, profile)
        for n in sorted(notes):
            print(f"note: {n}")
    if out:
        thr = {}
        for row in out:
            if row["predictor"] == "none":
                thr.setdefault(row["policy"], []).append(row["cells_per_s"])
        print("\nreplay speed, load-on-demand runs (token-layer cells/s, median): " +
              ", ".join(f"{k} {int(np.median(v)):,}" for k, v in thr.items()))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"profile": asdict(profile), "results": out}, indent=1))
        print(f"wrote {a.json_out}")
    return 0


def _print_tables(runs: list[SimResult], total: int, eb: int, profile: HardwareProfile) -> None:
    by_key: dict[tuple[str, str, str], dict[int, SimResult]] = {}
    slot_cols: list[int] = []
    for r in runs:
        c = r.config
        by_key.setdefault((c.allocation if c.slots_override is None else "worker", c.predictor, c.policy), {})[
            c.total_slots] = r
        if c.total_slots not in slot_cols:
            slot_cols.append(c.total_slots)
    if not runs:
        return
    head = "  ".join(f"{f'{q}={100 * q / total:.0f}%' if total else q:>9}" for q in slot_cols)
    print("hit rate (hits + prefetch hits) / lookups; columns: budget in experts (share of all experts)")
    print(f"{'allocation':<18}{'predictor':<12}{'policy':<10}{head}")
    for (al, pr, pol), d in by_key.items():
        cells = "  ".join(f"{d[q].hit_rate:9.3f}" if q in d else f"{'-':>9}" for q in slot_cols)
        print(f"{al[:17]:<18}{pr:<12}{pol:<10}{cells}")
    if eb:
        print(f"projected decode tokens/s on {profile.name} ({eb} bytes per expert)")
        for (al, pr, pol), d in by_key.items():
            cells = "  ".join(f"{estimate_cost(d[q], profile, eb).decode_tokens_per_s:9.1f}" if q in d else
                              f"{'-':>9}" for q in slot_cols)
            print(f"{al[:17]:<18}{pr:<12}{pol:<10}{cells}")
