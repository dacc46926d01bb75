"""Blocking work off the event loop: a small thread pool fed by a priority queue.

Demand fetches run before prefetches, prefetches before store hints, hints before background
promotions, so a prefetch never delays a demand fetch that arrives after it; a queued job that a
more urgent caller comes to wait for is boosted to that caller's priority (`boost`).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

PRIORITY_DEMAND, PRIORITY_PREFETCH, PRIORITY_HINT, PRIORITY_BACKGROUND = 0, 1, 2, 3  # the I/O queue's order


class Job:
    """One queued call; `future` gets its result. `IoScheduler.boost` can move it up while it waits."""

    __slots__ = ("priority", "future", "fn", "args", "started")

    def __init__(self, priority: int, future: asyncio.Future, fn: Callable[..., Any], args: tuple):
        self.priority, self.future, self.fn, self.args, self.started = priority, future, fn, args, False


class IoScheduler:
    """Runs blocking functions in `threads` threads, lowest priority number first, FIFO within one."""

    def __init__(self, threads: int):
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="store-io")
        self._queue: asyncio.PriorityQueue = asyncio.PriorityQueue()
        self._seq = itertools.count()
        self._workers = [asyncio.create_task(self._work(), name=f"store-io-{i}") for i in range(threads)]

    async def run(self, priority: int, fn: Callable[..., T], *args: Any) -> T:
        return await self.submit(priority, fn, *args).future

    def submit(self, priority: int, fn: Callable[..., Any], *args: Any) -> Job:
        """Queue `fn(*args)`; await `job.future` for its result."""
        job = Job(priority, asyncio.get_running_loop().create_future(), fn, args)
        self._queue.put_nowait((priority, next(self._seq), job))
        return job

    def boost(self, job: Job, priority: int) -> None:
        """A more urgent caller waits for `job`: if it has not started, it runs at `priority` (when lower)."""
        if not job.started and not job.future.done() and priority < job.priority:
            job.priority = priority
            self._queue.put_nowait((priority, next(self._seq), job))  # the older entry is skipped once started

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            _, _, job = await self._queue.get()
            fut = job.future
            if job.started or fut.done():  # run through a boosted entry, or its caller went away (cancelled)
                continue
            job.started = True
            try:
                result = await loop.run_in_executor(self._executor, job.fn, *job.args)
            except Exception as e:  # delivered to the caller
                if not fut.done():
                    fut.set_exception(e)
            else:
                if not fut.done():
                    fut.set_result(result)

    async def close(self) -> None:
        """Stop taking work and wait for the jobs running in threads (they may touch the segment)."""
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, functools.partial(self._executor.shutdown, wait=True))


