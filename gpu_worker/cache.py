"""The worker's expert cache: compute-ready experts on the device under a byte budget.

ExpertCache = the cache ledger (gpu_worker.policy.ledger: slots, reservations, borrowing,
eviction, trim, prefetch room, per-layer statistics) + the experts' compute forms on the device
+ the fetcher that brings blobs + one lock. Every cached expert costs `expert_bytes` (its compute
form's real bytes, `ExpertCompute.nbytes`, measured once), and so does every expert being
fetched or built for the cache (a reservation, taken before the fetch starts): the ledger's
units. An INT2 prefill expert (below) reserves `tail_units` units while it is fetched and used.
`used_bytes` never exceeds `budget_bytes`; `high_water_bytes` records the most it reached.

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
The bookkeeping of 1-5 is the ledger's (gpu_worker.policy.ledger); the simulator replays
traces through the same ledger (`CacheLedger.replay_demand`), so a load-on-demand replay
(no prefetch, no INT2 tail) with the same allocation, policy, staging and budget gets the
worker's hits, misses and evictions exactly.

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
concurrently. One lock guards the ledger; fetches and compute builds run outside it. Two
condition variables share it, so that neither thread wakes the other for nothing: the compute
thread waits on `cond` (a prefetch landed or gave its room back), the prefetch thread on
`prefetch_cond` (a job, room, the end of a demand fetch). The compute thread notifies the
prefetcher only while it says it waits for the cache (`prefetcher_waiting`): waking it for
every released expert cost more CPU than the prefetches themselves. While a demand fetch is in flight
(`demand_fetching`), the prefetcher starts no new fetch: demand outranks prefetch on the link
here as it does in the store's queue (builds may overlap).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator, Sequence

import torch

from expert_store.codec import expert_nbytes
from expert_store.model_args import ModelArgs

from .expert_compute import ExpertCompute, default_compute_form, make_expert_compute
from .policy import Allocation, ReplacementPolicy, make_allocation, make_policy_factory
from .policy.ledger import (  # noqa: F401 - the cache's statistics types are the ledger's
    CacheBudgetError, CacheError, CacheLedger, CacheStats, LayerLedger, LayerStats, StepOutcome,
)
from .cache_copies import CacheCopies
from .store_client import ExpertFetcher, FetchedBlob

log = logging.getLogger(__name__)

MIB = 1 << 20


# -- sizes --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _compute_nbytes(args: ModelArgs, fmt: str, form: str, device: str) -> int:
    blob = bytes(expert_nbytes(fmt, args.hidden_size, args.expert_intermediate_size))
    return make_expert_compute(fmt, blob, args.hidden_size, args.expert_intermediate_size, form, device).nbytes


def expert_compute_nbytes(args: ModelArgs, fmt: str, form: str, device: torch.device | str) -> int:
    """Bytes one expert takes in the cache in `form` (built once per (model, format, form, device) from a zero
    blob and measured)."""
    device = torch.device(device)
    form = default_compute_form(fmt, device) if form == "auto" else form
    try:
        return _compute_nbytes(args, fmt, form, str(device))
    except TypeError:  # ModelArgs with an unhashable field: measured every time
        return _compute_nbytes.__wrapped__(args, fmt, form, str(device))


def min_budget_bytes(args: ModelArgs, fmt: str, form: str, device: torch.device | str) -> int:
    """The smallest workable budget: the top_k experts of one layer in the compute form."""
    return args.top_k * expert_compute_nbytes(args, fmt, form, device)


def full_budget_bytes(args: ModelArgs, fmt: str, form: str, device: torch.device | str) -> int:
    """The budget that holds every expert of every MoE layer (100%)."""
    return args.num_moe_layers * args.num_experts * expert_compute_nbytes(args, fmt, form, device)


@dataclass
class PrefetchResult:
    """What one `prefetch` call did."""

    inserted: list[int] = field(default_factory=list)  # fetched and inserted, in rank order
    no_room: list[int] = field(default_factory=list)  # wanted, not resident, no room for them now
    stale: bool = False  # the layer had already run in this step: nothing done
    fetch_ns: int = 0  # wall time of the fetch + builds


# -- the cache ----------------------------------------------------------------------------------


class ExpertCache(CacheCopies):
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
        slots = self.allocation.slots(self.total_slots - self.staging_slots, args.moe_layers, args.num_experts,
                                     args.top_k)
        if set(slots) != set(args.moe_layers) or any(not 0 <= s <= args.num_experts for s in slots.values()) \
                or sum(slots.values()) > self.total_slots - self.staging_slots:
            raise CacheBudgetError(f"allocation {self.allocation.name!r} gave slots {slots} that do not fit "
                                   f"{args.num_experts} experts per layer and {self.budget_bytes} bytes")
        self.ledger = CacheLedger(args.moe_layers, slots, new_policy, self.total_slots, self.staging_slots)
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
        lock = threading.Lock()  # guards the ledger
        self.cond = threading.Condition(lock)  # the compute thread waits on it
        self.prefetch_cond = threading.Condition(lock)  # the prefetch thread waits on it
        self.prefetcher_waiting = False  # the prefetcher waits for room or for demand to finish (lock held)
        self._demand_fetching = 0  # demand fetch calls in flight (the link is busy with demand)
        self._wait_poll_s = wait_poll_s
        self._init_copies()
        self._staging = None
        if self.device.type == "cuda":
            from .cuda_staging import CudaStaging

            blob = max(expert_nbytes(f, args.hidden_size, args.expert_intermediate_size)
                       for f in (fmt, tail_fmt) if f is not None)
            self._staging = CudaStaging(self.device, blob)

    # -- ExpertProvider -------------------------------------------------------------------------

    def iter_experts(self, layer: int, experts: Sequence[int]) -> Iterator[tuple[int, ExpertCompute]]:
        """The demand path (module docstring, 1-4): hits first, then the misses in waves, then the INT2
        tail; trimmed back to the layer's slots at the end. Experts yielded and not yet released, and
        fetched but not yet yielded, are pinned: nothing evicts them."""
        led = self.ledger
        L = led.layer(layer)
        ids = list(dict.fromkeys(int(e) for e in experts))
        pinned: set[int] = set()  # pinned by this call and not yet released
        with self.cond:
            self._land(L)
            ready, tail = led.begin_call(L, ids, pin=True)
            pinned.update(ready)
        remaining = [e for e in ids if e not in pinned and e not in tail]
        transient = [e for e in ids if e not in pinned and e in tail]
        try:
            yield from self._yield_pinned(L, ready, pinned)
            while remaining:
                ready, wave = self._next_wave(L, remaining, pinned)
                yield from self._yield_pinned(L, ready, pinned)
                if wave:
                    self._demand_fetch(L, wave, pinned)
                    yield from self._yield_pinned(L, wave, pinned)
                done = set(ready) | set(wave)
                remaining = [e for e in remaining if e not in done]
            while transient:
                ready, wave = self._next_transient_wave(L, transient, pinned)
                yield from self._yield_pinned(L, ready, pinned)
                if wave:
                    yield from self._transient_fetch(L, wave)
                done = set(ready) | set(wave)
                transient = [e for e in transient if e not in done]
        finally:
            with self.cond:
                for e in pinned:
                    led.unpin(L, e)
                led.end_call(L)
                self._notify_prefetcher()

    def set_int2_tail(self, layer: int, experts: Sequence[int]) -> None:
        """Experts of `layer` to fetch in `tail_fmt` if they miss in this step's next iter_experts for it
        (ignored when the cache has no tail format)."""
        if self.tail_fmt is None:
            return
        L = self.ledger.layer(layer)
        with self.cond:
            L.int2_tail = (self.ledger.step_seq, frozenset(int(e) for e in experts)) if experts else None

    # -- prefetch --------------------------------------------------------------------------------

    def prefetch(self, layer: int, experts: Sequence[int], step: int | None = None,
                 fetch_only: Collection[int] | None = None) -> PrefetchResult:
        """Fetch and insert experts of `layer` (ranked, most likely first) that are neither resident nor being
        fetched, as far as free units and this layer's unpinned experts outside `experts` allow (module
        docstring). `step`: the `step_seq` the prefetch is for; if that step's compute has passed the layer,
        nothing is done (stale). `fetch_only`: fetch only these of `experts` (the others are still kept from
        eviction)."""
        led = self.ledger
        L = led.layer(layer)
        res = PrefetchResult()
        want = list(dict.fromkeys(int(x) for x in experts))
        with self.cond:
            if step is not None and led.passed(L, step):
                res.stale = True
                L.stats.prefetch_dropped += sum(1 for e in want if e not in L.resident and e not in L.pending)
                return res
            todo = [e for e in want if e not in L.resident and e not in L.pending
                    and (fetch_only is None or e in fetch_only)]
            wave = led.reserve_prefetch(L, todo, protect=set(want))
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
                compute, build_ns = self._build(b, self.fmt, self.form, slot=True)
            except BaseException:
                self._abandon(L, wave[i:])
                raise
            with self.cond:
                L.pending.discard(e)
                led.insert(L, e, compute, prefetch=True, blob_bytes=b.nbytes)
                L.stats.bytes_fetched += b.nbytes
                L.stats.prefetch_bytes += b.nbytes
                L.stats.build_ns += build_ns
                if led.step is not None:
                    led.step.prefetch_bytes += b.nbytes
                self.cond.notify_all()
            res.inserted.append(e)
        res.fetch_ns = time.perf_counter_ns() - t0
        if step is not None:
            with self.cond:
                if led.passed(L, step) and not L.active:  # landed after its layer ran
                    led.trim(L)
                    self.cond.notify_all()
        return res

    def passed(self, layer: int, step: int) -> bool:
        """Has the compute finished `layer` in step `step` (or moved to a later step)? Lock held or not."""
        return self.ledger.passed(self.ledger.layer(layer), step)

    def not_resident(self, layer: int, experts: Sequence[int]) -> int:
        """How many of `experts` are not resident in `layer` (lock held by the caller or not)."""
        R = self.ledger.layer(layer).resident
        return sum(1 for e in experts if e not in R)

    def count_dropped(self, layer: int, n: int) -> None:
        """`n` experts of prefetches for `layer` were dropped stale (the prefetch thread, lock held)."""
        self.ledger.layer(layer).stats.prefetch_dropped += n

    def build_expert(self, blob: FetchedBlob) -> ExpertCompute:
        """The compute form of one fetched blob in the cache's format and form (not inserted)."""
        return self._build(blob, self.fmt, self.form)[0]

    # -- step outcomes and statistics ---------------------------------------------------------------

    @property
    def step_seq(self) -> int:
        """Forward steps begun (`begin_step` calls); prefetches name the step they are for."""
        return self.ledger.step_seq

    @property
    def demand_fetching(self) -> bool:
        """A demand fetch is in flight (read with the lock held for a consistent answer)."""
        return self._demand_fetching > 0

    @property
    def has_free_unit(self) -> bool:
        """Room for one more expert without an eviction (read with the lock held)."""
        return self.ledger.free > 0

    @property
    def step_fetch_wait_ns(self) -> int:
        """The compute thread's fetch wait so far in this step (0 outside a step)."""
        step = self.ledger.step
        return step.fetch_wait_ns if step is not None else 0

    @property
    def policy_name(self) -> str:
        return next((L.policy.name for L in self.ledger.layers.values()), "")

    def begin_step(self) -> None:
        """Start recording per-layer outcomes of one forward step (the compute thread's)."""
        with self.cond:
            self.ledger.begin_step()
            self._notify_prefetcher()

    def end_step(self) -> StepOutcome:
        """The outcomes since `begin_step`; also ages the policies (`on_step`)."""
        with self.cond:
            return self.ledger.end_step()

    def stats(self) -> CacheStats:
        with self.cond:
            return self.ledger.stats(self.expert_bytes, self.budget_bytes)

    @property
    def used_bytes(self) -> int:
        return self.ledger.used * self.expert_bytes

    @property
    def high_water_bytes(self) -> int:
        return self.ledger.high_water * self.expert_bytes

    def slots(self) -> dict[int, int]:
        return {layer: L.slots for layer, L in self.ledger.layers.items()}

    def resident(self, layer: int) -> list[int]:
        with self.cond:
            return sorted(self.ledger.layer(layer).resident)

    def clear(self) -> None:
        """Drop every unpinned expert (e.g. the store now serves another pack)."""
        with self.cond:
            self.ledger.clear()

    # -- internals -------------------------------------------------------------------------------

    def _yield_pinned(self, L: LayerLedger, experts: list[int], pinned: set[int]
                      ) -> Iterator[tuple[int, ExpertCompute]]:
        for e in experts:
            with self.cond:
                compute = L.resident[e]
            yield e, compute
            with self.cond:  # released: the model asked for the next one
                self.ledger.unpin(L, e)
                pinned.discard(e)
                self._notify_prefetcher()

    def _wait_until(self, L: LayerLedger, pick) -> tuple[list[int], list[int]]:
        """Loop `pick()` (lock held) until it returns something; count the time waited as a stall."""
        t0 = time.perf_counter_ns()
        waited = False
        with self.cond:
            while True:
                self._land_all()  # other layers' landed copies hold units until they are made resident
                ready, wave = pick()
                if ready or wave:
                    break
                if self._await_copies(t0):  # copies in flight: a short wait, then look again
                    waited = True
                    continue
                if not self.ledger.reserved and not L.pending:
                    raise CacheBudgetError(
                        f"layer {L.layer}: no room for one expert in a {self.budget_bytes}-byte budget with nothing "
                        f"in flight (a cache bug: used {self.used_bytes}, pinned {self.ledger.pinned()})")
                self.cond.wait(self._wait_poll_s)
                waited = True
        if waited:  # on a late prefetch, or on room a prefetch held: the compute thread stalled
            self._count_wait(L, time.perf_counter_ns() - t0)
        return ready, wave

    def _next_wave(self, L: LayerLedger, remaining: list[int], pinned: set[int]) -> tuple[list[int], list[int]]:
        """(experts that became resident meanwhile, experts reserved for one demand fetch)."""
        led = self.ledger

        def pick():
            ready = [e for e in remaining if e in L.resident]
            if ready:  # a prefetch landed since we looked
                led.use(L, ready, late=True, pin=True)
                pinned.update(ready)
            to_fetch = [e for e in remaining if e not in L.resident and e not in L.pending]
            wave = led.reserve(L, to_fetch, borrow=True)
            L.pending.update(wave)
            return ready, wave

        return self._wait_until(L, pick)

    def _next_transient_wave(self, L: LayerLedger, remaining: list[int], pinned: set[int]
                             ) -> tuple[list[int], list[int]]:
        """(INT2 tail experts that became resident meanwhile, as int4: hits; experts reserved as INT2)."""
        led = self.ledger

        def pick():
            ready = [e for e in remaining if e in L.resident]
            if ready:
                led.use(L, ready, late=True, pin=True)
                pinned.update(ready)
            wave = []
            for e in remaining:
                if e in L.resident or e in L.pending:
                    continue
                if not led.make_room(L, self.tail_units, borrow=True):
                    break
                led.take(self.tail_units)
                wave.append(e)
            return ready, wave

        return self._wait_until(L, pick)

    def _demand_fetch(self, L: LayerLedger, wave: list[int], pinned: set[int]) -> None:
        t0 = time.perf_counter_ns()
        built: list = []
        try:
            blobs = self._fetch_demand([(L.layer, e, self.fmt) for e in wave])
            for b in blobs:
                built.append(self._build(b, self.fmt, self.form, slot=True))
        except BaseException:
            with self.cond:
                self._unfill([c for c, _ in built])
            self._abandon(L, wave)
            raise
        waited = time.perf_counter_ns() - t0
        nbytes = sum(b.nbytes for b in blobs)
        led = self.ledger
        with self.cond:
            L.pending.difference_update(wave)
            for e, (c, build_ns) in zip(wave, built):
                led.insert(L, e, c, pin=True)
                pinned.add(e)
                L.stats.build_ns += build_ns
            led.count_demand(L, wave)
            self._count_bytes(L, nbytes)
            self._count_wait(L, waited)
            self._notify_prefetcher()

    def _transient_fetch(self, L: LayerLedger, wave: list[int]) -> Iterator[tuple[int, ExpertCompute]]:
        """INT2 copies: fetched, built, yielded, dropped (their reservation freed as the model moves on)."""
        units = self.tail_units
        left = len(wave)
        led = self.ledger
        try:
            t0 = time.perf_counter_ns()
            blobs = self._fetch_demand([(L.layer, e, self.tail_fmt) for e in wave])
            built = [self._build(b, self.tail_fmt, self.tail_form) for b in blobs]
            waited = time.perf_counter_ns() - t0
            nbytes = sum(b.nbytes for b in blobs)
            with self.cond:
                led.count_demand(L, wave, int2=True)
                self._count_bytes(L, nbytes)
                L.stats.int2_bytes += nbytes
                L.stats.build_ns += sum(ns for _, ns in built)
                self._count_wait(L, waited)
            for i, e in enumerate(wave):
                c, built[i] = built[i][0], None  # the only reference: dropped once the model is done with it
                yield e, c
                del c
                with self.cond:
                    led.give_back(units)
                    left -= 1
                    self._notify_prefetcher()
        finally:
            with self.cond:
                led.give_back(units * left)
                self._notify_prefetcher()

    def _fetch_demand(self, keys: list) -> list[FetchedBlob]:
        with self.cond:
            self._demand_fetching += 1
        try:
            return self.fetcher.fetch(keys, "demand")
        finally:
            with self.cond:
                self._demand_fetching -= 1
                self._notify_prefetcher()

    def _notify_prefetcher(self) -> None:
        """Wake the prefetch thread if it waits for room or for demand to finish (lock held)."""
        if self.prefetcher_waiting:
            self.prefetch_cond.notify_all()

    def _count_bytes(self, L: LayerLedger, nbytes: int) -> None:
        L.stats.bytes_fetched += nbytes
        L.stats.demand_bytes += nbytes
        step = self.ledger.step
        if step is not None:
            step.layer_bytes_fetched[L.layer] = step.layer_bytes_fetched.get(L.layer, 0) + nbytes

    def _count_wait(self, L: LayerLedger, waited_ns: int) -> None:
        L.stats.fetch_wait_ns += waited_ns
        step = self.ledger.step
        if step is not None:
            step.layer_fetch_wait_ns[L.layer] = step.layer_fetch_wait_ns.get(L.layer, 0) + waited_ns

    def _build(self, b: FetchedBlob, fmt: str, form: str, slot: bool = False) -> tuple[ExpertCompute, int]:
        """The compute form of one blob (no lock held: this is the slow part) and the ns it took. slot: for
        insertion, so into an arena slot when the cache has an arena (one copy, nothing built)."""
        t0 = time.perf_counter_ns()
        a = self.args
        c = self._fill_slot(b.data) if slot and fmt == self.fmt else None
        if c is not None:
            return c, time.perf_counter_ns() - t0  # type: ignore[return-value]
        if self._staging is not None:  # CUDA: pinned staging, copied and built on the side stream
            c = self._staging.build(b.data, lambda dev: make_expert_compute(
                fmt, dev, a.hidden_size, a.expert_intermediate_size, form, self.device))
        else:
            c = make_expert_compute(fmt, b.data, a.hidden_size, a.expert_intermediate_size, form, self.device)
        if fmt == self.fmt and c.nbytes != self.expert_bytes:
            raise CacheError(f"expert {b.key} takes {c.nbytes} bytes in form {form!r}, the cache "
                             f"budgets {self.expert_bytes} per expert (a compute form bug)")
        if fmt != self.fmt and c.nbytes > self.tail_units * self.expert_bytes:
            raise CacheError(f"{fmt} expert {b.key} takes {c.nbytes} bytes, more than the "
                             f"{self.tail_units * self.expert_bytes} reserved (a compute form bug)")
        return c, time.perf_counter_ns() - t0

    def _abandon(self, L: LayerLedger, experts: list[int]) -> None:
        """A fetch or build failed: its reservations go back."""
        with self.cond:
            self.ledger.give_back(len(experts))
            L.pending.difference_update(experts)
            self.cond.notify_all()
            self._notify_prefetcher()
