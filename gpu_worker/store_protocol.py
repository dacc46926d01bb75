"""The store's protocol as the worker reads it: errors, the manifest, chunk reassembly, checksums.

Pure functions and dataclasses over the moe.v1 messages, unit-tested without a server;
`store_client.StoreClient` drives them over gRPC.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Literal, Protocol, Sequence

import grpc
import torch

from moe.v1 import store_pb2 as pb
from expert_store.checksums import BLOB_CHECKSUM, blob_digest, digest_for
from expert_store.errors import ChecksumError, FateError
from expert_store.model_args import ModelArgs
from expert_store.wire import payload_of

BlobKey = tuple[int, int, str]  # (decoder layer, expert, stored format)
Priority = Literal["demand", "prefetch"]

FORMAT_TO_PB = {
    "bf16": pb.EXPERT_FORMAT_BF16,
    "int8": pb.EXPERT_FORMAT_INT8,
    "int4": pb.EXPERT_FORMAT_INT4,
    "int2": pb.EXPERT_FORMAT_INT2,
}
PB_TO_FORMAT = {v: k for k, v in FORMAT_TO_PB.items()}
TIER_NAMES = {pb.STORE_TIER_RAM: "ram", pb.STORE_TIER_NVME: "nvme", pb.STORE_TIER_UNSPECIFIED: "unknown"}
PRIORITY_TO_PB = {"demand": pb.FETCH_PRIORITY_DEMAND, "prefetch": pb.FETCH_PRIORITY_PREFETCH}
COMPRESSION_TO_PB = {"none": pb.COMPRESSION_NONE, "zstd": pb.COMPRESSION_ZSTD}

# safetensors dtype names (TensorHeader.dtype) -> torch dtypes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip

class StoreError(FateError):
    """The store refused a request or broke the protocol (the message has the gRPC status)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class StoreUnavailableError(StoreError):
    """The store cannot be reached (down, restarting, or not answering within the deadline)."""


class PackChangedError(StoreError):
    """The store came back serving another pack than the one this worker loaded: restart the worker."""

    def __init__(self, message: str):
        super().__init__(message, grpc.StatusCode.FAILED_PRECONDITION)


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
    shm_segment_name: str = ""  # the RAM tier's data segment ("" : no slot directory)
    shm_directory_name: str = ""  # its slot directory (expert_store/slot_directory.py)

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
            PB_TO_FORMAT[f.format]: StoreFormatInfo(int(f.expert_bytes), int(f.group_size))
            for f in m.formats if f.format in PB_TO_FORMAT
        }
        return cls(
            pack_id=m.pack_id, pack_format_version=m.pack_format_version, family=m.family, args=args,
            formats=formats, num_moe_layers=m.num_moe_layers, num_experts=m.num_experts, top_k=m.top_k,
            dense_bytes=m.dense_bytes, tokenizer_files=tuple(m.tokenizer_files), pack_manifest=pack_manifest,
            shm_enabled=m.shm_enabled, shm_host_id=m.shm_host_id, ram_tier_bytes=m.ram_tier_bytes,
            max_chunk_bytes=m.max_chunk_bytes, shm_segment_name=m.shm_segment_name,
            shm_directory_name=m.shm_directory_name,
        )


# -- chunk reassembly (pure functions, unit-tested without a server) --------------------------


class ChunkDecoder:
    """Decodes a DataChunk's or ExpertPart's payload; zstd only when it says so."""

    def __init__(self) -> None:
        self._zstd = None

    def decode(self, chunk: pb.DataChunk, what: str) -> bytes:
        return self.decode_data(chunk.data, chunk.compression, chunk.uncompressed_bytes, chunk.offset_bytes, what)

    def decode_data(self, data: bytes | memoryview, compression: int, uncompressed_bytes: int, offset: int,
                    what: str) -> bytes | memoryview:
        if compression == pb.COMPRESSION_NONE:
            return data
        if compression == pb.COMPRESSION_ZSTD:
            if self._zstd is None:
                import zstandard

                self._zstd = zstandard.ZstdDecompressor()
            try:
                out = self._zstd.decompress(data, max_output_size=uncompressed_bytes)
            except Exception as e:  # zstandard.ZstdError: damaged on the wire
                raise ChecksumError(f"{what}: undecodable zstd data at offset {offset} ({e})") from None
            if len(out) != uncompressed_bytes:
                raise ChecksumError(f"{what}: zstd data at {offset} decoded to {len(out)} bytes, "
                                    f"expected {uncompressed_bytes}")
            return out
        raise StoreError(f"{what}: unknown compression {compression}")


def place_chunk(buf: bytearray, offset: int, data: bytes | memoryview, what: str) -> None:
    end = offset + len(data)
    if end > len(buf):
        raise StoreError(f"{what}: chunk [{offset}, {end}) runs past the blob's {len(buf)} bytes")
    buf[offset:end] = data


@dataclass(frozen=True)
class BlobsMessage:
    """One FetchExperts reply message as the client keeps it: the parts' index, and the payload as a view
    of the received bytes (nothing copied)."""

    parts: Sequence[pb.ExpertPart]
    payload: memoryview
    nbytes: int  # the message's size on the wire


def parse_expert_blobs(message: bytes) -> BlobsMessage:
    """FetchExperts' response deserializer: the index parsed, the payload a view of `message` (a message
    framed otherwise than the store frames it is parsed whole, its payload then a view of the parsed copy)."""
    try:
        index, payload = payload_of(message)
        parts = pb.ExpertBlobIndex.FromString(index).parts
    except ValueError:
        m = pb.ExpertBlobs.FromString(message)
        parts, payload = m.index.parts, memoryview(m.payload)
    return BlobsMessage(parts, payload, len(message))


class ExpertBlobAssembler:
    """Verified blobs, by request index, from FetchExperts reply messages.

    An expert that arrives whole and uncompressed (the usual case) is a view of the received message:
    with `zero_copy`, handed on as it is (the worker's build views it too, so a cached expert keeps its
    reply message alive); without, copied once into its own bytes. Experts in parts or zstd-compressed
    are decoded into a buffer of their own. `expected_crc32[i]` (the manifest's xxh3_64, when known)
    and the store's checksum on the last part must both match the bytes; otherwise ChecksumError.
    """

    def __init__(self, keys: Sequence[BlobKey], expected_crc32: Sequence[int | None], zero_copy: bool = True):
        self.keys = keys
        self.expected = expected_crc32
        self.zero_copy = zero_copy
        self.done: dict[int, tuple[bytes | bytearray | memoryview, str]] = {}  # index -> (blob, tier name)
        self.wire_bytes = 0
        self.messages = 0
        self._open: dict[int, tuple[bytearray, int]] = {}  # index -> (buffer, bytes received)
        self._decoder = ChunkDecoder()

    def add(self, msg: BlobsMessage) -> None:
        self.messages += 1
        for part in msg.parts:
            self._add_part(part, msg.payload)

    def _add_part(self, part: pb.ExpertPart, payload: memoryview) -> None:
        i = part.index
        if not 0 <= i < len(self.keys):
            raise StoreError(f"FetchExperts: a part for index {i}, the request had {len(self.keys)} experts")
        layer, expert, fmt = self.keys[i]
        what = f"expert (layer {layer}, expert {expert}, {fmt})"
        if (part.key.layer, part.key.expert) != (layer, expert):
            raise StoreError(f"{what}: the store answered index {i} with (layer {part.key.layer}, "
                             f"expert {part.key.expert})")
        if i in self.done:
            raise StoreError(f"{what}: more parts after its last one")
        a, n = part.payload_offset_bytes, part.payload_bytes
        if a + n > len(payload):
            raise StoreError(f"{what}: part [{a}, {a + n}) runs past the message's {len(payload)} payload bytes")
        data = self._decoder.decode_data(payload[a:a + n], part.compression, part.uncompressed_bytes,
                                         part.offset_bytes, what)
        self.wire_bytes += n
        blob: bytes | bytearray | memoryview
        if part.last and part.offset_bytes == 0 and i not in self._open:  # whole in this message
            if len(data) != part.total_bytes:
                raise StoreError(f"{what}: got {len(data)} bytes, the store announced {part.total_bytes}")
            blob = data if self.zero_copy or not isinstance(data, memoryview) else bytes(data)
        else:
            buf, received = self._open.get(i) or (bytearray(part.total_bytes), 0)
            place_chunk(buf, part.offset_bytes, data, what)
            received += len(data)
            if not part.last:
                self._open[i] = (buf, received)
                return
            self._open.pop(i, None)
            if received != len(buf):
                raise StoreError(f"{what}: got {received} bytes in parts, the store announced {len(buf)}")
            blob = buf
        got = verify_checksum(blob, part.checksum, what) if part.checksum else blob_digest(blob)
        want = self.expected[i]
        if want is not None and got != want:
            raise ChecksumError(f"{what}: checksum mismatch with the pack manifest (got xxh3_64 {got:016x}, "
                                f"manifest {want:016x}); refusing the bytes", layer, expert, fmt)
        if want is None and not part.checksum:
            raise ChecksumError(f"{what}: no checksum from the store and none in the manifest; refusing the bytes")
        self.done[i] = (blob, TIER_NAMES.get(part.tier, "unknown"))


def assemble_dense(chunks: Iterable[pb.DenseChunk]) -> dict[str, torch.Tensor]:
    """Tensors from a StreamDense stream, each checked against its header's checksum."""
    out: dict[str, torch.Tensor] = {}
    decoder = ChunkDecoder()
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
            place_chunk(buf, msg.chunk.offset_bytes, decoder.decode(msg.chunk, what), what)
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


# -- what a fetch returns ---------------------------------------------------------------------


@dataclass(frozen=True)
class FetchedBlob:
    """One expert blob in our memory, checksum-verified."""

    key: BlobKey
    # the blob's bytes: a memoryview over the pack's mmap (PackFetcher), bytes copied out of shared memory,
    # a view of the gRPC reply message, or a buffer of its own (an expert that came in parts)
    data: bytes | bytearray | memoryview
    tier: str  # where the store found it: "ram", "nvme"; "local" for PackFetcher
    transport: str  # how it came: "shm", "grpc", "local"

    @property
    def nbytes(self) -> int:
        return len(self.data)


class ExpertFetcher(Protocol):
    def fetch(self, keys: Sequence[BlobKey], priority: Priority = "demand") -> list[FetchedBlob]:
        """The blobs of `keys`, in the order asked. Raises rather than return a bad blob."""

    # Optional: `in_memory(keys) -> list[bool]`, which of `keys` a fetch would copy at memory speed
    # (no round trip, no disk read). The prefetch controller copies those on the compute thread and
    # leaves the rest to the prefetch thread; a fetcher without it has every prefetch go to the thread.


@dataclass
class FetchCounters:
    """Totals since start; read `snapshot()` for a consistent copy."""

    experts_shm: int = 0
    experts_grpc: int = 0
    experts_local: int = 0
    bytes_fetched_shm: int = 0
    bytes_fetched_grpc: int = 0  # decoded bytes (after zstd)
    bytes_wire_grpc: int = 0  # expert bytes as they crossed the socket (after zstd)
    messages_grpc: int = 0  # FetchExperts reply messages (one per batch unless it exceeds a message)
    bytes_fetched_local: int = 0
    fetch_ns_shm: int = 0  # directory copies + FetchExpertsShm + copy + verify + ReleaseLeases
    shm_directory_hits: int = 0  # experts copied through the slot directory (no RPC)
    shm_directory_retries: int = 0  # directory copies thrown away: the slot was reused meanwhile
    fetch_ns_grpc: int = 0
    fetch_ns_local: int = 0
    tier_ram: int = 0  # experts the store served from its RAM tier
    tier_nvme: int = 0
    tier_ram_demand: int = 0  # of tier_ram, fetched for a cache miss (not a prefetch)
    tier_nvme_demand: int = 0
    shm_unavailable: int = 0  # experts the store could not lease (fetched over gRPC instead)
    retries: int = 0  # RPCs retried after UNAVAILABLE
    release_failures: int = 0  # ReleaseLeases calls that failed (the leases expire by TTL)

    def snapshot(self) -> "FetchCounters":
        return FetchCounters(**vars(self))
