"""Promotions the store makes on its own: store hints (the Prefetch RPC) and, after a gRPC read from
NVMe, a background promotion of that expert.

A bounded queue served by a few tasks on the event loop; each promotion goes through the store's
`acquire` (one promotion per expert however many ask, the I/O queue's priorities: hints after
demand and prefetch fetches, background promotions last).

A hint may not evict an expert another hint brought into RAM that no one has read yet (the RAM
tier refuses: those are predictions for nearer layers, not used yet). Such a hint waits rather
than being lost: the oldest waiting hint is retried every `RETRY_S` (a worker's copies free the
slots as it reaches those layers), until `hint_wait_s` passed since it was first refused; then
it is dropped and counted in `hints_refused`. An expert resident by then leaves the wait.

Admission follows the hints' measured use: `admit` is the recent share of hint promotions a worker
read before they were evicted (an average over windows of `ADMIT_WINDOW` outcomes, at least
`ADMIT_FLOOR`), and only that share of new hints is promoted (evenly spread, the rest counted in
`hints_skipped`). A RAM tier too small for the predicted window would otherwise fill with hints
that evict each other and the experts workers fetch; one that holds them admits every hint.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import FateError
from .io_scheduler import PRIORITY_BACKGROUND, PRIORITY_HINT

logger = logging.getLogger(__name__)

RETRY_S = 0.002  # how often the oldest waiting hint tries again
ADMIT_WINDOW = 16  # hint outcomes (read, or evicted unread) per update of `admit`
ADMIT_FLOOR = 0.1  # the least share of hints promoted (so their use keeps being measured)


class PromotionQueue:
    """Queued promotions into the RAM tier (module docstring); needs a running event loop."""

    def __init__(self, acquire: Callable[[Any, int], Awaitable[tuple[Any, bool]]], ram: Any, counters: Any,
                 capacity: int, hint_wait_s: float, clock: Callable[[], float] = time.monotonic):
        """acquire: StoreCore._acquire (slot pinned or None, promoted); ram: the RamTier (replaced when
        the store creates its segment); counters: where `prefetch_promotions`, `hints_refused` and
        `hints_skipped` count."""
        self._acquire, self.ram, self._counters = acquire, ram, counters
        self.capacity, self.hint_wait_s, self._clock = capacity, hint_wait_s, clock
        self._queue: collections.deque[tuple[Any, bool]] = collections.deque()
        self._queued: set[Any] = set()
        self._waiting: collections.OrderedDict[Any, float] = collections.OrderedDict()  # key -> first refused
        self._retry_at = 0.0
        self._wake = asyncio.Event()
        self.admit = 1.0  # share of new hints promoted (module docstring)
        self._credit = 0.0
        self._outcomes = (0, 0)  # the RAM tier's (hints_used, hints_wasted) at the last update of `admit`

    def __contains__(self, key: Any) -> bool:
        return key in self._queued or key in self._waiting

    @property
    def waiting(self) -> int:
        """Hints waiting for a slot they may take."""
        return len(self._waiting)

    def put(self, key: Any, background: bool) -> bool:
        """Queue a promotion (a hint, or background after a gRPC miss); False when the queue is full."""
        if key in self:
            return True
        if len(self._queue) >= self.capacity:
            return False
        self._queue.append((key, background))
        self._queued.add(key)
        self._wake.set()
        return True

    def start(self, workers: int) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self._work(), name=f"promotions-{i}") for i in range(workers)]

    def _next(self) -> tuple[Any, bool, float | None] | None:
        """(key, background, when first refused: None for a new one) to promote next; None: nothing due."""
        now = self._clock()
        while self._waiting:  # the oldest first: the nearest layer's prediction
            key, since = next(iter(self._waiting.items()))
            if now - since < self.hint_wait_s and not self.ram.resident(key):
                break
            del self._waiting[key]
            self._counters.hints_refused += not self.ram.resident(key)
        if self._waiting and now >= self._retry_at:
            key, since = self._waiting.popitem(last=False)
            return key, False, since
        if self._queue:
            key, background = self._queue.popleft()
            self._queued.discard(key)
            return key, background, None
        return None

    async def _work(self) -> None:
        while True:
            item = self._next()
            if item is None:
                self._wake.clear()
                timeout = max(0.0, self._retry_at - self._clock()) if self._waiting else None
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except (asyncio.TimeoutError, TimeoutError):
                    pass
                continue
            key, background, since = item
            if not background and since is None and not self._admitted():
                self._counters.hints_skipped += 1
                continue
            try:
                slot, promoted = await self._acquire(key, PRIORITY_BACKGROUND if background else PRIORITY_HINT)
                if slot is not None:
                    self.ram.unpin(slot)
                    if promoted and not background:
                        self._counters.prefetch_promotions += 1
                elif not background:
                    self._wait(key, since)
            except FateError as e:
                logger.warning("promotion of layer %d expert %d %s failed: %s", key.layer, key.expert, key.fmt, e)
            except Exception:
                logger.exception("promotion of %s failed (a bug)", key)

    def _admitted(self) -> bool:
        """Whether this new hint is promoted: `admit` of them are, evenly spread."""
        c = self.ram.counters
        used, wasted = c.hints_used - self._outcomes[0], c.hints_wasted - self._outcomes[1]
        if used + wasted >= ADMIT_WINDOW:
            self.admit = max(ADMIT_FLOOR, (self.admit + used / (used + wasted)) / 2)
            self._outcomes = (c.hints_used, c.hints_wasted)
        self._credit += self.admit
        if self._credit < 1.0:
            return False
        self._credit -= 1.0
        return True

    def _wait(self, key: Any, since: float | None) -> None:
        """A hint that got no slot: into the wait (a retried one back at its front: it stays the oldest),
        or dropped once it waited `hint_wait_s`."""
        now = self._clock()
        if key in self:  # asked for again meanwhile: that request stands
            return
        if since is not None and now - since >= self.hint_wait_s or self.hint_wait_s <= 0:
            self._counters.hints_refused += 1
            return
        self._waiting[key] = now if since is None else since
        if since is not None:
            self._waiting.move_to_end(key, last=False)
        while len(self._waiting) > self.capacity:
            self._waiting.popitem(last=True)
            self._counters.hints_refused += 1
        self._retry_at = now + RETRY_S
