"""dense.safetensors read raw: each tensor's byte range from the header, a crc32 per tensor."""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import ChecksumError, PackError

_DENSE_SCAN_PIECE = 16 << 20


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


