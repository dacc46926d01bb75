"""The byte order in which torch's CPU int4 matmul reads its weights, so packs can store it.

`torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, G, scales_and_zeros)` reads `w` as
uint8 [N, K/2], the order `_convert_weight_to_int4pack_for_cpu` writes. That order
depends on the instruction set torch dispatches to on this CPU (torch 2.4-2.13):

    rows in blocks of `block_n` (64 on AVX512, 32 on AVX2 and the scalar build); a block
    is stored k-major: for each k, block_n / 2 bytes;
    full blocks, AVX512 / AVX2 ("split"): byte j holds row j (low nibble) and row
        j + block_n / 2 (high nibble);
    the last block when N is not a multiple of block_n (16, 32 or 48 rows), and every
    block of the scalar build ("adjacent"): byte j holds rows 2j (low) and 2j + 1 (high).

A pack records the layout its int4/int2 blobs use (`Int4Layout.record()`: the name and
a fingerprint: the xxh3_64 of a fixed probe matrix in that layout). A worker compares the
fingerprint with what its own kernel makes of the probe (`kernel_fingerprint()`) before
it hands blob bytes to the kernel unchanged.

INT2 is stored at 2 bits, as the same nibble stream compressed: the kernel's nibble for
an int2 code c is c + 6 (codes centred in the int4 range), so the int2 byte i holds the
nibbles 4i..4i+3 of the int4 stream, minus 6, two bits each from bit 0 up.
`expand_int2` turns it back into int4 kernel bytes with one table lookup.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import xxhash
from torch import Tensor

INT2_NIBBLE_OFFSET = 6  # int4 nibble = int2 code + 6: the codes sit around the kernel's zero point 8
_PROBE_SHAPE = (112, 64)  # one full 64-row block plus a 48-row tail (three 32-row blocks plus 16)


class Int4LayoutError(ValueError):
    """A layout name that is not one of ours, or a torch whose int4 CPU layout we do not know."""


@dataclass(frozen=True)
class Int4Layout:
    """One byte order of int4 codes for torch's CPU int4 kernel (module docstring)."""

    block_n: int  # rows per block
    split: bool  # full blocks pair row j with row j + block_n/2; False: rows 2j and 2j+1

    @property
    def name(self) -> str:
        return f"n{self.block_n}-{'split' if self.split else 'adjacent'}"

    @classmethod
    def from_name(cls, name: str) -> "Int4Layout":
        for layout in KNOWN_LAYOUTS:
            if layout.name == name:
                return layout
        raise Int4LayoutError(f"unknown int4 layout {name!r} (known: {', '.join(l.name for l in KNOWN_LAYOUTS)})")

    def fingerprint(self) -> str:
        """xxh3_64 of the probe matrix in this layout: equal to kernel_fingerprint() on a CPU that uses it."""
        return _fingerprint(self)

    def record(self) -> dict[str, str]:
        """What a manifest stores about the layout of its int4/int2 blobs."""
        return {"name": self.name, "fingerprint": self.fingerprint()}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Int4Layout":
        layout = cls.from_name(str(record["name"]))
        if str(record.get("fingerprint")) != layout.fingerprint():
            raise Int4LayoutError(f"int4 layout {layout.name}: fingerprint {record.get('fingerprint')!r} does not "
                                  f"match the layout's own ({layout.fingerprint()})")
        return layout


KNOWN_LAYOUTS: tuple[Int4Layout, ...] = (
    Int4Layout(64, True),  # AVX512
    Int4Layout(32, True),  # AVX2
    Int4Layout(32, False),  # scalar build (Vectorized<float> of 8)
    Int4Layout(64, False),  # scalar build with 16-wide vectors
)


def _digest(t: Tensor) -> str:
    return f"xxh3_64:{xxhash.xxh3_64_hexdigest(t.contiguous().cpu().numpy().tobytes())}"


@functools.lru_cache(maxsize=16)
def _fingerprint(layout: Int4Layout) -> str:
    return _digest(pack_nibbles(probe_codes().to(torch.uint8), layout))


def probe_codes() -> Tensor:
    """A fixed int32 [112, 64] matrix of codes 0..15 with no symmetry a layout could hide in."""
    n = torch.arange(_PROBE_SHAPE[0]).unsqueeze(1)
    k = torch.arange(_PROBE_SHAPE[1]).unsqueeze(0)
    return ((n * 7 + k * 11 + (n * k) % 13) % 16).to(torch.int32)


@functools.lru_cache(maxsize=1)
def kernel_fingerprint() -> str:
    """xxh3_64 of what this machine's torch kernel makes of the probe matrix."""
    return _digest(torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe_codes(), 1))


@functools.lru_cache(maxsize=1)
def native_layout() -> Int4Layout | None:
    """The layout this machine's int4 CPU kernel uses, or None when it is none of KNOWN_LAYOUTS."""
    want = kernel_fingerprint()
    return next((layout for layout in KNOWN_LAYOUTS if layout.fingerprint() == want), None)


def require_native_layout() -> Int4Layout:
    layout = native_layout()
    if layout is None:
        raise Int4LayoutError(
            f"torch {torch.__version__}'s int4 CPU kernel uses a weight layout this fate-moe does not know "
            f"(probe fingerprint {kernel_fingerprint()}); pack with a torch whose layout is one of "
            f"{', '.join(l.name for l in KNOWN_LAYOUTS)}")
    return layout


def _split_rows(n_rows: int, layout: Int4Layout) -> tuple[int, int]:
    """(full blocks, rows in the last partial block)."""
    if n_rows % 16:
        raise Int4LayoutError(f"int4 kernel rows must be a multiple of 16, got {n_rows}")
    return n_rows // layout.block_n, n_rows % layout.block_n


def pack_nibbles(codes: Tensor, layout: Int4Layout) -> Tensor:
    """uint8 codes [Np, Kp] (values 0..15) -> flat uint8 [Np * Kp / 2] in `layout`, on codes' device."""
    n_rows, k = codes.shape
    full, tail = _split_rows(n_rows, layout)
    b = layout.block_n
    parts = []
    if full:
        blk = codes[: full * b].reshape(full, b, k).transpose(1, 2)  # [NB, Kp, B]
        lo, hi = (blk[..., : b // 2], blk[..., b // 2:]) if layout.split else (blk[..., 0::2], blk[..., 1::2])
        parts.append((lo | (hi << 4)).reshape(-1))  # [NB, Kp, B/2]
    if tail:
        t = codes[full * b:].t()  # [Kp, tail]
        parts.append((t[:, 0::2] | (t[:, 1::2] << 4)).reshape(-1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def unpack_nibbles(packed: Tensor, n_rows: int, k: int, layout: Int4Layout) -> Tensor:
    """Inverse of pack_nibbles: flat uint8 [Np * Kp / 2] -> uint8 codes [Np, Kp]."""
    full, tail = _split_rows(n_rows, layout)
    b = layout.block_n
    parts = []
    if full:
        blk = packed[: full * k * b // 2].view(full, k, b // 2)
        lo, hi = blk & 0x0F, blk >> 4
        both = torch.cat([lo, hi], dim=2) if layout.split else torch.stack([lo, hi], dim=3).view(full, k, b)
        parts.append(both.transpose(1, 2).reshape(full * b, k))  # [NB * B, Kp]
    if tail:
        t = packed[full * k * b // 2:].view(k, tail // 2)
        parts.append(torch.stack([t & 0x0F, t >> 4], dim=2).view(k, tail).t())
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def compress_int2(int4_bytes: Tensor) -> Tensor:
    """int4 kernel bytes whose nibbles are all 6..9 -> the int2 stream (half the bytes)."""
    pairs = int4_bytes.view(-1, 2)  # two int4 bytes = four nibbles = one int2 byte
    v = [(pairs[:, 0] & 0x0F), pairs[:, 0] >> 4, (pairs[:, 1] & 0x0F), pairs[:, 1] >> 4]
    out = v[0] - INT2_NIBBLE_OFFSET
    for i in range(1, 4):
        out |= (v[i] - INT2_NIBBLE_OFFSET) << (2 * i)
    return out


@functools.lru_cache(maxsize=8)
def _int2_table(device: torch.device) -> Tensor:
    """int32 [65536]: two int2 bytes (one little-endian uint16) -> the four int4 kernel bytes they stand for."""
    def bytes_of(q: Tensor) -> Tensor:  # one int2 byte -> two int4 bytes as a 16-bit value
        nib = [((q >> (2 * i)) & 3) + INT2_NIBBLE_OFFSET for i in range(4)]
        return nib[0] | (nib[1] << 4) | (nib[2] << 8) | (nib[3] << 12)

    pair = torch.arange(1 << 16, dtype=torch.int64)
    word = bytes_of(pair & 0xFF) | (bytes_of(pair >> 8) << 16)  # little-endian: first byte lowest
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32).to(device)  # the same 32 bits


def expand_int2(int2_bytes: Tensor) -> Tensor:
    """The int2 stream (even length) -> int4 kernel bytes (twice the bytes): one lookup per two bytes.

    A 256 KiB table indexed by uint16 pairs: 11 us for a tiny-mixtral matrix (18 KiB), 3x
    faster than a 256-entry table per byte, 5-8x faster than shifts and masks."""
    table = _int2_table(int2_bytes.device)
    flat = int2_bytes.reshape(-1)
    if flat.device.type == "cpu":
        index = flat.view(torch.uint16).to(torch.int32)
    else:  # uint16 arithmetic is CPU-only in older torch; int16 and a mask work everywhere
        index = flat.view(torch.int16).to(torch.int32) & 0xFFFF
    return table.index_select(0, index).view(torch.uint8)
