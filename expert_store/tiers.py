"""The store's two tiers: NVMe (experts.bin itself) and RAM (one shared-memory segment of slots).

NvmeTier reads experts.bin with pread rather than through a mapping: the GIL
is released while a cold read waits for the disk (a page fault on a mapping
would hold it and stall the event loop), a promotion reads straight into its
RAM slot (one copy), and no page of the file stays mapped in this process, so
`drop_page_cache` (posix_fadvise DONTNEED) really empties the page cache and
the next reads are real disk reads (honest cold tests). A blob's xxh3_64 is checked
every time its bytes come off the disk to be handed out (a promotion into a RAM
slot, a gRPC read from NVMe), not once per process: a byte that flips on disk while
the store runs is caught the next time the blob is read. A mismatch raises
ChecksumError (naming the expert, not the file), never bytes.

RamTier is ONE POSIX shared-memory segment divided into equal slots (slot size:
the largest 4 KiB-aligned blob among the served formats), each holding one
expert blob of any format. A slot's generation increments every time it gets
new contents. Slots are filled at start-up in a hotness order (`fill_order`),
then promoted into on demand, evicting the least recently used slot that no
one holds; recency counts the reads workers report in the slot directory, and a
store hint may not evict a slot another hint filled that no one read yet (`_victim`).
Holding is counted in `pins`: every lease (a co-located worker copying the bytes)
and every in-flight gRPC read of the slot pins it, and a pinned slot is never overwritten.
With a slot directory (`open_directory`, slot_directory.py) workers also copy unpinned
slots with no RPC: an eviction withdraws the blob's row before the slot is reused, a
commit publishes it, so such a copy detects a reuse. Leases expire after their TTL; lease
ids are random 63-bit numbers, an owner holds at most `max_leases_per_client` at once.

Thread safety: RamTier's bookkeeping runs on the event loop thread only; the
byte copies into a slot (`fill_view`, `write`) run in I/O threads while the
slot is FILLING, which no one else can see or take.

The segment is created 0600 (multiprocessing's default): workers must run as
the store's user to attach it.
"""

from __future__ import annotations

import heapq
import logging
import os
import secrets
import time
import traceback
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from multiprocessing.shared_memory import SharedMemory
from typing import Callable, Iterable, Iterator, NamedTuple


from . import shm
from .checksums import blob_checksum, blob_digest, new_hasher
from .errors import ChecksumError, FateError
from .pack import ALIGNMENT, align_up
from .slot_directory import SlotDirectory
from .packfile import BlobRef, Pack

logger = logging.getLogger(__name__)

ExpertId = tuple[int, int]  # (decoder layer, expert)
_VERIFY_PIECE = 16 << 20  # bytes per pread while verifying


class Tier(Enum):
    """Where the store found a blob (the edge maps it to the protocol's enum)."""

    RAM = "ram"
    NVME = "nvme"


class LeaseLimitError(FateError):
    """A client asked for more leases than `max_leases_per_client` allows: release some first."""


class BlobKey(NamedTuple):
    """One expert in one stored format."""

    layer: int  # decoder layer index
    expert: int
    fmt: str  # "bf16", "int8", "int4", "int2"


@dataclass
class TierStats:
    """Counters of one tier, since start-up."""

    hits: int = 0  # expert fetches served from this tier
    bytes_read: int = 0  # bytes this tier supplied
    read_ns: int = 0  # time spent reading from it

    def add(self, nbytes: int, ns: int, hits: int = 1) -> None:
        self.hits += hits
        self.bytes_read += nbytes
        self.read_ns += ns


@contextmanager
def no_views_in_tracebacks() -> Iterator[None]:
    """Drop the locals of the frames an exception passes through.

    A traceback keeps its frames' locals alive, and a memoryview of a slot among them keeps the
    segment's mapping exported, so it could not be closed at shutdown. Wrap code that handles slot
    views and may raise (the exception keeps its message and line numbers).
    """
    try:
        yield
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)
        raise


# -- NVMe tier ----------------------------------------------------------------------------------


class NvmeTier:
    """experts.bin of an open pack, read with pread (the GIL is released while the disk reads)."""

    def __init__(self, pack: Pack, formats: Iterable[str]):
        self.pack = pack
        self.formats = tuple(formats)
        self.path = pack.path / pack.manifest["experts_file"]
        self.capacity_bytes = int(pack.manifest["experts_nbytes"])
        self.stats = TierStats()
        self._verified: set[BlobKey] = set()
        self.uncached = False  # drop every read's pages from the page cache (StoreConfig.nvme_uncached)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def keys(self) -> list[BlobKey]:
        """Every served blob, in file order."""
        keys = [BlobKey(l, e, f) for f in self.formats for l, e in self.pack.expert_ids]
        return sorted(keys, key=lambda k: self.ref(k).offset)

    @property
    def blob_count(self) -> int:
        return len(self.pack.expert_ids) * len(self.formats)

    def ref(self, key: BlobKey) -> BlobRef:
        return self.pack.blob_ref(key.layer, key.expert, key.fmt)

    def checksum(self, key: BlobKey) -> str:
        """The blob's checksum as the protocol writes it: "xxh3_64:<16 hex digits>"."""
        return blob_checksum(self.ref(key).xxh3_64)

    # -- reads (blocking: run them in I/O threads) ---------------------------------------------

    def read_into(self, key: BlobKey, dest: memoryview, verify: bool = True) -> None:
        """Read the whole blob into `dest` (len >= blob); with verify, check the crc of what was read
        unless the blob was verified before."""
        ref = self.ref(key)
        self._pread_into(dest[: ref.nbytes], ref.offset)
        self._forget(ref.offset, ref.nbytes)
        if verify:
            self._check(key, blob_digest(dest[: ref.nbytes]))

    def read_range(self, key: BlobKey, start: int, nbytes: int) -> bytes:
        """`nbytes` of the blob from `start` (call `verify_blob` first: this does not check)."""
        ref = self.ref(key)
        if start < 0 or start + nbytes > ref.nbytes:
            raise ValueError(f"range {start}+{nbytes} outside the blob ({ref.nbytes} bytes)")  # a bug
        data = os.pread(self._fd, nbytes, ref.offset + start)
        if len(data) < nbytes:  # a regular file gives all unless at its end; stay correct anyway
            rest = bytearray(nbytes - len(data))
            self._pread_into(memoryview(rest), ref.offset + start + len(data))
            data += rest
        self._forget(ref.offset + start, nbytes)
        return data

    def _forget(self, offset: int, nbytes: int) -> None:
        """With `uncached`: drop what was just read from the page cache (the next read is a disk read)."""
        if self.uncached:
            os.posix_fadvise(self._fd, offset, nbytes, os.POSIX_FADV_DONTNEED)

    def verify_blob(self, key: BlobKey, piece: memoryview | None = None) -> None:
        """xxh3_64 of the blob as it is on disk now against the manifest; ChecksumError on a mismatch."""
        ref = self.ref(key)
        piece = piece if piece is not None else memoryview(bytearray(min(_VERIFY_PIECE, max(ref.nbytes, 1))))
        hasher, pos, end = new_hasher(), ref.offset, ref.offset + ref.nbytes
        while pos < end:
            n = min(len(piece), end - pos)
            self._pread_into(piece[:n], pos)
            hasher.update(piece[:n])
            pos += n
        self._check(key, hasher.intdigest())

    def _check(self, key: BlobKey, crc: int) -> None:
        ref = self.ref(key)
        if crc != ref.xxh3_64:
            raise ChecksumError(
                f"layer {key.layer} expert {key.expert} {key.fmt}: the stored bytes fail their checksum (xxh3_64 "
                f"{crc:016x}, manifest {ref.xxh3_64:016x}); the store's pack is damaged (its log names the file)",
                key.layer, key.expert, key.fmt,
            )
        self._verified.add(key)

    def _pread_into(self, dest: memoryview, offset: int) -> None:
        done = 0
        while done < len(dest):
            n = os.preadv(self._fd, [dest[done:]], offset + done)
            if n <= 0:
                raise OSError(f"{self.path}: unexpected end of file at byte {offset + done} (truncated pack?)")
            done += n

    def verify_all(
        self, should_stop: Callable[[], bool] = lambda: False, progress: Callable[[int, int], None] | None = None
    ) -> list[str]:
        """Check every served blob, in file order; returns one line per bad blob (blocking)."""
        problems: list[str] = []
        keys = self.keys()
        piece = memoryview(bytearray(min(_VERIFY_PIECE, max((self.ref(k).nbytes for k in keys), default=1))))
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        try:
            for i, key in enumerate(keys):
                if should_stop():
                    break
                try:
                    self.verify_blob(key, piece)
                except ChecksumError as e:
                    problems.append(str(e))
                if progress is not None:
                    progress(i + 1, len(keys))
        finally:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_NORMAL)
        return problems

    def will_need(self, key: BlobKey) -> None:
        """Start the kernel's readahead of the blob (asynchronous)."""
        ref = self.ref(key)
        os.posix_fadvise(self._fd, ref.offset, ref.nbytes, os.POSIX_FADV_WILLNEED)

    def drop_page_cache(self) -> None:
        """Drop experts.bin from the page cache (pages other processes map stay): the next reads hit the disk."""
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# -- RAM tier -----------------------------------------------------------------------------------


class SlotState(Enum):
    FREE = "free"
    FILLING = "filling"  # reserved for a copy in progress: invisible to lookups, never evicted
    READY = "ready"


@dataclass
class Slot:
    index: int
    offset: int  # bytes from the start of the segment
    key: BlobKey | None = None
    nbytes: int = 0  # blob length (<= slot_bytes)
    generation: int = 0  # incremented at every new content
    state: SlotState = SlotState.FREE
    pins: int = 0  # leases + in-flight reads; > 0: never overwritten
    hinted: bool = False  # filled for a store hint and not read since: other hints may not evict it
    hint_unread: bool = False  # filled for a store hint, not read yet (counts hints_used, hints_wasted)


@dataclass
class Lease:
    lease_id: int
    client_id: str
    slot: Slot
    generation: int  # the slot's generation when granted
    expires_at: float  # clock() seconds
    ttl_ms: int


@dataclass
class RamCounters:
    promotions: int = 0  # NVMe -> RAM copies after start-up
    evictions: int = 0  # slots given to another blob
    leases_granted: int = 0
    leases_expired: int = 0  # ended by TTL rather than release
    directory_refreshes: int = 0  # slots spared at eviction because a worker read them through the directory
    hints_used: int = 0  # slots filled for a hint that a fetch or a directory copy then read
    hints_wasted: int = 0  # slots filled for a hint that were evicted before anyone read them


def slot_bytes_for(blob_nbytes: Iterable[int]) -> int:
    """Slot size: the largest blob, rounded up to 4 KiB (so every slot starts page-aligned)."""
    return align_up(max(blob_nbytes, default=0), ALIGNMENT)


class RamTier:
    """Slots in one shared-memory segment; `RamTier.create` makes the segment, `close` unlinks it."""

    def __init__(self, segment: SharedMemory | None, slot_bytes: int, num_slots: int,
                 clock: Callable[[], float] = time.monotonic):
        self.segment = segment
        self.segment_name = segment.name if segment is not None else ""
        self.slot_bytes = slot_bytes
        self.capacity_bytes = slot_bytes * num_slots
        self.stats = TierStats()
        self.counters = RamCounters()
        self._clock = clock
        self._buf = segment.buf if segment is not None else memoryview(bytearray(0))
        self.slots = [Slot(i, i * slot_bytes) for i in range(num_slots)]
        self._free: list[Slot] = list(reversed(self.slots))  # pop() gives slot 0 first
        self._where: dict[BlobKey, Slot] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # READY slots, least recently used first
        self._leases: dict[int, Lease] = {}
        self._by_client: dict[str, set[int]] = {}
        self._expiry: list[tuple[float, int]] = []  # heap of (expires_at, lease_id)
        self.max_leases_per_client = 0  # 0: no cap
        self.directory: SlotDirectory | None = None  # set by `open_directory`: rows follow commit and evict

    @classmethod
    def create(cls, ram_bytes: int, slot_bytes: int, max_slots: int,
               clock: Callable[[], float] = time.monotonic) -> "RamTier":
        """A segment of as many slots as fit in ram_bytes (at most max_slots); none for 0 slots.

        The segment's pages are reserved up front (posix_fallocate), so a /dev/shm too small for
        it fails here with a clear error instead of a SIGBUS at the first write into a slot.
        """
        num = min(ram_bytes // slot_bytes, max_slots) if slot_bytes else 0
        if num <= 0:
            return cls(None, slot_bytes, 0, clock)
        size = num * slot_bytes
        segment = SharedMemory(name=shm.new_segment_name(), create=True, size=size)
        try:
            fd = getattr(segment, "_fd", -1)
            if fd >= 0:
                os.posix_fallocate(fd, 0, size)
        except OSError as e:
            segment.close()
            segment.unlink()
            raise FateError(
                f"cannot reserve {size} bytes of shared memory in {shm.SHM_DIR} ({e.strerror}): lower --ram-bytes "
                f"or give /dev/shm more room"
            ) from None
        return cls(segment, slot_bytes, num, clock)

    # -- description --------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return bool(self.slots)

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def resident_count(self) -> int:
        return len(self._where)

    @property
    def used_bytes(self) -> int:
        """Bytes of the slots that hold a blob (whole slots)."""
        return len(self._where) * self.slot_bytes

    @property
    def leases_active(self) -> int:
        return len(self._leases)

    def resident(self, key: BlobKey) -> bool:
        return key in self._where

    # -- slots --------------------------------------------------------------------------------

    def lookup(self, key: BlobKey, read: bool = True) -> Slot | None:
        """The READY slot holding `key` (now most recently used), or None; read=False: a hint's own look."""
        slot = self._where.get(key)
        if slot is not None:
            self._lru.move_to_end(slot.index)
            if read:
                self._was_read(slot)
        return slot

    def _was_read(self, slot: Slot) -> None:
        self.counters.hints_used += slot.hint_unread
        slot.hinted = slot.hint_unread = False

    def pin(self, slot: Slot) -> None:
        slot.pins += 1

    def unpin(self, slot: Slot) -> None:
        if slot.pins <= 0:
            raise RuntimeError(f"slot {slot.index} unpinned more often than pinned")  # a bug
        slot.pins -= 1

    def reserve(self, key: BlobKey, hint: bool = False) -> Slot | None:
        """A slot to copy `key` into (FILLING): a free one, else the LRU unpinned one; None if all are held.
        hint: for a store hint, which may not evict an unread hinted slot (None if only those are left)."""
        self.expire_leases()
        if self._free:
            slot = self._free.pop()
        else:
            slot = self._victim(hint)
            if slot is None:
                return None
            self._evict(slot)
            self.counters.evictions += 1
        slot.state, slot.key, slot.nbytes = SlotState.FILLING, key, 0
        return slot

    def _victim(self, hint: bool = False) -> Slot | None:
        """The least recently used unpinned READY slot, counting reads through the slot directory.

        Workers copy resident blobs through the directory without telling the store, so recency from
        `lookup` alone would evict the experts they use most. Second chance: walking from the least
        recently used end, a slot read since the store last looked moves to the most recently used end
        instead (each read saves a slot once: amortised O(1) per eviction); if every unpinned slot was
        read, the least recently used of them goes. Hinted slots: a hint's walk passes over them; a
        fetch's walk gives them one second chance, which ends their protection (wrong guesses age out).
        """
        d, refreshed, victim, aged = self.directory, [], None, []
        for i in self._lru:
            s = self.slots[i]
            if s.pins:
                continue
            if d is not None and s.key is not None and d.read_since(s.key):
                refreshed.append(i)
                self._was_read(s)
            elif s.hinted:
                aged += [] if hint else [i]  # a hint passes over it; a fetch gives it its last chance
            else:
                victim = s
                break
        for i in refreshed + aged:
            self._lru.move_to_end(i)
            self.slots[i].hinted = False
        self.counters.directory_refreshes += len(refreshed)
        if victim is None and refreshed + aged:
            victim = next((s for s in map(self.slots.__getitem__, self._lru) if not s.pins and not s.hinted), None)
        return victim

    def write(self, slot: Slot, src: memoryview | bytes) -> None:
        """Copy a blob into a FILLING slot (any thread); then `commit`."""
        self.fill_view(slot)[: len(src)] = src
        slot.nbytes = len(src)

    def fill_view(self, slot: Slot) -> memoryview:
        """The whole of a FILLING slot, to read a blob into (any thread); set `slot.nbytes`, then `commit`."""
        if slot.state is not SlotState.FILLING:
            raise RuntimeError(f"slot {slot.index}: filled in state {slot.state}")  # a bug
        return self._buf[slot.offset : slot.offset + self.slot_bytes]

    def commit(self, slot: Slot, promotion: bool = True, hinted: bool = False) -> None:
        """The copy into `slot` is complete: it becomes visible (new generation, most recently used)."""
        if slot.state is not SlotState.FILLING or slot.key is None or not 0 < slot.nbytes <= self.slot_bytes:
            raise RuntimeError(f"slot {slot.index}: commit in state {slot.state} with {slot.nbytes} bytes")  # a bug
        slot.generation += 1
        slot.state, slot.hinted, slot.hint_unread = SlotState.READY, hinted, hinted
        self._where[slot.key] = slot
        self._lru[slot.index] = None
        self._lru.move_to_end(slot.index)
        if self.directory is not None:
            self.directory.publish(slot.key, slot.offset, slot.nbytes)
        if promotion:
            self.counters.promotions += 1

    def abort(self, slot: Slot) -> None:
        """A copy that failed: the slot is free again."""
        if slot.state is SlotState.FILLING:
            slot.state, slot.key, slot.nbytes = SlotState.FREE, None, 0
            self._free.append(slot)

    def view(self, slot: Slot) -> memoryview:
        return self._buf[slot.offset : slot.offset + slot.nbytes]

    def _evict(self, slot: Slot) -> None:
        if slot.key is not None:
            self._where.pop(slot.key, None)
            if self.directory is not None:  # before any byte of the slot changes: readers notice the reuse
                self.directory.withdraw(slot.key)
        self._lru.pop(slot.index, None)
        self.counters.hints_wasted += slot.hint_unread
        slot.state, slot.key, slot.nbytes, slot.hinted, slot.hint_unread = SlotState.FREE, None, 0, False, False

    def fill(self, keys: Iterable[BlobKey], load: Callable[[BlobKey, memoryview], int],
             should_stop: Callable[[], bool] = lambda: False) -> int:
        """Start-up fill in hotness order (hottest first) until the free slots run out; blocking.

        `load(key, slot_view)` reads the blob into the slot and returns its length (0: leave this
        key out). The first key
        ends up most recently used, so the coldest of the fill is evicted first.
        """
        filled: list[Slot] = []
        for key in keys:
            if not self._free or should_stop():
                break
            if key in self._where:
                continue
            slot = self.reserve(key)
            if slot is None:
                break
            try:
                with no_views_in_tracebacks():
                    slot.nbytes = load(key, self.fill_view(slot))
                if slot.nbytes == 0:  # the loader left this one out
                    self.abort(slot)
                    continue
                self.commit(slot, promotion=False)
            except BaseException:
                self.abort(slot)
                raise
            filled.append(slot)
        for slot in reversed(filled):
            self._lru.move_to_end(slot.index)
        return len(filled)

    def open_directory(self, keys: Iterable[BlobKey]) -> str:
        """Create the slot directory over `keys` (every served blob) and publish what is resident; its name."""
        if self.directory is None and self.enabled:
            self.directory = SlotDirectory(keys)
            for key, slot in self._where.items():
                self.directory.publish(key, slot.offset, slot.nbytes)
        return self.directory.name if self.directory is not None else ""

    # -- leases -------------------------------------------------------------------------------

    def lease(self, slot: Slot, client_id: str, ttl_ms: int) -> Lease:
        """Pin a READY slot for `client_id` until released or `ttl_ms` passed."""
        if slot.state is not SlotState.READY:
            raise RuntimeError(f"slot {slot.index}: lease in state {slot.state}")  # a bug
        held = self._by_client.get(client_id, ())
        if self.max_leases_per_client and len(held) >= self.max_leases_per_client:
            raise LeaseLimitError(f"this client holds {len(held)} leases (max_leases_per_client "
                                  f"{self.max_leases_per_client}): release leases before asking for more")
        lease_id = secrets.randbits(63) or 1
        while lease_id in self._leases:
            lease_id = secrets.randbits(63) or 1
        lease = Lease(lease_id, client_id, slot, slot.generation, self._clock() + ttl_ms / 1000, ttl_ms)
        slot.pins += 1
        self._leases[lease.lease_id] = lease
        self._by_client.setdefault(client_id, set()).add(lease.lease_id)
        heapq.heappush(self._expiry, (lease.expires_at, lease.lease_id))
        self.counters.leases_granted += 1
        return lease

    def release(self, client_id: str, lease_ids: Iterable[int] = (), release_all: bool = False) -> tuple[int, int]:
        """End leases of `client_id` (the given ids, or all of them); returns (released, unknown).

        An id that is not held by this client (expired, released, another client's) is unknown.
        """
        self.expire_leases()
        held = self._by_client.get(client_id, set())
        ids = list(held) if release_all else list(lease_ids)
        released = unknown = 0
        for lease_id in ids:
            if lease_id in held and lease_id in self._leases:
                self._end(self._leases[lease_id])
                released += 1
            else:
                unknown += 1
        return released, unknown

    def expire_leases(self) -> int:
        """End every lease past its expiry time; returns how many."""
        now, n = self._clock(), 0
        while self._expiry and self._expiry[0][0] <= now:
            _, lease_id = heapq.heappop(self._expiry)
            lease = self._leases.get(lease_id)
            if lease is not None:
                self._end(lease)
                self.counters.leases_expired += 1
                n += 1
        return n

    def _end(self, lease: Lease) -> None:
        del self._leases[lease.lease_id]
        ids = self._by_client.get(lease.client_id)
        if ids is not None:
            ids.discard(lease.lease_id)
            if not ids:
                del self._by_client[lease.client_id]
        self.unpin(lease.slot)

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap and UNLINK the segment (idempotent). Workers' mappings stay valid until they close them."""
        if self.directory is not None:
            self.directory.close()
        segment, self.segment = self.segment, None
        if segment is None:
            return
        self._buf.release()
        try:
            segment.close()
        except BufferError:
            logger.warning("shared-memory segment %s still has views in this process; unlinking anyway",
                           segment.name)
        finally:
            try:
                segment.unlink()
            except FileNotFoundError:
                pass


__all__ = [
    "BlobKey", "ExpertId", "Lease", "LeaseLimitError", "NvmeTier", "RamTier", "Slot", "SlotState", "Tier", "TierStats",
    "slot_bytes_for", "no_views_in_tracebacks",
]
