"""Shared memory between the store and co-located workers: segment names, attaching, host identity.

The store creates ONE POSIX shared-memory segment (`/dev/shm/fate-moe-<pid>-...`)
for its RAM tier and hands out descriptors (segment, offset, length,
generation, lease) into it. A worker on the same host attaches with
`attach_segment(name)` and copies the bytes straight out of it.

Why a helper for attaching: on Python < 3.13 `SharedMemory(name=..., create=False)`
registers the segment with the attaching process's `resource_tracker`, which
then *unlinks* it (and warns about a "leaked" segment) when that process exits,
pulling the segment out from under the store and every other worker. 3.13 added
`track=False`; on older versions `attach_segment` unregisters right after
attaching. Only the store, which created the segment, unlinks it.

Reading a descriptor: attach once per segment name and keep it; copy
`buf[offset_bytes : offset_bytes + length_bytes]` out while the lease is valid
(`lease_ttl_ms` from the reply), check the xxh3_64 against the descriptor's
`checksum`, then ReleaseLeases. The store never rewrites a leased slot; a copy
that outlives its lease may see the slot's next tenant, which the checksum
catches (fetch again). A segment name that no longer exists means the store
restarted: call GetManifest again.

Without an RPC: the store also publishes a slot directory (slot_directory.py), a second small
segment named in GetManifest (`shm_directory_name`, over `shm_segment_name`). A worker maps
both once and copies a resident expert by itself, checking the row's generation after the copy
and the blob's xxh3_64; misses take the lease path above in one batched FetchExpertsShm.

Co-location: `host_id()` is the boot id plus the IPC namespace's inode; the store
reports its own in GetManifest, and a worker whose `host_id()` differs cannot see
the segment (another machine, another boot, or another IPC namespace) and must
fetch over gRPC.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

SEGMENT_PREFIX = "fate-moe-"
SHM_DIR = Path("/dev/shm")
_NAME_RE = re.compile(r"^fate-moe-(\d+)-(\d+)-[0-9a-f]+$")


def host_id() -> str:
    """`<boot id>:<IPC namespace inode>`: equal in two processes iff they can share a segment by name."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    try:
        ipc = os.stat("/proc/self/ns/ipc").st_ino
    except OSError:
        ipc = 0
    return f"{boot}:{ipc}"


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def new_segment_name() -> str:
    """`fate-moe-<pid>-<pid namespace inode>-<random>`: the pid lets a later store find a dead one's leftovers."""
    return f"{SEGMENT_PREFIX}{os.getpid()}-{_pid_namespace()}-{secrets.token_hex(4)}"


def segments_of(pid: int) -> list[str]:
    """Names of this pid's segments that exist now (tests check that none is left)."""
    if not SHM_DIR.is_dir():
        return []
    return sorted(p.name for p in SHM_DIR.glob(f"{SEGMENT_PREFIX}{pid}-*"))


def attach_segment(name: str) -> SharedMemory:
    """Attach to the store's segment without taking ownership (it is never unlinked by this process).

    Raises FileNotFoundError when the segment is gone (the store stopped or restarted: fetch the
    manifest again). Close it with `.close()` when done; never `.unlink()` it.
    """
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, create=False, track=False)
    shm = SharedMemory(name=name, create=False)
    # Python < 3.13 registered the segment for unlinking at exit: take that back.
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]  # "/<name>"
    return shm


def remove_stale_segments() -> list[str]:
    """Unlink segments left by stores of this pid namespace whose process is gone (a SIGKILLed store).

    Segments of live processes, of other pid namespaces (containers sharing /dev/shm) and names
    not ours are left alone. Returns the names removed.
    """
    removed: list[str] = []
    if not SHM_DIR.is_dir():
        return removed
    ns = _pid_namespace()
    for path in SHM_DIR.glob(f"{SEGMENT_PREFIX}*"):
        m = _NAME_RE.match(path.name)
        if not m or int(m.group(2)) != ns or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except OSError:
            pass  # another user's segment, or removed meanwhile
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
