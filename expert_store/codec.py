"""Group-wise quantization of expert weights and the on-disk layout of one expert.

Why group-wise asymmetric min-max: expert weights are moved far more often than they
are computed with, so bytes per parameter decide fetch time (Fate sends INT4 and INT2).
A per-group (scale, min) keeps outliers local to their group; asymmetric (min stored)
uses the whole code range for skewed groups.

Quantization (per row, along the input = last dimension, groups of `group_size`):
    scale = (max - min) / (2**bits - 1)        stored fp16, rounded UP
    min                                       stored fp16, rounded DOWN
    code  = clamp(round((w - min) / scale), 0, 2**bits - 1)
    w'    = code * scale + min
Rounding min down and scale up keeps [min, min + (2**bits-1)*scale] around every value
of the group after the fp16 rounding, so |w - w'| <= scale / 2 holds with the stored
values. A constant group has scale 0 (codes 0, w' = min). An input dim that is not a
multiple of the group size is padded (replicating the row's last value, which leaves
the last group's min/max unchanged); the padded codes are stored, the shape is exact.

Blob layout of one expert, LAYOUT_VERSION 1 (the pack manifest records the version).
No header: every offset follows from (format, hidden, inter).
    matrices in order: gate [inter, hidden], up [inter, hidden], down [hidden, inter]
    quantized formats, per matrix (out, in), G = group_size, NG = ceil(in / G):
        codes  uint8 [out, NG * G * bits / 8]   little-endian bit packing inside a byte:
               int4: element 2j -> bits 0-3, 2j+1 -> bits 4-7
               int2: element 4j+i -> bits 2i..2i+1;  int8: one code per byte
        scales fp16  [out, NG]   (native little-endian)
        mins   fp16  [out, NG]
    bf16, per matrix: weight bf16 [out, in]
    every section starts at a multiple of ALIGN (16) bytes, zero-padded, so fp16/bf16
    views straight off the blob (or an mmap) are legal; the blob size is the padded sum.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from torch import Tensor

LAYOUT_VERSION = 1
ALIGN = 16
MATRIX_NAMES = ("gate", "up", "down")

BlobLike = Union[bytes, bytearray, memoryview, np.ndarray, Tensor]


class CodecError(ValueError):
    """Unknown format, wrong blob size, bad shapes or values that fp16 cannot hold."""


@dataclass(frozen=True)
class FormatSpec:
    """One stored format of an expert."""

    name: str
    bits: int  # bits per stored weight (16 for bf16)
    group_size: int  # inputs per (scale, min) group; 0 for bf16 (not quantized)

    @property
    def quantized(self) -> bool:
        return self.group_size > 0


FORMATS: dict[str, FormatSpec] = {
    "bf16": FormatSpec("bf16", 16, 0),
    "int8": FormatSpec("int8", 8, 128),
    "int4": FormatSpec("int4", 4, 64),
    "int2": FormatSpec("int2", 2, 32),
}


@dataclass
class QuantizedMatrix:
    """A group-quantized [out, in] matrix; tensors may be views into a blob."""

    codes: Tensor  # uint8 [out, n_groups * group_size * bits / 8]
    scales: Tensor  # fp16 [out, n_groups]
    mins: Tensor  # fp16 [out, n_groups]
    shape: tuple[int, int]  # (out, in), unpadded
    bits: int
    group_size: int

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins))

    def to(self, device: torch.device | str, copy: bool = False) -> QuantizedMatrix:
        """On `device`; copy=True gives owned tensors (a view keeps a whole blob or mmap alive)."""
        return QuantizedMatrix(self.codes.to(device, copy=copy), self.scales.to(device, copy=copy),
                               self.mins.to(device, copy=copy), self.shape, self.bits,
                               self.group_size)


def format_spec(fmt: str) -> FormatSpec:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise CodecError(f"unknown expert format {fmt!r}; known formats: {sorted(FORMATS)}") from None


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _matrix_shapes(hidden: int, inter: int) -> tuple[tuple[int, int], ...]:
    if hidden <= 0 or inter <= 0:
        raise CodecError(f"hidden and inter must be positive, got hidden={hidden} inter={inter}")
    return ((inter, hidden), (inter, hidden), (hidden, inter))


def _sections(spec: FormatSpec, out: int, inp: int) -> list[tuple[str, int]]:
    """(name, unpadded byte length) of one matrix's sections, in blob order."""
    if not spec.quantized:
        return [("weight", out * inp * 2)]
    n_groups = math.ceil(inp / spec.group_size)
    code_bytes = out * n_groups * spec.group_size * spec.bits // 8
    return [("codes", code_bytes), ("scales", out * n_groups * 2), ("mins", out * n_groups * 2)]


def _matrix_nbytes(spec: FormatSpec, out: int, inp: int) -> int:
    return sum(_align(n) for _, n in _sections(spec, out, inp))


def expert_nbytes(fmt: str, hidden: int, inter: int) -> int:
    """Exact size of one expert blob (gate, up, down) in `fmt`."""
    spec = format_spec(fmt)
    return sum(_matrix_nbytes(spec, o, i) for o, i in _matrix_shapes(hidden, inter))


# --------------------------------------------------------------------------- quantize


def _pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [out, n] (values < 2**bits) -> packed uint8 [out, n * bits / 8]."""
    if bits == 8:
        return codes
    per_byte = 8 // bits
    c = codes.view(codes.shape[0], -1, per_byte)  # [out, n / per_byte, per_byte]
    packed = c[..., 0].clone()
    for i in range(1, per_byte):  # 2 or 4 whole-tensor ops, not a loop over data
        packed |= c[..., i] << (bits * i)
    return packed


def _unpack(packed: Tensor, bits: int) -> Tensor:
    """packed uint8 [out, m] -> codes uint8 [out, m * 8 / bits]."""
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # [per_byte]
    codes = (packed.unsqueeze(-1) >> shifts) & mask  # [out, m, per_byte]
    return codes.view(packed.shape[0], -1)


def unpack_codes(q: QuantizedMatrix) -> Tensor:
    """One uint8 code per element, [out, n_groups * group_size] (padding included)."""
    return _unpack(q.codes, q.bits)


def quantize(w: Tensor, bits: int, group_size: int) -> QuantizedMatrix:
    """Group-wise asymmetric min-max quantization of a 2-D float matrix (see module doc)."""
    if w.dim() != 2 or w.numel() == 0:
        raise CodecError(f"quantize expects a non-empty 2-D matrix, got shape {tuple(w.shape)}")
    if bits not in (2, 4, 8) or group_size <= 0 or (group_size * bits) % 8:
        raise CodecError(f"unsupported bits={bits} group_size={group_size}")
    if not w.is_floating_point():
        raise CodecError(f"quantize expects a float tensor, got {w.dtype}")
    w = w.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise CodecError("weights contain inf or nan")
    out, inp = w.shape
    n_groups = math.ceil(inp / group_size)
    pad = n_groups * group_size - inp
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
    g = w.view(out, n_groups, group_size)  # [out, NG, G]
    qmax = (1 << bits) - 1
    lo, hi = g.amin(-1), g.amax(-1)  # [out, NG]
    lo16 = lo.to(torch.float16)
    lo16 = torch.where(lo16.float() > lo, torch.nextafter(lo16, torch.full_like(lo16, -math.inf)), lo16)
    scale16 = ((hi - lo16.float()) / qmax).to(torch.float16)
    short = scale16.float() * qmax + lo16.float() < hi
    scale16 = torch.where(short, torch.nextafter(scale16, torch.full_like(scale16, math.inf)), scale16)
    if not (torch.isfinite(lo16).all() and torch.isfinite(scale16).all()):
        raise CodecError("weights out of fp16 range for group scales/mins (|w| > 65504)")
    scale = scale16.float().unsqueeze(-1)  # [out, NG, 1]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: codes 0
    codes = ((g - lo16.float().unsqueeze(-1)) / safe).round_().clamp_(0, qmax).to(torch.uint8)
    packed = _pack(codes.view(out, -1), bits)
    return QuantizedMatrix(packed.contiguous(), scale16.contiguous(), lo16.contiguous(),
                           (out, inp), bits, group_size)


def _unpack_into(codes: Tensor, bits: int, out: Tensor) -> None:
    """Write packed codes [R, m] into fp32 `out` [R, m, 8 / bits], one pass per code slot.

    Masks work on int32 words (four bytes at once, byte-order independent) and the
    uint8 -> fp32 conversion happens in the strided copy, so no uint8 intermediate of
    the full size is made: ~3x faster than unpack-then-convert on the bench machine.
    """
    rows, m = codes.shape
    per_byte = 8 // bits
    if m % 4 or codes.stride(-1) != 1 or codes.storage_offset() % 4:
        out.copy_(_unpack(codes, bits).view(rows, m, per_byte))
        return
    words = codes.view(torch.int32)  # [R, m / 4]
    mask = {4: 0x0F0F0F0F, 2: 0x03030303}[bits]
    for i in range(per_byte):  # 2 or 4 whole-tensor passes, not a loop over data
        part = (words >> (bits * i)) & mask if i else words & mask
        out[..., i].copy_(part.view(torch.uint8).view(rows, m))


def dequantize(q: QuantizedMatrix, dtype: torch.dtype = torch.float32) -> Tensor:
    """[out, in] weights in `dtype` on q's device; whole-tensor ops, no per-group loop.

    Arithmetic is fp32 (then cast), so a bf16 result is the rounded fp32 result.
    """
    out, inp = q.shape
    m = q.codes.shape[1]
    w = torch.empty((out, m, 8 // q.bits), dtype=torch.float32, device=q.codes.device)
    if q.bits == 8:
        w.view(out, m).copy_(q.codes)
    else:
        _unpack_into(q.codes, q.bits, w)
    w = w.view(out, q.n_groups, q.group_size)  # [out, NG, G]
    w.mul_(q.scales.float().unsqueeze(-1)).add_(q.mins.float().unsqueeze(-1))
    w = w.view(out, -1)
    if w.shape[1] != inp:
        w = w[:, :inp].contiguous()
    return w if dtype == torch.float32 else w.to(dtype)


# --------------------------------------------------------------------------- blobs


def encode_expert(fmt: str, gate: Tensor, up: Tensor, down: Tensor) -> bytes:
    """One contiguous blob: gate [inter, hidden], up [inter, hidden], down [hidden, inter]."""
    spec = format_spec(fmt)
    if gate.dim() != 2 or up.shape != gate.shape or down.shape != gate.shape[::-1]:
        raise CodecError(f"expected gate, up [inter, hidden] and down [hidden, inter], got "
                         f"{tuple(gate.shape)}, {tuple(up.shape)}, {tuple(down.shape)}")
    inter, hidden = gate.shape
    total = expert_nbytes(fmt, hidden, inter)
    buf = bytearray(total)
    off = 0
    for w in (gate, up, down):
        if not w.is_floating_point():
            raise CodecError(f"expert weights must be floating point, got {w.dtype}")
        w = w.detach().cpu()
        if spec.quantized:
            q = quantize(w, spec.bits, spec.group_size)
            parts = [q.codes, q.scales, q.mins]
        else:
            parts = [w.to(torch.bfloat16).contiguous()]
        for t in parts:
            raw = t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
            buf[off:off + len(raw)] = raw
            off += _align(len(raw))
    if off != total:  # layout code and expert_nbytes disagree: a bug, not bad input
        raise RuntimeError(f"blob layout error: wrote {off} bytes, expected {total}")
    return bytes(buf)


def _as_uint8(blob: BlobLike) -> Tensor:
    """A flat uint8 CPU/GPU tensor sharing memory with `blob` (no copy)."""
    if isinstance(blob, Tensor):
        if blob.dtype != torch.uint8:
            raise CodecError(f"blob tensor must be uint8, got {blob.dtype}")
        return blob.reshape(-1)
    if isinstance(blob, np.ndarray):
        if blob.dtype != np.uint8:
            raise CodecError(f"blob array must be uint8, got {blob.dtype}")
        arr = blob.reshape(-1)
    elif isinstance(blob, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(blob, dtype=np.uint8)
    else:
        raise CodecError(f"unsupported blob type {type(blob).__name__}")
    with warnings.catch_warnings():  # read-only buffers (bytes, mmap): we never write to them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _aligned(data: Tensor) -> Tensor:
    """`data`, or an aligned copy when the buffer starts at an odd address (fp16 views need 2)."""
    return data if data.data_ptr() % 2 == 0 else data.clone()


def view_expert(fmt: str, blob: BlobLike, hidden: int, inter: int) -> dict[str, QuantizedMatrix | Tensor]:
    """Zero-copy views of the blob: QuantizedMatrix per matrix, or a bf16 Tensor for bf16.

    The views keep `blob` alive; clone them to keep an expert past its buffer.
    """
    spec = format_spec(fmt)
    data = _aligned(_as_uint8(blob))
    expected = expert_nbytes(fmt, hidden, inter)
    if data.numel() != expected:
        raise CodecError(f"{fmt} expert blob for hidden={hidden} inter={inter} must be "
                         f"{expected} bytes, got {data.numel()}")
    views: dict[str, QuantizedMatrix | Tensor] = {}
    off = 0
    for name, (out, inp) in zip(MATRIX_NAMES, _matrix_shapes(hidden, inter)):
        parts = []
        for section, n in _sections(spec, out, inp):
            raw = data[off:off + n]
            off += _align(n)
            if section == "codes":
                parts.append(raw.view(out, -1))
            elif section == "weight":
                parts.append(raw.view(torch.bfloat16).view(out, inp))
            else:
                parts.append(raw.view(torch.float16).view(out, -1))
        if spec.quantized:
            views[name] = QuantizedMatrix(parts[0], parts[1], parts[2], (out, inp),
                                          spec.bits, spec.group_size)
        else:
            views[name] = parts[0]
    return views


def decode_expert(fmt: str, blob: BlobLike, hidden: int, inter: int,
                  dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """Dequantized (gate, up, down) in `dtype` on `device`.

    The compact form crosses to the device first, then expands there.
    """
    views = view_expert(fmt, blob, hidden, inter)
    result = []
    for name in MATRIX_NAMES:
        v = views[name]
        if isinstance(v, QuantizedMatrix):
            result.append(dequantize(v.to(device), dtype))
        else:
            result.append(v.to(device=device, dtype=dtype, copy=True))
    return result[0], result[1], result[2]


def reconstruction_error(fmt: str, w: Tensor) -> dict[str, float]:
    """How far `fmt` moves one matrix: relative Frobenius, max/mean abs, RMSE, bits/param."""
    spec = format_spec(fmt)
    if w.dim() != 2:
        raise CodecError(f"reconstruction_error expects a 2-D matrix, got {tuple(w.shape)}")
    ref = w.detach().float().cpu()
    if spec.quantized:
        q = quantize(ref, spec.bits, spec.group_size)
        rec, stored = dequantize(q), q.nbytes
    else:
        rec, stored = ref.to(torch.bfloat16).float(), ref.numel() * 2
    err = rec - ref
    norm = ref.norm().item()
    return {
        "rel_fro": err.norm().item() / norm if norm > 0 else float(err.norm().item() > 0),
        "max_abs": err.abs().max().item(),
        "mean_abs": err.abs().mean().item(),
        "rmse": err.pow(2).mean().sqrt().item(),
        "bits_per_param": 8.0 * stored / ref.numel(),
    }
