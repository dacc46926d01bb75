"""Where the worker's expert cache gets blobs from: the store process, or a pack in process.

Both fetchers have one method the cache uses, `fetch(keys, priority) -> list[FetchedBlob]`:

    StoreClient   the store over gRPC (synchronous: the worker's compute runs in a thread).
                  Co-located (same boot id and IPC namespace as the store): experts the store's
                  slot directory shows resident are copied straight out of its segment with no
                  RPC (a generation check after the copy throws away a slot reused meanwhile);
                  for the rest one FetchExpertsShm promotes them and returns leased
                  descriptors; we copy the bytes out (one copy: the build views them), verify
                  them and release the leases in one call. Experts the store could not lease,
                  and every expert for a remote worker, come over FetchExperts: one reply
                  message per batch (several only past the message limit), each expert a view
                  of the received bytes (`zero_copy`; the build views it in turn, so a cached
                  expert keeps its reply message alive; zero_copy=False copies each out once).
    PackFetcher   the same interface over an open `Pack` (tests, `generate`).

Integrity: every blob is checked against its xxh3_64 (the manifest's, and the store's own
checksum where the reply carries one) after it reaches our memory; a mismatch raises
ChecksumError (naming the expert, from the store's trailing metadata when it found the
damage) and the bytes are never returned. The protocol pieces (manifest, reassembly,
checksums, errors) live in store_protocol.py.

Store restarts: every RPC has a deadline. Without a retry window, UNAVAILABLE is retried
`max_retries` times quickly, then raises StoreUnavailableError. With `retry_window_s`
(the worker's store_retry_s), a call keeps trying until the window, counted from its
first failure, ends: exponential backoff up to 1 s, then it waits for the store's
health to say SERVING and checks the manifest again (pack id and the manifest's
sha256); a store that came back with another pack raises PackChangedError (and sets
`pack_changed`) instead of serving mismatching blobs. The caller's state (the
worker's KV caches) is untouched meanwhile: the call simply returns later.

Security: the channel comes from `expert_store.edge.ClientSecurity` (TLS, a client
certificate, a bearer token); every call carries a random per-client secret, so the
store's leases are ours alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
import uuid
from multiprocessing.shared_memory import SharedMemory
from typing import Iterable, Literal, Sequence

import grpc
import grpc.experimental
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe.v1 import store_pb2 as pb
from moe.v1 import store_pb2_grpc as pb_grpc
from expert_store.checksums import blob_digest
from expert_store.edge import CLIENT_SECRET_HEADER, CORRUPT_EXPERT_TRAILER, ClientSecurity
from expert_store.shm import SHM_DIR, attach_segment, host_id
from expert_store.slot_directory import DirectoryReader

from .pack_fetcher import PackFetcher
from .store_directory import SlotDirectoryReads
from .store_retry import _Retry
from .store_protocol import (
    COMPRESSION_TO_PB, FORMAT_TO_PB, PRIORITY_TO_PB, TIER_NAMES, BlobKey, ChecksumError, ChunkDecoder,
    ExpertBlobAssembler, ExpertFetcher, FetchCounters, FetchedBlob, PackChangedError, Priority, StoreError,
    StoreManifest, StoreUnavailableError, assemble_dense, parse_expert_blobs, place_chunk, verify_checksum,
)

log = logging.getLogger(__name__)

Transport = Literal["auto", "shm", "grpc"]

_MAX_MESSAGE_BYTES = 256 << 20
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    # a restarted store is found again within a second, not after grpc's default 1-120 s backoff
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # streaming calls (FetchExperts, StreamDense) read in the calling thread: no helper thread started per call
    (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
]


# -- the store over gRPC -----------------------------------------------------------------------


class StoreClient(SlotDirectoryReads):
    """Synchronous client of the expert store (thread-safe: the prefetcher and compute thread share it)."""

    def __init__(
        self,
        address: str,
        client_id: str | None = None,
        transport: Transport = "auto",
        connect_timeout_s: float = 10.0,
        rpc_timeout_s: float = 10.0,
        fetch_timeout_s: float = 30.0,
        stream_timeout_s: float = 300.0,
        max_retries: int = 3,
        retry_backoff_s: float = 0.05,
        compression: Literal["none", "zstd"] = "none",
        lease_ttl_ms: int = 0,
        retry_window_s: float = 0.0,
        security: ClientSecurity | None = None,
        shm_directory: bool = True,
        zero_copy: bool = True,
    ):
        if transport not in ("auto", "shm", "grpc"):
            raise StoreError(f"transport must be 'auto', 'shm' or 'grpc', got {transport!r}")
        if compression not in COMPRESSION_TO_PB:
            raise StoreError(f"compression must be 'none' or 'zstd', got {compression!r}")
        self.address = address
        self.client_id = client_id or f"worker-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.requested_transport = transport
        self.connect_timeout_s = connect_timeout_s
        self.rpc_timeout_s = rpc_timeout_s
        self.fetch_timeout_s = fetch_timeout_s
        self.stream_timeout_s = stream_timeout_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.compression = compression
        self.lease_ttl_ms = lease_ttl_ms
        self.retry_window_s = retry_window_s
        self.counters = FetchCounters()
        self.pack_changed = False  # the store came back with another pack: this worker must restart
        secret = secrets.token_urlsafe(24)  # our leases are ours alone: the store keys them by (client_id, secret)
        self._stubs_channel, self._channel = (security or ClientSecurity()).channel(
            address, _CHANNEL_OPTIONS, metadata=[(CLIENT_SECRET_HEADER, secret)])
        self._stub = pb_grpc.ExpertStoreStub(self._stubs_channel)
        # FetchExperts with our own deserializer: the payload stays a view of the received message
        self._fetch_experts = self._stubs_channel.unary_stream(
            "/moe.v1.ExpertStore/FetchExperts", request_serializer=pb.FetchExpertsRequest.SerializeToString,
            response_deserializer=parse_expert_blobs, _registered_method=True)
        self._health = health_pb2_grpc.HealthStub(self._stubs_channel)
        self._lock = threading.Lock()  # counters, segments, manifest
        self._manifest: StoreManifest | None = None
        self._manifest_sha256 = ""
        self._outage_since: float | None = None  # monotonic time of the failure that began an outage
        self._crc32: dict[BlobKey, int] = {}
        self._transport: str | None = None
        self._segments: dict[str, SharedMemory] = {}  # attached store segments by name (never unlinked)
        self.use_directory = shm_directory  # copy resident experts through the store's slot directory
        self.zero_copy = zero_copy  # gRPC: blobs are views of the reply message (else one copy each)
        self._dir: DirectoryReader | None = None
        self._dir_names: tuple[str, str] | None = None  # (data segment, directory) the store advertised

    # -- lifetime ---------------------------------------------------------------------------

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the store's health service says SERVING; StoreUnavailableError after `timeout_s`."""
        timeout_s = self.connect_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        service = ""  # the whole server; a store that registers only its service name answers NOT_FOUND
        t0 = time.monotonic()
        next_note = t0 + 2.0  # say what we wait for within a few seconds, then every 10 s
        while True:
            now = time.monotonic()
            if now >= next_note and deadline - now > 0:
                log.warning("still waiting for the expert store at %s (%s); checking again every second for up "
                            "to %.0f s more", self.address, last, deadline - now)
                next_note = now + 10.0
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreUnavailableError(
                    f"expert store at {self.address} not ready within {timeout_s:g} s ({last}); "
                    f"is `python -m expert_store serve` running and listening there?",
                    grpc.StatusCode.UNAVAILABLE)
            try:
                reply = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                           timeout=min(left, 1.0), wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
                if e.code() == grpc.StatusCode.NOT_FOUND and service == "":
                    service = pb.DESCRIPTOR.services_by_name["ExpertStore"].full_name
                    continue
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                    grpc.StatusCode.NOT_FOUND):
                    raise self._error("health check", e) from None
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        """Release any leases we still hold (best effort), unmap segments, close the channel."""
        try:
            self._stub.ReleaseLeases(pb.ReleaseLeasesRequest(client_id=self.client_id, all=True), timeout=1.0)
        except grpc.RpcError:
            pass
        with self._lock:
            self._drop_directory()
            for seg in self._segments.values():
                _detach(seg)
            self._segments.clear()
        self._channel.close()

    def __enter__(self) -> "StoreClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- start-up data ---------------------------------------------------------------------------

    def manifest(self, refresh: bool = False) -> StoreManifest:
        with self._lock:
            if self._manifest is not None and not refresh:
                return self._manifest
        reply = self._call("GetManifest", lambda t: self._stub.GetManifest(pb.GetManifestRequest(), timeout=t),
                           self.rpc_timeout_s)
        self._check_pack(reply)
        m = StoreManifest.from_pb(reply)
        with self._lock:
            if self._manifest is None:
                self._manifest = m
                self._manifest_sha256 = hashlib.sha256(reply.manifest_json).hexdigest()
                self._crc32 = m.expert_crc32s()
                self._dir_names = (m.shm_segment_name, m.shm_directory_name)
            return self._manifest

    def _check_pack(self, reply: pb.GetManifestResponse) -> None:
        """PackChangedError when the store serves another pack than the one we loaded (pack id and the
        manifest's own checksum: either differing is another model or another packing)."""
        m = self._manifest
        if m is None:
            return
        digest = hashlib.sha256(reply.manifest_json).hexdigest()
        if reply.pack_id != m.pack_id or digest != self._manifest_sha256:
            if not self.pack_changed:
                log.error("the expert store at %s now serves another pack (id %s, manifest sha256 %s; this worker "
                          "loaded %s, %s): requests fail with FAILED_PRECONDITION until the worker restarts",
                          self.address, reply.pack_id[:12], digest[:12], m.pack_id[:12], self._manifest_sha256[:12])
            self.pack_changed = True
            raise PackChangedError(f"the expert store at {self.address} now serves another pack (id "
                                   f"{reply.pack_id[:12]}, this worker loaded {m.pack_id[:12]}): restart the worker")

    def check_pack_id(self, timeout_s: float) -> None:
        """Cheap periodic check (GetStats' pack id); on a difference, the full manifest check."""
        if self._manifest is not None and not self.pack_changed:
            stats = self._stub.GetStats(pb.GetStoreStatsRequest(), timeout=timeout_s)
            if stats.pack_id == self._manifest.pack_id:
                return
        self.revalidate(timeout_s)

    def revalidate(self, timeout_s: float) -> None:
        """Ask the store for its manifest and check it is still our pack (PackChangedError otherwise)."""
        if self.pack_changed:
            raise PackChangedError(f"the expert store at {self.address} serves another pack: restart the worker")
        reply = self._stub.GetManifest(pb.GetManifestRequest(), timeout=timeout_s)
        self._check_pack(reply)
        with self._lock:  # a restarted store has new segments
            if self._dir_names != (reply.shm_segment_name, reply.shm_directory_name):
                self._drop_directory()
                self._dir_names = (reply.shm_segment_name, reply.shm_directory_name)

    def dense_tensors(self, names: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """Dense tensors (all when `names` is empty), checksum-verified, in their stored dtypes."""
        req = pb.StreamDenseRequest(names=list(names), compression=COMPRESSION_TO_PB[self.compression])
        return self._call("StreamDense", lambda t: assemble_dense(self._stub.StreamDense(req, timeout=t)),
                          self.stream_timeout_s)

    def files(self, names: Sequence[str] = ()) -> dict[str, bytes]:
        """The pack's auxiliary files (tokenizer) by name; all of them when `names` is empty."""

        def run(timeout: float) -> dict[str, bytes]:
            out: dict[str, bytes] = {}
            bufs: dict[str, bytearray] = {}
            decoder = ChunkDecoder()
            for msg in self._stub.StreamFiles(pb.StreamFilesRequest(names=list(names)), timeout=timeout):
                buf = bufs.setdefault(msg.name, bytearray(msg.total_bytes))
                if msg.HasField("chunk"):
                    place_chunk(buf, msg.chunk.offset_bytes, decoder.decode(msg.chunk, f"file {msg.name!r}"),
                           f"file {msg.name!r}")
                if msg.last:
                    out[msg.name] = bytes(bufs.pop(msg.name))
            if bufs:
                raise StoreError(f"StreamFiles ended before the last chunk of {sorted(bufs)}")
            return out

        got = self._call("StreamFiles", run, self.stream_timeout_s)
        missing = set(names) - set(got)
        if missing:
            raise StoreError(f"the store did not send files {sorted(missing)}")
        return got

    def store_stats(self) -> pb.StoreStats:
        return self._call("GetStats", lambda t: self._stub.GetStats(pb.GetStoreStatsRequest(), timeout=t),
                          self.rpc_timeout_s)

    def prefetch_hint(self, keys: Sequence[BlobKey]) -> pb.PrefetchResponse:
        """Ask the store to promote these experts into its RAM tier (does not move them to us)."""
        req = pb.PrefetchRequest(experts=[_key_pb(k) for k in keys], client_id=self.client_id)
        return self._call("Prefetch", lambda t: self._stub.Prefetch(req, timeout=t), self.rpc_timeout_s)

    # -- experts --------------------------------------------------------------------------------

    @property
    def transport(self) -> str:
        """"shm" or "grpc": what fetches use (decided from the manifest on first use)."""
        if self._transport is None:
            self._transport = self._choose_transport(self.manifest())
        return self._transport

    def _choose_transport(self, m: StoreManifest) -> str:
        co_located = m.shm_enabled and bool(m.shm_host_id) and m.shm_host_id == host_id()
        if self.requested_transport == "grpc":
            return "grpc"
        if self.requested_transport == "shm" and not co_located:
            why = ("the store serves no shared memory (started without a RAM tier?)" if not m.shm_enabled
                   else f"the store runs on another host or IPC namespace ({m.shm_host_id!r} vs ours "
                        f"{host_id()!r})")
            raise StoreError(f"transport 'shm' to {self.address} is impossible: {why}; use 'grpc' or 'auto'")
        return "shm" if co_located else "grpc"

    def fetch(self, keys: Sequence[BlobKey], priority: Priority = "demand") -> list[FetchedBlob]:
        if not keys:
            return []
        for k in keys:
            if k[2] not in FORMAT_TO_PB:
                raise StoreError(f"unknown expert format {k[2]!r} (known: {', '.join(FORMAT_TO_PB)})")
        if self.pack_changed:
            raise PackChangedError(f"the expert store at {self.address} serves another pack: restart the worker")
        try:
            if self.transport == "shm":
                results, rest = self._fetch_shm(keys, priority)
            else:
                results, rest = {}, list(range(len(keys)))
            if rest:
                results.update(self._fetch_grpc(keys, rest, priority))
        except ChecksumError:
            try:  # a store restarted with another pack between two calls looks like corruption: tell them apart
                self.revalidate(self.rpc_timeout_s)
            except grpc.RpcError:
                pass
            raise
        return [results[i] for i in range(len(keys))]

    def _fetch_grpc(self, keys: Sequence[BlobKey], indices: list[int], priority: Priority) -> dict[int, FetchedBlob]:
        t0 = time.perf_counter_ns()
        sub = [keys[i] for i in indices]
        asm = ExpertBlobAssembler(sub, [self._crc32.get(k) for k in sub], self.zero_copy)
        retry = _Retry(self, "FetchExperts")
        while True:
            todo = [j for j in range(len(sub)) if j not in asm.done]
            req = pb.FetchExpertsRequest(
                experts=[_key_pb(sub[j]) for j in todo], priority=PRIORITY_TO_PB[priority],
                compression=COMPRESSION_TO_PB[self.compression], client_id=self.client_id,
                max_reply_bytes=_MAX_MESSAGE_BYTES)
            part = ExpertBlobAssembler([sub[j] for j in todo], [asm.expected[j] for j in todo], self.zero_copy)
            call = self._fetch_experts(req, timeout=self.fetch_timeout_s)
            try:
                for msg in call:
                    part.add(msg)
            except grpc.RpcError as e:
                retry.after(e)
                continue
            except BaseException:
                call.cancel()  # a bad part: stop the store sending the rest
                raise
            finally:  # keep what arrived whole: a retry asks only for the rest
                asm.wire_bytes += part.wire_bytes
                asm.messages += part.messages
                for j, got in part.done.items():
                    asm.done[todo[j]] = got
            break
        missing = [sub[j] for j in range(len(sub)) if j not in asm.done]
        if missing:
            raise StoreError(f"FetchExperts ended without experts {missing[:4]}")
        out = {indices[j]: FetchedBlob(sub[j], blob, tier, "grpc") for j, (blob, tier) in asm.done.items()}
        dt = time.perf_counter_ns() - t0
        with self._lock:
            c = self.counters
            c.experts_grpc += len(out)
            c.bytes_fetched_grpc += sum(b.nbytes for b in out.values())
            c.bytes_wire_grpc += asm.wire_bytes
            c.messages_grpc += asm.messages
            c.fetch_ns_grpc += dt
            self._count_tiers(out.values(), priority)
        return out

    def _fetch_shm(self, keys: Sequence[BlobKey], priority: Priority) -> tuple[dict[int, FetchedBlob], list[int]]:
        """Resident experts through the slot directory (no RPC), the rest in one FetchExpertsShm (the store
        promotes them, we copy under leases); returns (blobs by index, indices left for gRPC)."""
        t0 = time.perf_counter_ns()
        out, rest = self._copy_resident(keys, priority), []
        todo = [i for i in range(len(keys)) if i not in out]
        if todo:
            leased, left = self._fetch_leased([keys[i] for i in todo], priority)
            out.update((todo[j], b) for j, b in leased.items())
            rest = [todo[j] for j in left]
        dt = time.perf_counter_ns() - t0
        with self._lock:
            c = self.counters
            c.experts_shm += len(out)
            c.bytes_fetched_shm += sum(b.nbytes for b in out.values())
            c.fetch_ns_shm += dt
            c.shm_unavailable += len(rest)
            c.shm_directory_hits += len(keys) - len(todo)
            if self._dir is not None:
                c.shm_directory_retries = self._dir.retries
            self._count_tiers(out.values(), priority)
        return out, rest

    def _fetch_leased(self, keys: Sequence[BlobKey], priority: Priority) -> tuple[dict[int, FetchedBlob], list[int]]:
        """Leased copies out of the store's segment; returns (blobs by index, indices left for gRPC)."""
        req = pb.FetchExpertsShmRequest(experts=[_key_pb(k) for k in keys], priority=PRIORITY_TO_PB[priority],
                                        client_id=self.client_id, lease_ttl_ms=self.lease_ttl_ms)
        reply = self._call("FetchExpertsShm", lambda t: self._stub.FetchExpertsShm(req, timeout=t),
                           self.fetch_timeout_s)
        out: dict[int, FetchedBlob] = {}
        rest = set(int(i) for i in reply.unavailable_indices)
        try:
            for d in reply.descriptors:
                i = d.index
                if not 0 <= i < len(keys) or (d.key.layer, d.key.expert) != keys[i][:2]:
                    raise StoreError(f"FetchExpertsShm: descriptor for index {i} does not match the request")
                blob = self._copy_out(d, keys[i])
                if blob is None:
                    rest.add(i)
                    continue
                out[i] = FetchedBlob(keys[i], blob, TIER_NAMES.get(d.tier, "unknown"), "shm")
        finally:  # copies done (or failed): the store may reuse the slots
            self._release([d.lease_id for d in reply.descriptors])
        rest |= set(range(len(keys))) - set(out) - rest
        with self._lock:
            if self._dir is not None and reply.descriptors and reply.descriptors[0].segment_name != self._dir_names[0]:
                self._drop_directory()  # the store restarted: its new directory comes with the next manifest
                self._dir_names = None
        return out, sorted(rest)

    def _copy_out(self, d: pb.ShmDescriptor, key: BlobKey) -> bytes | None:
        """The leased bytes, copied and verified; None when the segment cannot be mapped (use gRPC)."""
        what = f"expert (layer {key[0]}, expert {key[1]}, {key[2]}) in shm {d.segment_name}@{d.offset_bytes}"
        with self._lock:  # a copy holds the GIL anyway; the lock keeps a re-attach from closing it mid-copy
            seg = self._segment(d.segment_name, d.offset_bytes + d.length_bytes)
            if seg is None:
                return None
            blob = bytes(seg.buf[d.offset_bytes:d.offset_bytes + d.length_bytes])  # the one copy
        return self._check_blob(blob, key, d.checksum, what)

    def _check_blob(self, blob: bytes, key: BlobKey, checksum: str, what: str) -> bytes:
        got = verify_checksum(blob, checksum, what) if checksum else blob_digest(blob)
        want = self._crc32.get(key)
        if want is not None and got != want:
            raise ChecksumError(f"{what}: checksum mismatch with the pack manifest (got xxh3_64 {got:016x}, "
                                f"manifest {want:016x}); refusing the bytes", *key)
        if want is None and not checksum:
            raise ChecksumError(f"{what}: no checksum from the store and none in the manifest; refusing the bytes")
        return blob

    def _segment(self, name: str, need_bytes: int) -> SharedMemory | None:
        """The attached segment `name` (lock held); None when it cannot be attached and gRPC may stand in."""
        seg = self._segments.get(name)
        if seg is not None and seg.size >= need_bytes:
            return seg
        if seg is not None:  # a new segment under an old name: attach again
            _detach(self._segments.pop(name))
        # segments a restarted store left (unlinked) would keep their memory alive while we map them
        for old in [n for n in self._segments if not (SHM_DIR / n).exists()]:
            _detach(self._segments.pop(old))
        try:
            seg = attach_segment(name)
        except OSError as e:
            if self.requested_transport == "shm":
                raise StoreError(f"cannot attach the store's shared memory {name!r} ({e}); run the worker as "
                                 f"a user that can read it, or use transport 'grpc'") from None
            log.warning("cannot attach the store's shared memory %r (%s): fetching over gRPC from now on", name, e)
            self._transport = "grpc"
            return None
        if seg.size < need_bytes:
            _detach(seg)
            raise StoreError(f"shared memory {name!r} has {seg.size} bytes, a descriptor points to {need_bytes}")
        self._segments[name] = seg
        return seg

    def _release(self, lease_ids: list[int]) -> None:
        """ReleaseLeases without waiting for the answer: the copies are done, the compute thread goes on."""
        if not lease_ids:
            return
        req = pb.ReleaseLeasesRequest(client_id=self.client_id, lease_ids=lease_ids)
        self._stub.ReleaseLeases.future(req, timeout=self.rpc_timeout_s).add_done_callback(self._released)

    def _released(self, fut: grpc.Future) -> None:
        if fut.code() not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):  # CANCELLED: closing
            # the leases expire by TTL; the bytes we copied are verified
            log.warning("ReleaseLeases to %s failed (%s): the leases will expire by TTL", self.address,
                        fut.code().name)
            with self._lock:
                self.counters.release_failures += 1

    def _count_tiers(self, blobs: Iterable[FetchedBlob], priority: Priority) -> None:
        c, demand = self.counters, priority == "demand"
        for b in blobs:
            if b.tier == "ram":
                c.tier_ram += 1
                c.tier_ram_demand += demand
            elif b.tier == "nvme":
                c.tier_nvme += 1
                c.tier_nvme_demand += demand

    # -- errors and retries --------------------------------------------------------------------

    def _call(self, what: str, fn, timeout_s: float):
        retry = _Retry(self, what)
        while True:
            try:
                return fn(timeout_s)
            except grpc.RpcError as e:
                retry.after(e)

    def _outage(self, began: bool) -> None:
        """One log line when an outage begins and one when the store is back (the calls of all threads)."""
        with self._lock:
            if began and self._outage_since is None:
                self._outage_since = time.monotonic()
                log.warning("expert store at %s unavailable: in-flight requests wait for it (keeping their state) "
                            "for up to %.0f s (store_retry_s), retrying with backoff", self.address,
                            self.retry_window_s)
            elif not began and self._outage_since is not None:
                log.info("expert store at %s is back after %.1f s, serving the same pack", self.address,
                         time.monotonic() - self._outage_since)
                self._outage_since = None

    def _error(self, what: str, e: grpc.RpcError) -> StoreError:
        code = e.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            tried = (f"for {self.retry_window_s:g} s" if self.retry_window_s > 0 else f"{self.max_retries} retries")
            return StoreUnavailableError(
                f"expert store at {self.address} unavailable ({what}, retried {tried}): {e.details()}", code)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return StoreUnavailableError(f"expert store at {self.address} did not answer {what} in time", code)
        if code == grpc.StatusCode.DATA_LOSS:
            trailer = dict(e.trailing_metadata() or ()).get(CORRUPT_EXPERT_TRAILER, "") if hasattr(
                e, "trailing_metadata") else ""
            layer, _, rest = trailer.partition(":")
            expert, _, fmt = rest.partition(":")
            key = (int(layer), int(expert), fmt) if layer.isdigit() and expert.isdigit() else (None, None, None)
            return ChecksumError(f"expert store at {self.address}: {what}: {e.details()}", *key)
        return StoreError(f"expert store at {self.address}: {what} failed: {code.name}: {e.details()}", code)


def _detach(seg: SharedMemory) -> None:
    try:
        seg.close()  # never unlink: the segment is the store's
    except BufferError:
        pass  # a view is still out; the mapping goes with it


def _key_pb(key: BlobKey) -> pb.ExpertKey:
    return pb.ExpertKey(layer=key[0], expert=key[1], format=FORMAT_TO_PB[key[2]])


__all__ = [
    "ExpertFetcher", "FetchCounters", "FetchedBlob", "PackChangedError", "PackFetcher", "StoreClient", "StoreError",
    "StoreManifest", "StoreUnavailableError",
]
