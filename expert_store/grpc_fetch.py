"""FetchExperts' domain side: a batch of experts as few reply messages as fit the client's limit.

`fetch_batches(core, keys, ...)` plans the whole reply first: RAM-tier hits (pinned, then views of
their slots: no copy here) before NVMe reads, in request order within each group; experts are
packed whole into messages of at most `max_payload` bytes, and only an expert larger than that is
split into parts. It yields one list of `BlobPart`s per message; the slots behind them stay pinned
until the generator is resumed, so the edge (server.py) must encode a message (its one copy of the
bytes) before asking for the next.

NVMe reads run in the store's I/O threads, a few experts ahead of the message being built: each
blob is read whole and checked against the manifest's xxh3_64 before any of its bytes leave, so
corruption that happens while the store runs is refused (counted, logged, DATA_LOSS) on every read.
zstd, when the client accepts it, is tried per part in the I/O threads and kept only where it pays.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from .core import InvalidRequest, StoreCore
from .errors import ChecksumError
from .tiers import BlobKey, Slot, Tier, no_views_in_tracebacks
from .wire import PAYLOAD_ALIGN, Compression

PART_OVERHEAD_BYTES = 128 + PAYLOAD_ALIGN  # an ExpertPart in the index, and the payload's alignment padding
MESSAGE_OVERHEAD_BYTES = 256  # the message's own field headers and padding


class InvalidFetch(InvalidRequest):
    """A reply limit too small to carry anything (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class BlobPart:
    """One expert, or one part of an expert, in a reply message."""

    index: int  # position of the expert in the request
    key: BlobKey
    total_bytes: int  # the expert's size
    offset: int  # where this part's bytes start in the expert
    data: memoryview | bytes  # encoded as `compression` says (a view of a pinned slot, or read bytes)
    compression: Compression
    raw_nbytes: int  # the part's length once decoded
    last: bool  # the expert's last part
    tier: Tier
    checksum: str  # of the whole expert, on its last part ("" otherwise)


@dataclass
class _Planned:
    index: int
    key: BlobKey
    nbytes: int
    slot: Slot | None  # pinned RAM slot (until its last part is encoded), or None: read from NVMe
    try_zstd: bool
    tier: Tier = Tier.NVME
    read: asyncio.Future[tuple[bytearray, int]] | None = None  # NVMe: (the verified blob, read ns)
    read_ns: int = 0
    wire_bytes: int = 0
    compressed_parts: int = 0


def max_payload_bytes(limit: int) -> int:
    """Payload bytes one part may carry in a message of at most `limit` bytes."""
    return limit - MESSAGE_OVERHEAD_BYTES - PART_OVERHEAD_BYTES


def plan_messages(sizes: Sequence[int], limit: int) -> list[list[tuple[int, int, int]]]:
    """Messages of at most `limit` bytes as lists of (expert position in `sizes`, start, length): experts
    whole and in order, a new message when the next one does not fit, and an expert larger than one
    message in parts that fill whole messages."""
    room = max_payload_bytes(limit)
    if room < 4096:
        raise InvalidFetch(f"a reply limit of {limit} bytes leaves no room for expert bytes; give at least "
                           f"{MESSAGE_OVERHEAD_BYTES + PART_OVERHEAD_BYTES + 4096}")
    messages: list[list[tuple[int, int, int]]] = []
    cur: list[tuple[int, int, int]] = []
    used = MESSAGE_OVERHEAD_BYTES
    for j, n in enumerate(sizes):
        if cur and used + PART_OVERHEAD_BYTES + n > limit:  # does not fit beside what is there: a new message
            messages.append(cur)
            cur, used = [], MESSAGE_OVERHEAD_BYTES
        start = 0
        while n - start > room:  # larger than a whole message: parts of `room` bytes
            if cur:
                messages.append(cur)
                cur, used = [], MESSAGE_OVERHEAD_BYTES
            messages.append([(j, start, room)])
            start += room
        cur.append((j, start, n - start))
        used += PART_OVERHEAD_BYTES + n - start + (-(n - start) % PAYLOAD_ALIGN)
    if cur:
        messages.append(cur)
    return messages


async def fetch_batches(core: StoreCore, keys: Sequence[BlobKey], priority: int, accept_zstd: bool,
                        limit: int) -> AsyncIterator[list[BlobPart]]:
    """The blobs of `keys`, one list of parts per reply message of at most `limit` bytes (see the module)."""
    core._require_ready()
    if not keys:
        raise InvalidRequest("no experts in the request")
    core.counters.fetch_requests += 1
    plan: list[_Planned] = []
    for i, key in enumerate(keys):
        slot = core.ram.lookup(key) if core.ram.enabled else None
        if slot is not None:
            core.ram.pin(slot)
        p = _Planned(i, key, core.blob_nbytes[key.fmt], slot, accept_zstd and core.wire.should_try(key))
        p.tier = Tier.RAM if slot is not None else Tier.NVME
        core.counters.count_fetch(priority, slot is not None)
        plan.append(p)
    plan.sort(key=lambda p: p.slot is None)  # stable: RAM hits first, each group in request order
    reads = collections.deque(j for j, p in enumerate(plan) if p.slot is None)  # NVMe ones, in reply order
    window = max(2, core.config.io_threads)  # NVMe blobs read (and held) ahead of the message being built
    held = 0  # NVMe reads started and not yet sent
    try:
        with no_views_in_tracebacks():
            for message in plan_messages([p.nbytes for p in plan], limit):
                needed = {j for j, _, _ in message}
                while reads and (reads[0] in needed or held < window):
                    p = plan[reads.popleft()]
                    p.read = asyncio.ensure_future(core.io.run(priority, _read_verified, core, p.key))
                    held += 1
                parts = [await _part(core, plan[j], start, n, priority) for j, start, n in message]
                yield parts
                del parts
                for j, start, n in message:
                    p = plan[j]
                    if start + n == p.nbytes:  # its last part is encoded: the slot may go, the buffer too
                        _finish(core, p)
                        if p.slot is not None:
                            core.ram.unpin(p.slot)
                            p.slot = None
                        if p.read is not None:
                            p.read, held = None, held - 1
    finally:
        for p in plan:
            if p.read is not None:
                p.read.cancel()
            if p.slot is not None:
                core.ram.unpin(p.slot)
                p.slot = None


async def _part(core: StoreCore, p: _Planned, start: int, n: int, priority: int) -> BlobPart:
    if p.slot is not None:
        raw: memoryview | bytes = core.ram.view(p.slot)[start:start + n]
    else:
        assert p.read is not None
        try:
            blob, ns = await p.read
        except ChecksumError as e:
            core.corrupt(e, "the FetchExperts call answers DATA_LOSS")
            raise
        p.read_ns = ns
        raw = memoryview(blob)[start:start + n]
    data, compression = raw, Compression.NONE
    if p.try_zstd:
        data, compression = await core.io.run(priority, core.wire.encode, raw)
        p.compressed_parts += compression == Compression.ZSTD
    p.wire_bytes += len(data)
    last = start + n == p.nbytes
    return BlobPart(p.index, p.key, p.nbytes, start, data, compression, n, last, p.tier,
                    core.nvme.checksum(p.key) if last else "")


def _read_verified(core: StoreCore, key: BlobKey) -> tuple[bytearray, int]:
    """(the blob as it is on disk now, read ns), its xxh3_64 checked: one read (an I/O thread)."""
    t0 = time.perf_counter_ns()
    blob = bytearray(core.nvme.ref(key).nbytes)
    core.nvme.read_into(key, memoryview(blob), verify=True)
    return blob, time.perf_counter_ns() - t0


def _finish(core: StoreCore, p: _Planned) -> None:
    tier = core.ram if p.tier == Tier.RAM else core.nvme
    tier.stats.add(p.nbytes, p.read_ns)
    core.counters.experts_served_grpc += 1
    core.counters.bytes_served_grpc += p.nbytes
    core.counters.bytes_sent_wire += p.wire_bytes
    if p.try_zstd:
        core.wire.record(p.key, p.compressed_parts > 0)
    if p.tier == Tier.NVME and core.ram.enabled and core.config.promote_on_grpc_miss:
        core._enqueue_promotion(p.key, background=True)


__all__ = ["BlobPart", "InvalidFetch", "fetch_batches", "max_payload_bytes", "plan_messages"]
