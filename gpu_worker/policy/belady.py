"""Belady's MIN, the future-aware bound of demand caching (offline replays only)."""

from __future__ import annotations

from bisect import bisect_right
from typing import Collection

from .replacement import PolicyError, ReplacementPolicy

INF = float("inf")


class BeladyPolicy(ReplacementPolicy):
    """Belady's MIN: evict the candidate whose next use is farthest in the future.

    `occurrences[e]`: the sorted clock values (flat: access index; worker: step) at which expert e
    is used in this layer; the driver sets `now` to the clock of the access being served, so the
    next use of a resident expert is its first occurrence after `now`. Ties (e.g. never used
    again) go to the smallest id. A next use found once stays the answer while `now` is below it
    (the clock never runs back), so each is looked up again only once `now` has reached it.
    """

    name = "belady"

    def __init__(self, occurrences: dict[int, list[int]]):
        self._occ = occurrences
        self._next: dict[int, float] = {}  # expert -> its next use after the `now` it was found at
        self.now = -1

    def next_use(self, expert: int) -> float:
        nxt = self._next.get(expert)
        if nxt is not None and nxt > self.now:
            return nxt
        occ = self._occ.get(expert)
        if not occ:
            nxt = INF
        else:
            i = bisect_right(occ, self.now)
            nxt = occ[i] if i < len(occ) else INF
        self._next[expert] = nxt
        return nxt

    def on_hit(self, expert: int) -> None:
        pass

    def on_hits(self, experts: list[int]) -> None:
        pass

    def on_insert(self, expert: int, prefetch: bool = False) -> None:
        pass

    def on_evict(self, expert: int) -> None:
        pass

    def victim(self, candidates: Collection[int]) -> int:
        best, best_use = None, -1.0
        cache, now, next_use = self._next, self.now, self.next_use
        for e in candidates:
            use = cache.get(e)
            if use is None or use <= now:
                use = next_use(e)
            if use > best_use or (use == best_use and e < best):  # type: ignore[operator]
                best, best_use = e, use
        if best is None:
            raise PolicyError("belady: no victim among no candidates (a simulator bug)")
        return best
