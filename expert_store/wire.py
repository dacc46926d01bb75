"""Compression on the wire: zstd for reply chunks, used only where it pays."""

from __future__ import annotations

import enum
import threading
from typing import Any

import zstandard


class Compression(enum.Enum):
    """How one chunk's bytes travel (the edge maps it to the protocol's enum)."""

    NONE = "none"
    ZSTD = "zstd"


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

    def encode(self, raw: bytes) -> tuple[bytes, Compression]:
        """(data, compression) for one chunk: zstd if it pays, else the raw bytes."""
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=self.level)
        packed = compressor.compress(raw)
        if zstd_pays(len(raw), len(packed), self.min_saving):
            return packed, Compression.ZSTD
        return raw, Compression.NONE




# -- FetchExperts reply messages, framed by hand ---------------------------------------------------
#
# An `ExpertBlobs` message (proto/moe/v1/store.proto) is written here rather than by protobuf, so that
# its payload is assembled straight from the blobs' memory (views of pinned RAM-tier slots, or what
# was read from NVMe) in one join: the store's only copy. The bytes are ordinary protobuf (fields
# index = 1, padding = 2, payload = 3, in that order); a client may parse them with the generated
# class or take the payload as a view of the received message.

PAYLOAD_ALIGN = 64  # each part's data starts at a multiple of this in the payload, and the payload in the message
_LEN = 2  # protobuf wire type of length-delimited fields
_TAG_INDEX, _TAG_PADDING, _TAG_PAYLOAD = (1 << 3) | _LEN, (2 << 3) | _LEN, (3 << 3) | _LEN
_ZEROS = bytes(PAYLOAD_ALIGN)


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """(value, position after it); ValueError past the end or over 10 bytes."""
    value = shift = 0
    for i in range(pos, min(pos + 10, len(data))):
        b = data[i]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i + 1
        shift += 7
    raise ValueError("truncated or overlong varint")


def payload_layout(sizes: list[int]) -> tuple[list[int], int]:
    """(offset of each piece in the payload, payload length): pieces in order, each at a PAYLOAD_ALIGN boundary."""
    offsets, pos = [], 0
    for n in sizes:
        offsets.append(pos)
        pos += n + (-n % PAYLOAD_ALIGN)
    return offsets, (offsets[-1] + sizes[-1]) if sizes else 0


def frame_expert_blobs(index: bytes, pieces: list[Any], offsets: list[int], payload_nbytes: int) -> bytes:
    """One ExpertBlobs message: `index` (a serialized ExpertBlobIndex), padding, then the payload made of
    `pieces` (buffers) at `offsets` (from payload_layout), joined in one copy."""
    head = bytes([_TAG_INDEX]) + varint(len(index)) + index
    tail = bytes([_TAG_PAYLOAD]) + varint(payload_nbytes)
    pad = -(len(head) + 2 + len(tail)) % PAYLOAD_ALIGN  # + 2: the padding field's tag and 1-byte length
    out: list[Any] = [head, bytes([_TAG_PADDING, pad]), _ZEROS[:pad], tail]
    pos = 0
    for piece, off in zip(pieces, offsets):
        if off > pos:
            out.append(_ZEROS[: off - pos])
        out.append(piece)
        pos = off + len(piece)
    return b"".join(out)


def payload_of(message: bytes) -> tuple[memoryview, memoryview]:
    """(the serialized ExpertBlobIndex, the payload) of an ExpertBlobs message, both views of `message`;
    ValueError unless its fields are index, padding (optional), payload, each once and in that order
    (as frame_expert_blobs, and protobuf itself, write them): parse such a message with the generated class."""
    view, pos, found = memoryview(message), 0, {}
    while pos < len(view):
        tag = view[pos]
        if tag not in (_TAG_INDEX, _TAG_PADDING, _TAG_PAYLOAD) or any(t >= tag for t in found):
            raise ValueError("not framed as index, padding, payload")
        n, start = read_varint(view, pos + 1)
        pos = start + n
        if pos > len(view):
            raise ValueError("a field runs past the end of the message")
        found[tag] = view[start:pos]
    empty = view[:0]
    return found.get(_TAG_INDEX, empty), found.get(_TAG_PAYLOAD, empty)
