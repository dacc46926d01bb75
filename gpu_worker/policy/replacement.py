"""Replacement policies: which resident expert of one MoE layer leaves.

Plain Python, no torch and no I/O: the cache ledger (gpu_worker.policy.ledger) drives
these very classes for the worker's `ExpertCache` and for the offline simulator, so a
hit rate replayed from a trace is the hit rate the worker would have had.

How a cache drives a policy, for one layer (expert ids are ints within the layer):
- a routed expert is resident: `on_hit(e)`;
- it is not: `on_miss(e)` first (ARC adapts here), then, while the layer needs room,
  `victim(candidates)` and `on_evict(v)`, then `on_insert(e)` once it is resident;
- a prefetched expert arrives: the same as a miss, with `prefetch=True`;
- at the end of every forward step: `on_step()`.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Callable, ClassVar, Collection

from expert_store.errors import FateError


class PolicyError(FateError, ValueError):
    """An unknown policy or allocation name, or a policy asked for a victim it does not hold."""


class ReplacementPolicy(ABC):
    """Chooses which resident expert of one layer leaves. Sees every hit, miss, insert and eviction."""

    name: ClassVar[str]

    @abstractmethod
    def on_hit(self, expert: int) -> None:
        """A resident expert was used."""

    def on_hits(self, experts: list[int]) -> None:
        """`on_hit` for each of `experts`, in order (one call for a demand call's hits)."""
        on_hit = self.on_hit
        for e in experts:
            on_hit(e)

    def on_miss(self, expert: int, prefetch: bool = False) -> None:
        """`expert` is about to be brought in (before any victim is chosen for it)."""

    @abstractmethod
    def on_insert(self, expert: int, prefetch: bool = False) -> None:
        """An expert became resident (after a demand fetch, or a prefetch when `prefetch`)."""

    @abstractmethod
    def victim(self, candidates: Collection[int]) -> int:
        """One of `candidates` (resident, not pinned, never empty) to evict."""

    @abstractmethod
    def on_evict(self, expert: int) -> None:
        """An expert left the cache (after `victim` chose it, or when the layer was trimmed)."""

    def on_step(self) -> None:
        """A forward step ended (for policies that age their counts)."""

    def on_inserts(self, experts: list[int]) -> None:
        """`on_insert(e)` (demand) for each of `experts`, in order."""
        on_insert = self.on_insert
        for e in experts:
            on_insert(e, False)

    def admit(self, resident: dict[int, object], wave: list[int], free: int) -> int:
        """A wave of demand misses (none resident; nothing in `resident` pinned): for each expert in order,
        `on_miss`, then, past the first `free` ones, one eviction as `evict_victims(resident, 1)`; then each
        is added to `resident` (payload None) and `on_insert`. Returns the evictions."""
        n = 0
        on_miss, victim, on_evict = self.on_miss, self.victim, self.on_evict
        for e in wave:
            on_miss(e, False)
            if free > 0:
                free -= 1
                continue
            v = victim(resident)
            del resident[v]
            on_evict(v)
            n += 1
        for e in wave:
            resident[e] = None
        self.on_inserts(wave)
        return n

    def evict_victims(self, resident: dict[int, object], n: int) -> list[int]:
        """`n` evictions from `resident` (every entry a candidate, none pinned), one after another: each the
        `victim` of what is left, deleted from `resident`, then `on_evict`. Returns them in that order."""
        out = []
        victim, on_evict = self.victim, self.on_evict
        for _ in range(n):
            v = victim(resident)
            del resident[v]
            on_evict(v)
            out.append(v)
        return out


def _first_in(order: Collection[int], candidates: Collection[int], who: str) -> int:
    for e in order:
        if e in candidates:
            return e
    raise PolicyError(f"{who}: no victim among {sorted(candidates)}: they are not resident (a cache bug)")


class _EvictFirstAdmit:
    """`admit` for policies whose on_miss does nothing: a wave's evictions at once, then its inserts
    (the same calls `ReplacementPolicy.admit` makes, in an order that cannot matter to them)."""

    def admit(self, resident: dict[int, object], wave: list[int], free: int) -> int:
        n = len(wave) - free
        if n > 0:
            self.evict_victims(resident, n)
        for e in wave:
            resident[e] = None
        self.on_inserts(wave)
        return max(n, 0)


class LRUPolicy(_EvictFirstAdmit, ReplacementPolicy):
    """Least recently used: the expert whose last hit or insert is oldest."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.on_hit = self._order.move_to_end  # type: ignore[method-assign] # the same, one call fewer per hit

    def on_hit(self, expert: int) -> None:
        self._order.move_to_end(expert)

    def on_insert(self, expert: int, prefetch: bool = False) -> None:
        order = self._order
        if expert in order:
            order.move_to_end(expert)
        else:
            order[expert] = None  # a new key goes last

    def victim(self, candidates: Collection[int]) -> int:
        if self._order and len(candidates) == len(self._order):  # every resident expert is a candidate
            return next(iter(self._order))
        return _first_in(self._order, candidates, "lru")

    def on_evict(self, expert: int) -> None:
        self._order.pop(expert, None)

    def on_inserts(self, experts: list[int]) -> None:
        order = self._order
        for e in experts:
            if e in order:
                order.move_to_end(e)
            else:
                order[e] = None

    def evict_victims(self, resident: dict[int, object], n: int) -> list[int]:
        order = self._order
        if len(resident) != len(order):
            return super().evict_victims(resident, n)
        out = []
        for _ in range(n):  # the oldest, each time
            v = order.popitem(last=False)[0]
            del resident[v]
            out.append(v)
        return out


class LFUPolicy(_EvictFirstAdmit, ReplacementPolicy):
    """Least frequently used, counting every use since start-up (counts survive eviction, so
    an expert that was popular and comes back is judged by its history); ties go to the
    least recently used. A prefetch is not a use."""

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[int, float] = {}  # every expert ever resident -> its (scaled) uses
        self._recency: OrderedDict[int, None] = OrderedDict()  # resident experts, oldest first
        self._inc = 1.0  # what one use adds (LFU: 1; LFU-decay: decay**-step)

    def on_hit(self, expert: int) -> None:
        count = self._count
        count[expert] = count.get(expert, 0.0) + self._inc
        self._recency.move_to_end(expert)

    def on_hits(self, experts: list[int]) -> None:
        count, inc, mte = self._count, self._inc, self._recency.move_to_end
        for e in experts:
            count[e] = count.get(e, 0.0) + inc
            mte(e)

    def on_insert(self, expert: int, prefetch: bool = False) -> None:
        count = self._count
        count[expert] = count.get(expert, 0.0) + (0.0 if prefetch else self._inc)
        recency = self._recency
        recency[expert] = None
        recency.move_to_end(expert)

    def victim(self, candidates: Collection[int]) -> int:
        count = self._count
        if len(candidates) == len(self._recency) and self._recency:
            # every resident expert is a candidate: min() keeps the first (least recently used) of equal counts
            return min(self._recency, key=count.__getitem__)
        # one pass, oldest first: the strict < keeps the least recently used among equal counts
        best, best_count = None, 0.0
        for e in self._recency:
            if e in candidates:
                c = count.get(e, 0.0)
                if best is None or c < best_count:
                    best, best_count = e, c
        if best is None:
            raise PolicyError(f"{self.name}: no victim among {sorted(candidates)}: they are not resident (a cache bug)")
        return best

    def on_evict(self, expert: int) -> None:
        self._recency.pop(expert, None)

    def on_inserts(self, experts: list[int]) -> None:
        count, inc, recency = self._count, self._inc, self._recency
        for e in experts:
            count[e] = count.get(e, 0.0) + inc
            recency[e] = None
            recency.move_to_end(e)

    def evict_victims(self, resident: dict[int, object], n: int) -> list[int]:
        recency = self._recency
        if len(resident) != len(recency):
            return super().evict_victims(resident, n)
        key = self._count.__getitem__
        # n successive `victim`s of what is left = the n smallest counts, ties least recently used first
        # (min() and nsmallest() both keep the first of equal keys)
        out = [min(recency, key=key)] if n == 1 else heapq.nsmallest(n, recency, key=key)
        for v in out:
            del recency[v]
            del resident[v]
        return out

    def count(self, expert: int) -> float:
        """The (decayed) count in units of one use at the current step."""
        return self._count.get(expert, 0.0) / self._inc


class LFUDecayPolicy(LFUPolicy):
    """LFU whose counts are multiplied by `decay` at every step, so old popularity fades.

    Implemented without touching every count: each use adds decay**-step instead of 1,
    which ranks experts exactly as multiplying all counts by `decay` each step would;
    the counts are rescaled before the increment overflows.
    """

    name = "lfu_decay"

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 < decay <= 1.0:
            raise PolicyError(f"lfu_decay: decay must be in (0, 1], got {decay}")
        super().__init__()
        self.decay = decay

    def on_step(self) -> None:
        self._inc /= self.decay
        if self._inc > 1e100:
            self._count = {e: c / self._inc for e, c in self._count.items()}
            self._inc = 1.0


class ARCPolicy(ReplacementPolicy):
    """Adaptive Replacement Cache (Megiddo & Modha, FAST 2003) for a layer of `capacity` slots.

    T1: resident, seen once recently; T2: resident, seen at least twice; B1, B2: ghosts
    (ids only) of what T1 and T2 evicted; p: the adaptive target size of T1. A ghost hit
    in B1 grows p (recency was evicted too early), one in B2 shrinks it. When the layer
    must evict, REPLACE takes T1's LRU if |T1| > p (or = p and the incoming id is a B2
    ghost), else T2's LRU; pinned experts are skipped within the chosen list first.
    """

    name = "arc"

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise PolicyError(f"arc: capacity must be >= 1, got {capacity}")
        self.c = capacity
        self.p = 0.0
        self.t1: OrderedDict[int, None] = OrderedDict()  # LRU first
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()
        self._incoming_from: str | None = None  # "b1" | "b2" | None for the expert being brought in
        self._incoming: int | None = None

    def on_hit(self, expert: int) -> None:
        t2 = self.t2
        if expert in t2:
            t2.move_to_end(expert)
        else:
            self.t1.pop(expert, None)
            t2[expert] = None

    def on_hits(self, experts: list[int]) -> None:
        t1, t2 = self.t1, self.t2
        mte = t2.move_to_end
        for e in experts:
            if e in t2:
                mte(e)
            else:
                t1.pop(e, None)
                t2[e] = None

    def on_miss(self, expert: int, prefetch: bool = False) -> None:
        self._incoming = expert
        if expert in self.b1:
            self.p = min(float(self.c), self.p + max(len(self.b2) / len(self.b1), 1.0))
            del self.b1[expert]
            self._incoming_from = "b1"
        elif expert in self.b2:
            self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1.0))
            del self.b2[expert]
            self._incoming_from = "b2"
        else:
            self._incoming_from = None

    def victim(self, candidates: Collection[int]) -> int:
        from_t1 = len(self.t1) >= 1 and (
            (self._incoming_from == "b2" and len(self.t1) == self.p) or len(self.t1) > self.p
        )
        first, second = (self.t1, self.t2) if from_t1 else (self.t2, self.t1)
        if (first or second) and len(candidates) == len(first) + len(second):  # every resident one is a candidate
            return next(iter(first)) if first else next(iter(second))
        for lst in (first, second):
            for e in lst:
                if e in candidates:
                    return e
        raise PolicyError(f"arc: no victim among {sorted(candidates)}: they are not resident (a cache bug)")

    def on_evict(self, expert: int) -> None:
        if expert in self.t1:
            del self.t1[expert]
            self.b1[expert] = None
        elif expert in self.t2:
            del self.t2[expert]
            self.b2[expert] = None
        self._trim_ghosts()

    def on_insert(self, expert: int, prefetch: bool = False) -> None:
        if self._incoming != expert:  # inserted without on_miss (a direct fill): a plain new expert
            self.on_miss(expert, prefetch)
        if self._incoming_from is not None:
            self.t2[expert] = None  # seen before (a ghost): frequency list
        else:
            self.t1[expert] = None
        self._incoming = self._incoming_from = None
        self._trim_ghosts()

    def admit(self, resident: dict[int, object], wave: list[int], free: int) -> int:
        """`ReplacementPolicy.admit` with on_miss, victim, on_evict, on_insert and the ghost trims inlined."""
        t1, t2, b1, b2, c = self.t1, self.t2, self.b1, self.b2, self.c
        if len(resident) != len(t1) + len(t2):
            return super().admit(resident, wave, free)
        n = 0
        for e in wave:
            self.on_miss(e)
            if free > 0:
                free -= 1
                continue
            # victim(resident): every resident expert is a candidate
            nt1 = len(t1)
            if nt1 >= 1 and ((self._incoming_from == "b2" and nt1 == self.p) or nt1 > self.p):
                v = next(iter(t1))
                del t1[v]
                b1[v] = None
            elif t2:
                v = next(iter(t2))
                del t2[v]
                b2[v] = None
            else:
                v = next(iter(t1))
                del t1[v]
                b1[v] = None
            del resident[v]
            n += 1
            self._trim_ghosts()
        for e in wave:
            resident[e] = None
            if self._incoming != e:
                self.on_miss(e)
            if self._incoming_from is not None:
                t2[e] = None
            else:
                t1[e] = None
            self._incoming = self._incoming_from = None
            if b1:
                over = len(t1) + len(b1) - c
                while over > 0 and b1:
                    b1.popitem(last=False)
                    over -= 1
            if b2:
                over = len(t1) + len(t2) + len(b1) + len(b2) - 2 * c
                while over > 0 and b2:
                    b2.popitem(last=False)
                    over -= 1
        return n

    def _trim_ghosts(self) -> None:
        # The directory holds at most c ids of L1 = T1 + B1 and 2c in all (the paper's invariants).
        b1, b2 = self.b1, self.b2
        if b1:
            over = len(self.t1) + len(b1) - self.c
            while over > 0 and b1:
                b1.popitem(last=False)
                over -= 1
        if b2:
            over = len(self.t1) + len(self.t2) + len(b1) + len(b2) - 2 * self.c
            while over > 0 and b2:
                b2.popitem(last=False)
                over -= 1


POLICY_NAMES = ("lru", "lfu", "lfu_decay", "arc")


def make_policy_factory(name: str, lfu_decay: float = 0.9) -> Callable[[int], ReplacementPolicy]:
    """name -> a function of the layer's slot count returning a fresh policy."""
    factories: dict[str, Callable[[int], ReplacementPolicy]] = {
        "lru": lambda slots: LRUPolicy(),
        "lfu": lambda slots: LFUPolicy(),
        "lfu_decay": lambda slots: LFUDecayPolicy(lfu_decay),
        "arc": lambda slots: ARCPolicy(max(1, slots)),
    }
    if name not in factories:
        raise PolicyError(f"unknown replacement policy {name!r}; known: {', '.join(POLICY_NAMES)}")
    return factories[name]
