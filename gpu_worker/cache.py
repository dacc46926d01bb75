"""The worker's expert cache: compute-ready experts on the device under a byte budget.

Accounting: every cached expert costs `expert_bytes` (its compute form's real bytes,
`ExpertCompute.nbytes`, measured once at start-up), and so does every expert being
fetched or built for the cache (a reservation, taken before the fetch starts). An INT2
prefill expert (below) reserves `tail_units` such units while it is fetched and used.
Their sum, `used_bytes`, never exceeds `budget_bytes`; `high_water_bytes` records the most
it reached.

Layout: the budget is `total_slots = budget_bytes // expert_bytes` units. `staging_slots`
of them are set aside for prefetched experts not used yet (and for a layer's misses beyond
its share while it computes); an `Allocation` turns the rest into resident slots per MoE
layer. Whatever is not held by a layer's slots is free: any layer may use it while it
computes (a layer's experts beyond its slots), and prefetches land there. A
`ReplacementPolicy` per layer picks victims. Policies and allocations live in the
torch-free `gpu_worker.policies`, so the offline simulator replays traces through these
same classes (`policies.DemandCacheModel` is this demand path, without torch).

Demand path: one `iter_experts(L, experts)` call per MoE layer L per forward step. The
model passes the layer's routed experts, each once, in popularity order (most token
assignments in the step first, ties: lower expert id). Exactly:
 1. ids = `experts` without repeats (order kept); lookups += len(ids).
 2. Hits: every id resident at the call, in ids order: `on_hit(e)`, counted as a prefetch
    hit when a prefetch brought e and it was not used since, else as a (cache) hit. Hits
    are computed first, in ids order, and each is released (evictable again) as soon as
    the model asks for the next expert.
 3. Misses: the other ids, in ids order, in waves. (INT2 tail experts are kept for last,
    see below.) A wave is the first n of those left, where
        n = free units + L's unpinned residents,
    or, only when that is 0, n = every other layer's unpinned residents (borrowing);
    free units = (budget_bytes - used_bytes) // expert_bytes. Without prefetching,
    nothing is pinned when a wave is formed (the model released every expert it was
    given), so a layer cycles its misses through the free units and its own residents
    and borrows only when it has neither (a budget near the minimum, a 0-slot layer
    with no free unit). For each expert e of the wave, in order: `on_miss(e)`; then, if
    no free unit is left, one eviction: L's victim among L's unpinned residents if it has
    any, else the victim of another layer, taking layers in order of (slots - residents)
    ascending (the layer furthest over its slots first; ties: lower layer index), the
    first with an unpinned resident; `on_evict(victim)` of that layer. Then the wave is fetched (one
    call, demand priority), and, in order, each expert is inserted (`on_insert(e)`),
    counted as a miss, and given to the model.
 4. When the model has had every expert: while L holds more residents than its slots,
    evict L's victim among its unpinned residents (`on_evict`). This "trim" leaves L at
    its slots (the scratch goes back to the free units).
 5. `end_step()` (the engine calls it after each forward step) calls `on_step()` on every
    layer's policy, in layer order.
A load-on-demand replay (no prefetch, no INT2 tail) that follows 1-5 with the same
allocation, policy, staging and budget gets the worker's hits, misses and evictions
exactly; it needs, per step and MoE layer, the distinct routed experts and their token
counts (for the order).

Prefetch path (`prefetch(L, experts)`, from the prefetch thread; timing-dependent, so a
replay reproduces it only approximately): experts in rank order, those not resident nor
being fetched; each takes a free unit, else evicts one of L's unpinned residents that is
not in this prefetch's own list (`on_miss(e, prefetch=True)`, victim, `on_evict`); never
another layer's expert, never a pinned one; the rest are reported as `no_room` (the
prefetcher retries them when space frees up, until the layer is reached). The reserved
ones are fetched in one call (prefetch priority); each is inserted as soon as it is built
(`on_insert(e, prefetch=True)`), so the compute thread can use the first while later ones
build. A demand lookup of an expert a prefetch is fetching waits for it (no double fetch)
and counts a (late) prefetch hit. A prefetch for a layer the compute has already passed in
this step is dropped; one that lands after its layer ran is inserted and L is trimmed.
Prefetched experts evicted before any use are counted with their blob bytes (wasted).

INT2 tail (prefill): `set_int2_tail(L, experts)` just before L's `iter_experts` names
experts that only prefill rows routed to and that carry the least token assignments;
those among the misses are fetched in `tail_fmt` (int2) after the other misses, in waves
that reserve `tail_units` each (freeing room as in 3, without on_miss/on_insert), computed,
and dropped when the model asks for the next expert: never inserted, so decode never hits
an INT2 copy. They count as lookups and misses (and int2_misses).

Threads: the compute thread calls `iter_experts`; a prefetch thread calls `prefetch`
concurrently. One lock guards the state; fetches and compute builds run outside it. While
a demand fetch is in flight (`demand_fetching`), the prefetcher starts no new fetch: demand
outranks prefetch on the link here as it does in the store's queue (builds may overlap).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Callable, Iterator, Sequence

import torch

from expert_store.codec import expert_nbytes
from expert_store.errors import FateError

from .expert_compute import ExpertCompute, default_compute_form, make_expert_compute
from expert_store.model_args import ModelArgs
from .policies import Allocation, ReplacementPolicy, make_allocation, make_policy_factory
from .store_client import ExpertFetcher, FetchedBlob

log = logging.getLogger(__name__)

MIB = 1 << 20


class CacheError(FateError, ValueError):
    """A cache misconfigured (unknown policy or allocation) or misused (a layer without experts)."""


class CacheBudgetError(CacheError):
    """A budget that cannot work (below one layer's top-k experts), or a cache that cannot make room."""


# -- sizes --------------------------------------------------------------------------------------


def expert_compute_nbytes(args: ModelArgs, fmt: str, form: str, device: torch.device | str) -> int:
    """Bytes one expert takes in the cache in `form` (built once from a zero blob and measured)."""
    form = default_compute_form(fmt, device) if form == "auto" else form
    blob = bytes(expert_nbytes(fmt, args.hidden_size, args.expert_intermediate_size))
    return make_expert_compute(fmt, blob, args.hidden_size, args.expert_intermediate_size, form, device).nbytes


def min_budget_bytes(args: ModelArgs, fmt: str, form: str, device: torch.device | str) -> int:
    """The smallest workable budget: the top_k experts of one layer in the compute form."""
    return args.top_k * expert_compute_nbytes(args, fmt, form, device)


def full_budget_bytes(args: ModelArgs, fmt: str, form: str, device: torch.device | str) -> int:
    """The budget that holds every expert of every MoE layer (100%)."""
    return args.num_moe_layers * args.num_experts * expert_compute_nbytes(args, fmt, form, device)


# -- statistics ---------------------------------------------------------------------------------


@dataclass
class LayerStats:
    lookups: int = 0  # experts asked for (each id once per iter_experts call)
    hits: int = 0  # resident when asked for, not brought by an unused prefetch
    prefetch_hits: int = 0  # resident (or arriving) because a prefetch brought them, first use
    prefetch_late_hits: int = 0  # of prefetch_hits: still in flight when asked for (compute waited)
    misses: int = 0  # fetched on demand (INT2 tail experts included)
    int2_misses: int = 0  # of misses: INT2 tail experts (prefill), not inserted
    evictions: int = 0
    prefetched: int = 0  # experts inserted by prefetch
    prefetch_unused_evictions: int = 0  # prefetched experts evicted before any use
    prefetch_dropped: int = 0  # experts of prefetches dropped: their layer had run (stale)
    bytes_fetched: int = 0  # blob bytes fetched for this layer (demand + prefetch)
    demand_bytes: int = 0  # of bytes_fetched: demand fetches (INT2 included)
    int2_bytes: int = 0  # of demand_bytes: INT2 tail blobs
    prefetch_bytes: int = 0  # of bytes_fetched: prefetches
    prefetch_wasted_bytes: int = 0  # blob bytes of prefetched experts evicted before any use
    fetch_wait_ns: int = 0  # compute thread blocked on demand fetches, their builds and late prefetches
    build_ns: int = 0  # of all fetches (demand + prefetch), time building compute forms from blobs
    used_bytes: int = 0  # resident experts x expert_bytes
    resident: int = 0
    slots: int = 0

    def add(self, other: "LayerStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def hit_rate(self) -> float:
        """(hits + prefetch hits) / lookups."""
        return (self.hits + self.prefetch_hits) / self.lookups if self.lookups else 0.0


@dataclass
class CacheStats:
    budget_bytes: int
    expert_bytes: int
    used_bytes: int  # resident + reserved
    reserved_bytes: int  # experts being fetched or built
    high_water_bytes: int
    total: LayerStats
    layers: dict[int, LayerStats]
    staging_slots: int = 0
    total_slots: int = 0


@dataclass
class StepOutcome:
    """What the cache did in one forward step, per MoE layer (the engine attributes it to requests
    through their routings). Each expert a layer asked for is in exactly one of the three maps."""

    hits: dict[int, list[int]] = field(default_factory=dict)  # layer -> experts resident when asked for
    prefetch_hits: dict[int, list[int]] = field(default_factory=dict)  # ... resident or arriving by prefetch
    misses: dict[int, list[int]] = field(default_factory=dict)  # layer -> experts fetched on demand
    layer_fetch_wait_ns: dict[int, int] = field(default_factory=dict)  # compute thread blocked, per layer
    layer_bytes_fetched: dict[int, int] = field(default_factory=dict)  # demand-fetched blob bytes, per layer
    prefetches_issued: int = 0  # experts prefetches inserted during the step (any layer)
    prefetch_bytes: int = 0  # their blob bytes
    prefetch_wasted_bytes: int = 0  # prefetched experts evicted unused during the step
    int2_misses: int = 0

    @property
    def fetch_wait_ns(self) -> int:
        return sum(self.layer_fetch_wait_ns.values())

    @property
    def bytes_fetched(self) -> int:
        return sum(self.layer_bytes_fetched.values())

    def count(self, kind: str) -> int:
        """Total experts in `kind` ("hits", "prefetch_hits", "misses") over all layers."""
        return sum(len(v) for v in getattr(self, kind).values())


@dataclass
class PrefetchResult:
    """What one `prefetch` call did."""

    inserted: list[int] = field(default_factory=list)  # fetched and inserted, in rank order
    no_room: list[int] = field(default_factory=list)  # wanted, not resident, no room for them now
    stale: bool = False  # the layer had already run in this step: nothing done
    fetch_ns: int = 0  # wall time of the fetch + builds


# -- the cache ----------------------------------------------------------------------------------


@dataclass
class _LayerState:
    policy: ReplacementPolicy
    slots: int
    resident: dict[int, ExpertCompute] = field(default_factory=dict)
    pins: dict[int, int] = field(default_factory=dict)  # expert -> pin count (in use, never evicted)
    pending: set[int] = field(default_factory=set)  # reserved and being fetched by someone
    prefetched: dict[int, int] = field(default_factory=dict)  # inserted by prefetch, not used yet -> blob bytes
    stats: LayerStats = field(default_factory=LayerStats)
    done_step: int = -1  # the last step whose iter_experts for this layer ended
    active: bool = False  # inside iter_experts now
    int2_tail: tuple[int, frozenset[int]] | None = None  # (step, experts) for the next iter_experts

    def evictable(self) -> set[int]:
        return {e for e in self.resident if not self.pins.get(e)}


class ExpertCache:
    """`ExpertProvider` with a byte budget, per-layer slots, a staging area and a replacement policy per layer."""

    def __init__(
        self,
        args: ModelArgs,
        fetcher: ExpertFetcher,
        fmt: str,
        form: str = "auto",
        device: torch.device | str = "cpu",
        budget_bytes: int = 0,
        policy: str | Callable[[int], ReplacementPolicy] = "lru",
        allocation: str | Allocation = "uniform",
        staging_slots: int = 0,
        tail_fmt: str | None = None,
        wait_poll_s: float = 0.5,
    ):
        self.args = args
        self.fetcher = fetcher
        self.fmt = fmt
        self.device = torch.device(device)
        self.form = default_compute_form(fmt, self.device) if form == "auto" else form
        self.expert_bytes = expert_compute_nbytes(args, fmt, self.form, self.device)
        self.budget_bytes = int(budget_bytes)
        minimum = args.top_k * self.expert_bytes
        if self.budget_bytes < minimum:
            raise CacheBudgetError(
                f"expert cache budget {self.budget_bytes} bytes ({self.budget_bytes / MIB:.2f} MiB) is below the "
                f"minimum {minimum} bytes ({minimum / MIB:.2f} MiB): one layer's top-{args.top_k} experts in "
                f"compute form {self.form!r} ({self.expert_bytes} bytes each); raise the budget")
        if staging_slots < 0:
            raise CacheError(f"staging_slots must be >= 0, got {staging_slots}")
        self.total_slots = self.budget_bytes // self.expert_bytes
        self.staging_slots = min(int(staging_slots), self.total_slots)
        self.allocation = make_allocation(allocation) if isinstance(allocation, str) else allocation
        new_policy = make_policy_factory(policy) if isinstance(policy, str) else policy  # slots -> policy
        slots = self.allocation.slots(self.total_slots - self.staging_slots, args.moe_layers, args.num_experts)
        if set(slots) != set(args.moe_layers) or any(not 0 <= s <= args.num_experts for s in slots.values()) \
                or sum(slots.values()) > self.total_slots - self.staging_slots:
            raise CacheBudgetError(f"allocation {self.allocation.name!r} gave slots {slots} that do not fit "
                                   f"{args.num_experts} experts per layer and {self.budget_bytes} bytes")
        self._layers = {layer: _LayerState(new_policy(slots[layer]), slots[layer]) for layer in args.moe_layers}
        self.tail_fmt = tail_fmt
        self.tail_form = self.form
        self.tail_units = 0
        if tail_fmt is not None:
            try:
                tail_bytes = expert_compute_nbytes(args, tail_fmt, self.form, self.device)
            except Exception:  # noqa: BLE001 - a form that cannot run the tail format: the device default
                self.tail_form = default_compute_form(tail_fmt, self.device)
                tail_bytes = expert_compute_nbytes(args, tail_fmt, self.tail_form, self.device)
            self.tail_units = math.ceil(tail_bytes / self.expert_bytes)
            if self.tail_units * self.expert_bytes > self.budget_bytes:
                raise CacheBudgetError(f"one {tail_fmt} expert ({tail_bytes} bytes as {self.tail_form!r}) does not "
                                       f"fit the {self.budget_bytes}-byte budget: raise it or turn the tail off")
        self._cond = threading.Condition(threading.Lock())
        self._used = 0  # resident + reserved bytes
        self._reserved = 0
        self._high_water = 0
        self._step: StepOutcome | None = None
        self._step_seq = 0
        self._demand_fetching = 0  # demand fetch calls in flight (the link is busy with demand)
        self._wait_poll_s = wait_poll_s

    # -- ExpertProvider -------------------------------------------------------------------------

    def iter_experts(self, layer: int, experts: Sequence[int]) -> Iterator[tuple[int, ExpertCompute]]:
        """The demand path (module docstring, 1-4): hits first, then the misses in waves, then the INT2
        tail; trimmed back to the layer's slots at the end. Experts yielded and not yet released, and
        fetched but not yet yielded, are pinned: nothing evicts them."""
        L = self._layer(layer)
        ids = list(dict.fromkeys(int(e) for e in experts))
        step = self._step
        pinned: set[int] = set()  # pinned by this call and not yet released
        with self._cond:
            L.active = True
            L.stats.lookups += len(ids)
            tail: frozenset[int] = frozenset()
            if L.int2_tail is not None:
                if L.int2_tail[0] == self._step_seq:
                    tail = L.int2_tail[1]
                L.int2_tail = None
            ready = [e for e in ids if e in L.resident]
            self._use(L, layer, ready, pinned, step, late=False)
        remaining = [e for e in ids if e not in pinned and e not in tail]
        transient = [e for e in ids if e not in pinned and e in tail]
        try:
            yield from self._yield_pinned(L, ready, pinned)
            while remaining:
                ready, wave = self._next_wave(L, layer, remaining, pinned, step)
                yield from self._yield_pinned(L, ready, pinned)
                if wave:
                    self._demand_fetch(L, layer, wave, pinned, step)
                    yield from self._yield_pinned(L, wave, pinned)
                done = set(ready) | set(wave)
                remaining = [e for e in remaining if e not in done]
            while transient:
                ready, wave = self._next_transient_wave(L, layer, transient, pinned, step)
                yield from self._yield_pinned(L, ready, pinned)
                if wave:
                    yield from self._transient_fetch(L, layer, wave, step)
                done = set(ready) | set(wave)
                transient = [e for e in transient if e not in done]
        finally:
            with self._cond:
                for e in pinned:
                    self._unpin(L, e)
                self._trim(L)
                L.done_step = self._step_seq
                L.active = False
                self._cond.notify_all()

    def set_int2_tail(self, layer: int, experts: Sequence[int]) -> None:
        """Experts of `layer` to fetch in `tail_fmt` if they miss in this step's next iter_experts for it
        (ignored when the cache has no tail format)."""
        if self.tail_fmt is None:
            return
        L = self._layer(layer)
        with self._cond:
            L.int2_tail = (self._step_seq, frozenset(int(e) for e in experts)) if experts else None

    # -- prefetch --------------------------------------------------------------------------------

    def prefetch(self, layer: int, experts: Sequence[int], step: int | None = None) -> PrefetchResult:
        """Fetch and insert experts of `layer` (ranked, most likely first) that are neither resident nor being
        fetched, as far as free units and this layer's unpinned experts outside `experts` allow (module
        docstring). `step`: the `step_seq` the prefetch is for; if that step's compute has passed the layer,
        nothing is done (stale)."""
        L = self._layer(layer)
        res = PrefetchResult()
        want = list(dict.fromkeys(int(x) for x in experts))
        with self._cond:
            if step is not None and self._passed(L, step):
                res.stale = True
                L.stats.prefetch_dropped += sum(1 for e in want if e not in L.resident and e not in L.pending)
                return res
            todo = [e for e in want if e not in L.resident and e not in L.pending]
            wave = self._reserve_prefetch(L, todo, protect=set(want))
            res.no_room = todo[len(wave):]
            L.pending.update(wave)
        if not wave:
            return res
        t0 = time.perf_counter_ns()
        try:
            blobs = self.fetcher.fetch([(layer, e, self.fmt) for e in wave], "prefetch")
        except BaseException:
            self._abandon(L, wave)
            raise
        for i, (e, b) in enumerate(zip(wave, blobs)):
            try:
                compute, build_ns = self._build(b, self.fmt, self.form)
            except BaseException:
                self._abandon(L, wave[i:])
                raise
            with self._cond:
                L.pending.discard(e)
                self._insert(L, e, compute, prefetch=True)
                L.prefetched[e] = b.nbytes
                L.stats.prefetched += 1
                L.stats.bytes_fetched += b.nbytes
                L.stats.prefetch_bytes += b.nbytes
                L.stats.build_ns += build_ns
                if self._step is not None:
                    self._step.prefetches_issued += 1
                    self._step.prefetch_bytes += b.nbytes
                self._cond.notify_all()
            res.inserted.append(e)
        res.fetch_ns = time.perf_counter_ns() - t0
        if step is not None:
            with self._cond:
                if self._passed(L, step) and not L.active:  # landed after its layer ran
                    self._trim(L)
                    self._cond.notify_all()
        return res

    def passed(self, layer: int, step: int) -> bool:
        """Has the compute finished `layer` in step `step` (or moved to a later step)?"""
        with self._cond:
            return self._passed(self._layer(layer), step)

    # -- step outcomes and statistics ---------------------------------------------------------------

    @property
    def step_seq(self) -> int:
        """Forward steps begun (`begin_step` calls); prefetches name the step they are for."""
        return self._step_seq

    @property
    def demand_fetching(self) -> bool:
        """A demand fetch is in flight (read with the lock held for a consistent answer)."""
        return self._demand_fetching > 0

    def begin_step(self) -> None:
        """Start recording per-layer outcomes of one forward step (the compute thread's)."""
        with self._cond:
            self._step_seq += 1
            self._step = StepOutcome()
            self._cond.notify_all()

    def end_step(self) -> StepOutcome:
        """The outcomes since `begin_step`; also ages the policies (`on_step`)."""
        with self._cond:
            out, self._step = self._step or StepOutcome(), None
            for L in self._layers.values():
                L.policy.on_step()
        return out

    def stats(self) -> CacheStats:
        with self._cond:
            layers = {}
            total = LayerStats()
            for layer, L in self._layers.items():
                s = LayerStats(**vars(L.stats))
                s.resident, s.used_bytes, s.slots = len(L.resident), len(L.resident) * self.expert_bytes, L.slots
                layers[layer] = s
                total.add(s)
            return CacheStats(self.budget_bytes, self.expert_bytes, self._used, self._reserved, self._high_water,
                              total, layers, self.staging_slots, self.total_slots)

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def high_water_bytes(self) -> int:
        return self._high_water

    def slots(self) -> dict[int, int]:
        return {layer: L.slots for layer, L in self._layers.items()}

    def resident(self, layer: int) -> list[int]:
        with self._cond:
            return sorted(self._layer(layer).resident)

    def clear(self) -> None:
        """Drop every unpinned expert (e.g. the store now serves another pack)."""
        with self._cond:
            for L in self._layers.values():
                for e in list(L.evictable()):
                    self._evict(L, e)

    # -- internals (the callers of _use, _reserve*, _evict_one, _unreserve, _insert, _evict, _unpin, _trim
    #    and _passed hold the lock) --------------------------------------------------------------------------

    def _layer(self, layer: int) -> _LayerState:
        try:
            return self._layers[layer]
        except KeyError:
            raise CacheError(f"layer {layer} is not an MoE layer (MoE layers: {list(self._layers)})") from None

    def _passed(self, L: _LayerState, step: int) -> bool:
        return step < self._step_seq or L.done_step >= step

    def _use(self, L: _LayerState, layer: int, ready: list[int], pinned: set[int], step: StepOutcome | None,
             late: bool) -> None:
        """Count resident experts as (prefetch) hits and pin them for this call. Lock held."""
        for e in ready:
            if e in L.prefetched:
                del L.prefetched[e]
                L.stats.prefetch_hits += 1
                L.stats.prefetch_late_hits += late
                if step is not None:
                    step.prefetch_hits.setdefault(layer, []).append(e)
            else:
                L.stats.hits += 1
                if step is not None:
                    step.hits.setdefault(layer, []).append(e)
            L.policy.on_hit(e)
            L.pins[e] = L.pins.get(e, 0) + 1
            pinned.add(e)

    def _yield_pinned(self, L: _LayerState, experts: list[int], pinned: set[int]
                      ) -> Iterator[tuple[int, ExpertCompute]]:
        for e in experts:
            with self._cond:
                compute = L.resident[e]
            yield e, compute
            with self._cond:  # released: the model asked for the next one
                self._unpin(L, e)
                pinned.discard(e)
                self._cond.notify_all()

    def _wait_until(self, L: _LayerState, layer: int, step: StepOutcome | None, pick) -> tuple[list[int], list[int]]:
        """Loop `pick()` (lock held) until it returns something; count the time waited as a stall."""
        t0 = time.perf_counter_ns()
        waited = False
        with self._cond:
            while True:
                ready, wave = pick()
                if ready or wave:
                    break
                if not self._reserved and not L.pending:
                    raise CacheBudgetError(
                        f"layer {layer}: no room for one expert in a {self.budget_bytes}-byte budget with nothing "
                        f"in flight (a cache bug: used {self._used}, pinned "
                        f"{sum(len([p for p in S.pins.values() if p]) for S in self._layers.values())})")
                self._cond.wait(self._wait_poll_s)
                waited = True
        if waited:  # on a late prefetch, or on room a prefetch held: the compute thread stalled
            self._count_wait(L, layer, step, time.perf_counter_ns() - t0)
        return ready, wave

    def _next_wave(self, L: _LayerState, layer: int, remaining: list[int], pinned: set[int],
                   step: StepOutcome | None) -> tuple[list[int], list[int]]:
        """(experts that became resident meanwhile, experts reserved for one demand fetch)."""

        def pick():
            ready = [e for e in remaining if e in L.resident]
            if ready:  # a prefetch landed since we looked
                self._use(L, layer, ready, pinned, step, late=True)
            to_fetch = [e for e in remaining if e not in L.resident and e not in L.pending]
            wave = self._reserve(L, to_fetch, borrow=True, prefetch=False)
            L.pending.update(wave)
            return ready, wave

        return self._wait_until(L, layer, step, pick)

    def _next_transient_wave(self, L: _LayerState, layer: int, remaining: list[int], pinned: set[int],
                             step: StepOutcome | None) -> tuple[list[int], list[int]]:
        """(INT2 tail experts that became resident meanwhile, as int4: hits; experts reserved as INT2)."""

        def pick():
            ready = [e for e in remaining if e in L.resident]
            if ready:
                self._use(L, layer, ready, pinned, step, late=True)
            wave = []
            for e in remaining:
                if e in L.resident or e in L.pending:
                    continue
                if not self._make_room(L, self.tail_units, borrow=True):
                    break
                self._take(self.tail_units)
                wave.append(e)
            return ready, wave

        return self._wait_until(L, layer, step, pick)

    def _demand_fetch(self, L: _LayerState, layer: int, wave: list[int], pinned: set[int],
                      step: StepOutcome | None) -> None:
        t0 = time.perf_counter_ns()
        try:
            blobs = self._fetch_demand([(layer, e, self.fmt) for e in wave])
            built = [self._build(b, self.fmt, self.form) for b in blobs]
        except BaseException:
            self._abandon(L, wave)
            raise
        waited = time.perf_counter_ns() - t0
        nbytes = sum(b.nbytes for b in blobs)
        with self._cond:
            L.pending.difference_update(wave)
            for e, (c, build_ns) in zip(wave, built):
                self._insert(L, e, c, prefetch=False)
                L.pins[e] = L.pins.get(e, 0) + 1
                pinned.add(e)
                L.stats.build_ns += build_ns
            L.stats.misses += len(wave)
            L.stats.bytes_fetched += nbytes
            L.stats.demand_bytes += nbytes
            if step is not None:
                step.misses.setdefault(layer, []).extend(wave)
                step.layer_bytes_fetched[layer] = step.layer_bytes_fetched.get(layer, 0) + nbytes
            self._count_wait(L, layer, step, waited)
            self._cond.notify_all()

    def _transient_fetch(self, L: _LayerState, layer: int, wave: list[int], step: StepOutcome | None
                         ) -> Iterator[tuple[int, ExpertCompute]]:
        """INT2 copies: fetched, built, yielded, dropped (their reservation freed as the model moves on)."""
        units = self.tail_units
        left = len(wave)
        try:
            t0 = time.perf_counter_ns()
            blobs = self._fetch_demand([(layer, e, self.tail_fmt) for e in wave])
            built = [self._build(b, self.tail_fmt, self.tail_form) for b in blobs]
            waited = time.perf_counter_ns() - t0
            nbytes = sum(b.nbytes for b in blobs)
            with self._cond:
                L.stats.misses += len(wave)
                L.stats.int2_misses += len(wave)
                L.stats.bytes_fetched += nbytes
                L.stats.demand_bytes += nbytes
                L.stats.int2_bytes += nbytes
                L.stats.build_ns += sum(ns for _, ns in built)
                if step is not None:
                    step.misses.setdefault(layer, []).extend(wave)
                    step.int2_misses += len(wave)
                    step.layer_bytes_fetched[layer] = step.layer_bytes_fetched.get(layer, 0) + nbytes
                self._count_wait(L, layer, step, waited)
            for i, e in enumerate(wave):
                c, built[i] = built[i][0], None  # the only reference: dropped once the model is done with it
                yield e, c
                del c
                with self._cond:
                    self._give_back(units)
                    left -= 1
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._give_back(units * left)
                self._cond.notify_all()

    def _fetch_demand(self, keys: list) -> list[FetchedBlob]:
        with self._cond:
            self._demand_fetching += 1
        try:
            return self.fetcher.fetch(keys, "demand")
        finally:
            with self._cond:
                self._demand_fetching -= 1
                self._cond.notify_all()

    def _count_wait(self, L: _LayerState, layer: int, step: StepOutcome | None, waited_ns: int) -> None:
        L.stats.fetch_wait_ns += waited_ns
        if step is not None:
            step.layer_fetch_wait_ns[layer] = step.layer_fetch_wait_ns.get(layer, 0) + waited_ns

    def _build(self, b: FetchedBlob, fmt: str, form: str) -> tuple[ExpertCompute, int]:
        """The compute form of one blob (no lock held: this is the slow part) and the ns it took."""
        t0 = time.perf_counter_ns()
        a = self.args
        c = make_expert_compute(fmt, b.data, a.hidden_size, a.expert_intermediate_size, form, self.device)
        if fmt == self.fmt and c.nbytes != self.expert_bytes:
            raise CacheError(f"expert {b.key} takes {c.nbytes} bytes in form {form!r}, the cache "
                             f"budgets {self.expert_bytes} per expert (a compute form bug)")
        if fmt != self.fmt and c.nbytes > self.tail_units * self.expert_bytes:
            raise CacheError(f"{fmt} expert {b.key} takes {c.nbytes} bytes, more than the "
                             f"{self.tail_units * self.expert_bytes} reserved (a compute form bug)")
        return c, time.perf_counter_ns() - t0

    def _abandon(self, L: _LayerState, experts: list[int]) -> None:
        """A fetch or build failed: its reservations go back."""
        with self._cond:
            self._unreserve(len(experts))
            L.pending.difference_update(experts)
            self._cond.notify_all()

    def _reserve(self, L: _LayerState, experts: list[int], borrow: bool, prefetch: bool) -> list[int]:
        """Room for the first experts of `experts` that fit, in layer L: free units first, then L's unpinned
        experts (by its policy); only when neither exists, (borrow) other layers' unpinned experts. Lock held.
        Returns those reserved; each had its policy's on_miss just before room was made for it."""
        room = (self.budget_bytes - self._used) // self.expert_bytes + len(L.evictable())
        if borrow and room == 0:
            room = sum(len(S.evictable()) for S in self._layers.values() if S is not L)
        chosen = experts[:room]
        for e in chosen:
            L.policy.on_miss(e, prefetch)
            if self.budget_bytes - self._used < self.expert_bytes and not self._evict_one(L, borrow):
                raise CacheError(f"cache accounting: no room after counting {room} (a cache bug)")
            self._take(1)
        return chosen

    def _reserve_prefetch(self, L: _LayerState, experts: list[int], protect: set[int]) -> list[int]:
        """Prefetch room, in rank order: a free unit, else one of L's unpinned experts outside `protect`.
        Lock held."""
        chosen = []
        for e in experts:
            free = self.budget_bytes - self._used >= self.expert_bytes
            candidates = set() if free else L.evictable() - protect
            if not free and not candidates:
                break
            L.policy.on_miss(e, True)
            if not free:
                self._evict(L, L.policy.victim(candidates))
            self._take(1)
            chosen.append(e)
        return chosen

    def _make_room(self, L: _LayerState, units: int, borrow: bool) -> bool:
        """Evict (L first, then others) until `units` free units exist; False (nothing evicted beyond need)
        when the unpinned experts cannot make that much room. Lock held."""
        free = (self.budget_bytes - self._used) // self.expert_bytes
        if free >= units:
            return True
        evictable = len(L.evictable()) + (sum(len(S.evictable()) for S in self._layers.values() if S is not L)
                                          if borrow else 0)
        if free + evictable < units:
            return False
        while (self.budget_bytes - self._used) // self.expert_bytes < units:
            if not self._evict_one(L, borrow):
                return False
        return True

    def _take(self, units: int) -> None:
        self._used += units * self.expert_bytes
        self._reserved += units * self.expert_bytes
        self._high_water = max(self._high_water, self._used)

    def _give_back(self, units: int) -> None:
        self._used -= units * self.expert_bytes
        self._reserved -= units * self.expert_bytes

    def _evict_one(self, L: _LayerState, borrow: bool) -> bool:
        candidates = L.evictable()
        if candidates:
            self._evict(L, L.policy.victim(candidates))
            return True
        if not borrow:
            return False
        # other layers, the ones furthest over their slots first (scratch and staged prefetches), then any
        for other in sorted(self._layers.values(), key=lambda S: S.slots - len(S.resident)):
            if other is not L and (c := other.evictable()):
                self._evict(other, other.policy.victim(c))
                return True
        return False

    def _unreserve(self, n: int) -> None:
        self._give_back(n)

    def _insert(self, L: _LayerState, e: int, compute: ExpertCompute, prefetch: bool) -> None:
        """A reserved expert becomes resident (its bytes move from reserved to resident)."""
        self._reserved -= self.expert_bytes
        L.resident[e] = compute
        L.policy.on_insert(e, prefetch)

    def _evict(self, L: _LayerState, e: int) -> None:
        del L.resident[e]
        L.policy.on_evict(e)
        L.stats.evictions += 1
        if e in L.prefetched:
            nbytes = L.prefetched.pop(e)
            L.stats.prefetch_unused_evictions += 1
            L.stats.prefetch_wasted_bytes += nbytes
            if self._step is not None:
                self._step.prefetch_wasted_bytes += nbytes
        self._used -= self.expert_bytes

    def _unpin(self, L: _LayerState, e: int) -> None:
        left = L.pins.get(e, 0) - 1
        if left > 0:
            L.pins[e] = left
        else:
            L.pins.pop(e, None)

    def _trim(self, L: _LayerState) -> None:
        """Back to the layer's slots after its step: the scratch it used goes back to the budget."""
        while len(L.resident) > L.slots:
            candidates = L.evictable()
            if not candidates:
                break
            self._evict(L, L.policy.victim(candidates))
