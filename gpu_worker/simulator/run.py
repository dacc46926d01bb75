"""The replays: a trace driven through the worker's own cache ledger, policies, allocations and predictors.

`worker` semantics (default): per forward step and MoE layer, the model's demand call
(`CacheLedger.replay_demand`: the distinct experts its rows routed to, most token assignments
first, ties: lower id), exactly as `gpu_worker.cache.ExpertCache` runs it for load on demand (the
fidelity tests hold it to the worker's counters). Prefetch (a predictor) follows
`PrefetchController` + `ExpertCache.prefetch` without timing: the proposals for layer m + 1
(predicted before layer m is observed, rows merged by `merge_ranked`) land just before layer
m + 1's lookup (`CacheLedger.replay_prefetch`); how many of them would have found no room when the
job was queued (at layer m's gate input, before m's trim) is counted for the cost model. With
`prefetch_room="gate"` (the copy engine) they take their room when proposed, before layer m's demand
call, and what finds none is not prefetched.

`flat` semantics: the (token, expert) sequence of the published studies (../shared/traces/README.md):
each trace row is its own step, each routed cell an access to per-layer caches of fixed slots
(a one-layer ledger per column, `CacheLedger.replay_access`), demand insertion. `pin` says whether
the current token's experts are protected from eviction: "reference" (the README's convention:
LFU, LFU-decay and ARC pin; LRU and Belady do not), "all" or "none".
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from ..policy import (
    BeladyPolicy, CacheLedger, PolicyError, ReplacementPolicy, make_allocation, make_policy_factory,
)
from ..policy.allocation import Allocation
from ..policy.predictors import BASELINE_PREDICTOR_NAMES, PREDICTOR_NAMES, PredictorError, make_predictor, merge_ranked
from ..traces import Trace
from .config import (
    PIN_MODES, PREFETCH_ROOMS, SEMANTICS, SIM_POLICIES, SimConfig, SimResult, SimulationError, _REFERENCE_PINNED,
)
from .replay import Replay


def make_sim_allocation(name: str, full_layers: int | None = None) -> Allocation:
    try:
        return make_allocation(name, full_layers)
    except PolicyError as e:
        if isinstance(e, SimulationError) or name.startswith("learned:"):
            raise
        raise SimulationError(str(e)) from None


def layer_slots(replay: Replay, cfg: SimConfig) -> list[int]:
    if cfg.slots_override is not None:
        d = dict(cfg.slots_override)
        return [int(d.get(c, 0)) for c in range(replay.L)]
    alloc = make_sim_allocation(cfg.allocation, cfg.full_layers)
    ids = replay.trace.layer_ids
    slots = alloc.slots(max(0, cfg.total_slots - min(cfg.staging_slots, cfg.total_slots)), ids, replay.E,
                        replay.trace.top_k)
    return [int(slots.get(layer, 0)) for layer in ids]


def _policy_factory(name: str, lfu_decay: float) -> Callable[[int], ReplacementPolicy]:
    if name == "belady":
        raise SimulationError("belady is built per layer from the trace")
    try:
        return make_policy_factory(name, lfu_decay)
    except PolicyError as e:
        raise SimulationError(f"{e}, belady") from None


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
    known = tuple(PREDICTOR_NAMES) + tuple(BASELINE_PREDICTOR_NAMES)
    if name not in known:
        raise SimulationError(f"unknown predictor {name!r}; known: recorded, {', '.join(known)}")
    try:
        pred = make_predictor(name, num_moe_layers=len(moe_layers), num_experts=num_experts)
    except PredictorError as e:
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


def _collect(r: dict[str, Any], ledger_stats: list) -> None:
    """Per-layer totals from the ledgers' statistics (one LayerStats per column)."""
    for name, attr in (("lookups", "lookups"), ("hits", "hits"), ("prefetch_hits", "prefetch_hits"),
                       ("misses", "misses"), ("evictions", "evictions"), ("prefetched", "prefetched"),
                       ("prefetch_unused", "prefetch_unused_evictions")):
        r[name] = np.array([getattr(s, attr) for s in ledger_stats], np.int64)


def _run_flat(rp: Replay, cfg: SimConfig, slots: list[int], policies: list[ReplacementPolicy]) -> SimResult:
    t0 = time.perf_counter()
    N, L = rp.N, rp.L
    r = _empty_result(rp, cfg, slots, N)
    pin = cfg.pin == "all" or (cfg.pin == "reference" and cfg.policy in _REFERENCE_PINNED)
    stats = []
    for col in range(L):
        pol, cap, rows = policies[col], slots[col], rp.flat_rows[col]
        ledger = CacheLedger([0], {0: cap}, lambda s: pol, cap)  # one column, its own slots: no borrowing
        Lg = ledger.layers[0]
        belady = pol if isinstance(pol, BeladyPolicy) else None
        clock = 0
        miss_rows = np.zeros(N, np.int32)
        access = ledger.replay_access
        for n, row in enumerate(rows):
            if belady is None:
                miss_rows[n] = access(Lg, row, pin)
            else:
                m = 0
                for i in range(len(row)):  # Belady's clock is the access index
                    belady.now = clock
                    clock += 1
                    m += access(Lg, row, pin, start=i, stop=i + 1)
                miss_rows[n] = m
            ledger.end_step()
        stats.append(Lg.stats)
        r["step_misses"][:, col] = miss_rows
        r["step_lookups"][:, col] = [len(x) for x in rows]
    _collect(r, stats)
    r["step_waves"] = (r["step_misses"] > 0).astype(np.int32)
    phase = rp.trace.phase
    return SimResult(**r, step_tokens=np.ones(N, np.int32),
                     step_decode=(phase == 1) if phase is not None else np.ones(N, bool),
                     cells=N * L, seconds=time.perf_counter() - t0)


def _run_worker(rp: Replay, cfg: SimConfig, slots: list[int], policies: list[ReplacementPolicy]) -> SimResult:
    """The worker's demand (and, with a predictor, prefetch) path, step by step, through one CacheLedger."""
    t0 = time.perf_counter()
    S, L = rp.S, rp.L
    r = _empty_result(rp, cfg, slots, S)
    notes: list[str] = []
    ledger = CacheLedger(range(L), dict(enumerate(slots)), None, cfg.total_slots,  # type: ignore[arg-type]
                         min(cfg.staging_slots, cfg.total_slots), policies=dict(enumerate(policies)))
    layers = [ledger.layers[c] for c in range(L)]
    by_step = rp.by_step
    miss_events: list[tuple[int, int, int, int]] = []  # (step, layer, misses, waves)
    pf_events: list[tuple[int, int, int]] = []  # (step, layer, prefetched)
    phit_events: list[tuple[int, int, int]] = []  # (step, layer, prefetch hits)
    wait_events: list[tuple[int, int, int]] = []  # (step, layer, proposals without room at the gate input)
    belady = bool(policies) and isinstance(policies[0], BeladyPolicy)
    ages = any(type(p).on_step is not ReplacementPolicy.on_step for p in policies)

    predictor = None
    if cfg.predictor == "cross_layer":
        notes.append(f"{rp.trace.name}: predictor 'cross_layer' skipped: it needs hidden states (gate inputs), "
                     f"which traces do not carry; its recorded proposals replay as 'recorded'")
    elif cfg.predictor != "none":
        predictor, note = make_sim_predictor(cfg.predictor, rp.trace, rp.K, rp.E, rp.trace.layer_ids)
        if note:
            notes.append(note)
    K = rp.K
    if cfg.prefetch_room not in PREFETCH_ROOMS:
        raise SimulationError(f"unknown prefetch room {cfg.prefetch_room!r}; known: {', '.join(PREFETCH_ROOMS)}")
    at_gate = cfg.prefetch_room == "gate"
    width = cfg.prefetch_width or (rp.trace.predicted.shape[2] if isinstance(predictor, _RecordedPredictor) else K)
    phases = rp.trace.phase.tolist() if rp.trace.phase is not None else [1] * rp.N
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
    demand = ledger.replay_demand
    end_step = ledger.end_step

    if predictor is None:  # load on demand: one demand call per (step, layer)
        pols = [Lg.policy for Lg in layers]

        def clock(s: int) -> None:
            for p in pols:
                p.now = s

        miss_events = ledger.replay_steps(by_step, clock if belady else None)
    for s in range(S if predictor is not None else 0):
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
            Lg = layers[col]
            if proposals:
                if belady:
                    Lg.policy.now = s - 1  # this step's use of the layer is still ahead
                landed = ledger.replay_prefetch(Lg, proposals)
                if landed:
                    pf_events.append((s, col, landed))
            if predictor is not None:
                # PrefetchController: predict(m + 1) with layer m's gate input (prefill rows cut to top-k, rows
                # merged into one ranked list), then observe(m)
                if col + 1 < L:
                    lists = predictor.predict(col + 1, rids, call_width)
                    if any_prefill:
                        lists = [row[:K] if pre else row for row, pre in zip(lists, prefill_rows)]
                    proposals = merge_ranked(lists, K)
                    if proposals and at_gate:  # the copy engine: room now or never
                        if belady:
                            layers[col + 1].policy.now = s - 1
                        landed = ledger.replay_prefetch(layers[col + 1], proposals)
                        if landed:
                            pf_events.append((s, col + 1, landed))
                        proposals = []
                    if proposals:  # room for them now, at this layer's gate input (its trim is still ahead)
                        nxt = layers[col + 1]
                        R = nxt.resident
                        todo = sum(1 for e in proposals if e not in R and e not in nxt.pending)
                        if todo > ledger.free:
                            prot = set(proposals)
                            room = ledger.free + sum(1 for e in nxt.evictable() if e not in prot)
                            if todo > room:
                                wait_events.append((s, col + 1, todo - room))
                else:
                    proposals = []
                rows = experts_np[starts[s]:ends[s], col, :].tolist()
                predictor.observe(col, rids, [[e for e in row if e >= 0] for row in rows])
            if not ids:
                continue
            if belady:
                Lg.policy.now = s
            if Lg.prefetched:
                before = Lg.stats.prefetch_hits
                n_miss, waves = demand(Lg, ids)
                if Lg.stats.prefetch_hits != before:
                    phit_events.append((s, col, Lg.stats.prefetch_hits - before))
            else:
                n_miss, waves = demand(Lg, ids)
            if n_miss:
                miss_events.append((s, col, n_miss, waves))
        if ages:
            end_step()
        if predictor is not None:
            for rid in dict.fromkeys(rids):
                if last_step_of.get(rid) == s:
                    predictor.end_request(rid)
    _collect(r, [Lg.stats for Lg in layers])
    r["step_lookups"] = rp.step_lookups
    for name, events, k in (("step_misses", miss_events, 2), ("step_waves", miss_events, 3),
                            ("step_prefetched", pf_events, 2), ("step_prefetch_hits", phit_events, 2)):
        if events:
            ev = np.array(events, np.int64)
            r[name][ev[:, 0], ev[:, 1]] = ev[:, k]
    waiting = np.zeros((S, L), np.int32)
    if wait_events:
        ev = np.array(wait_events, np.int64)
        waiting[ev[:, 0], ev[:, 1]] = ev[:, 2]
    return SimResult(**r, step_tokens=rp.step_tokens, step_decode=rp.step_decode, cells=rp.N * rp.L,
                     seconds=time.perf_counter() - t0, notes=notes, resident=[sorted(Lg.resident) for Lg in layers],
                     step_prefetch_waiting=np.minimum(waiting, r["step_prefetched"]))
