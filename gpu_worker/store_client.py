"""Where the worker's expert cache gets blobs from: the store process, or a pack in process.

Both fetchers have one method the cache uses, `fetch(keys, priority) -> list[FetchedBlob]`:

    StoreClient   the store over gRPC (synchronous: the worker's compute runs in a thread).
                  Co-located (same boot id and IPC namespace as the store): FetchExpertsShm
                  returns leased descriptors into the store's shared-memory segment; we copy
                  the bytes out, verify them and release the leases in one call. Experts the
                  store could not lease, and every expert for a remote worker, come as chunks
                  over FetchExperts.
    PackFetcher   the same interface over an open `Pack` (tests, `generate`).

Integrity: every blob is checked against its xxh3_64 (the manifest's, and the store's own
checksum where the reply carries one) after it reaches our memory; a mismatch raises
ChecksumError and the bytes are never returned. Every RPC has a deadline; UNAVAILABLE
during a fetch is retried a bounded number of times, then raises StoreUnavailableError.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Iterable, Literal, Protocol, Sequence

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe.v1 import store_pb2 as pb
from moe.v1 import store_pb2_grpc as pb_grpc
from expert_store.checksums import BLOB_CHECKSUM, blob_digest, digest_for
from expert_store.errors import ChecksumError, FateError
from expert_store.shm import SHM_DIR, attach_segment, host_id

from expert_store.model_args import ModelArgs

log = logging.getLogger(__name__)

BlobKey = tuple[int, int, str]  # (decoder layer, expert, stored format)
Priority = Literal["demand", "prefetch"]
Transport = Literal["auto", "shm", "grpc"]

_FORMAT_TO_PB = {
    "bf16": pb.EXPERT_FORMAT_BF16,
    "int8": pb.EXPERT_FORMAT_INT8,
    "int4": pb.EXPERT_FORMAT_INT4,
    "int2": pb.EXPERT_FORMAT_INT2,
}
_PB_TO_FORMAT = {v: k for k, v in _FORMAT_TO_PB.items()}
_TIER_NAMES = {pb.STORE_TIER_RAM: "ram", pb.STORE_TIER_NVME: "nvme", pb.STORE_TIER_UNSPECIFIED: "unknown"}
_PRIORITY_TO_PB = {"demand": pb.FETCH_PRIORITY_DEMAND, "prefetch": pb.FETCH_PRIORITY_PREFETCH}
_COMPRESSION_TO_PB = {"none": pb.COMPRESSION_NONE, "zstd": pb.COMPRESSION_ZSTD}

# safetensors dtype names (TensorHeader.dtype) -> torch dtypes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip

_MAX_MESSAGE_BYTES = 256 << 20
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    # a restarted store is found again within a second, not after grpc's default 1-120 s backoff
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class StoreError(FateError):
    """The store refused a request or broke the protocol (the message has the gRPC status)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class StoreUnavailableError(StoreError):
    """The store cannot be reached (down, restarting, or not answering within the deadline)."""


# -- what a fetch returns ---------------------------------------------------------------------


@dataclass(frozen=True)
class FetchedBlob:
    """One expert blob in our memory, checksum-verified."""

    key: BlobKey
    data: bytes | memoryview  # the blob's bytes (a memoryview over the pack's mmap for PackFetcher)
    tier: str  # where the store found it: "ram", "nvme"; "local" for PackFetcher
    transport: str  # how it came: "shm", "grpc", "local"

    @property
    def nbytes(self) -> int:
        return len(self.data)


class ExpertFetcher(Protocol):
    def fetch(self, keys: Sequence[BlobKey], priority: Priority = "demand") -> list[FetchedBlob]:
        """The blobs of `keys`, in the order asked. Raises rather than return a bad blob."""


@dataclass
class FetchCounters:
    """Totals since start; read `snapshot()` for a consistent copy."""

    experts_shm: int = 0
    experts_grpc: int = 0
    experts_local: int = 0
    bytes_fetched_shm: int = 0
    bytes_fetched_grpc: int = 0  # decoded bytes (after zstd)
    bytes_wire_grpc: int = 0  # bytes as they crossed the socket
    bytes_fetched_local: int = 0
    fetch_ns_shm: int = 0  # FetchExpertsShm + copy + verify + ReleaseLeases
    fetch_ns_grpc: int = 0
    fetch_ns_local: int = 0
    tier_ram: int = 0  # experts the store served from its RAM tier
    tier_nvme: int = 0
    shm_unavailable: int = 0  # experts the store could not lease (fetched over gRPC instead)
    retries: int = 0  # RPCs retried after UNAVAILABLE
    release_failures: int = 0  # ReleaseLeases calls that failed (the leases expire by TTL)

    def snapshot(self) -> "FetchCounters":
        return FetchCounters(**vars(self))


def verify_checksum(data: bytes | bytearray | memoryview, checksum: str, what: str) -> int:
    """Check `data` against a "xxh3_64:<hex>" (blobs) or "crc32:<hex>" (dense) checksum; return the digest.
    Unknown algorithms fail too."""
    algo, _, digest = checksum.partition(":")
    got = digest_for(algo, data) if digest else None
    if got is None:
        raise ChecksumError(f"{what}: cannot verify checksum {checksum!r} (expected 'xxh3_64:<hex>' or "
                            f"'crc32:<hex>'); refusing the bytes")
    try:
        want = int(digest, 16)
    except ValueError:
        raise ChecksumError(f"{what}: malformed checksum {checksum!r}; refusing the bytes") from None
    if got != want:
        raise ChecksumError(f"{what}: checksum mismatch (got {algo} {got:08x}, expected {want:08x}); "
                            f"the bytes were damaged in the store or in transit")
    return got


# -- the manifest as the store describes it ----------------------------------------------------


@dataclass(frozen=True)
class StoreFormatInfo:
    expert_bytes: int  # one expert blob in this format
    group_size: int  # quantization group; 0 for bf16


@dataclass(frozen=True)
class StoreManifest:
    pack_id: str  # digest of the pack's manifest: a different id means a different model
    pack_format_version: int
    family: str
    args: ModelArgs
    formats: dict[str, StoreFormatInfo]
    num_moe_layers: int
    num_experts: int
    top_k: int
    dense_bytes: int
    tokenizer_files: tuple[str, ...]
    pack_manifest: dict  # manifest.json of the pack (per-expert byte ranges and xxh3_64 digests)
    shm_enabled: bool  # the store serves FetchExpertsShm
    shm_host_id: str  # equal to expert_store.shm.host_id() when co-located
    ram_tier_bytes: int
    max_chunk_bytes: int

    def expert_bytes(self, fmt: str) -> int:
        if fmt not in self.formats:
            raise StoreError(f"the store has no {fmt!r} experts (it has: {', '.join(self.formats)})")
        return self.formats[fmt].expert_bytes

    def expert_crc32s(self) -> dict[BlobKey, int]:
        """(layer, expert, fmt) -> the blob's xxh3_64 from the pack's manifest."""
        return {
            (int(entry["layer"]), int(entry["expert"]), str(fmt)): int(blob[BLOB_CHECKSUM])
            for entry in self.pack_manifest.get("experts", ())
            for fmt, blob in entry["blobs"].items()
        }

    @classmethod
    def from_pb(cls, m: pb.GetManifestResponse) -> "StoreManifest":
        try:
            args = ModelArgs.from_dict(json.loads(m.model_args_json))
            pack_manifest = json.loads(m.manifest_json) if m.manifest_json else {}
        except (ValueError, TypeError, KeyError) as e:
            raise StoreError(f"the store sent a malformed manifest ({type(e).__name__}: {e})") from None
        formats = {
            _PB_TO_FORMAT[f.format]: StoreFormatInfo(int(f.expert_bytes), int(f.group_size))
            for f in m.formats if f.format in _PB_TO_FORMAT
        }
        return cls(
            pack_id=m.pack_id, pack_format_version=m.pack_format_version, family=m.family, args=args,
            formats=formats, num_moe_layers=m.num_moe_layers, num_experts=m.num_experts, top_k=m.top_k,
            dense_bytes=m.dense_bytes, tokenizer_files=tuple(m.tokenizer_files), pack_manifest=pack_manifest,
            shm_enabled=m.shm_enabled, shm_host_id=m.shm_host_id, ram_tier_bytes=m.ram_tier_bytes,
            max_chunk_bytes=m.max_chunk_bytes,
        )


# -- chunk reassembly (pure functions, unit-tested without a server) --------------------------


class _Decoder:
    """Decodes a DataChunk's payload; zstd only when the chunk says so."""

    def __init__(self) -> None:
        self._zstd = None

    def decode(self, chunk: pb.DataChunk, what: str) -> bytes:
        if chunk.compression == pb.COMPRESSION_NONE:
            return chunk.data
        if chunk.compression == pb.COMPRESSION_ZSTD:
            if self._zstd is None:
                import zstandard

                self._zstd = zstandard.ZstdDecompressor()
            try:
                data = self._zstd.decompress(chunk.data, max_output_size=chunk.uncompressed_bytes)
            except Exception as e:  # zstandard.ZstdError: damaged on the wire
                raise ChecksumError(f"{what}: undecodable zstd chunk at offset {chunk.offset_bytes} ({e})") from None
            if len(data) != chunk.uncompressed_bytes:
                raise ChecksumError(f"{what}: zstd chunk at {chunk.offset_bytes} decoded to {len(data)} bytes, "
                                    f"expected {chunk.uncompressed_bytes}")
            return data
        raise StoreError(f"{what}: unknown chunk compression {chunk.compression}")


def _place(buf: bytearray, offset: int, data: bytes, what: str) -> None:
    end = offset + len(data)
    if end > len(buf):
        raise StoreError(f"{what}: chunk [{offset}, {end}) runs past the blob's {len(buf)} bytes")
    buf[offset:end] = data


class ExpertChunkAssembler:
    """Reassembles a FetchExperts stream into verified blobs, by request index.

    `expected_crc32[i]` (from the manifest, when known) and the stream's own checksum on
    the last chunk must both match the bytes; otherwise ChecksumError.
    """

    def __init__(self, keys: Sequence[BlobKey], expected_crc32: Sequence[int | None]):
        self.keys = keys
        self.expected = expected_crc32
        self.done: dict[int, tuple[bytes, str]] = {}  # index -> (blob, tier name)
        self.wire_bytes = 0
        self._open: dict[int, tuple[bytearray, int]] = {}  # index -> (buffer, bytes received)
        self._decoder = _Decoder()

    def add(self, msg: pb.ExpertChunk) -> None:
        i = msg.index
        if not 0 <= i < len(self.keys):
            raise StoreError(f"FetchExperts: chunk for index {i}, the request had {len(self.keys)} experts")
        layer, expert, fmt = self.keys[i]
        what = f"expert (layer {layer}, expert {expert}, {fmt})"
        if (msg.key.layer, msg.key.expert) != (layer, expert):
            raise StoreError(f"{what}: the store answered index {i} with (layer {msg.key.layer}, "
                             f"expert {msg.key.expert})")
        if i in self.done:
            raise StoreError(f"{what}: more chunks after its last one")
        buf, received = self._open.get(i) or (bytearray(msg.total_bytes), 0)
        data = self._decoder.decode(msg.chunk, what)
        _place(buf, msg.chunk.offset_bytes, data, what)
        self.wire_bytes += len(msg.chunk.data)
        received += len(data)
        if not msg.last:
            self._open[i] = (buf, received)
            return
        self._open.pop(i, None)
        if received != len(buf):
            raise StoreError(f"{what}: got {received} bytes in chunks, the store announced {len(buf)}")
        blob = bytes(buf)
        got = verify_checksum(blob, msg.checksum, what) if msg.checksum else blob_digest(blob)
        want = self.expected[i]
        if want is not None and got != want:
            raise ChecksumError(f"{what}: checksum mismatch with the pack manifest (got xxh3_64 {got:016x}, "
                                f"manifest {want:08x}); refusing the bytes", layer, expert, fmt)
        if want is None and not msg.checksum:
            raise ChecksumError(f"{what}: no checksum from the store and none in the manifest; refusing the bytes")
        self.done[i] = (blob, _TIER_NAMES.get(msg.tier, "unknown"))


def assemble_dense(chunks: Iterable[pb.DenseChunk]) -> dict[str, torch.Tensor]:
    """Tensors from a StreamDense stream, each checked against its header's checksum."""
    out: dict[str, torch.Tensor] = {}
    decoder = _Decoder()
    cur: tuple[pb.TensorHeader, bytearray] | None = None
    for msg in chunks:
        if msg.HasField("header"):
            if cur is not None:
                raise StoreError(f"dense tensor {cur[0].name!r}: a new tensor began before its last chunk")
            cur = (msg.header, bytearray(msg.header.total_bytes))
        if cur is None or msg.name != cur[0].name:
            raise StoreError(f"dense tensor {msg.name!r}: chunk without a header")
        header, buf = cur
        what = f"dense tensor {header.name!r}"
        if msg.HasField("chunk"):
            _place(buf, msg.chunk.offset_bytes, decoder.decode(msg.chunk, what), what)
        if msg.last:
            verify_checksum(buf, header.checksum, what)
            out[header.name] = _tensor_from_bytes(header, buf)
            cur = None
    if cur is not None:
        raise StoreError(f"dense tensor {cur[0].name!r}: the stream ended before its last chunk")
    return out


def _tensor_from_bytes(header: pb.TensorHeader, buf: bytearray) -> torch.Tensor:
    dtype = SAFETENSORS_DTYPES.get(header.dtype)
    if dtype is None:
        raise StoreError(f"dense tensor {header.name!r}: unsupported dtype {header.dtype!r}")
    shape = tuple(int(s) for s in header.shape)
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize != len(buf):
        raise StoreError(f"dense tensor {header.name!r}: {len(buf)} bytes for shape {shape} {header.dtype}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)  # owns `buf` (no copy)


# -- the store over gRPC -----------------------------------------------------------------------


class StoreClient:
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
    ):
        if transport not in ("auto", "shm", "grpc"):
            raise StoreError(f"transport must be 'auto', 'shm' or 'grpc', got {transport!r}")
        if compression not in _COMPRESSION_TO_PB:
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
        self.counters = FetchCounters()
        self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.ExpertStoreStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._lock = threading.Lock()  # counters, segments, manifest
        self._manifest: StoreManifest | None = None
        self._crc32: dict[BlobKey, int] = {}
        self._transport: str | None = None
        self._segments: dict[str, SharedMemory] = {}  # attached store segments by name (never unlinked)

    # -- lifetime ---------------------------------------------------------------------------

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the store's health service says SERVING; StoreUnavailableError after `timeout_s`."""
        timeout_s = self.connect_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        service = ""  # the whole server; a store that registers only its service name answers NOT_FOUND
        while True:
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
        m = StoreManifest.from_pb(reply)
        with self._lock:
            if self._manifest is not None and m.pack_id != self._manifest.pack_id:
                raise StoreError(f"the store at {self.address} now serves pack {m.pack_id}, not "
                                 f"{self._manifest.pack_id}: restart the worker")
            self._manifest = m
            self._crc32 = m.expert_crc32s()
        return m

    def dense_tensors(self, names: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """Dense tensors (all when `names` is empty), checksum-verified, in their stored dtypes."""
        req = pb.StreamDenseRequest(names=list(names), compression=_COMPRESSION_TO_PB[self.compression])
        return self._call("StreamDense", lambda t: assemble_dense(self._stub.StreamDense(req, timeout=t)),
                          self.stream_timeout_s)

    def files(self, names: Sequence[str] = ()) -> dict[str, bytes]:
        """The pack's auxiliary files (tokenizer) by name; all of them when `names` is empty."""

        def run(timeout: float) -> dict[str, bytes]:
            out: dict[str, bytes] = {}
            bufs: dict[str, bytearray] = {}
            decoder = _Decoder()
            for msg in self._stub.StreamFiles(pb.StreamFilesRequest(names=list(names)), timeout=timeout):
                buf = bufs.setdefault(msg.name, bytearray(msg.total_bytes))
                if msg.HasField("chunk"):
                    _place(buf, msg.chunk.offset_bytes, decoder.decode(msg.chunk, f"file {msg.name!r}"),
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
            if k[2] not in _FORMAT_TO_PB:
                raise StoreError(f"unknown expert format {k[2]!r} (known: {', '.join(_FORMAT_TO_PB)})")
        if self.transport == "shm":
            results, rest = self._fetch_shm(keys, priority)
        else:
            results, rest = {}, list(range(len(keys)))
        if rest:
            results.update(self._fetch_grpc(keys, rest, priority))
        return [results[i] for i in range(len(keys))]

    def _fetch_grpc(self, keys: Sequence[BlobKey], indices: list[int], priority: Priority) -> dict[int, FetchedBlob]:
        t0 = time.perf_counter_ns()
        sub = [keys[i] for i in indices]
        asm = ExpertChunkAssembler(sub, [self._crc32.get(k) for k in sub])
        attempt = 0
        while True:
            todo = [j for j in range(len(sub)) if j not in asm.done]
            req = pb.FetchExpertsRequest(
                experts=[_key_pb(sub[j]) for j in todo], priority=_PRIORITY_TO_PB[priority],
                compression=_COMPRESSION_TO_PB[self.compression], client_id=self.client_id)
            part = ExpertChunkAssembler([sub[j] for j in todo], [asm.expected[j] for j in todo])
            call = self._stub.FetchExperts(req, timeout=self.fetch_timeout_s)
            try:
                for msg in call:
                    part.add(msg)
            except grpc.RpcError as e:
                attempt = self._retry_or_raise("FetchExperts", e, attempt)
                continue
            except BaseException:
                call.cancel()  # a bad chunk: stop the store sending the rest
                raise
            finally:  # keep what arrived whole: a retry asks only for the rest
                asm.wire_bytes += part.wire_bytes
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
            c.fetch_ns_grpc += dt
            self._count_tiers(out.values())
        return out

    def _fetch_shm(self, keys: Sequence[BlobKey], priority: Priority) -> tuple[dict[int, FetchedBlob], list[int]]:
        """Leased copies out of the store's segment; returns (blobs by index, indices left for gRPC)."""
        t0 = time.perf_counter_ns()
        req = pb.FetchExpertsShmRequest(experts=[_key_pb(k) for k in keys], priority=_PRIORITY_TO_PB[priority],
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
                out[i] = FetchedBlob(keys[i], blob, _TIER_NAMES.get(d.tier, "unknown"), "shm")
        finally:  # copies done (or failed): the store may reuse the slots
            self._release([d.lease_id for d in reply.descriptors])
        rest |= set(range(len(keys))) - set(out) - rest
        dt = time.perf_counter_ns() - t0
        with self._lock:
            c = self.counters
            c.experts_shm += len(out)
            c.bytes_fetched_shm += sum(b.nbytes for b in out.values())
            c.fetch_ns_shm += dt
            c.shm_unavailable += len(rest)
            self._count_tiers(out.values())
        return out, sorted(rest)

    def _copy_out(self, d: pb.ShmDescriptor, key: BlobKey) -> bytes | None:
        """The leased bytes, copied and verified; None when the segment cannot be mapped (use gRPC)."""
        what = f"expert (layer {key[0]}, expert {key[1]}, {key[2]}) in shm {d.segment_name}@{d.offset_bytes}"
        with self._lock:  # a copy holds the GIL anyway; the lock keeps a re-attach from closing it mid-copy
            seg = self._segment(d.segment_name, d.offset_bytes + d.length_bytes)
            if seg is None:
                return None
            blob = bytes(seg.buf[d.offset_bytes:d.offset_bytes + d.length_bytes])  # the one copy
        got = verify_checksum(blob, d.checksum, what) if d.checksum else blob_digest(blob)
        want = self._crc32.get(key)
        if want is not None and got != want:
            raise ChecksumError(f"{what}: checksum mismatch with the pack manifest (got xxh3_64 {got:016x}, "
                                f"manifest {want:08x}); refusing the bytes", *key)
        if want is None and not d.checksum:
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

    def _count_tiers(self, blobs: Iterable[FetchedBlob]) -> None:
        for b in blobs:
            if b.tier == "ram":
                self.counters.tier_ram += 1
            elif b.tier == "nvme":
                self.counters.tier_nvme += 1

    # -- errors and retries --------------------------------------------------------------------

    def _call(self, what: str, fn, timeout_s: float):
        attempt = 0
        while True:
            try:
                return fn(timeout_s)
            except grpc.RpcError as e:
                attempt = self._retry_or_raise(what, e, attempt)

    def _retry_or_raise(self, what: str, e: grpc.RpcError, attempt: int) -> int:
        """Sleep and return the next attempt number for a transient UNAVAILABLE; raise otherwise."""
        if e.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.max_retries:
            with self._lock:
                self.counters.retries += 1
            time.sleep(self.retry_backoff_s * (2 ** attempt))
            return attempt + 1
        raise self._error(what, e) from None

    def _error(self, what: str, e: grpc.RpcError) -> StoreError:
        code = e.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return StoreUnavailableError(
                f"expert store at {self.address} unavailable ({what}, {self.max_retries} retries): {e.details()}",
                code)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return StoreUnavailableError(f"expert store at {self.address} did not answer {what} in time", code)
        if code == grpc.StatusCode.DATA_LOSS:
            return ChecksumError(f"expert store at {self.address}: {what}: {e.details()}")
        return StoreError(f"expert store at {self.address}: {what} failed: {code.name}: {e.details()}", code)


def _detach(seg: SharedMemory) -> None:
    try:
        seg.close()  # never unlink: the segment is the store's
    except BufferError:
        pass  # a view is still out; the mapping goes with it


def _key_pb(key: BlobKey) -> pb.ExpertKey:
    return pb.ExpertKey(layer=key[0], expert=key[1], format=_FORMAT_TO_PB[key[2]])


# -- in process --------------------------------------------------------------------------------


class PackFetcher:
    """`fetch()` straight from an open Pack (zero-copy views over its mmap, xxh3_64-checked on first read)."""

    def __init__(self, pack):
        self.pack = pack
        self.counters = FetchCounters()
        self._lock = threading.Lock()

    def fetch(self, keys: Sequence[BlobKey], priority: Priority = "demand") -> list[FetchedBlob]:
        t0 = time.perf_counter_ns()
        out = [FetchedBlob(k, self.pack.expert_blob(*k), "local", "local") for k in keys]
        dt = time.perf_counter_ns() - t0
        with self._lock:
            self.counters.experts_local += len(out)
            self.counters.bytes_fetched_local += sum(b.nbytes for b in out)
            self.counters.fetch_ns_local += dt
        return out
