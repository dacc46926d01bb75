"""The store server: `ExpertStore` (proto/moe/v1/store.proto) on grpc.aio and uvloop.

    python -m expert_store serve PACK --listen unix:/run/fate-moe/store.sock --ram-bytes 4GiB

Layout: `StoreCore` (core.py) is the domain (pack, tiers, I/O scheduling, counters)
and never sees protobuf; `ExpertStoreServicer` here converts at the edge (formats,
tiers, compression to and from the protocol's enums); one `EdgeInterceptor`
(edge.py) maps every exception to its status (`status_for`), checks the bearer
token and answers undecodable requests INVALID_ARGUMENT; `run_until_signalled`
wires the gRPC server, health service, signals and sd_notify.

Bounded work: a request message is at most `max_request_bytes` (gRPC refuses more
before parsing), names at most `max_keys_per_fetch` experts (INVALID_ARGUMENT
before any work), and a long key list is converted in a thread. Leases belong to
(client_id, a digest of the client's secret, sent as `x-fate-client-secret`
metadata), so another client cannot release them; a client holds at most
`max_leases_per_client`. Client-visible messages never carry the store's paths.

Start-up: bind (a unix socket another live process serves is refused; a stale one
is removed) and answer health NOT_SERVING at once, then verify every served blob
and the dense file, create and fill the RAM tier, and only then say SERVING (for
"" and "moe.v1.ExpertStore"), log "ready: listening on ...", and sd_notify
READY=1. Store RPCs before that get UNAVAILABLE. Under systemd with WatchdogSec=
the event loop pings WATCHDOG=1, so a wedged loop gets the store restarted.

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
import hashlib
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
    PRIORITY_DEMAND, PRIORITY_PREFETCH, Compression, InvalidRequest, LeaseLimitError, StoreCore, StoreUnavailable,
    Tier, TooManyKeys,
)
from .edge import CLIENT_SECRET_HEADER, EdgeInterceptor, Listener, ServerSecurity, bind
from .errors import ChecksumError, FateError
from .grpc_fetch import BlobPart, fetch_batches
from .packfile import Pack
from .tiers import BlobKey
from .wire import frame_expert_blobs, payload_layout

logger = logging.getLogger(__name__)

SERVICE_NAME = "moe.v1.ExpertStore"
_OFF_LOOP_KEYS = 256  # requests naming more experts are converted and checked in a thread
DEFAULT_REPLY_BYTES = 4 << 20  # FetchExperts messages when the client names no limit: gRPC's default receive limit
# A reply message is encoded on the event loop (joining memoryviews holds the GIL, so a thread would not free
# the loop): messages of at most 8 MiB keep other calls waiting ~1 ms at most and cost no throughput (a batch
# of 16 int4 experts moved as 2, 4, 8 or 16 experts per message took the same time within noise).
MAX_REPLY_BYTES = 8 << 20

FORMAT_TO_PB = {
    "bf16": store_pb2.EXPERT_FORMAT_BF16,
    "int8": store_pb2.EXPERT_FORMAT_INT8,
    "int4": store_pb2.EXPERT_FORMAT_INT4,
    "int2": store_pb2.EXPERT_FORMAT_INT2,
}
PB_TO_FORMAT = {v: k for k, v in FORMAT_TO_PB.items()}
TIER_TO_PB = {Tier.RAM: store_pb2.STORE_TIER_RAM, Tier.NVME: store_pb2.STORE_TIER_NVME}
COMPRESSION_TO_PB = {Compression.NONE: store_pb2.COMPRESSION_NONE, Compression.ZSTD: store_pb2.COMPRESSION_ZSTD}


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """gRPC status of an exception: input errors are the caller's, only bugs are INTERNAL."""
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, LeaseLimitError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, ChecksumError):
        return grpc.StatusCode.DATA_LOSS
    if isinstance(exc, StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, FateError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, OSError):  # the disk under the pack failed
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def status_for(core: StoreCore) -> Callable[[BaseException], tuple[grpc.StatusCode, str]]:
    """(code, message) for the interceptor; the store's file paths never reach a client."""
    pack_dir = str(core.pack.path)

    def status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
        code = status_code_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            return code, f"internal error in the store (a bug; its log has the traceback): {type(exc).__name__}"
        message = str(exc).replace(pack_dir, "<pack>")
        if isinstance(exc, OSError):
            message = f"the store cannot read its pack ({exc.strerror or type(exc).__name__})"
        return code, message
    return status


def _key_from_pb(k: store_pb2.ExpertKey, where: str) -> BlobKey:
    fmt = PB_TO_FORMAT.get(k.format)
    if fmt is None:
        name = store_pb2.ExpertFormat.Name(k.format) if k.format in store_pb2.ExpertFormat.values() else str(k.format)
        raise InvalidRequest(f"{where}: format {name} is not a stored format (set one of "
                             f"{', '.join(store_pb2.ExpertFormat.Name(v) for v in FORMAT_TO_PB.values())})")
    return BlobKey(k.layer, k.expert, fmt)


def _key_to_pb(key: BlobKey) -> store_pb2.ExpertKey:
    return store_pb2.ExpertKey(layer=key.layer, expert=key.expert, format=FORMAT_TO_PB[key.fmt])


def lease_owner(client_id: str, context: grpc.aio.ServicerContext) -> str:
    """Who holds a lease: the client's id AND a digest of its secret (metadata), so knowing another
    client's id is not enough to release its leases."""
    if not client_id:
        raise InvalidRequest("client_id is required: leases belong to a client")
    secret = dict(context.invocation_metadata() or ()).get(CLIENT_SECRET_HEADER, "")
    if len(secret) < 16:
        raise InvalidRequest(f"leases need a per-client secret of at least 16 characters in the "
                             f"{CLIENT_SECRET_HEADER!r} metadata (the worker sends a random one)")
    return f"{client_id}/{hashlib.sha256(secret.encode()).hexdigest()[:32]}"


class ExpertStoreServicer(store_pb2_grpc.ExpertStoreServicer):
    """Protobuf in, StoreCore calls, protobuf out."""

    def __init__(self, core: StoreCore):
        self.core = core
        self._manifest: store_pb2.GetManifestResponse | None = None

    async def _keys(self, experts: Sequence[store_pb2.ExpertKey]) -> list[BlobKey]:
        """Checked keys; a long list is converted in a thread (the loop keeps serving)."""
        if not experts:
            raise InvalidRequest("no experts in the request")
        cap = self.core.config.max_keys_per_fetch
        if len(experts) > cap:
            raise TooManyKeys(f"{len(experts)} experts in one request; at most {cap} (max_keys_per_fetch): "
                              f"split the request")

        def convert() -> list[BlobKey]:
            return [self.core.check_key(_key_from_pb(k, f"experts[{i}]"), f"experts[{i}]")
                    for i, k in enumerate(experts)]
        return await asyncio.to_thread(convert) if len(experts) > _OFF_LOOP_KEYS else convert()

    async def GetManifest(self, request: store_pb2.GetManifestRequest,
                          context: grpc.aio.ServicerContext) -> store_pb2.GetManifestResponse:
        self.core._require_ready()
        if self._manifest is None:
            self._manifest = manifest_to_pb(self.core)
        return self._manifest

    async def StreamDense(self, request: store_pb2.StreamDenseRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[store_pb2.DenseChunk]:
        accept_zstd = request.compression == store_pb2.COMPRESSION_ZSTD
        for t in self.core.dense_tensors(list(request.names)):
            first = True
            async for offset, data, compression, raw in self.core.dense_chunks(t, request.chunk_bytes, accept_zstd):
                msg = store_pb2.DenseChunk(
                    name=t.name,
                    chunk=store_pb2.DataChunk(offset_bytes=offset, data=data, compression=COMPRESSION_TO_PB[compression],
                                              uncompressed_bytes=raw),
                    last=offset + raw >= t.nbytes,
                )
                if first:
                    msg.header.CopyFrom(store_pb2.TensorHeader(name=t.name, dtype=t.dtype, shape=t.shape,
                                                               total_bytes=t.nbytes, checksum=t.checksum))
                    first = False
                yield msg

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

    async def FetchExperts(self, request: store_pb2.FetchExpertsRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """One ExpertBlobs message per batch that fits the client's limit, already encoded (see `encode_blobs`:
        the serializer passes it through)."""
        self.core._require_ready()
        keys = await self._keys(request.experts)
        priority = PRIORITY_PREFETCH if request.priority == store_pb2.FETCH_PRIORITY_PREFETCH else PRIORITY_DEMAND
        accept_zstd = request.compression == store_pb2.COMPRESSION_ZSTD
        limit = min(request.max_reply_bytes or DEFAULT_REPLY_BYTES, self.core.config.max_message_bytes,
                    MAX_REPLY_BYTES)
        async with aclosing(fetch_batches(self.core, keys, priority, accept_zstd, limit)) as batches:
            async for parts in batches:
                yield encode_blobs(parts)

    async def FetchExpertsShm(self, request: store_pb2.FetchExpertsShmRequest,
                              context: grpc.aio.ServicerContext) -> store_pb2.FetchExpertsShmResponse:
        self.core._require_ready()
        keys = await self._keys(request.experts)
        priority = PRIORITY_PREFETCH if request.priority == store_pb2.FETCH_PRIORITY_PREFETCH else PRIORITY_DEMAND
        owner = lease_owner(request.client_id, context)
        grants, unavailable = await self.core.fetch_shm(keys, priority, owner, request.lease_ttl_ms)
        ram = self.core.ram
        return store_pb2.FetchExpertsShmResponse(
            descriptors=[
                store_pb2.ShmDescriptor(
                    index=g.index, key=_key_to_pb(g.key), segment_name=ram.segment_name,
                    segment_bytes=ram.capacity_bytes, offset_bytes=g.offset, length_bytes=g.nbytes,
                    lease_id=g.lease_id, generation=g.generation, lease_ttl_ms=g.ttl_ms, tier=TIER_TO_PB[g.tier],
                    checksum=g.checksum,
                )
                for g in grants
            ],
            unavailable_indices=unavailable,
        )

    async def ReleaseLeases(self, request: store_pb2.ReleaseLeasesRequest,
                            context: grpc.aio.ServicerContext) -> store_pb2.ReleaseLeasesResponse:
        owner = lease_owner(request.client_id, context)
        released, unknown = self.core.release(owner, list(request.lease_ids), request.all)
        return store_pb2.ReleaseLeasesResponse(released_count=released, unknown_count=unknown)

    async def Prefetch(self, request: store_pb2.PrefetchRequest,
                       context: grpc.aio.ServicerContext) -> store_pb2.PrefetchResponse:
        self.core._require_ready()
        accepted, resident, dropped = self.core.prefetch(await self._keys(request.experts))
        return store_pb2.PrefetchResponse(accepted_count=accepted, already_resident_count=resident,
                                          dropped_count=dropped)

    async def GetStats(self, request: store_pb2.GetStoreStatsRequest,
                       context: grpc.aio.ServicerContext) -> store_pb2.StoreStats:
        return stats_to_pb(self.core)


def encode_blobs(parts: Sequence[BlobPart]) -> bytes:
    """The ExpertBlobs message of one reply: the index by protobuf, the payload joined straight from the
    parts' memory (views of pinned RAM-tier slots, or NVMe reads) in one copy."""
    offsets, payload_nbytes = payload_layout([len(p.data) for p in parts])
    index = store_pb2.ExpertBlobIndex(parts=[
        store_pb2.ExpertPart(
            index=p.index, key=_key_to_pb(p.key), total_bytes=p.total_bytes, offset_bytes=p.offset,
            payload_offset_bytes=off, payload_bytes=len(p.data), compression=COMPRESSION_TO_PB[p.compression],
            uncompressed_bytes=p.raw_nbytes, last=p.last, tier=TIER_TO_PB[p.tier], checksum=p.checksum)
        for p, off in zip(parts, offsets)
    ]).SerializeToString()
    return frame_expert_blobs(index, [p.data for p in parts], offsets, payload_nbytes)


def _passthrough(serializer: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """A response serializer that sends bytes as they are (messages a servicer encoded itself)."""
    def serialize(message: Any) -> bytes:
        return message if type(message) is bytes else serializer(message)
    return serialize


def add_servicer(servicer: ExpertStoreServicer, server: grpc.aio.Server) -> None:
    """The generated registration, with FetchExperts' pre-encoded replies passed through as they are."""
    class Capture:  # stands in for the server while the generated code registers
        def __init__(self) -> None:
            self.handlers: dict[str, grpc.RpcMethodHandler] = {}

        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
            self.handlers = dict(handlers)

    capture = Capture()
    store_pb2_grpc.add_ExpertStoreServicer_to_server(servicer, capture)
    handlers = capture.handlers
    fetch = handlers["FetchExperts"]
    handlers["FetchExperts"] = fetch._replace(response_serializer=_passthrough(fetch.response_serializer))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


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
        shm_segment_name=core.ram.segment_name if core.ram.directory is not None else "",
        shm_directory_name=core.ram.directory.name if core.ram.directory is not None else "",
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
        directory_refreshes=ram.counters.directory_refreshes, hints_refused=c.hints_refused,
        hints_used=ram.counters.hints_used, hints_wasted=ram.counters.hints_wasted, hints_skipped=c.hints_skipped,
        **core.ram_hit_counts(),
    )


# -- the process --------------------------------------------------------------------------------


def grpc_options(config: StoreConfig) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_request_bytes),
        ("grpc.so_reuseport", 0),  # a second store on the same port must fail, not share it silently
    ]


@dataclass
class RunningStore:
    """A started server (for `serve` and for tests that run the store in their own event loop)."""

    server: grpc.aio.Server
    core: StoreCore
    health: HealthServicer
    address: str  # what clients dial: "127.0.0.1:PORT" or "unix:/path"
    listener: Listener | None = None
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
            if self.listener is not None:
                self.listener.remove_socket()
            await self.core.close()
            self.core.pack.close()


async def start_store(config: StoreConfig, wait_ready: bool = True) -> RunningStore:
    """Open the pack, bind, start answering (health NOT_SERVING), then start up the store.

    With wait_ready, returns once the store is SERVING (start-up errors raise here, after cleanup).
    """
    removed = shm.remove_stale_segments()
    if removed:
        logger.warning("removed shared-memory segments of dead stores: %s", ", ".join(removed))
    security = ServerSecurity.from_files(config.tls_cert, config.tls_key, config.tls_client_ca,
                                         config.auth_token_file)
    pack = Pack.open(config.pack)
    try:
        core = StoreCore(pack, config)
    except BaseException:
        pack.close()
        raise
    server = grpc.aio.server(options=grpc_options(config),
                             interceptors=[EdgeInterceptor(status_for(core), security.token, logger)])
    health = HealthServicer()
    running = RunningStore(server, core, health, config.listen)
    try:
        for service in ("", SERVICE_NAME):
            await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        add_servicer(ExpertStoreServicer(core), server)
        running.listener = bind(server, config.listen, security, "listen")
        running.address = running.listener.address
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


async def _ping_watchdog(watchdog: sdnotify.Watchdog) -> None:
    """WATCHDOG=1 from the event loop (WatchdogSec= in the unit): a loop wedged by one request gets the
    store killed and restarted, rather than answering nothing for ever."""
    if not watchdog.enabled:
        return
    while True:
        watchdog.ping()
        await asyncio.sleep(watchdog.interval_s / 6)


async def run_until_signalled(config: StoreConfig) -> int:
    """The store's whole life: start, serve until SIGTERM/SIGINT, drain, clean up. Exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait())
    pinger = asyncio.create_task(_ping_watchdog(sdnotify.Watchdog()))
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
        pinger.cancel()
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


__all__ = ["ExpertStoreServicer", "RunningStore", "add_servicer", "encode_blobs", "finish_start", "serve", "start_store",
           "status_code_for"]
