"""Checksums of expert blobs: xxh3_64 (xxhash), as the pack manifest and the protocol write them.

Why xxh3_64: a blob is checked every time it crosses a process or enters a tier, and a
cache miss served from shared memory costs a few microseconds of copying; zlib's crc32
(~1 GB/s here) cost more than the copy, xxh3 runs at memory speed (bench/expert_fetch.py
measures both). The protocol writes a checksum as "<algorithm>:<hex digest>"; dense
tensors are still "crc32:..." (checked once, at start-up), so readers accept both.
"""

from __future__ import annotations

import zlib
from typing import Union

import xxhash

BLOB_CHECKSUM = "xxh3_64"  # the manifest's "checksum" and the protocol's prefix for expert blobs

Buffer = Union[bytes, bytearray, memoryview]


def blob_digest(data: Buffer) -> int:
    """xxh3_64 of `data` as an unsigned 64-bit int (the manifest stores it)."""
    return xxhash.xxh3_64_intdigest(data)


def blob_checksum(digest: int) -> str:
    """The protocol's string for a blob digest: "xxh3_64:<16 hex digits>"."""
    return f"{BLOB_CHECKSUM}:{digest:016x}"


def new_hasher() -> "xxhash.xxh3_64":
    """An incremental xxh3_64 (`update(piece)`, then `intdigest()`): the same value as blob_digest."""
    return xxhash.xxh3_64()


def digest_for(algorithm: str, data: Buffer) -> int | None:
    """`data`'s digest under a protocol algorithm name, or None for an algorithm we do not know."""
    if algorithm == BLOB_CHECKSUM:
        return xxhash.xxh3_64_intdigest(data)
    if algorithm == "crc32":
        return zlib.crc32(data)
    return None
