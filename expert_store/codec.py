"""Group-wise quantization of expert weights and the on-disk layout of one expert.

Why group-wise asymmetric min-max: expert weights are moved far more often than they
are computed with, so bytes per parameter decide fetch time (Fate sends INT4 and INT2).
A per-group (scale, zero) keeps outliers local to their group; asymmetric (an offset
stored) uses the whole code range for skewed groups.

int4 / int2 are stored the way torch's CPU int4 matmul reads them, so a worker builds
its compute object from views of the blob (no unpacking, no repacking):
    w' = (code - H) * scale + zero      H = 2**(bits-1) (8 for int4, 2 for int2)
    scale, zero stored bf16 (the kernel's scales_and_zeros); codes 0 .. 2**bits - 1
int8 keeps the general form (fp16 scale rounded UP, fp16 min rounded DOWN):
    w' = code * scale + min
Both keep |w - w'| <= scale / 2 with the stored values (fp32 arithmetic):
  - fp16 (int8): rounding min down and scale up keeps [min, min + (2**bits-1)*scale]
    around every value of the group;
  - bf16 (int4/int2): scale is (max - min) / (2**bits - 1) rounded up to bf16, zero the
    bf16 nearest to the centre of the grid; where bf16 has no zero close enough (a
    group far from 0 relative to its range: bf16 carries 8 significant bits), the scale
    grows until the grid [zero - H*scale, zero + (2**bits-1-H)*scale] reaches within
    scale/2 of both ends of the group. A constant group whose value is a bf16 number has
    scale 0 and is exact.
An input dim that is not a multiple of the group size is padded (replicating the row's
last value, which leaves the last group's min/max unchanged); the padded codes are
stored, the shape is exact.

Blob layout of one expert, LAYOUT_VERSION 2 (the pack manifest records the version and,
for int4/int2, the kernel layout: expert_store/int4_layout.py). No header: every offset
follows from (format, hidden, inter) and the layout.
    matrices: gate [inter, hidden], up [inter, hidden], down [hidden, inter]; per matrix
    (out = N, in = K), G = group_size, NG = ceil(K / G), Kp = NG * G, Np = N rounded up
    to 16 (the kernel's multiple; padded rows have scale 0, zero 0)
    int4 / int2, sections in order (blob_sections):
           gate codes, up codes, gate+up scales_and_zeros, down codes, down scales_and_zeros
           codes  int4: uint8 [Np * Kp / 2] in the kernel's layout (int4_layout.pack_nibbles)
                  int2: uint8 [Np * Kp / 4], the int4 layout's nibbles minus 6, 2 bits each
                        (int4_layout.expand_int2 restores them)
           scales_and_zeros bf16 [NG, Np, 2] (scale, zero) per group and row; gate's and
                  up's as one [NG, 2 Np, 2] (gate's rows first): with Np a multiple of the
                  layout's block, gate codes + up codes + that tensor are the [2 Np, K]
                  matrix as the kernel takes it (one call computes both)
    int8, per matrix in order: codes uint8 [N, Kp] row-major, one code per byte,
           scales fp16 [N, NG], mins fp16 [N, NG]
    bf16, per matrix in order: weight bf16 [N, K]
    every section starts at a multiple of ALIGN (16) bytes, zero-padded, so fp16/bf16
    views straight off the blob (or an mmap) are legal; the blob size is the padded sum.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from torch import Tensor

from .int4_layout import (
    Int4Layout,
    Int4LayoutError,
    compress_int2,
    expand_int2,
    pack_nibbles,
    require_native_layout,
    unpack_nibbles,
)

LAYOUT_VERSION = 2
ALIGN = 16
KERNEL_ROW_MULTIPLE = 16  # the int4 kernels want N % 16 == 0
MATRIX_NAMES = ("gate", "up", "down")

BlobLike = Union[bytes, bytearray, memoryview, np.ndarray, Tensor]


class CodecError(ValueError):
    """Unknown format, wrong blob size, bad shapes or values a stored scale cannot hold."""


@dataclass(frozen=True)
class FormatSpec:
    """One stored format of an expert."""

    name: str
    bits: int  # bits per stored weight (16 for bf16)
    group_size: int  # inputs per (scale, zero) group; 0 for bf16 (not quantized)

    @property
    def quantized(self) -> bool:
        return self.group_size > 0

    @property
    def kernel_layout(self) -> bool:
        """Stored in the int4 kernel's layout (int4, int2) rather than row-major (int8)."""
        return self.bits in (2, 4)


FORMATS: dict[str, FormatSpec] = {
    "bf16": FormatSpec("bf16", 16, 0),
    "int8": FormatSpec("int8", 8, 128),
    "int4": FormatSpec("int4", 4, 64),
    "int2": FormatSpec("int2", 2, 32),
}


@dataclass
class QuantizedMatrix:
    """A group-quantized [out, in] matrix, row-major codes, fp16 scale and min; tensors may be views."""

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


@dataclass
class Int4KernelMatrix:
    """An int4/int2 [N, K] matrix as torch's int4 kernel reads it (module docstring); tensors may be views."""

    codes: Tensor  # flat uint8: int4 [Np * Kp / 2] kernel bytes; int2 [Np * Kp / 4] (expand_int2)
    scales_and_zeros: Tensor  # bf16 [NG, Np, 2]
    shape: tuple[int, int]  # (N, K), unpadded
    bits: int  # 4 or 2
    group_size: int
    layout: Int4Layout

    @property
    def n_groups(self) -> int:
        return self.scales_and_zeros.shape[0]

    @property
    def padded_shape(self) -> tuple[int, int]:
        """(Np, Kp): rows to a multiple of 16, inputs to whole groups."""
        return self.scales_and_zeros.shape[1], self.n_groups * self.group_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales_and_zeros))

    def to(self, device: torch.device | str, copy: bool = False) -> Int4KernelMatrix:
        return Int4KernelMatrix(self.codes.to(device, copy=copy), self.scales_and_zeros.to(device, copy=copy),
                                self.shape, self.bits, self.group_size, self.layout)

    def kernel_bytes(self) -> Tensor:
        """uint8 [Np, Kp / 2] int4 bytes in self.layout (int2 expanded), on the codes' device."""
        n_pad, k_pad = self.padded_shape
        raw = self.codes if self.bits == 4 else expand_int2(self.codes)
        return raw.view(n_pad, k_pad // 2)

    def nibbles(self) -> Tensor:
        """uint8 [Np, Kp]: the kernel's q per element, w' = (q - 8) * scale + zero."""
        n_pad, k_pad = self.padded_shape
        return unpack_nibbles(self.kernel_bytes().reshape(-1), n_pad, k_pad, self.layout)


Quantized = Union[QuantizedMatrix, Int4KernelMatrix]


def format_spec(fmt: str) -> FormatSpec:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise CodecError(f"unknown expert format {fmt!r}; known formats: {sorted(FORMATS)}") from None


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _pad_rows(n: int) -> int:
    return -(-n // KERNEL_ROW_MULTIPLE) * KERNEL_ROW_MULTIPLE


def _matrix_shapes(hidden: int, inter: int) -> tuple[tuple[int, int], ...]:
    if hidden <= 0 or inter <= 0:
        raise CodecError(f"hidden and inter must be positive, got hidden={hidden} inter={inter}")
    return ((inter, hidden), (inter, hidden), (hidden, inter))


def _sections(spec: FormatSpec, out: int, inp: int) -> list[tuple[str, int]]:
    """(name, unpadded byte length) of one row-major matrix's sections (int8, bf16), in blob order."""
    if not spec.quantized:
        return [("weight", out * inp * 2)]
    n_groups = math.ceil(inp / spec.group_size)
    return [("codes", out * n_groups * spec.group_size * spec.bits // 8), ("scales", out * n_groups * 2),
            ("mins", out * n_groups * 2)]


@functools.lru_cache(maxsize=64)
def blob_sections(fmt: str, hidden: int, inter: int) -> tuple[tuple[str, str, int, int], ...]:
    """(matrix, section, byte offset, unpadded bytes) of every section of one expert blob, in blob order.

    int4/int2: gate codes, up codes, then one scales_and_zeros [NG, 2 Np, 2] for gate and up
    (gate's rows, then up's), then down's codes and scales_and_zeros. Where Np is a multiple
    of the layout's block, gate and up codes side by side are the [2 Np, K] matrix packed
    whole, so the worker runs both in one kernel call.
    """
    spec = format_spec(fmt)
    shapes = dict(zip(MATRIX_NAMES, _matrix_shapes(hidden, inter)))
    if spec.kernel_layout:
        rows = []
        for name, (out, inp) in shapes.items():
            n_groups = math.ceil(inp / spec.group_size)
            rows.append((name, _pad_rows(out), n_groups, n_groups * spec.group_size))
        (_, np_gu, ng_gu, kp_gu), _, (_, np_d, ng_d, kp_d) = rows
        code_gu = np_gu * kp_gu * spec.bits // 8
        order = [("gate", "codes", code_gu), ("up", "codes", code_gu),
                 ("gate_up", "scales_and_zeros", ng_gu * 2 * np_gu * 4),
                 ("down", "codes", np_d * kp_d * spec.bits // 8), ("down", "scales_and_zeros", ng_d * np_d * 4)]
    else:
        order = [(name, section, n) for name, (o, i) in shapes.items() for section, n in _sections(spec, o, i)]
    out, off = [], 0
    for name, section, n in order:
        out.append((name, section, off, n))
        off += _align(n)
    return tuple(out)


def expert_nbytes(fmt: str, hidden: int, inter: int) -> int:
    """Exact size of one expert blob (gate, up, down) in `fmt`."""
    *_, (_, _, off, n) = blob_sections(fmt, hidden, inter)
    return off + _align(n)


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


def _check_weights(w: Tensor, bits: int, group_size: int, allowed_bits: tuple[int, ...]) -> Tensor:
    if w.dim() != 2 or w.numel() == 0:
        raise CodecError(f"quantize expects a non-empty 2-D matrix, got shape {tuple(w.shape)}")
    if bits not in allowed_bits or group_size <= 0 or (group_size * bits) % 8:
        raise CodecError(f"unsupported bits={bits} group_size={group_size}")
    if not w.is_floating_point():
        raise CodecError(f"quantize expects a float tensor, got {w.dtype}")
    w = w.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise CodecError("weights contain inf or nan")
    return w


def _groups(w: Tensor, group_size: int) -> Tensor:
    """fp32 [out, in] -> [out, NG, G], the last group padded with the row's last value."""
    out, inp = w.shape
    n_groups = math.ceil(inp / group_size)
    pad = n_groups * group_size - inp
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
    return w.view(out, n_groups, group_size)


def quantize(w: Tensor, bits: int, group_size: int) -> QuantizedMatrix:
    """Group-wise asymmetric min-max with fp16 scale/min, row-major codes (the int8 format; module doc)."""
    w = _check_weights(w, bits, group_size, (2, 4, 8))
    out, inp = w.shape
    g = _groups(w, group_size)  # [out, NG, G]
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


def _bf16_up(x: Tensor) -> Tensor:
    """The smallest bf16 >= x (x >= 0, finite), as bf16."""
    b = x.to(torch.bfloat16)
    low = b.float() < x
    if low.any():  # positive bf16: the next value up is the next bit pattern
        b = torch.where(low, (b.view(torch.int16) + 1).view(torch.bfloat16), b)
    return b


def _bf16_spacing(x: Tensor) -> Tensor:
    """Distance between consecutive bf16 values around |x| (8 significant bits), fp32."""
    _, e = torch.frexp(x.abs().clamp_min(torch.finfo(torch.float32).tiny))
    return torch.ldexp(torch.ones_like(x), (e - 8).to(torch.int32))


def _kernel_scale_zero(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """bf16 (scale, zero) per group with the grid zero + (c - H) * scale, c = 0..2**bits-1, reaching within
    scale/2 of lo and of hi (module docstring). Whole-tensor ops; the loop runs only where bf16 forces it."""
    qmax, half = (1 << bits) - 1, 1 << (bits - 1)
    below, above = half + 0.5, qmax - half + 0.5  # grid reach in steps, from zero, including the half step

    def zero_for(scale: Tensor) -> Tensor:
        return ((lo + hi) * 0.5 + (half - qmax * 0.5) * scale.float()).to(torch.bfloat16)

    def covers(scale: Tensor, zero: Tensor) -> Tensor:
        s, z = scale.float(), zero.float()
        return (z - below * s <= lo) & (z + above * s >= hi)

    scale = _bf16_up((hi - lo) / qmax)
    zero = zero_for(scale)
    ok = covers(scale, zero)
    if not ok.all():  # widen so that the feasible zeros span at least one bf16 spacing
        u = _bf16_spacing(torch.maximum(lo.abs(), hi.abs()))
        wide = torch.maximum(scale, _bf16_up((hi - lo + 2 * u) / (qmax + 1)))
        scale = torch.where(ok, scale, wide)
        zero = torch.where(ok, zero, zero_for(scale))
        ok = covers(scale, zero)
        for _ in range(64):  # rounding at binade edges: one bf16 step at a time, only where still short
            if ok.all():
                break
            up = (scale.view(torch.int16) + 1).view(torch.bfloat16)
            scale = torch.where(ok, scale, up)
            zero = torch.where(ok, zero, zero_for(scale))
            ok = covers(scale, zero)
        if not ok.all():
            raise RuntimeError("bf16 scale/zero search did not converge (a codec bug)")
    if not (torch.isfinite(scale.float()).all() and torch.isfinite(zero.float()).all()):
        raise CodecError("weights out of bf16 range for group scales/zeros")
    return scale, zero


def quantize_for_kernel(w: Tensor, bits: int, group_size: int, layout: Int4Layout | None = None) -> Int4KernelMatrix:
    """int4/int2 group quantization straight into the int4 kernel's layout (module docstring)."""
    w = _check_weights(w, bits, group_size, (2, 4))
    layout = layout or _native_layout()
    out, inp = w.shape
    g = _groups(w, group_size)  # [N, NG, G]
    n_groups = g.shape[1]
    half = 1 << (bits - 1)
    scale, zero = _kernel_scale_zero(g.amin(-1), g.amax(-1), bits)  # bf16 [N, NG]
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))  # scale 0: the group is `zero` exactly, code H
    codes = ((g - z) / safe).round_().add_(half).clamp_(0, (1 << bits) - 1).to(torch.uint8)
    n_pad = _pad_rows(out)
    nib = codes.view(out, -1) + (8 - half)  # [N, Kp] the kernel's q (int2: centred, c + 6)
    sz = torch.stack([scale, zero], dim=-1)  # [N, NG, 2]
    if n_pad != out:
        nib = torch.cat([nib, torch.full((n_pad - out, nib.shape[1]), 8, dtype=torch.uint8)])
        sz = torch.cat([sz, torch.zeros(n_pad - out, n_groups, 2, dtype=torch.bfloat16)])
    packed = pack_nibbles(nib, layout)
    if bits == 2:
        packed = compress_int2(packed)
    return Int4KernelMatrix(packed.contiguous(), sz.transpose(0, 1).contiguous(), (out, inp), bits, group_size,
                            layout)


def _native_layout() -> Int4Layout:
    try:
        return require_native_layout()
    except Int4LayoutError as e:
        raise CodecError(str(e)) from None


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


def _dequantize_kernel(q: Int4KernelMatrix) -> Tensor:
    """fp32 [N, K]: w' = (q - 8) * scale + zero, from the kernel layout."""
    n, k = q.shape
    n_pad, k_pad = q.padded_shape
    w = q.nibbles()[:n].float().view(n, q.n_groups, q.group_size).sub_(8)  # [N, NG, G]
    sz = q.scales_and_zeros[:, :n].float()  # [NG, N, 2]
    w.mul_(sz[..., 0].t().unsqueeze(-1)).add_(sz[..., 1].t().unsqueeze(-1))
    w = w.view(n, k_pad)
    return w if k == k_pad else w[:, :k].contiguous()


def dequantize(q: Quantized, dtype: torch.dtype = torch.float32) -> Tensor:
    """[out, in] weights in `dtype` on q's device; whole-tensor ops, no per-group loop.

    Arithmetic is fp32 (then cast), so a bf16 result is the rounded fp32 result.
    """
    if isinstance(q, Int4KernelMatrix):
        w = _dequantize_kernel(q)
        return w if dtype == torch.float32 else w.to(dtype)
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


def quantize_format(fmt: str, w: Tensor, layout: Int4Layout | None = None) -> Quantized:
    """`w` quantized as format `fmt` stores it."""
    spec = format_spec(fmt)
    if not spec.quantized:
        raise CodecError(f"{fmt} is not a quantized format")
    if spec.kernel_layout:
        return quantize_for_kernel(w, spec.bits, spec.group_size, layout)
    return quantize(w, spec.bits, spec.group_size)


# --------------------------------------------------------------------------- blobs


def encode_expert(fmt: str, gate: Tensor, up: Tensor, down: Tensor, layout: Int4Layout | None = None) -> bytes:
    """One contiguous blob: gate [inter, hidden], up [inter, hidden], down [hidden, inter].

    int4/int2 codes go in `layout` (default: this machine's int4 kernel layout).
    """
    spec = format_spec(fmt)
    if gate.dim() != 2 or up.shape != gate.shape or down.shape != gate.shape[::-1]:
        raise CodecError(f"expected gate, up [inter, hidden] and down [hidden, inter], got "
                         f"{tuple(gate.shape)}, {tuple(up.shape)}, {tuple(down.shape)}")
    inter, hidden = gate.shape
    for w in (gate, up, down):
        if not w.is_floating_point():
            raise CodecError(f"expert weights must be floating point, got {w.dtype}")
    ws = [w.detach().cpu() for w in (gate, up, down)]
    if spec.kernel_layout:
        g, u, d = (quantize_format(fmt, w, layout) for w in ws)
        parts = [g.codes, u.codes, torch.cat([g.scales_and_zeros, u.scales_and_zeros], dim=1),
                 d.codes, d.scales_and_zeros]
    elif spec.quantized:
        parts = [t for w in ws for q in [quantize_format(fmt, w)] for t in (q.codes, q.scales, q.mins)]
    else:
        parts = [w.to(torch.bfloat16) for w in ws]
    sections = blob_sections(fmt, hidden, inter)
    buf = bytearray(expert_nbytes(fmt, hidden, inter))
    for t, (name, section, off, n) in zip(parts, sections, strict=True):
        raw = t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        if len(raw) != n:  # layout code and blob_sections disagree: a bug, not bad input
            raise RuntimeError(f"blob layout error: {name} {section} is {len(raw)} bytes, expected {n}")
        buf[off:off + n] = raw
    return bytes(buf)


def as_uint8(blob: BlobLike) -> Tensor:
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


def view_expert(fmt: str, blob: BlobLike, hidden: int, inter: int,
                layout: Int4Layout | None = None) -> dict[str, Quantized | Tensor]:
    """Zero-copy views of the blob: a QuantizedMatrix / Int4KernelMatrix per matrix, or a bf16 Tensor.

    `layout` is the int4 layout the blob was written in (default: this machine's kernel's).
    The views keep `blob` alive; clone them to keep an expert past its buffer.
    """
    spec = format_spec(fmt)
    data = _aligned(as_uint8(blob))
    expected = expert_nbytes(fmt, hidden, inter)
    if data.numel() != expected:
        raise CodecError(f"{fmt} expert blob for hidden={hidden} inter={inter} must be "
                         f"{expected} bytes, got {data.numel()}")
    if spec.kernel_layout:
        layout = layout or _native_layout()
    shapes = dict(zip(MATRIX_NAMES, _matrix_shapes(hidden, inter)))
    raw = {(name, section): data[off:off + n] for name, section, off, n in blob_sections(fmt, hidden, inter)}
    views: dict[str, Quantized | Tensor] = {}
    if spec.kernel_layout:
        np_gu = _pad_rows(inter)
        sz_gu = raw[("gate_up", "scales_and_zeros")].view(torch.bfloat16).view(-1, 2 * np_gu, 2)
        sz = {"gate": sz_gu[:, :np_gu], "up": sz_gu[:, np_gu:],
              "down": raw[("down", "scales_and_zeros")].view(torch.bfloat16).view(-1, _pad_rows(hidden), 2)}
        for name, shape in shapes.items():
            views[name] = Int4KernelMatrix(raw[(name, "codes")], sz[name], shape, spec.bits, spec.group_size, layout)
    elif spec.quantized:
        for name, (out, inp) in shapes.items():
            views[name] = QuantizedMatrix(raw[(name, "codes")].view(out, -1),
                                          raw[(name, "scales")].view(torch.float16).view(out, -1),
                                          raw[(name, "mins")].view(torch.float16).view(out, -1),
                                          (out, inp), spec.bits, spec.group_size)
    else:
        for name, (out, inp) in shapes.items():
            views[name] = raw[(name, "weight")].view(torch.bfloat16).view(out, inp)
    return views


def decode_expert(fmt: str, blob: BlobLike, hidden: int, inter: int,
                  dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu",
                  layout: Int4Layout | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Dequantized (gate, up, down) in `dtype` on `device`.

    The compact form crosses to the device first, then expands there.
    """
    views = view_expert(fmt, blob, hidden, inter, layout)
    result = []
    for name in MATRIX_NAMES:
        v = views[name]
        if isinstance(v, Tensor):
            result.append(v.to(device=device, dtype=dtype, copy=True))
        else:
            result.append(dequantize(v.to(device), dtype))
    return result[0], result[1], result[2]


def reconstruction_error(fmt: str, w: Tensor) -> dict[str, float]:
    """How far `fmt` moves one matrix: relative Frobenius, max/mean abs, RMSE, bits/param."""
    spec = format_spec(fmt)
    if w.dim() != 2:
        raise CodecError(f"reconstruction_error expects a 2-D matrix, got {tuple(w.shape)}")
    ref = w.detach().float().cpu()
    if spec.quantized:
        q = quantize_format(fmt, ref)
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
