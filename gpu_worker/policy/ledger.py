"""The cache ledger: who holds which expert slot, in units of one expert, and what that cost.

One algorithm, two drivers: the worker's `ExpertCache` (gpu_worker.cache) drives it around real
fetches and compute builds, with its lock held; the offline simulator (gpu_worker.sim) drives the
same methods from a trace (`replay_demand`, `replay_prefetch`), so a replayed count is the count
the worker would have had.

Layout: the budget is `total_slots` units. `staging_slots` of them are set aside for prefetched
experts not used yet (and for a layer's misses beyond its share while it computes); an
`Allocation` turns the rest into resident slots per MoE layer. Whatever is not held by a layer's
slots is free: any layer may use it while it computes (its experts beyond its slots), and
prefetches land there. A `ReplacementPolicy` per layer picks victims. `used` counts resident and
reserved units (a reservation is taken before a fetch starts) and never exceeds `total_slots`.

Demand path, per MoE layer L per forward step (gpu_worker.cache's docstring tells it with fetches):
 1. `begin_call(L, ids)`: lookups += len(ids); every id resident now is a hit, in ids order
    (`use`: on_hit; a prefetch hit when a prefetch brought it and it was not used since).
 2. The other ids, in waves: `reserve(L, todo, borrow=True)` reserves the first n, where
        n = free units + L's unpinned residents,
    or, only when that is 0, n = every other layer's unpinned residents (borrowing). For each, in
    order: `on_miss(e)`; then, if no unit is free, one eviction (`evict_one`): L's victim among its
    unpinned residents if it has any, else another layer's, taking layers in order of (slots -
    residents) ascending (ties: lower layer index), the first with an unpinned resident. Each
    reserved expert is then inserted (`insert`: on_insert) and counted as a miss (`count_demand`).
 3. `end_call(L)`: while L holds more residents than its slots, evict L's victim among its unpinned
    residents ("trim": the scratch goes back to the free units).
 4. `end_step()` calls `on_step()` on every layer's policy, in layer order.
A replay (`replay_steps`) runs a call whose misses fit in one wave through the policy's batch methods
(`on_hits`, `admit`, `evict_victims`): the same calls in the same order, one Python call per demand call.
Prefetch path (`reserve_prefetch`): in rank order, a free unit, else one of L's unpinned residents
outside the prefetch's own list; never another layer's expert, never a pinned one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

from expert_store.errors import FateError

from .replacement import ReplacementPolicy


class CacheError(FateError, ValueError):
    """A cache misconfigured (unknown policy or allocation) or misused (a layer without experts)."""


class CacheBudgetError(CacheError):
    """A budget that cannot work (below one layer's top-k experts), or a cache that cannot make room."""


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


# -- the ledger ---------------------------------------------------------------------------------


class LayerLedger:
    """One MoE layer's part of the ledger (its fields are read by the cache and the prefetch thread)."""

    __slots__ = ("layer", "policy", "slots", "resident", "pins", "pending", "prefetched", "stats", "done_step",
                 "active", "int2_tail", "on_miss")

    def __init__(self, layer: int, policy: ReplacementPolicy, slots: int):
        self.layer = layer
        self.policy = policy
        # the policy's on_miss, or None where it is the base class's no-op (LRU, LFU): skipped
        self.on_miss = policy.on_miss if type(policy).on_miss is not ReplacementPolicy.on_miss else None
        self.slots = slots
        self.resident: dict[int, Any] = {}  # expert -> payload (the worker's compute form; None in a replay)
        self.pins: dict[int, int] = {}  # expert -> pin count (in use, never evicted)
        self.pending: set[int] = set()  # reserved and being fetched by someone
        self.prefetched: dict[int, int] = {}  # inserted by prefetch, not used yet -> blob bytes
        self.stats = LayerStats()
        self.done_step = -1  # the last step whose demand call for this layer ended
        self.active = False  # inside a demand call now
        self.int2_tail: tuple[int, frozenset[int]] | None = None  # (step, experts) for the next demand call

    def evictable(self):
        """Resident experts not pinned (the resident map itself when nothing is pinned)."""
        if not self.pins:
            return self.resident
        pins = self.pins
        return {e for e in self.resident if not pins.get(e)}

    def n_evictable(self) -> int:
        return len(self.resident) if not self.pins else sum(1 for e in self.resident if not self.pins.get(e))


class CacheLedger:
    """Slots, reservations, borrowing, eviction, trim and prefetch room of a budgeted expert cache, in units
    of one expert, with per-layer statistics. No locking: the worker's cache holds its lock around calls."""

    def __init__(self, moe_layers: Sequence[int], slots: Mapping[int, int],
                 new_policy: Callable[[int], ReplacementPolicy], total_slots: int, staging_slots: int = 0,
                 policies: Mapping[int, ReplacementPolicy] | None = None):
        """slots: resident slots per MoE layer (an Allocation's answer); new_policy: slots -> a fresh policy
        (or `policies`, one per layer, given); total_slots: the budget in units."""
        self.total_slots = int(total_slots)
        self.staging_slots = int(staging_slots)
        self.layers: dict[int, LayerLedger] = {
            layer: LayerLedger(layer, policies[layer] if policies is not None else new_policy(slots[layer]),
                               int(slots[layer]))
            for layer in moe_layers}
        self._order = list(self.layers.values())
        self.used = 0  # resident + reserved units
        self.reserved = 0
        self.high_water = 0
        self.step: StepOutcome | None = None
        self.step_seq = 0
        self.on_evict: Callable[[Any], None] | None = None  # called with an evicted expert's payload

    # -- lookups --------------------------------------------------------------------------------

    def layer(self, layer: int) -> LayerLedger:
        try:
            return self.layers[layer]
        except KeyError:
            raise CacheError(f"layer {layer} is not an MoE layer (MoE layers: {list(self.layers)})") from None

    @property
    def free(self) -> int:
        return self.total_slots - self.used

    def passed(self, L: LayerLedger, step: int) -> bool:
        """Has the demand call of `step` for L ended (or a later step begun)?"""
        return step < self.step_seq or L.done_step >= step

    def pinned(self) -> int:
        return sum(1 for S in self._order for p in S.pins.values() if p)

    # -- the demand path ------------------------------------------------------------------------

    def begin_call(self, L: LayerLedger, ids: list[int], pin: bool) -> tuple[list[int], frozenset[int]]:
        """Step 1: (the ids resident now, used as hits; this step's INT2 tail experts)."""
        L.active = True
        L.stats.lookups += len(ids)
        tail: frozenset[int] = frozenset()
        if L.int2_tail is not None:
            if L.int2_tail[0] == self.step_seq:
                tail = L.int2_tail[1]
            L.int2_tail = None
        R = L.resident
        ready = [e for e in ids if e in R]
        self.use(L, ready, late=False, pin=pin)
        return ready, tail

    def use(self, L: LayerLedger, ready: list[int], late: bool, pin: bool) -> None:
        """Count resident experts as (prefetch) hits (on_hit each), pinned when `pin`."""
        st, P, step, on_hit = L.stats, L.prefetched, self.step, L.policy.on_hit
        if not P and step is None and not pin:
            st.hits += len(ready)
            for e in ready:
                on_hit(e)
            return
        for e in ready:
            if e in P:
                del P[e]
                st.prefetch_hits += 1
                st.prefetch_late_hits += late
                if step is not None:
                    step.prefetch_hits.setdefault(L.layer, []).append(e)
            else:
                st.hits += 1
                if step is not None:
                    step.hits.setdefault(L.layer, []).append(e)
            on_hit(e)
            if pin:
                L.pins[e] = L.pins.get(e, 0) + 1

    def reserve(self, L: LayerLedger, experts: list[int], borrow: bool, prefetch: bool = False) -> list[int]:
        """Step 2: room for the first experts of `experts` that fit, in layer L: free units first, then L's
        unpinned experts (by its policy); only when neither exists, (borrow) other layers' unpinned experts.
        Returns those reserved; each had its policy's on_miss just before room was made for it."""
        room = self.total_slots - self.used + (len(L.resident) if not L.pins else L.n_evictable())
        if borrow and room == 0:
            room = sum(S.n_evictable() for S in self._order if S is not L)
        chosen = experts[:room]
        on_miss, victim, total, R = L.on_miss, L.policy.victim, self.total_slots, L.resident
        for e in chosen:
            if on_miss is not None:
                on_miss(e, prefetch)
            if self.used >= total:
                if R and not L.pins:  # evict_one's first case: evict(L, victim), its unit taken at once
                    self.evict(L, victim(R))
                elif not self.evict_one(L, borrow):
                    raise CacheError(f"cache accounting: no room after counting {room} (a cache bug)")
            self.used += 1  # take(1)
            self.reserved += 1
            if self.used > self.high_water:
                self.high_water = self.used
        return chosen

    def insert(self, L: LayerLedger, e: int, payload: Any, prefetch: bool = False, blob_bytes: int = 0,
               pin: bool = False) -> None:
        """A reserved expert becomes resident (its unit moves from reserved to resident)."""
        self.reserved -= 1
        L.resident[e] = payload
        L.policy.on_insert(e, prefetch)
        if prefetch:
            L.prefetched[e] = blob_bytes
            L.stats.prefetched += 1
            if self.step is not None:
                self.step.prefetches_issued += 1
        if pin:
            L.pins[e] = L.pins.get(e, 0) + 1

    def count_demand(self, L: LayerLedger, wave: list[int], int2: bool = False) -> None:
        """`wave` was fetched on demand: misses (and INT2 misses)."""
        L.stats.misses += len(wave)
        if int2:
            L.stats.int2_misses += len(wave)
        if self.step is not None:
            self.step.misses.setdefault(L.layer, []).extend(wave)
            if int2:
                self.step.int2_misses += len(wave)

    def unpin(self, L: LayerLedger, e: int) -> None:
        left = L.pins.get(e, 0) - 1
        if left > 0:
            L.pins[e] = left
        else:
            L.pins.pop(e, None)

    def end_call(self, L: LayerLedger) -> None:
        """Step 3: trimmed back to the layer's slots; the call's step is done for L."""
        self.trim(L)
        L.done_step = self.step_seq
        L.active = False

    def trim(self, L: LayerLedger) -> None:
        """Back to the layer's slots after its step: the scratch it used goes back to the budget."""
        while len(L.resident) > L.slots:
            candidates = L.evictable()
            if not candidates:
                break
            self.evict(L, L.policy.victim(candidates))

    # -- prefetch and transient room ------------------------------------------------------------

    def reserve_prefetch(self, L: LayerLedger, experts: list[int], protect: set[int]) -> list[int]:
        """Prefetch room, in rank order: a free unit, else one of L's unpinned experts outside `protect`."""
        chosen = []
        for e in experts:
            free = self.used < self.total_slots
            if free:
                candidates: Any = ()
            else:
                candidates = {x for x in L.evictable() if x not in protect}
                if not candidates:
                    break
            L.policy.on_miss(e, True)
            if not free:
                self.evict(L, L.policy.victim(candidates))
            self.take(1)
            chosen.append(e)
        return chosen

    def make_room(self, L: LayerLedger, units: int, borrow: bool) -> bool:
        """Evict (L first, then others) until `units` free units exist; False (nothing evicted beyond need)
        when the unpinned experts cannot make that much room."""
        if self.free >= units:
            return True
        evictable = L.n_evictable() + (sum(S.n_evictable() for S in self._order if S is not L) if borrow else 0)
        if self.free + evictable < units:
            return False
        while self.free < units:
            if not self.evict_one(L, borrow):
                return False
        return True

    def take(self, units: int) -> None:
        self.used += units
        self.reserved += units
        if self.used > self.high_water:
            self.high_water = self.used

    def give_back(self, units: int) -> None:
        """Reserved units released without an insert (a failed fetch, a dropped INT2 copy)."""
        self.used -= units
        self.reserved -= units

    def evict_one(self, L: LayerLedger, borrow: bool) -> bool:
        candidates = L.evictable()
        if candidates:
            self.evict(L, L.policy.victim(candidates))
            return True
        if not borrow:
            return False
        # other layers, the ones furthest over their slots first (scratch and staged prefetches), then any
        for other in sorted(self._order, key=lambda S: S.slots - len(S.resident)):
            if other is not L and (c := other.evictable()):
                self.evict(other, other.policy.victim(c))
                return True
        return False

    def evict(self, L: LayerLedger, e: int) -> None:
        payload = L.resident.pop(e)
        if self.on_evict is not None:
            self.on_evict(payload)
        L.policy.on_evict(e)
        L.stats.evictions += 1
        if L.prefetched and e in L.prefetched:
            nbytes = L.prefetched.pop(e)
            L.stats.prefetch_unused_evictions += 1
            L.stats.prefetch_wasted_bytes += nbytes
            if self.step is not None:
                self.step.prefetch_wasted_bytes += nbytes
        self.used -= 1

    def clear(self) -> None:
        """Drop every unpinned expert."""
        for L in self._order:
            for e in list(L.evictable()):
                self.evict(L, e)

    # -- steps and statistics -------------------------------------------------------------------

    def begin_step(self, record: bool = True) -> None:
        """A forward step begins; `record`: keep a StepOutcome of it."""
        self.step_seq += 1
        self.step = StepOutcome() if record else None

    def end_step(self) -> StepOutcome:
        """The outcome since `begin_step`; ages the policies (`on_step`, in layer order)."""
        out, self.step = self.step or StepOutcome(), None
        for L in self._order:
            L.policy.on_step()
        return out

    def stats(self, expert_bytes: int, budget_bytes: int) -> CacheStats:
        layers = {}
        total = LayerStats()
        for layer, L in self.layers.items():
            s = LayerStats(**vars(L.stats))
            s.resident, s.used_bytes, s.slots = len(L.resident), len(L.resident) * expert_bytes, L.slots
            layers[layer] = s
            total.add(s)
        return CacheStats(budget_bytes, expert_bytes, self.used * expert_bytes, self.reserved * expert_bytes,
                          self.high_water * expert_bytes, total, layers, self.staging_slots, self.total_slots)

    # -- replays (the simulator's driver: no fetches, nothing pinned or pending between calls) ---------

    def replay_demand(self, L: LayerLedger, ids: Sequence[int]) -> tuple[int, int]:
        """One demand call for L with `ids` (distinct, in the model's order), as the worker's cache runs it
        when every fetch completes at once (nothing pinned or pending between calls): (misses, waves)."""
        R = L.resident
        if L.prefetched or self.step is not None or L.int2_tail is not None:
            ready, _ = self.begin_call(L, list(ids), pin=False)
            remaining = [e for e in ids if e not in R] if len(ready) < len(ids) else None
        else:  # begin_call without prefetches to tell apart: each hit is on_hit, in ids order
            L.active = True
            L.stats.lookups += len(ids)
            on_hit = L.policy.on_hit
            remaining = None
            for e in ids:
                if e in R:
                    on_hit(e)
                elif remaining is None:
                    remaining = [e]
                else:
                    remaining.append(e)
            L.stats.hits += len(ids) - (len(remaining) if remaining else 0)
        waves = self._replay_misses(L, remaining) if remaining else 0
        if len(R) > L.slots:
            self._replay_trim(L)
        L.done_step = self.step_seq
        L.active = False
        return (len(remaining) if remaining else 0), waves

    def _replay_misses(self, L: LayerLedger, remaining: list[int]) -> int:
        """Step 2 of a replayed demand call: the misses in waves, each reserved and inserted; the waves.
        `reserve` and `insert` inlined for a layer without pins (every replay): the same calls, in order."""
        R, pol = L.resident, L.policy
        on_insert, on_miss, victim, on_evict = pol.on_insert, L.on_miss, pol.victim, pol.on_evict
        on_inserts, evict_victims = pol.on_inserts, pol.evict_victims
        st, P, total = L.stats, L.prefetched, self.total_slots
        st.misses += len(remaining)
        waves = 0
        while remaining:
            if L.pins or self.total_slots - self.used + len(R) == 0:
                wave = self.reserve(L, remaining, borrow=True)  # pins, or borrowing from other layers
                if not wave:
                    raise CacheBudgetError(f"layer {L.layer}: no room for one expert in {self.total_slots} units")
                self.reserved -= len(wave)
            elif on_miss is None and not P:  # the same, each eviction's victim chosen from what is left
                wave = remaining[:total - self.used + len(R)]
                n = self.used + len(wave) - total
                if n > 0:
                    evict_victims(R, n)
                    st.evictions += n
                self.used += len(wave) - max(n, 0)
                if self.used > self.high_water:
                    self.high_water = self.used
                for e in wave:
                    R[e] = None
                on_inserts(wave)
                remaining = remaining[len(wave):]
                waves += 1
                continue
            else:  # reserve(L, remaining, borrow=True) with room = free units + L's residents
                wave = remaining[:total - self.used + len(R)]
                used = self.used
                for e in wave:
                    if on_miss is not None:
                        on_miss(e, False)
                    if used >= total:  # evict(L, victim(R)), its unit taken at once
                        v = victim(R)
                        del R[v]
                        on_evict(v)
                        st.evictions += 1
                        if P and v in P:
                            nbytes = P.pop(v)
                            st.prefetch_unused_evictions += 1
                            st.prefetch_wasted_bytes += nbytes
                            if self.step is not None:
                                self.step.prefetch_wasted_bytes += nbytes
                    else:
                        used += 1
                self.used = used
                if used > self.high_water:
                    self.high_water = used
            for e in wave:  # insert(L, e, None) for each: demand, unpinned, no payload
                R[e] = None
                on_insert(e, False)
            remaining = remaining[len(wave):]
            waves += 1
        return waves

    def _replay_trim(self, L: LayerLedger) -> None:
        """`trim(L)`, inlined for a layer without pins or prefetched experts (the load-on-demand replay)."""
        if L.pins or L.prefetched:
            self.trim(L)
            return
        n = len(L.resident) - L.slots
        L.policy.evict_victims(L.resident, n)
        L.stats.evictions += n
        self.used -= n

    def replay_steps(self, steps: Sequence[Sequence[Sequence[int]]], clock: Callable[[int], None] | None = None
                     ) -> list[tuple[int, int, int, int]]:
        """Load on demand over whole forward steps: steps[s][j] are the ids of the demand call of the j-th MoE
        layer (in layer order) in step s; every call is `replay_demand`, then `end_step`. `clock(s)` runs
        before each step (Belady's now). Returns (step, j, misses, waves) of every call that missed.
        For a ledger without prefetches, pins or INT2 tails (the hits of a call are counted in one pass)."""
        layers = self._order
        events: list[tuple[int, int, int, int]] = []
        ages = any(type(L.policy).on_step is not ReplacementPolicy.on_step for L in layers)
        agers = [L.policy.on_step for L in layers] if ages else []
        hooks = [(L, L.resident, L.stats, L.policy.on_hits) for L in layers]
        misses_of, trim, total = self._replay_misses, self._replay_trim, self.total_slots
        for s, step_ids in enumerate(steps):
            if clock is not None:
                clock(s)
            for j, ids in enumerate(step_ids):
                if not ids:
                    continue
                L, R, st, on_hits = hooks[j]
                n = len(ids)
                st.lookups += n
                remaining = [e for e in ids if e not in R]
                if not remaining:
                    st.hits += n
                    on_hits(ids)
                    continue  # nothing inserted: the layer is within its slots still
                m = len(remaining)
                if m < n:
                    st.hits += n - m
                    on_hits([e for e in ids if e in R])
                free = total - self.used
                if m > free + len(R) or L.pins or L.prefetched:
                    events.append((s, j, m, misses_of(L, remaining)))  # waves, or borrowing
                else:  # one wave within L's residents and the free units (_replay_misses' first wave)
                    st.misses += m
                    k = L.policy.admit(R, remaining, free)
                    st.evictions += k
                    self.used += m - k
                    if self.used > self.high_water:
                        self.high_water = self.used
                    events.append((s, j, m, 1))
                if len(R) > L.slots:
                    trim(L)
            for on_step in agers:  # end_step() without a StepOutcome to hand back
                on_step()
            self.step_seq += 1
        for L in layers:
            L.done_step = self.step_seq
        return events

    def replay_prefetch(self, L: LayerLedger, experts: list[int]) -> int:
        """A prefetch of `experts` (ranked) for L that lands before L's next demand call: how many landed."""
        R = L.resident
        todo = [e for e in experts if e not in R and e not in L.pending]
        wave = self.reserve_prefetch(L, todo, protect=set(experts))
        for e in wave:
            self.insert(L, e, None, prefetch=True)
        return len(wave)

    def replay_access(self, L: LayerLedger, row: Sequence[int], pin: bool, start: int = 0,
                      stop: int | None = None) -> int:
        """The flat semantics (one access at a time into L's own slots, no borrowing, no scratch) for
        row[start:stop]: a hit, or a miss inserted in place of L's victim (outside `row` when `pin`,
        unless every resident is in `row`); a layer without slots inserts nothing. Returns the misses."""
        R, st, pol = L.resident, L.stats, L.policy
        misses = 0
        for e in row[start:stop]:
            st.lookups += 1
            if e in R:
                st.hits += 1
                pol.on_hit(e)
                continue
            misses += 1
            st.misses += 1
            if not L.slots:
                continue
            pol.on_miss(e, False)
            if len(R) >= L.slots:
                candidates = R
                if pin:
                    candidates = {x for x in R if x not in row} or R
                self.evict(L, pol.victim(candidates))
            self.take(1)
            self.insert(L, e, None)
        return misses
