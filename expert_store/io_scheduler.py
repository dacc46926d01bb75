"""Blocking work off the event loop: a small thread pool fed by a priority queue.

Demand fetches run before prefetches, prefetches before background promotions, so a
prefetch never delays a demand fetch that arrives after it.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

PRIORITY_DEMAND, PRIORITY_PREFETCH, PRIORITY_BACKGROUND = 0, 1, 2  # the I/O queue's order


class IoScheduler:
    """Runs blocking functions in `threads` threads, lowest priority number first, FIFO within one."""

    def __init__(self, threads: int):
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="store-io")
        self._queue: asyncio.PriorityQueue = asyncio.PriorityQueue()
        self._seq = itertools.count()
        self._workers = [asyncio.create_task(self._work(), name=f"store-io-{i}") for i in range(threads)]

    async def run(self, priority: int, fn: Callable[..., T], *args: Any) -> T:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((priority, next(self._seq), fut, fn, args))
        return await fut

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            _, _, fut, fn, args = await self._queue.get()
            if fut.done():  # its caller went away (cancelled) while it waited
                continue
            try:
                result = await loop.run_in_executor(self._executor, fn, *args)
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


