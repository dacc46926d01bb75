"""The store's domain: the pack, its tiers, I/O scheduling and counters, free of protobuf.

`StoreCore` verifies and maps the pack, fills the RAM tier, and answers fetches (shared-memory
grants under a lease here; bytes in reply messages in grpc_fetch.py), prefetch hints and stats;
the gRPC edge in `server.py` converts to and from protobuf around it.

I/O: every blocking read, copy and compression runs in a small thread pool fed by a
priority queue (demand fetches, then prefetches, then store hints, then background
promotions), so the event loop never waits for a disk and a prefetch never delays a
demand fetch that arrives after it; a promotion a more urgent fetch waits for is boosted.
"""


from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import sdnotify, shm
from .config import StoreConfig
from .dense import DenseFile, DenseTensor
from .errors import ChecksumError, FateError, PackError
from .io_scheduler import PRIORITY_BACKGROUND, PRIORITY_DEMAND, PRIORITY_HINT, PRIORITY_PREFETCH, IoScheduler, Job
from .packfile import Pack
from .promotions import PromotionQueue
from .fill_order import fill_order, load_popularity, preferred_format
from .tiers import BlobKey, LeaseLimitError, NvmeTier, RamTier, Slot, Tier, no_views_in_tracebacks, slot_bytes_for
from .wire import Compression, WireCompression, zstd_pays

logger = logging.getLogger(__name__)

_LEASE_SWEEP_S = 1.0

__all__ = [
    "PRIORITY_BACKGROUND", "PRIORITY_DEMAND", "PRIORITY_HINT", "PRIORITY_PREFETCH", "Compression", "DenseTensor",
    "InvalidRequest", "IoScheduler", "LeaseLimitError", "ShmGrant", "StoreCore", "StoreUnavailable",
    "Tier", "TooManyKeys", "WireCompression", "zstd_pays",
]


class InvalidRequest(FateError):
    """A request the store cannot serve as asked (unknown expert or format, empty batch...)."""


class TooManyKeys(InvalidRequest):
    """More experts in one request than `max_keys_per_fetch`: split it."""


class StoreUnavailable(FateError):
    """The store is starting up or shutting down: retry later."""


# -- domain results (converted to protobuf at the edge) -----------------------------------------


@dataclass(frozen=True)
class ShmGrant:
    index: int
    key: BlobKey
    offset: int
    nbytes: int
    lease_id: int
    generation: int
    ttl_ms: int
    tier: Tier
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
    hints_refused: int = 0  # hints dropped after waiting hint_wait_ms for a slot (promotions.py)
    hints_skipped: int = 0  # hints not promoted: the measured use of hints admits only a share
    # per expert of a fetch RPC, by purpose: was it in RAM? (`ram_hit_counts` adds slot-directory copies)
    demand_ram_hits: int = 0
    demand_ram_misses: int = 0  # read from NVMe (or waited for its promotion)
    prefetch_ram_hits: int = 0
    prefetch_ram_misses: int = 0

    def count_fetch(self, priority: int, in_ram: bool) -> None:
        name = f"{'demand' if priority == PRIORITY_DEMAND else 'prefetch'}_ram_{'hits' if in_ram else 'misses'}"
        setattr(self, name, getattr(self, name) + 1)


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
        self._jobs: dict[BlobKey, Job] = {}  # the I/O jobs of those promotions (boosted by more urgent waiters)
        self.promotions = PromotionQueue(self._acquire, self.ram, self.counters, config.prefetch_queue,
                                         config.hint_wait_ms / 1000)
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
        self.ram.max_leases_per_client = cfg.max_leases_per_client
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
            self.ram.open_directory(self.nvme.keys())
        if cfg.cold or cfg.nvme_uncached:
            self.nvme.drop_page_cache()
        self.nvme.uncached = cfg.nvme_uncached
        self._tasks.append(asyncio.create_task(self._sweep_leases(), name="lease-sweeper"))
        self.promotions.ram = self.ram
        self._tasks += self.promotions.start(min(2, cfg.io_threads))
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
            self.corrupt(e, "left out of the RAM tier")
            return 0

    def corrupt(self, e: BaseException, consequence: str) -> None:
        """Count and log a blob that failed verification as it came off the disk."""
        self.counters.checksum_failures += 1
        logger.error("corrupt blob in %s: %s; %s (checksum_failures %d)", self.nvme.path, e, consequence,
                     self.counters.checksum_failures)

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
                    self.counters.count_fetch(priority, True)
                    grants.append(self._grant(i, key, slot, ttl, client_id, Tier.RAM))
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
                if isinstance(t.exception(), ChecksumError):  # that expert alone: its gRPC fetch says DATA_LOSS
                    unavailable.append(i)
                    continue
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
                self.counters.count_fetch(priority, not promoted)  # unavailable ones: their gRPC fetch counts
                tier = Tier.NVME if promoted else Tier.RAM
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
            slot = self.ram.lookup(key, read=priority < PRIORITY_HINT)  # a hint's own look is not a read
            if slot is not None:
                self.ram.pin(slot)
                return slot, promoted
            task = self._promotions.get(key)
            if task is None:  # a hint may not evict experts other hints brought in and no one read yet
                target = self.ram.reserve(key, hint=priority == PRIORITY_HINT)
                if target is None:
                    return None, promoted
                self._jobs[key] = job = self.io.submit(priority, self._timed_load, key, target)
                task = asyncio.create_task(self._promote(key, target, job))
                self._promotions[key] = task
                task.add_done_callback(functools.partial(self._promotion_done, key))
            elif key in self._jobs:  # a demand waiting for a hint's promotion: it is not a hint's any more
                self.io.boost(self._jobs[key], priority)
            await asyncio.shield(task)
            promoted = True
        return None, promoted

    def _promotion_done(self, key: BlobKey, task: asyncio.Task[None]) -> None:
        if self._promotions.get(key) is task:
            del self._promotions[key]
            self._jobs.pop(key, None)
        if not task.cancelled() and isinstance(task.exception(), ChecksumError):
            self.corrupt(task.exception(), "not promoted into RAM")

    async def _promote(self, key: BlobKey, slot: Slot, job: Job) -> None:
        """Copy a blob from NVMe into its reserved slot (not cancelled by a requester going away)."""
        try:
            ns = await job.future
        except asyncio.CancelledError:
            raise  # shutdown: the slot stays FILLING (a thread may still write it); the segment goes anyway
        except BaseException:
            self.ram.abort(slot)
            raise
        self.ram.commit(slot, hinted=job.priority == PRIORITY_HINT)
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
        return key in self._promotions or self.promotions.put(key, background)

    async def _sweep_leases(self) -> None:
        while True:
            await asyncio.sleep(_LEASE_SWEEP_S)
            if n := self.ram.expire_leases():
                logger.debug("%d lease(s) expired", n)

    def ram_hit_counts(self) -> dict[str, int]:
        """Fetches by purpose that found the expert in RAM, the slot directory's copies included."""
        c = self.counters
        reads, demand = self.ram.directory.read_counts() if self.ram.directory is not None else (0, 0)
        return {"directory_reads": reads, "directory_demand_reads": demand,
                "demand_ram_hits": c.demand_ram_hits + demand, "demand_ram_misses": c.demand_ram_misses,
                "prefetch_ram_hits": c.prefetch_ram_hits + reads - demand,
                "prefetch_ram_misses": c.prefetch_ram_misses}

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
            data, compression = raw, Compression.NONE
            if try_zstd and n:
                data, compression = await self.io.run(PRIORITY_DEMAND, self.wire.encode, raw)
                paid |= compression == Compression.ZSTD
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


