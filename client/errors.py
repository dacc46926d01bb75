"""The client's one error type: a failed call, named by its gRPC status."""

from __future__ import annotations

import grpc


class WorkerError(Exception):
    """A call to the worker failed; `code` is the gRPC status name, `details` the worker's message."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> "WorkerError":
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else str(e)
        return cls(code.name if code is not None else "UNKNOWN", details or "")
