"""The worker's expert cache: compute-ready experts on the device under a byte budget.

Accounting: every cached expert costs `expert_bytes` (its compute form's real bytes,
`ExpertCompute.nbytes`, measured once at start-up), and so does every expert being
fetched or built for the cache (a reservation, taken before the fetch starts). Their sum,
`used_bytes`, never exceeds `budget_bytes`; `high_water_bytes` records the most it reached.

Layout: an `Allocation` turns the budget (in experts) into resident slots per MoE layer;
a layer may use the unallocated rest of the budget as scratch while it computes (or, when
there is none, borrow other layers' unpinned experts) and is trimmed back to its slots
when its `iter_experts` ends. A `ReplacementPolicy` per layer picks victims, driven as
`gpu_worker.policies` describes (on_hit; on_miss before room is made, on_insert after;
on_evict; on_step per forward). Policies and allocations live in that torch-free module,
so the offline simulator replays traces through these same classes.

Threads: the compute thread calls `iter_experts`; a prefetch thread may call `prefetch`
concurrently. One lock guards the state; fetches and compute builds run outside it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Callable, Iterator, Sequence

import torch

from expert_store.codec import expert_nbytes
from expert_store.errors import FateError

from .expert_compute import ExpertCompute, default_compute_form, make_expert_compute
from .model_args import ModelArgs
from .policies import Allocation, ReplacementPolicy, make_allocation, make_policy_factory
from .store_client import ExpertFetcher, Priority

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
    hits: int = 0  # resident when asked for
    prefetch_hits: int = 0  # resident (or arriving) because a prefetch brought them, first use
    misses: int = 0  # fetched on demand
    evictions: int = 0
    prefetched: int = 0  # experts inserted by prefetch
    prefetch_unused_evictions: int = 0  # prefetched experts evicted before any use (wasted bytes)
    bytes_fetched: int = 0  # blob bytes fetched for this layer (demand + prefetch)
    fetch_wait_ns: int = 0  # compute thread blocked on demand fetches + building their compute forms
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


@dataclass
class StepOutcome:
    """What the cache did in one forward step, per MoE layer (the engine attributes it to requests
    through their routings). Each expert a layer asked for is in exactly one of the three maps."""

    hits: dict[int, list[int]] = field(default_factory=dict)  # layer -> experts resident when asked for
    prefetch_hits: dict[int, list[int]] = field(default_factory=dict)  # ... resident or arriving by prefetch
    misses: dict[int, list[int]] = field(default_factory=dict)  # layer -> experts fetched on demand
    layer_fetch_wait_ns: dict[int, int] = field(default_factory=dict)  # compute thread blocked, per layer
    layer_bytes_fetched: dict[int, int] = field(default_factory=dict)  # demand-fetched blob bytes, per layer

    @property
    def fetch_wait_ns(self) -> int:
        return sum(self.layer_fetch_wait_ns.values())

    @property
    def bytes_fetched(self) -> int:
        return sum(self.layer_bytes_fetched.values())

    def count(self, kind: str) -> int:
        """Total experts in `kind` ("hits", "prefetch_hits", "misses") over all layers."""
        return sum(len(v) for v in getattr(self, kind).values())


# -- the cache ----------------------------------------------------------------------------------


@dataclass
class _LayerState:
    policy: ReplacementPolicy
    slots: int
    resident: dict[int, ExpertCompute] = field(default_factory=dict)
    pins: dict[int, int] = field(default_factory=dict)  # expert -> pin count (in use, never evicted)
    pending: set[int] = field(default_factory=set)  # reserved and being fetched by someone
    prefetched: set[int] = field(default_factory=set)  # inserted by prefetch, not used yet
    stats: LayerStats = field(default_factory=LayerStats)

    def evictable(self) -> set[int]:
        return {e for e in self.resident if not self.pins.get(e)}


class ExpertCache:
    """`ExpertProvider` with a byte budget, per-layer slots and a replacement policy per layer."""

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
        self.allocation = make_allocation(allocation) if isinstance(allocation, str) else allocation
        new_policy = make_policy_factory(policy) if isinstance(policy, str) else policy  # slots -> policy
        slots = self.allocation.slots(self.budget_bytes // self.expert_bytes, args.moe_layers, args.num_experts)
        if set(slots) != set(args.moe_layers) or any(not 0 <= s <= args.num_experts for s in slots.values()) \
                or sum(slots.values()) * self.expert_bytes > self.budget_bytes:
            raise CacheBudgetError(f"allocation {self.allocation.name!r} gave slots {slots} that do not fit "
                                   f"{args.num_experts} experts per layer and {self.budget_bytes} bytes")
        self._layers = {layer: _LayerState(new_policy(slots[layer]), slots[layer]) for layer in args.moe_layers}
        self._cond = threading.Condition(threading.Lock())
        self._used = 0  # resident + reserved bytes
        self._reserved = 0
        self._high_water = 0
        self._step: StepOutcome | None = None
        self._wait_poll_s = wait_poll_s

    # -- ExpertProvider -------------------------------------------------------------------------

    def iter_experts(self, layer: int, experts: Sequence[int]) -> Iterator[tuple[int, ExpertCompute]]:
        """Resident experts first (hits), then the misses: one batched fetch when they fit in the budget,
        else waves that fit (evicting this layer's experts already used). Experts yielded and not yet
        released, and fetched but not yet yielded, are pinned: nothing evicts them."""
        L = self._layer(layer)
        ids = list(dict.fromkeys(int(e) for e in experts))
        step = self._step
        pinned: set[int] = set()  # pinned by this call and not yet released
        with self._cond:
            L.stats.lookups += len(ids)
            ready = [e for e in ids if e in L.resident]
            self._use(L, layer, ready, pinned, step)
        remaining = [e for e in ids if e not in pinned]
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
        finally:
            with self._cond:
                for e in pinned:
                    self._unpin(L, e)
                self._trim(L)
                self._cond.notify_all()

    # -- prefetch (issue 4's predictors call this from their thread) ------------------------------

    def prefetch(self, layer: int, experts: Sequence[int]) -> list[int]:
        """Fetch and insert experts not resident, as far as free space and this layer's unpinned experts allow.

        Never evicts other layers' experts or pinned ones. Returns the experts inserted.
        """
        L = self._layer(layer)
        with self._cond:
            todo = [e for e in dict.fromkeys(int(x) for x in experts) if e not in L.resident and e not in L.pending]
            wave = self._reserve(L, todo, borrow=False, prefetch=True)
            L.pending.update(wave)
        if not wave:
            return []
        try:
            computes, nbytes, build_ns = self._fetch_build(layer, wave, "prefetch")
        except BaseException:
            with self._cond:
                self._unreserve(len(wave))
                L.pending.difference_update(wave)
                self._cond.notify_all()
            raise
        with self._cond:
            L.pending.difference_update(wave)
            for e, c in zip(wave, computes):
                self._insert(L, e, c, prefetch=True)
                L.prefetched.add(e)
            L.stats.prefetched += len(wave)
            L.stats.bytes_fetched += nbytes
            L.stats.build_ns += build_ns
            self._cond.notify_all()
        return wave

    # -- step outcomes and statistics ---------------------------------------------------------------

    def begin_step(self) -> None:
        """Start recording per-layer outcomes of one forward step (the compute thread's)."""
        self._step = StepOutcome()

    def end_step(self) -> StepOutcome:
        """The outcomes since `begin_step`; also ages the policies (`on_step`)."""
        out, self._step = self._step or StepOutcome(), None
        with self._cond:
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
                              total, layers)

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

    # -- internals (the callers of _use, _reserve, _evict_one, _unreserve, _insert, _evict, _unpin and
    #    _trim hold the lock) ----------------------------------------------------------------------------

    def _layer(self, layer: int) -> _LayerState:
        try:
            return self._layers[layer]
        except KeyError:
            raise CacheError(f"layer {layer} is not an MoE layer (MoE layers: {list(self._layers)})") from None

    def _use(self, L: _LayerState, layer: int, ready: list[int], pinned: set[int], step: StepOutcome | None
             ) -> None:
        """Count resident experts as (prefetch) hits and pin them for this call. Lock held."""
        for e in ready:
            if e in L.prefetched:
                L.prefetched.discard(e)
                L.stats.prefetch_hits += 1
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

    def _next_wave(self, L: _LayerState, layer: int, remaining: list[int], pinned: set[int],
                   step: StepOutcome | None) -> tuple[list[int], list[int]]:
        """(experts that became resident meanwhile, experts reserved for one demand fetch)."""
        t0 = time.perf_counter_ns()
        waited = False
        with self._cond:
            while True:
                ready = [e for e in remaining if e in L.resident]
                if ready:  # a prefetch landed since we looked
                    self._use(L, layer, ready, pinned, step)
                to_fetch = [e for e in remaining if e not in L.resident and e not in L.pending]
                wave = self._reserve(L, to_fetch, borrow=True, prefetch=False)
                if ready or wave:
                    L.pending.update(wave)
                    break
                # everything left is being fetched by a prefetch, or the space is reserved by one: wait for it
                if not self._reserved and not any(e in L.pending for e in remaining):
                    raise CacheBudgetError(
                        f"layer {layer}: no room for one expert in a {self.budget_bytes}-byte budget with nothing "
                        f"in flight (a cache bug: used {self._used}, pinned "
                        f"{sum(len([p for p in S.pins.values() if p]) for S in self._layers.values())})")
                self._cond.wait(self._wait_poll_s)
                waited = True
        if waited:  # on a late prefetch, or on room a prefetch held: the compute thread stalled
            self._count_wait(L, layer, step, time.perf_counter_ns() - t0)
        return ready, wave

    def _demand_fetch(self, L: _LayerState, layer: int, wave: list[int], pinned: set[int],
                      step: StepOutcome | None) -> None:
        t0 = time.perf_counter_ns()
        try:
            computes, nbytes, build_ns = self._fetch_build(layer, wave, "demand")
        except BaseException:
            with self._cond:
                self._unreserve(len(wave))
                L.pending.difference_update(wave)
                self._cond.notify_all()
            raise
        waited = time.perf_counter_ns() - t0
        with self._cond:
            L.pending.difference_update(wave)
            for e, c in zip(wave, computes):
                self._insert(L, e, c, prefetch=False)
                L.pins[e] = L.pins.get(e, 0) + 1
                pinned.add(e)
            L.stats.misses += len(wave)
            L.stats.bytes_fetched += nbytes
            L.stats.build_ns += build_ns
            if step is not None:
                step.misses.setdefault(layer, []).extend(wave)
                step.layer_bytes_fetched[layer] = step.layer_bytes_fetched.get(layer, 0) + nbytes
            self._count_wait(L, layer, step, waited)
            self._cond.notify_all()

    def _count_wait(self, L: _LayerState, layer: int, step: StepOutcome | None, waited_ns: int) -> None:
        L.stats.fetch_wait_ns += waited_ns
        if step is not None:
            step.layer_fetch_wait_ns[layer] = step.layer_fetch_wait_ns.get(layer, 0) + waited_ns

    def _fetch_build(self, layer: int, wave: list[int], priority: Priority
                     ) -> tuple[list[ExpertCompute], int, int]:
        """One batched fetch, then the compute forms (no lock held: this is the slow part).
        Returns (computes, blob bytes fetched, ns spent building)."""
        blobs = self.fetcher.fetch([(layer, e, self.fmt) for e in wave], priority)
        t0 = time.perf_counter_ns()
        a = self.args
        computes = []
        for b in blobs:
            c = make_expert_compute(self.fmt, b.data, a.hidden_size, a.expert_intermediate_size, self.form,
                                    self.device)
            if c.nbytes != self.expert_bytes:
                raise CacheError(f"expert {b.key} takes {c.nbytes} bytes in form {self.form!r}, the cache "
                                 f"budgets {self.expert_bytes} per expert (a compute form bug)")
            computes.append(c)
        return computes, sum(b.nbytes for b in blobs), time.perf_counter_ns() - t0

    def _reserve(self, L: _LayerState, experts: list[int], borrow: bool, prefetch: bool) -> list[int]:
        """Room for the first experts of `experts` that fit, in layer L: free bytes first, then L's unpinned
        experts (by its policy), then (borrow) other layers' unpinned experts. Lock held. Returns those
        reserved; each had its policy's on_miss just before room was made for it."""
        room = (self.budget_bytes - self._used) // self.expert_bytes + len(L.evictable())
        if borrow:
            room += sum(len(S.evictable()) for S in self._layers.values() if S is not L)
        chosen = experts[:room]
        for e in chosen:
            L.policy.on_miss(e, prefetch)
            if self.budget_bytes - self._used < self.expert_bytes and not self._evict_one(L, borrow):
                raise CacheError(f"cache accounting: no room after counting {room} (a cache bug)")
            self._used += self.expert_bytes
            self._reserved += self.expert_bytes
        self._high_water = max(self._high_water, self._used)
        return chosen

    def _evict_one(self, L: _LayerState, borrow: bool) -> bool:
        candidates = L.evictable()
        if candidates:
            self._evict(L, L.policy.victim(candidates))
            return True
        if not borrow:
            return False
        # other layers, the ones furthest over their slots first (scratch users), then any
        for other in sorted(self._layers.values(), key=lambda S: S.slots - len(S.resident)):
            if other is not L and (c := other.evictable()):
                self._evict(other, other.policy.victim(c))
                return True
        return False

    def _unreserve(self, n: int) -> None:
        self._used -= n * self.expert_bytes
        self._reserved -= n * self.expert_bytes

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
            L.prefetched.discard(e)
            L.stats.prefetch_unused_evictions += 1
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
