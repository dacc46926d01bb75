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
