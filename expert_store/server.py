"""The store server: `ExpertStore` (proto/moe/v1/store.proto) on grpc.aio and uvloop.

    python -m expert_store serve PACK --listen unix:/run/fate-moe/store.sock --ram-bytes 4GiB

Layout: `StoreCore` (core.py) is the domain (pack, tiers, I/O scheduling, counters)
and never sees protobuf; `ExpertStoreServicer` here converts at the edge;
`run_until_signalled` wires the gRPC server, health service, signals and sd_notify.

Start-up: bind and answer health NOT_SERVING at once, then verify every served
blob and the dense file, create and fill the RAM tier, and only then say
SERVING (for "" and "moe.v1.ExpertStore"), log "ready: listening on ...", and
sd_notify READY=1. Store RPCs before that get UNAVAILABLE.

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
import functools
import inspect
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from moe.v1 import store_pb2, store_pb2_grpc

from . import sdnotify, shm
from .config import StoreConfig
from .core import (
    PRIORITY_DEMAND, PRIORITY_PREFETCH, InvalidRequest, StoreCore, StoreUnavailable,
)
from .errors import ChecksumError, FateError
from .packfile import Pack
from .tiers import (
    BlobKey,
)

logger = logging.getLogger(__name__)

SERVICE_NAME = "moe.v1.ExpertStore"

FORMAT_TO_PB = {
    "bf16": store_pb2.EXPERT_FORMAT_BF16,
    "int8": store_pb2.EXPERT_FORMAT_INT8,
    "int4": store_pb2.EXPERT_FORMAT_INT4,
    "int2": store_pb2.EXPERT_FORMAT_INT2,
}
PB_TO_FORMAT = {v: k for k, v in FORMAT_TO_PB.items()}


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


__all__ = ["ExpertStoreServicer", "RunningStore", "finish_start", "serve", "start_store", "status_code_for"]
