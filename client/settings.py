"""The client's settings: where the worker is and how long a call may take (the CLI's common flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .api import ADDRESS_ENV, DEFAULT_ADDRESS, default_address


@dataclass(frozen=True)
class ClientSettings:
    """Connection settings of `python -m client` (and the defaults of WorkerClient)."""

    address: str = field(default_factory=default_address)
    """Worker address: host:port or unix:/path. Default: $FATE_WORKER_ADDRESS, else unix:/run/fate-moe/worker.sock."""

    timeout_s: float | None = None
    """Deadline of each call in seconds; None: no deadline."""


ADDRESS_HELP = (f"worker address: host:port or unix:/path (default: ${ADDRESS_ENV} when set, else {DEFAULT_ADDRESS}"
                + (f"; now {default_address()}" if default_address() != DEFAULT_ADDRESS else "") + ")")
TIMEOUT_HELP = "deadline of each call in seconds (default: none)"
