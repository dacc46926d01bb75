"""The store server: `ExpertStore` (proto/moe/v1/store.proto) on grpc.aio and uvloop.

    python -m expert_store serve PACK --listen unix:/run/fate-moe/store.sock --ram-bytes 4GiB

Layout: `StoreCore` is the domain (pack, tiers, I/O scheduling, counters) and
never sees protobuf; `ExpertStoreServicer` converts at the edge; `run_store`
wires the gRPC server, health service, signals and sd_notify.

Start-up: bind and answer health NOT_SERVING at once, then verify every served
blob and the dense file, create and fill the RAM tier, and only then say
SERVING (for "" and "moe.v1.ExpertStore"), log "ready: listening on ...", and
sd_notify READY=1. Store RPCs before that get UNAVAILABLE.

I/O: every blocking read, copy and compression runs in a small thread pool fed
by a priority queue (demand fetches, then prefetches, then background
promotions), so the event loop never waits for a disk and a prefetch never
delays a demand fetch that arrives after it.

Shutdown (SIGTERM/SIGINT): health NOT_SERVING, sd_notify STOPPING=1, in-flight
RPCs get `grace_s` to finish, then the shared-memory segment is closed and
unlinked (in a `finally`, so also after errors). After a crash (SIGKILL, a
segfault): Python's resource_tracker process, which outlives the store, unlinks
the segment; if it is killed too (SIGKILL to the whole cgroup) the segment
stays in /dev/shm until the next store start removes it
(`shm.remove_stale_segments`), or until reboot.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import inspect
import itertools
import json
import logging
import os
import signal
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import zstandard
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from client.pb import store_pb2, store_pb2_grpc

from . import sdnotify, shm
from .config import StoreConfig
from .errors import ChecksumError, FateError, PackError
from .packfile import Pack
from .tiers import (
    BlobKey, NvmeTier, RamTier, Slot, fill_order, load_popularity, no_views_in_tracebacks, preferred_format,
    slot_bytes_for,
)

logger = logging.getLogger(__name__)

SERVICE_NAME = "moe.v1.ExpertStore"
PRIORITY_DEMAND, PRIORITY_PREFETCH, PRIORITY_BACKGROUND = 0, 1, 2
_LEASE_SWEEP_S = 1.0
_DENSE_SCAN_PIECE = 16 << 20

FORMAT_TO_PB = {
    "bf16": store_pb2.EXPERT_FORMAT_BF16,
    "int8": store_pb2.EXPERT_FORMAT_INT8,
    "int4": store_pb2.EXPERT_FORMAT_INT4,
    "int2": store_pb2.EXPERT_FORMAT_INT2,
}
PB_TO_FORMAT = {v: k for k, v in FORMAT_TO_PB.items()}
T = TypeVar("T")


class InvalidRequest(FateError):
    """A request the store cannot serve as asked (unknown expert or format, empty batch...)."""


class StoreUnavailable(FateError):
    """The store is starting up or shutting down: retry later."""


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """gRPC status of an exception: input errors are the caller's, only bugs are INTERNAL."""
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, ChecksumError):
        return grpc.StatusCode.DATA_LOSS
    if isinstance(exc, StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, FateError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, OSError):  # the disk under the pack failed
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


# -- compression on the wire --------------------------------------------------------------------


def zstd_pays(raw_nbytes: int, compressed_nbytes: int, min_saving: float = 0.1) -> bool:
    """Send compressed only if that saves at least `min_saving` of the bytes (default: < 0.9x raw)."""
    return compressed_nbytes < (1.0 - min_saving) * raw_nbytes


class WireCompression:
    """zstd for chunks, used only where it pays; remembers per blob whether it did.

    A blob none of whose chunks paid is never compressed again (quantized experts mostly don't
    compress: their codes are near-uniform), so incompressible data costs one try, not one per fetch.
    Thread-safe: one compressor per thread.
    """

    def __init__(self, level: int, min_saving: float):
        self.level = level
        self.min_saving = min_saving
        self._paid: dict[Any, bool] = {}
        self._local = threading.local()

    @property
    def enabled(self) -> bool:
        return self.level > 0

    def should_try(self, blob: Any) -> bool:
        return self.enabled and self._paid.get(blob, True)

    def record(self, blob: Any, paid: bool) -> None:
        self._paid[blob] = paid

    def encode(self, raw: bytes) -> tuple[bytes, int]:
        """(data, compression) for one chunk: zstd if it pays, else the raw bytes."""
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=self.level)
        packed = compressor.compress(raw)
        if zstd_pays(len(raw), len(packed), self.min_saving):
            return packed, store_pb2.COMPRESSION_ZSTD
        return raw, store_pb2.COMPRESSION_NONE


# -- blocking work off the event loop -----------------------------------------------------------


class IoScheduler:
    """Runs blocking functions in `threads` threads, lowest priority number first, FIFO within one."""

    def __init__(self, threads: int):
        from concurrent.futures import ThreadPoolExecutor

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


# -- dense tensors ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenseTensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int
    checksum: str  # "crc32:<hex>"


class DenseFile:
    """dense.safetensors read raw: the header gives each tensor's byte range; crc32 per tensor at start-up."""

    def __init__(self, path: Path, expected_crc32: int):
        self.path = path
        self.expected_crc32 = expected_crc32
        self.tensors: dict[str, DenseTensor] = {}  # file order once scanned
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def scan(self) -> None:
        """Parse the header, check the file's crc32 against the manifest, compute per-tensor crc32s (blocking)."""
        head = os.pread(self._fd, 8, 0)
        if len(head) != 8:
            raise PackError(f"{self.path}: too short for a safetensors file; re-pack the checkpoint")
        (header_len,) = struct.unpack("<Q", head)
        try:
            header = json.loads(os.pread(self._fd, header_len, 8))
        except ValueError as e:
            raise PackError(f"{self.path}: unreadable safetensors header ({e}); re-pack the checkpoint") from None
        base = 8 + header_len
        spans = sorted(
            ((base + int(v["data_offsets"][0]), base + int(v["data_offsets"][1]), k, v)
             for k, v in header.items() if k != "__metadata__"),
        )
        file_crc, crcs = 0, [0] * len(spans)
        first, pos = 0, 0
        buf = memoryview(bytearray(_DENSE_SCAN_PIECE))
        while True:
            n = os.preadv(self._fd, [buf], pos)
            if n <= 0:
                break
            piece, end = buf[:n], pos + n
            file_crc = zlib.crc32(piece, file_crc)
            while first < len(spans) and spans[first][1] <= pos:
                first += 1
            j = first
            while j < len(spans) and spans[j][0] < end:
                a, b = max(spans[j][0], pos), min(spans[j][1], end)
                if a < b:
                    crcs[j] = zlib.crc32(piece[a - pos : b - pos], crcs[j])
                j += 1
            pos = end
        if file_crc != self.expected_crc32:
            raise ChecksumError(
                f"{self.path}: checksum mismatch (crc32 {file_crc:#010x}, manifest {self.expected_crc32:#010x}); "
                f"the pack is corrupt, re-pack it"
            )
        self.tensors = {
            name: DenseTensor(name, str(info["dtype"]), tuple(int(d) for d in info["shape"]), a, b - a,
                              f"crc32:{crc:08x}")
            for (a, b, name, info), crc in zip(spans, crcs)
        }

    def read(self, start: int, nbytes: int) -> bytes:
        data = os.pread(self._fd, nbytes, start)
        if len(data) != nbytes:
            raise PackError(f"{self.path}: short read at {start} (truncated?); re-pack the checkpoint")
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# -- domain results (converted to protobuf at the edge) -----------------------------------------


@dataclass(frozen=True)
class ExpertPiece:
    """One chunk of one expert of a FetchExperts reply."""

    index: int
    key: BlobKey
    total_bytes: int
    offset: int
    data: bytes
    compression: int  # store_pb2.Compression value
    raw_nbytes: int
    last: bool
    tier: int  # store_pb2.StoreTier value
    checksum: str  # on the last chunk only


@dataclass(frozen=True)
class ShmGrant:
    index: int
    key: BlobKey
    offset: int
    nbytes: int
    lease_id: int
    generation: int
    ttl_ms: int
    tier: int
    checksum: str


@dataclass
class StoreCounters:
    fetch_requests: int = 0
    experts_served_grpc: int = 0
    experts_served_shm: int = 0
    bytes_served_grpc: int = 0
    bytes_sent_wire: int = 0
    bytes_served_shm: int = 0
    dense_bytes_served: int = 0
    prefetch_hints: int = 0
    prefetch_promotions: int = 0
    checksum_failures: int = 0


@dataclass
class _Planned:
    """One expert of a FetchExperts request on its way out."""

    index: int
    key: BlobKey
    nbytes: int
    slot: Slot | None  # pinned RAM slot (until its last chunk is out), or None: read from NVMe
    try_zstd: bool
    tier: int = store_pb2.STORE_TIER_NVME
    read_ns: int = 0
    wire_bytes: int = 0
    compressed_chunks: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)


# -- the store ----------------------------------------------------------------------------------


class StoreCore:
    """Pack + tiers + I/O scheduling + counters; needs a running event loop."""

    def __init__(self, pack: Pack, config: StoreConfig):
        self.pack = pack
        self.config = config
        self.args = pack.args
        self.formats = self._served_formats(pack, config)
        self.blob_nbytes = {f: pack.expert_nbytes(f) for f in self.formats}
        self.preferred = preferred_format(self.formats, self.blob_nbytes, config.preferred_format)
        self.popularity = load_popularity(config.popularity, self.args) if config.popularity else None
        self.pack_id = hashlib.sha256((pack.path / "manifest.json").read_bytes()).hexdigest()
        self.manifest_json = (pack.path / "manifest.json").read_bytes()
        self.host_id = shm.host_id()
        self.nvme = NvmeTier(pack, self.formats)
        self.dense = DenseFile(pack.path / pack.manifest["dense"]["file"], int(pack.manifest["dense"]["crc32"]))
        self.ram = RamTier(None, slot_bytes_for(self.blob_nbytes.values()), 0)
        self.wire = WireCompression(config.zstd_level, config.zstd_min_saving)
        self.counters = StoreCounters()
        self.io = IoScheduler(config.io_threads)
        self.ready = False
        self.started_at = time.monotonic()
        self.stop_requested = threading.Event()  # read by start-up threads, so a SIGTERM ends them early
        self._moe_layers = set(self.args.moe_layers)
        self._promotions: dict[BlobKey, asyncio.Task[None]] = {}
        self._prefetch_queue: asyncio.Queue[tuple[BlobKey, bool]] = asyncio.Queue(max(config.prefetch_queue, 1))
        self._queued: set[BlobKey] = set()
        self._tasks: list[asyncio.Task[None]] = []

    @staticmethod
    def _served_formats(pack: Pack, config: StoreConfig) -> tuple[str, ...]:
        if not config.formats:
            return pack.formats
        missing = [f for f in config.formats if f not in pack.formats]
        if missing:
            raise FateError(f"format(s) {', '.join(missing)} not in the pack {pack.path} (it has "
                            f"{', '.join(pack.formats)}); choose --formats among those")
        return tuple(dict.fromkeys(config.formats))

    # -- start-up and shutdown ----------------------------------------------------------------

    async def start(self) -> None:
        """Verify, scan the dense file, create and fill the RAM tier; then `ready` (UNAVAILABLE before)."""
        cfg, t0 = self.config, time.perf_counter()
        if cfg.verify_on_start:
            total = self.nvme.blob_count
            logger.info("verifying %d expert blobs (%s) of %s", total, ", ".join(self.formats), self.pack.path)
            sdnotify.status("verifying the pack")
            problems = await asyncio.to_thread(self.nvme.verify_all, self.stop_requested.is_set, _Progress(total))
            if problems:
                raise PackError(f"{self.pack.path}: {len(problems)} corrupt expert blob(s), e.g. {problems[0]}; "
                                f"re-pack the checkpoint")
        await asyncio.to_thread(self.dense.scan)
        if cfg.verify_on_start:
            logger.info("verified %d expert blobs and the dense file in %.1f s", self.nvme.blob_count,
                        time.perf_counter() - t0)
        if self.stop_requested.is_set():
            return
        max_slots = self.nvme.blob_count
        self.ram = await asyncio.to_thread(RamTier.create, cfg.ram_bytes, self.ram.slot_bytes, max_slots)
        if cfg.ram_bytes and not self.ram.enabled:
            logger.warning("--ram-bytes %d is less than one slot (%d bytes): RAM tier off, NVMe only",
                           cfg.ram_bytes, self.ram.slot_bytes)
        if self.ram.enabled:
            order = fill_order(self.args, self.formats, self.blob_nbytes, self.preferred, self.popularity)
            filled = await asyncio.to_thread(self.ram.fill, order, self._fill_blob, self.stop_requested.is_set)
            logger.info("RAM tier: segment %s, %d slots of %d bytes (%.1f MiB), filled with %d blobs (%s first%s)",
                        self.ram.segment_name, self.ram.num_slots, self.ram.slot_bytes,
                        self.ram.capacity_bytes / 2**20, filled, self.preferred,
                        ", popularity profile order" if self.popularity else ", shallow layers first")
        if cfg.cold:
            self.nvme.drop_page_cache()
        self._tasks.append(asyncio.create_task(self._sweep_leases(), name="lease-sweeper"))
        for i in range(min(2, cfg.io_threads)):
            self._tasks.append(asyncio.create_task(self._prefetch_worker(), name=f"prefetch-{i}"))
        self.ready = not self.stop_requested.is_set()
        logger.debug("start-up took %.2f s", time.perf_counter() - t0)

    async def close(self) -> None:
        """Stop background work, wait for I/O threads, unlink the segment, close files (idempotent)."""
        self.ready = False
        self.stop_requested.set()
        for t in self._tasks + list(self._promotions.values()):
            t.cancel()
        await asyncio.gather(*self._tasks, *self._promotions.values(), return_exceptions=True)
        self._tasks.clear()
        try:
            await self.io.close()
        finally:
            self.ram.close()
            self.nvme.close()
            self.dense.close()

    def _load_blob(self, key: BlobKey, dest: memoryview) -> int:
        """Read a blob into a slot (I/O thread); its length."""
        self.nvme.read_into(key, dest)
        return self.nvme.ref(key).nbytes

    def _fill_blob(self, key: BlobKey, dest: memoryview) -> int:
        """`_load_blob` for the start-up fill: a corrupt blob is left out (0), not a reason to stop."""
        try:
            return self._load_blob(key, dest)
        except ChecksumError as e:
            self.counters.checksum_failures += 1
            logger.error("%s (left out of the RAM tier; fetching it answers DATA_LOSS)", e)
            return 0

    def _require_ready(self) -> None:
        if not self.ready:
            raise StoreUnavailable("the store is starting up or shutting down; retry when health says SERVING")

    # -- requests -----------------------------------------------------------------------------

    def check_key(self, key: BlobKey, where: str) -> BlobKey:
        if key.fmt not in self.formats:
            raise InvalidRequest(f"{where}: format {key.fmt} is not served here (serving: {', '.join(self.formats)})")
        if key.layer not in self._moe_layers:
            raise InvalidRequest(f"{where}: layer {key.layer} is not an MoE layer (MoE layers: "
                                 f"{list(self.args.moe_layers)})")
        if not 0 <= key.expert < self.args.num_experts:
            raise InvalidRequest(f"{where}: expert {key.expert} does not exist (layer {key.layer} has experts "
                                 f"0..{self.args.num_experts - 1})")
        return key

    async def fetch(self, keys: Sequence[BlobKey], priority: int, accept_zstd: bool,
                    chunk_bytes: int) -> AsyncIterator[ExpertPiece]:
        """The blobs' bytes in chunks: RAM-tier hits first, then NVMe reads; a few chunks read ahead."""
        self._require_ready()
        if not keys:
            raise InvalidRequest("no experts in the request")
        self.counters.fetch_requests += 1
        chunk = self._chunk_size(chunk_bytes)
        plan: list[_Planned] = []
        for i, key in enumerate(keys):
            slot = self.ram.lookup(key) if self.ram.enabled else None
            if slot is not None:
                self.ram.pin(slot)
            n = self.blob_nbytes[key.fmt]
            p = _Planned(i, key, n, slot, accept_zstd and self.wire.should_try(key))
            p.tier = store_pb2.STORE_TIER_RAM if slot is not None else store_pb2.STORE_TIER_NVME
            p.ranges = [(a, min(chunk, n - a)) for a in range(0, n, chunk)]
            plan.append(p)
        plan.sort(key=lambda p: p.slot is None)  # stable: RAM hits first, each group in request order
        window = max(2, self.config.io_threads)
        jobs = ((p, a, n) for p in plan for a, n in p.ranges)
        pending: collections.deque[tuple[_Planned, int, int, asyncio.Future[tuple[bytes, int, int]]]] = (
            collections.deque())
        try:
            while True:
                while len(pending) < window:
                    job = next(jobs, None)
                    if job is None:
                        break
                    p, a, n = job
                    pending.append((p, a, n, self._chunk_job(p, a, n, priority)))
                if not pending:
                    break
                p, a, n, fut = pending.popleft()
                try:
                    data, compression, ns = await fut
                except ChecksumError:
                    self.counters.checksum_failures += 1
                    raise
                p.read_ns += ns
                p.wire_bytes += len(data)
                p.compressed_chunks += compression == store_pb2.COMPRESSION_ZSTD
                last = a + n == p.nbytes
                if last:
                    self._finish_grpc(p)
                    if p.slot is not None:  # all its bytes are copied out: the slot may go
                        self.ram.unpin(p.slot)
                        p.slot = None
                yield ExpertPiece(p.index, p.key, p.nbytes, a, data, compression, n, last, p.tier,
                                  self.nvme.checksum(p.key) if last else "")
        finally:
            for _, _, _, fut in pending:
                fut.cancel()
            for p in plan:
                if p.slot is not None:
                    self.ram.unpin(p.slot)
                    p.slot = None

    def _chunk_job(self, p: _Planned, start: int, nbytes: int, priority: int) -> asyncio.Future[tuple[bytes, int, int]]:
        if p.slot is not None and not p.try_zstd:  # a memcpy of resident bytes: no thread needed
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(self._read_chunk(p.key, p.slot, start, nbytes, False))
            return fut
        return asyncio.ensure_future(self.io.run(priority, self._read_chunk, p.key, p.slot, start, nbytes, p.try_zstd))

    def _read_chunk(self, key: BlobKey, slot: Slot | None, start: int, nbytes: int,
                    try_zstd: bool) -> tuple[bytes, int, int]:
        """(data, compression, read ns) of one chunk (an I/O thread, or the loop for RAM copies)."""
        t0 = time.perf_counter_ns()
        if slot is not None:
            raw = bytes(self.ram.view(slot)[start : start + nbytes])
        else:
            if start == 0:
                self.nvme.will_need(key)  # the kernel reads the rest of the blob ahead of our preads
                self.nvme.verify_blob(key)  # before any of its bytes leave; no-op once verified
            raw = self.nvme.read_range(key, start, nbytes)
        ns = time.perf_counter_ns() - t0
        if try_zstd:
            data, compression = self.wire.encode(raw)
            return data, compression, ns
        return raw, store_pb2.COMPRESSION_NONE, ns

    def _finish_grpc(self, p: _Planned) -> None:
        tier = self.ram if p.tier == store_pb2.STORE_TIER_RAM else self.nvme
        tier.stats.add(p.nbytes, p.read_ns)
        self.counters.experts_served_grpc += 1
        self.counters.bytes_served_grpc += p.nbytes
        self.counters.bytes_sent_wire += p.wire_bytes
        if p.try_zstd:
            self.wire.record(p.key, p.compressed_chunks > 0)
        if p.tier == store_pb2.STORE_TIER_NVME and self.ram.enabled and self.config.promote_on_grpc_miss:
            self._enqueue_promotion(p.key, background=True)

    async def fetch_shm(self, keys: Sequence[BlobKey], priority: int, client_id: str,
                        ttl_ms: int) -> tuple[list[ShmGrant], list[int]]:
        """Lease every blob in the RAM tier (promoting what is not there); (grants, unavailable indices)."""
        self._require_ready()
        if not keys:
            raise InvalidRequest("no experts in the request")
        if not client_id:
            raise InvalidRequest("client_id is required: leases belong to a client (ReleaseLeases names it)")
        self.counters.fetch_requests += 1
        if not self.ram.enabled:
            return [], list(range(len(keys)))
        ttl = min(ttl_ms or self.config.lease_ttl_ms, self.config.max_lease_ttl_ms)
        grants: list[ShmGrant] = []
        missing: list[tuple[int, BlobKey]] = []
        try:
            for i, key in enumerate(keys):  # resident ones first, leased at once, so promotions cannot evict them
                slot = self.ram.lookup(key)
                if slot is None:
                    missing.append((i, key))
                else:
                    self.ram.stats.add(slot.nbytes, 0)
                    grants.append(self._grant(i, key, slot, ttl, client_id, store_pb2.STORE_TIER_RAM))
            acquiring = [asyncio.ensure_future(self._acquire(key, priority)) for _, key in missing]
            try:
                await asyncio.gather(*acquiring, return_exceptions=True)
            except BaseException:  # cancelled (the client went away): give back the pins already taken
                for t in acquiring:
                    if t.done() and not t.cancelled() and t.exception() is None and t.result()[0] is not None:
                        self.ram.unpin(t.result()[0])
                raise
            unavailable: list[int] = []
            failure: BaseException | None = None
            for (i, key), t in zip(missing, acquiring):
                if t.exception() is not None:
                    failure = failure or t.exception()
                    continue
                slot, promoted = t.result()
                if slot is None:
                    unavailable.append(i)
                    continue
                if promoted:
                    self.nvme.stats.add(0, 0)  # its bytes and read time were counted by the promotion
                else:
                    self.ram.stats.add(slot.nbytes, 0)
                tier = store_pb2.STORE_TIER_NVME if promoted else store_pb2.STORE_TIER_RAM
                grants.append(self._grant(i, key, slot, ttl, client_id, tier))
                self.ram.unpin(slot)  # the lease holds it now
            if failure is not None:
                raise failure
        except BaseException:
            self.ram.release(client_id, [g.lease_id for g in grants])  # the client never learns of them
            raise
        grants.sort(key=lambda g: g.index)
        return grants, sorted(unavailable)

    def _grant(self, index: int, key: BlobKey, slot: Slot, ttl_ms: int, client_id: str, tier: int) -> ShmGrant:
        lease = self.ram.lease(slot, client_id, ttl_ms)
        self.counters.experts_served_shm += 1
        self.counters.bytes_served_shm += slot.nbytes
        return ShmGrant(index, key, slot.offset, slot.nbytes, lease.lease_id, slot.generation, ttl_ms, tier,
                        self.nvme.checksum(key))

    async def _acquire(self, key: BlobKey, priority: int) -> tuple[Slot | None, bool]:
        """(the blob's slot, pinned; or None when every slot is held, promoted: it came from NVMe now)."""
        promoted = False
        for _ in range(4):  # a slot promoted for us can be evicted before we run again: look once more
            slot = self.ram.lookup(key)
            if slot is not None:
                self.ram.pin(slot)
                return slot, promoted
            task = self._promotions.get(key)
            if task is None:
                target = self.ram.reserve(key)
                if target is None:
                    return None, promoted
                task = asyncio.create_task(self._promote(key, target, priority))
                self._promotions[key] = task
                task.add_done_callback(functools.partial(self._promotion_done, key))
            await asyncio.shield(task)
            promoted = True
        return None, promoted

    def _promotion_done(self, key: BlobKey, task: asyncio.Task[None]) -> None:
        if self._promotions.get(key) is task:
            del self._promotions[key]
        if not task.cancelled() and isinstance(task.exception(), ChecksumError):
            self.counters.checksum_failures += 1

    async def _promote(self, key: BlobKey, slot: Slot, priority: int) -> None:
        """Copy a blob from NVMe into its reserved slot (not cancelled by a requester going away)."""
        try:
            ns = await self.io.run(priority, self._timed_load, key, slot)
        except asyncio.CancelledError:
            raise  # shutdown: the slot stays FILLING (a thread may still write it); the segment goes anyway
        except BaseException:
            self.ram.abort(slot)
            raise
        self.ram.commit(slot)
        self.nvme.stats.add(slot.nbytes, ns, hits=0)  # the requesters count their hits

    def _timed_load(self, key: BlobKey, slot: Slot) -> int:
        t0 = time.perf_counter_ns()
        with no_views_in_tracebacks():
            slot.nbytes = self._load_blob(key, self.ram.fill_view(slot))
        return time.perf_counter_ns() - t0

    def release(self, client_id: str, lease_ids: Sequence[int], release_all: bool) -> tuple[int, int]:
        self._require_ready()
        if not client_id:
            raise InvalidRequest("client_id is required (the client the leases were granted to)")
        if not release_all and not lease_ids:
            raise InvalidRequest("no lease ids (give lease_ids, or all = true)")
        return self.ram.release(client_id, lease_ids, release_all)

    def prefetch(self, keys: Sequence[BlobKey]) -> tuple[int, int, int]:
        """Queue promotions; (accepted, already resident, dropped). Never waits for a read."""
        self._require_ready()
        if not keys:
            raise InvalidRequest("no experts in the request")
        self.counters.prefetch_hints += len(keys)
        accepted = resident = dropped = 0
        for key in keys:
            if self.ram.resident(key):
                resident += 1
            elif self._enqueue_promotion(key, background=False):
                accepted += 1
            else:
                dropped += 1
        return accepted, resident, dropped

    def _enqueue_promotion(self, key: BlobKey, background: bool) -> bool:
        if not self.ram.enabled or self.config.prefetch_queue == 0:
            return False
        if key in self._queued or key in self._promotions:
            return True
        try:
            self._prefetch_queue.put_nowait((key, background))
        except asyncio.QueueFull:
            return False
        self._queued.add(key)
        return True

    async def _prefetch_worker(self) -> None:
        while True:
            key, background = await self._prefetch_queue.get()
            self._queued.discard(key)
            try:
                slot, promoted = await self._acquire(key, PRIORITY_BACKGROUND if background else PRIORITY_PREFETCH)
                if slot is not None:
                    self.ram.unpin(slot)
                    if promoted and not background:
                        self.counters.prefetch_promotions += 1
            except FateError as e:
                logger.warning("promotion of layer %d expert %d %s failed: %s", key.layer, key.expert, key.fmt, e)
            except Exception:
                logger.exception("promotion of %s failed (a bug)", key)

    async def _sweep_leases(self) -> None:
        while True:
            await asyncio.sleep(_LEASE_SWEEP_S)
            if n := self.ram.expire_leases():
                logger.debug("%d lease(s) expired", n)

    def _chunk_size(self, asked: int) -> int:
        return max(4096, min(asked or self.config.chunk_bytes, self.config.max_chunk_bytes))

    # -- dense and files ------------------------------------------------------------------------

    def dense_tensors(self, names: Sequence[str]) -> list[DenseTensor]:
        self._require_ready()
        if not names:
            return list(self.dense.tensors.values())
        unknown = [n for n in names if n not in self.dense.tensors]
        if unknown:
            raise InvalidRequest(f"no dense tensor(s) {', '.join(map(repr, unknown[:5]))} in this pack "
                                 f"(GetManifest's manifest_json lists them)")
        return [self.dense.tensors[n] for n in dict.fromkeys(names)]

    async def dense_chunks(self, t: DenseTensor, chunk_bytes: int,
                           accept_zstd: bool) -> AsyncIterator[tuple[int, bytes, int, int]]:
        """(offset, data, compression, raw length) of one tensor, in order; at least one (empty) chunk."""
        chunk = self._chunk_size(chunk_bytes)
        try_zstd = accept_zstd and self.wire.should_try(("dense", t.name))
        paid = False
        for a in range(0, max(t.nbytes, 1), chunk):
            n = min(chunk, t.nbytes - a)
            raw = await self.io.run(PRIORITY_DEMAND, self.dense.read, t.start + a, n) if n else b""
            data, compression = raw, store_pb2.COMPRESSION_NONE
            if try_zstd and n:
                data, compression = await self.io.run(PRIORITY_DEMAND, self.wire.encode, raw)
                paid |= compression == store_pb2.COMPRESSION_ZSTD
            self.counters.dense_bytes_served += n
            yield a, data, compression, n
        if try_zstd:
            self.wire.record(("dense", t.name), paid)

    def file_path(self, name: str) -> Path:
        files = self.pack.manifest.get("tokenizer_files") or []
        if name not in files:
            raise InvalidRequest(f"no file {name!r} in this pack (it has: {', '.join(files) or 'none'})")
        return self.pack.path / name


class _Progress:
    """Start-up progress in the log and the systemd status line, every few seconds (called from a thread)."""

    def __init__(self, total: int, every_s: float = 5.0):
        self.total, self.every_s = total, every_s
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            pct = done * 100 // max(total, 1)
            logger.info("verified %d/%d blobs (%d%%, %.0f s)", done, total, pct, now - self.t0)
            sdnotify.status(f"verifying the pack: {pct}%")


# -- the gRPC edge ------------------------------------------------------------------------------


def _key_from_pb(k: store_pb2.ExpertKey, where: str) -> BlobKey:
    fmt = PB_TO_FORMAT.get(k.format)
    if fmt is None:
        name = store_pb2.ExpertFormat.Name(k.format) if k.format in store_pb2.ExpertFormat.values() else str(k.format)
        raise InvalidRequest(f"{where}: format {name} is not a stored format (set one of "
                             f"{', '.join(store_pb2.ExpertFormat.Name(v) for v in FORMAT_TO_PB.values())})")
    return BlobKey(k.layer, k.expert, fmt)


def _key_to_pb(key: BlobKey) -> store_pb2.ExpertKey:
    return store_pb2.ExpertKey(layer=key.layer, expert=key.expert, format=FORMAT_TO_PB[key.fmt])


def _rpc(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Maps exceptions to status codes (status_code_for) for unary and streaming handlers alike."""
    method = fn.__name__

    async def abort(context: grpc.aio.ServicerContext, e: Exception) -> None:
        code = status_code_for(e)
        if code is grpc.StatusCode.INTERNAL:
            logger.exception("%s: internal error", method)
            message = f"internal error in {method} (a bug; the store log has the traceback): {type(e).__name__}: {e}"
        else:
            logger.info("%s: %s: %s", method, code.name, e)
            message = " ".join(str(e).split())
        await context.abort(code, message)

    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async with aclosing(fn(self, request, context)) as items:
                    async for item in items:
                        yield item
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await abort(context, e)
        return stream

    @functools.wraps(fn)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await abort(context, e)
    return unary


class ExpertStoreServicer(store_pb2_grpc.ExpertStoreServicer):
    """Protobuf in, StoreCore calls, protobuf out."""

    def __init__(self, core: StoreCore):
        self.core = core
        self._manifest: store_pb2.GetManifestResponse | None = None

    def _keys(self, experts: Sequence[store_pb2.ExpertKey]) -> list[BlobKey]:
        if not experts:
            raise InvalidRequest("no experts in the request")
        return [self.core.check_key(_key_from_pb(k, f"experts[{i}]"), f"experts[{i}]") for i, k in enumerate(experts)]

    @_rpc
    async def GetManifest(self, request: store_pb2.GetManifestRequest,
                          context: grpc.aio.ServicerContext) -> store_pb2.GetManifestResponse:
        self.core._require_ready()
        if self._manifest is None:
            self._manifest = manifest_to_pb(self.core)
        return self._manifest

    @_rpc
    async def StreamDense(self, request: store_pb2.StreamDenseRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[store_pb2.DenseChunk]:
        accept_zstd = request.compression == store_pb2.COMPRESSION_ZSTD
        for t in self.core.dense_tensors(list(request.names)):
            first = True
            async for offset, data, compression, raw in self.core.dense_chunks(t, request.chunk_bytes, accept_zstd):
                msg = store_pb2.DenseChunk(
                    name=t.name,
                    chunk=store_pb2.DataChunk(offset_bytes=offset, data=data, compression=compression,
                                              uncompressed_bytes=raw),
                    last=offset + raw >= t.nbytes,
                )
                if first:
                    msg.header.CopyFrom(store_pb2.TensorHeader(name=t.name, dtype=t.dtype, shape=t.shape,
                                                               total_bytes=t.nbytes, checksum=t.checksum))
                    first = False
                yield msg

    @_rpc
    async def StreamFiles(self, request: store_pb2.StreamFilesRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[store_pb2.FileChunk]:
        self.core._require_ready()
        names = list(request.names) or list(self.core.pack.manifest.get("tokenizer_files") or [])
        chunk = self.core._chunk_size(request.chunk_bytes)
        for name in dict.fromkeys(names):
            data = await asyncio.to_thread(self.core.file_path(name).read_bytes)
            for a in range(0, max(len(data), 1), chunk):
                piece = data[a : a + chunk]
                yield store_pb2.FileChunk(
                    name=name, total_bytes=len(data), last=a + chunk >= len(data),
                    chunk=store_pb2.DataChunk(offset_bytes=a, data=piece, uncompressed_bytes=len(piece)),
                )

    @_rpc
    async def FetchExperts(self, request: store_pb2.FetchExpertsRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[store_pb2.ExpertChunk]:
        self.core._require_ready()
        keys = self._keys(request.experts)
        priority = PRIORITY_PREFETCH if request.priority == store_pb2.FETCH_PRIORITY_PREFETCH else PRIORITY_DEMAND
        accept_zstd = request.compression == store_pb2.COMPRESSION_ZSTD
        async with aclosing(self.core.fetch(keys, priority, accept_zstd, request.chunk_bytes)) as pieces:
            async for p in pieces:
                yield store_pb2.ExpertChunk(
                    index=p.index, key=_key_to_pb(p.key), total_bytes=p.total_bytes, last=p.last, tier=p.tier,
                    checksum=p.checksum,
                    chunk=store_pb2.DataChunk(offset_bytes=p.offset, data=p.data, compression=p.compression,
                                              uncompressed_bytes=p.raw_nbytes),
                )

    @_rpc
    async def FetchExpertsShm(self, request: store_pb2.FetchExpertsShmRequest,
                              context: grpc.aio.ServicerContext) -> store_pb2.FetchExpertsShmResponse:
        self.core._require_ready()
        keys = self._keys(request.experts)
        priority = PRIORITY_PREFETCH if request.priority == store_pb2.FETCH_PRIORITY_PREFETCH else PRIORITY_DEMAND
        grants, unavailable = await self.core.fetch_shm(keys, priority, request.client_id, request.lease_ttl_ms)
        ram = self.core.ram
        return store_pb2.FetchExpertsShmResponse(
            descriptors=[
                store_pb2.ShmDescriptor(
                    index=g.index, key=_key_to_pb(g.key), segment_name=ram.segment_name,
                    segment_bytes=ram.capacity_bytes, offset_bytes=g.offset, length_bytes=g.nbytes,
                    lease_id=g.lease_id, generation=g.generation, lease_ttl_ms=g.ttl_ms, tier=g.tier,
                    checksum=g.checksum,
                )
                for g in grants
            ],
            unavailable_indices=unavailable,
        )

    @_rpc
    async def ReleaseLeases(self, request: store_pb2.ReleaseLeasesRequest,
                            context: grpc.aio.ServicerContext) -> store_pb2.ReleaseLeasesResponse:
        released, unknown = self.core.release(request.client_id, list(request.lease_ids), request.all)
        return store_pb2.ReleaseLeasesResponse(released_count=released, unknown_count=unknown)

    @_rpc
    async def Prefetch(self, request: store_pb2.PrefetchRequest,
                       context: grpc.aio.ServicerContext) -> store_pb2.PrefetchResponse:
        self.core._require_ready()
        accepted, resident, dropped = self.core.prefetch(self._keys(request.experts))
        return store_pb2.PrefetchResponse(accepted_count=accepted, already_resident_count=resident,
                                          dropped_count=dropped)

    @_rpc
    async def GetStats(self, request: store_pb2.GetStoreStatsRequest,
                       context: grpc.aio.ServicerContext) -> store_pb2.StoreStats:
        return stats_to_pb(self.core)


def manifest_to_pb(core: StoreCore) -> store_pb2.GetManifestResponse:
    a, m = core.args, core.pack.manifest
    return store_pb2.GetManifestResponse(
        pack_id=core.pack_id,
        pack_format_version=int(m["format_version"]),
        family=a.family,
        model_args_json=json.dumps(a.to_dict()),
        formats=[
            store_pb2.ExpertFormatInfo(format=FORMAT_TO_PB[f], expert_bytes=core.blob_nbytes[f],
                                       group_size=int(m["formats"][f]["group_size"] or 0))
            for f in core.formats
        ],
        num_moe_layers=a.num_moe_layers,
        num_experts=a.num_experts,
        top_k=a.top_k,
        dense_bytes=core.dense.total_bytes,
        tokenizer_files=list(m.get("tokenizer_files") or []),
        manifest_json=core.manifest_json,
        shm_enabled=core.ram.enabled,
        shm_host_id=core.host_id,
        ram_tier_bytes=core.ram.capacity_bytes,
        max_chunk_bytes=core.config.max_chunk_bytes,
    )


def stats_to_pb(core: StoreCore) -> store_pb2.StoreStats:
    """Counters; per tier, `hits` counts experts served from it and `bytes_read` the bytes it supplied
    (NVMe: every byte read for serving or promoting; RAM: bytes copied out or handed out by lease)."""
    ram, nvme, c = core.ram, core.nvme, core.counters
    ram.expire_leases()
    return store_pb2.StoreStats(
        pack_id=core.pack_id,
        uptime_ms=int((time.monotonic() - core.started_at) * 1000),
        tiers=[
            store_pb2.StoreTierStats(tier=store_pb2.STORE_TIER_RAM, capacity_bytes=ram.capacity_bytes,
                                     used_bytes=ram.used_bytes, resident_experts=ram.resident_count,
                                     hits=ram.stats.hits, bytes_read=ram.stats.bytes_read, read_ns=ram.stats.read_ns),
            store_pb2.StoreTierStats(tier=store_pb2.STORE_TIER_NVME, capacity_bytes=nvme.capacity_bytes,
                                     used_bytes=nvme.capacity_bytes, resident_experts=nvme.blob_count,
                                     hits=nvme.stats.hits, bytes_read=nvme.stats.bytes_read,
                                     read_ns=nvme.stats.read_ns),
        ],
        fetch_requests=c.fetch_requests,
        experts_served_grpc=c.experts_served_grpc,
        experts_served_shm=c.experts_served_shm,
        bytes_served_grpc=c.bytes_served_grpc,
        bytes_sent_wire=c.bytes_sent_wire,
        bytes_served_shm=c.bytes_served_shm,
        dense_bytes_served=c.dense_bytes_served,
        promotions=ram.counters.promotions,
        evictions=ram.counters.evictions,
        leases_granted=ram.counters.leases_granted,
        leases_active=ram.leases_active,
        leases_expired=ram.counters.leases_expired,
        prefetch_hints=c.prefetch_hints,
        prefetch_promotions=c.prefetch_promotions,
        checksum_failures=c.checksum_failures,
    )


# -- the process --------------------------------------------------------------------------------


def grpc_options(config: StoreConfig) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second store on the same port must fail, not share it silently
    ]


@dataclass
class RunningStore:
    """A started server (for `serve` and for tests that run the store in their own event loop)."""

    server: grpc.aio.Server
    core: StoreCore
    health: HealthServicer
    address: str  # what clients dial: "127.0.0.1:PORT" or "unix:/path"
    _closed: bool = False

    async def stop(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING, drain in-flight RPCs for grace_s, then free the segment (idempotent)."""
        if self._closed:
            return
        self._closed = True
        grace = self.core.config.grace_s if grace_s is None else grace_s
        try:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace)  # refuses new calls at once; in-flight ones get `grace` seconds
        finally:
            await self.core.close()
            self.core.pack.close()


async def start_store(config: StoreConfig, wait_ready: bool = True) -> RunningStore:
    """Open the pack, bind, start answering (health NOT_SERVING), then start up the store.

    With wait_ready, returns once the store is SERVING (start-up errors raise here, after cleanup).
    """
    removed = shm.remove_stale_segments()
    if removed:
        logger.warning("removed shared-memory segments of dead stores: %s", ", ".join(removed))
    pack = Pack.open(config.pack)
    try:
        core = StoreCore(pack, config)
    except BaseException:
        pack.close()
        raise
    server = grpc.aio.server(options=grpc_options(config))
    health = HealthServicer()
    running = RunningStore(server, core, health, config.listen)
    try:
        for service in ("", SERVICE_NAME):
            await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        store_pb2_grpc.add_ExpertStoreServicer_to_server(ExpertStoreServicer(core), server)
        running.address = _bind(server, config.listen)
        await server.start()
        logger.info("starting: %s on %s (NOT_SERVING until the pack is verified and the RAM tier filled)",
                    pack.path, running.address)
        if wait_ready:
            await finish_start(running)
    except BaseException:
        await running.stop(0)
        raise
    return running


async def finish_start(running: RunningStore) -> None:
    core, t0 = running.core, time.perf_counter()
    await core.start()
    if not core.ready:
        return
    for service in ("", SERVICE_NAME):
        await running.health.set(service, health_pb2.HealthCheckResponse.SERVING)
    ram = core.ram
    ram_text = (f"RAM tier {ram.capacity_bytes} bytes ({ram.num_slots} slots, {ram.resident_count} resident)"
                if ram.enabled else "RAM tier off (NVMe only)")
    logger.info("ready: listening on %s (pack %s, formats %s, %s) after %.1f s",
                running.address, core.pack.path.name, ",".join(core.formats), ram_text, time.perf_counter() - t0)
    sdnotify.ready(f"serving {core.pack.path.name} on {running.address}")


def _bind(server: grpc.aio.Server, listen: str) -> str:
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as e:
        raise FateError(f"cannot listen on {listen}: {e} (in use, or no permission?)") from None
    if port == 0 and not listen.startswith("unix:"):
        raise FateError(f"cannot listen on {listen} (address in use, or no permission?)")
    if listen.startswith("unix:"):
        return listen
    host = listen.rpartition(":")[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        logger.warning("listening on %s: not loopback, and the store has no TLS or authentication", host)
    return f"{host}:{port}"


async def run_until_signalled(config: StoreConfig) -> int:
    """The store's whole life: start, serve until SIGTERM/SIGINT, drain, clean up. Exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait())
    try:
        running = await start_store(config, wait_ready=False)
        try:
            startup = asyncio.create_task(finish_start(running))
            await asyncio.wait({startup, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not startup.done():  # signalled during start-up: its threads check this and end early
                running.core.stop_requested.set()
            await startup  # a start-up error raises here
            await stopper
            logger.info("stopping: draining in-flight calls (up to %.1f s)", config.grace_s)
            sdnotify.stopping("draining")
            await running.stop()
        finally:
            await running.stop(0)  # after an error: still free the segment (a no-op after a clean stop)
    finally:
        stopper.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    logger.info("stopped")
    return 0


def serve(config: StoreConfig) -> int:
    """Run the store on uvloop until SIGTERM/SIGINT; returns the exit status."""
    logging.getLogger("expert_store").setLevel(config.log_level.upper())
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # uvloop is a dependency; stay usable without it
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(run_until_signalled(config))


__all__ = [
    "ExpertStoreServicer", "InvalidRequest", "RunningStore", "StoreCore", "StoreUnavailable", "WireCompression",
    "finish_start", "serve", "start_store", "status_code_for", "zstd_pays",
]
