"""One store call's retries after UNAVAILABLE (the StoreClient's retry window)."""

from __future__ import annotations

import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2


class _Retry:
    """One call's retries after UNAVAILABLE: `max_retries` quick ones, or, with a retry window, until the
    window (from the first failure) ends: backoff, wait for the store's health to say SERVING, check it
    still serves our pack (PackChangedError if not), then try again."""

    def __init__(self, client: Any, what: str):  # a StoreClient (not imported: no cycle)
        self.client, self.what = client, what
        self.attempt = 0
        self.deadline: float | None = None

    def after(self, e: grpc.RpcError) -> None:
        c = self.client
        if e.code() != grpc.StatusCode.UNAVAILABLE:
            raise c._error(self.what, e) from None
        now = time.monotonic()
        if c.retry_window_s <= 0:
            if self.attempt >= c.max_retries:
                raise c._error(self.what, e) from None
            with c._lock:
                c.counters.retries += 1
            time.sleep(c.retry_backoff_s * (2 ** self.attempt))
            self.attempt += 1
            return
        if self.deadline is None:
            self.deadline = now + c.retry_window_s
            c._outage(began=True)
        if now >= self.deadline:
            raise c._error(self.what, e) from None
        with c._lock:
            c.counters.retries += 1
        time.sleep(min(c.retry_backoff_s * (2 ** self.attempt), 1.0, self.deadline - now))
        self.attempt += 1
        self._wait_for_store()

    def _wait_for_store(self) -> None:
        c = self.client
        assert self.deadline is not None
        while (left := self.deadline - time.monotonic()) > 0:
            try:
                reply = c._health.Check(health_pb2.HealthCheckRequest(), timeout=min(left, 1.0))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    c.revalidate(min(max(self.deadline - time.monotonic(), 0.1), c.rpc_timeout_s))
                    c._outage(began=False)
                    return
            except grpc.RpcError:
                pass
            time.sleep(min(0.1, max(0.0, self.deadline - time.monotonic())))
