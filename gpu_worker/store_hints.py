"""Store hints: the worker's predictions, sent to the expert store as one-way, batched Prefetch calls.

The store promotes the named experts from its NVMe tier into its RAM tier (demand reads first), so
that a worker miss finds them there. `StoreHinter` owns one thread: `submit` never blocks (batches
queued while a call is in flight are merged into the next one, oldest dropped past `max_pending`),
and a failed call is counted, never raised (the demand path reports the store's errors).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

log = logging.getLogger(__name__)

@dataclass
class StoreHintStats:
    sends: int = 0  # Prefetch calls made to the store
    experts: int = 0  # experts named in them
    merged: int = 0  # batches merged into a pending one (a call was still in flight)
    dropped: int = 0  # experts dropped from a full backlog (oldest first)
    errors: int = 0  # calls that failed (counted, never raised)


BlobKey = tuple[int, int, str]


class StoreHinter:
    """The store-hint thread: one-way, batched Prefetch calls (module docstring). `send` is the
    store client's `prefetch_hint`."""

    def __init__(self, send: Callable[[list[BlobKey]], object], max_pending: int = 4096, start_thread: bool = True):
        self._send = send
        self.max_pending = max_pending
        self.stats = StoreHintStats()
        self._pending: dict[BlobKey, None] = {}  # an ordered set, oldest first
        self._busy = False
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="store-hints", daemon=True) if start_thread else None
        if self._thread is not None:
            self._thread.start()

    def submit(self, keys: Sequence[BlobKey]) -> None:
        """Queue one batch (never blocks on the store)."""
        if not keys:
            return
        with self._cond:
            if self._stop:
                return
            if self._pending:
                self.stats.merged += 1
            for k in keys:
                self._pending.pop(k, None)
                self._pending[k] = None
            while len(self._pending) > self.max_pending:
                del self._pending[next(iter(self._pending))]
                self.stats.dropped += 1
            self._cond.notify_all()

    def send_pending(self) -> bool:
        """Send what is queued now, on this thread (the thread's loop body; tests without a thread)."""
        with self._cond:
            if not self._pending:
                return False
            keys = list(self._pending)
            self._pending.clear()
            self._busy = True
        try:
            self._send(keys)
        except Exception as e:  # a hint is advice: the demand path reports the store's errors
            log.debug("store hint of %d experts failed: %s", len(keys), e)
            with self._cond:
                self.stats.errors += 1
        else:
            with self._cond:
                self.stats.sends += 1
                self.stats.experts += len(keys)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
        return True

    def drain(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued hint was sent (or failed); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
            self.send_pending()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
