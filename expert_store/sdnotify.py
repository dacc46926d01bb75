"""sd_notify(3) without libsystemd: READY=1, STOPPING=1, STATUS=... and WATCHDOG=1 for `Type=notify` units.

systemd passes the path of a unix datagram socket in NOTIFY_SOCKET; a name that
starts with '@' is in the abstract namespace (a leading NUL byte). Without
NOTIFY_SOCKET (not under systemd) every call is a no-op that returns False.
A failure to notify is logged, never raised: the service must not die because
its supervisor's socket went away.

With `WatchdogSec=` systemd sets WATCHDOG_USEC (and WATCHDOG_PID); `Watchdog` pings
WATCHDOG=1 at most every third of that, so a loop that calls it on every turn
keeps the unit alive exactly while the loop turns, and a wedged loop gets the
process killed and restarted.
"""

from __future__ import annotations

import logging
import os
import socket
import time

logger = logging.getLogger(__name__)
_warned = False


def notify(state: str) -> bool:
    """Send `state` (newline-separated assignments, e.g. "READY=1\\nSTATUS=serving"); True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        logger.warning("NOTIFY_SOCKET=%r: only unix socket paths are supported; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        global _warned
        log = logger.debug if _warned else logger.warning  # once: a missing supervisor is not news every time
        _warned = True
        log("sd_notify %r to %s failed: %s", state.split("\n", 1)[0], os.environ["NOTIFY_SOCKET"], e)
        return False
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def watchdog_interval_s() -> float:
    """systemd's watchdog timeout in seconds for this process; 0 when there is none."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 1e6


class Watchdog:
    """`ping()` from the loop that must keep turning; sends WATCHDOG=1 at most every interval / 3."""

    def __init__(self, interval_s: float | None = None):
        self.interval_s = watchdog_interval_s() if interval_s is None else interval_s
        self._next = 0.0

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0

    def ping(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval_s / 3
            notify("WATCHDOG=1")
