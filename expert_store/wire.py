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


