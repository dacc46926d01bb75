"""Turn a stored expert blob into an object that computes the expert on a device.

An expert is SwiGLU: down(silu(gate x) * up x), x [T, hidden] fp32 -> [T, hidden] fp32
(Mixtral's w2(silu(w1 x) * w3 x)). The compute form decides what the expert cache
holds for it, so it trades bytes in the cache budget against time per call:

    fp32             dequantize once, fp32 weights (4 B/param), the exact path
    bf16             dequantize once, bf16 weights, bf16 matmuls (2 B/param)
    int4_fused       keep int4 codes in torch's tinygemm-style layout and call
                     torch's group-wise int4 matmul (~0.56 B/param for int4 g64)
    dequant_per_use  keep the stored codes (as the blob had them) and dequantize at
                     every call

Measured trade-offs and the per-device defaults: docs/codec.md.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from expert_store.codec import (
    BlobLike,
    CodecError,
    QuantizedMatrix,
    dequantize,
    format_spec,
    unpack_codes,
    view_expert,
)

from .config import COMPUTE_FORMS  # the names live with the settings (torch-free)

# Group sizes the int4 matmul kernels accept (CPU: _weight_int4pack_mm_cpu checks this list).
INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)
# Both kernels want N (output rows) divisible by 16 on CPU, 8 on CUDA: we pad to 16.
_N_MULTIPLE = 16


class ExpertCompute(Protocol):
    nbytes: int  # bytes of the tensors it keeps on its device (counted by the cache budget)

    def __call__(self, x: Tensor) -> Tensor: ...

    def project_in(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(gate x, up x) fp32 [T, I] each: for families whose activation or biases differ (gpt-oss)."""

    def project_out(self, h: Tensor) -> Tensor:
        """down h, fp32 [T, H]."""


def _tensor_bytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _check_input(x: Tensor, hidden: int) -> None:
    if x.dim() != 2 or x.shape[1] != hidden:
        raise CodecError(f"expert input must be [T, {hidden}], got {tuple(x.shape)}")


class DenseExpert:
    """Weights expanded once ("fp32" / "bf16" forms); matmuls in the weights' dtype."""

    def __init__(self, gate: Tensor, up: Tensor, down: Tensor) -> None:
        self.gate, self.up, self.down = gate, up, down  # [I, H], [I, H], [H, I]
        self.hidden = gate.shape[1]
        self.nbytes = _tensor_bytes(gate, up, down)

    def __call__(self, x: Tensor) -> Tensor:
        _check_input(x, self.hidden)
        xc = x.to(self.gate.dtype)  # no copy in the fp32 form
        h = F.silu(F.linear(xc, self.gate)) * F.linear(xc, self.up)  # [T, I]
        return F.linear(h, self.down).float()  # [T, H]

    def project_in(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_input(x, self.hidden)
        xc = x.to(self.gate.dtype)
        return F.linear(xc, self.gate).float(), F.linear(xc, self.up).float()

    def project_out(self, h: Tensor) -> Tensor:
        return F.linear(h.to(self.down.dtype), self.down).float()


class DequantPerUseExpert:
    """Keeps the stored form; expands every call (no second copy lives in the cache).

    Expansion and matmul run in `dtype`: fp32 on CPU, bf16 on CUDA (see default below).
    """

    def __init__(self, mats: list[QuantizedMatrix | Tensor], dtype: torch.dtype) -> None:
        self.mats = mats
        self.dtype = dtype
        self.hidden = mats[0].shape[1]
        self.nbytes = sum(m.nbytes if isinstance(m, QuantizedMatrix) else _tensor_bytes(m)
                          for m in mats)

    def _weight(self, m: QuantizedMatrix | Tensor) -> Tensor:
        return dequantize(m, self.dtype) if isinstance(m, QuantizedMatrix) else m.to(self.dtype)

    def __call__(self, x: Tensor) -> Tensor:
        _check_input(x, self.hidden)
        # one expanded matrix alive at a time: a third of the scratch memory
        xc = x.to(self.dtype)
        h = F.silu(F.linear(xc, self._weight(self.mats[0])))  # [T, I]
        h = h * F.linear(xc, self._weight(self.mats[1]))
        return F.linear(h, self._weight(self.mats[2])).float()  # [T, H]

    def project_in(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_input(x, self.hidden)
        xc = x.to(self.dtype)
        return (F.linear(xc, self._weight(self.mats[0])).float(),
                F.linear(xc, self._weight(self.mats[1])).float())

    def project_out(self, h: Tensor) -> Tensor:
        return F.linear(h.to(self.dtype), self._weight(self.mats[2])).float()


class Int4Linear:
    """One [N, K] matrix in the int4 kernel's packed layout.

    The kernels compute w = (q - 8) * scale + zero with scales_and_zeros [K/G, N, 2];
    ours is w = c * scale + min, so q = c and zero = min + 8 * scale (same scale).
    int2 codes (0..3) are valid int4 codes, but with q = c the kernel's (q - 8) is
    -8..-5 and the bf16 `zero` (~min + 8 scale) cancels against it, costing 6x the
    error; so codes are shifted to the middle of the int4 range, q = c + 8 - 2**(bits-1),
    and zero = min + 2**(bits-1) * scale (for int4 the shift is 0: zero = min + 8 scale).
    K is our padded input (whole groups; the caller zero-pads x), N is padded to 16
    rows (sliced off the output).
    """

    def __init__(self, q: QuantizedMatrix, device: torch.device) -> None:
        if q.bits not in (2, 4) or q.group_size not in INT4_KERNEL_GROUP_SIZES:
            raise CodecError(f"int4_fused needs int4/int2 codes with group size in "
                             f"{INT4_KERNEL_GROUP_SIZES}, got bits={q.bits} group={q.group_size}")
        n, k = q.shape
        self.n, self.k = n, k
        self.group_size = q.group_size
        half = 1 << (q.bits - 1)
        codes = _unpack_codes(q) + (8 - half)  # uint8 [N, Kp] (CPU), centred int4 codes
        self.k_pad = codes.shape[1]
        n_pad = -n % _N_MULTIPLE
        scale = q.scales.float().cpu()  # [N, NG]
        zero = q.mins.float().cpu() + half * scale  # [N, NG]
        if n_pad:
            codes = F.pad(codes, (0, 0, 0, n_pad))
            scale, zero = F.pad(scale, (0, 0, 0, n_pad)), F.pad(zero, (0, 0, 0, n_pad))
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # [K/G, Np, 2]
        # CPU kernel: only its bf16 path is fast (fp32 x measured 27x slower at 1 token,
        # ~100x at 64, docs/codec.md); x and scales_and_zeros must share a dtype.
        # CUDA (tinygemm) takes bf16 only.
        self.scales_and_zeros = sz.to(torch.bfloat16).contiguous().to(device)
        if device.type == "cuda":
            packed_u8 = (codes[:, ::2] << 4) | codes[:, 1::2]  # [Np, Kp/2], even element high
            self.weight = torch.ops.aten._convert_weight_to_int4pack(
                packed_u8.to(device), _inner_k_tiles(self.k_pad))
            self._mm = torch.ops.aten._weight_int4pack_mm
        elif device.type == "cpu":
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
            self._mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        else:
            raise CodecError(f"int4_fused has no kernel for device type {device.type!r}")
        self.nbytes = _tensor_bytes(self.weight, self.scales_and_zeros)

    def __call__(self, x: Tensor) -> Tensor:
        """x bf16 [T, K] -> bf16 [T, N]."""
        if self.k_pad != self.k:
            x = F.pad(x, (0, self.k_pad - self.k))  # padded codes meet zeros
        y = self._mm(x.contiguous(), self.weight, self.group_size, self.scales_and_zeros)
        return y if y.shape[1] == self.n else y[:, :self.n]


def _unpack_codes(q: QuantizedMatrix) -> Tensor:
    """Codes as uint8 [N, NG * G] on CPU, one per element (padding included)."""
    return unpack_codes(q.to("cpu")).contiguous()


def _inner_k_tiles(k: int) -> int:
    """CUDA tinygemm: K must be a multiple of inner_k_tiles * 16, inner_k_tiles in {2, 4, 8}."""
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    raise CodecError(f"int4_fused on CUDA needs K % 32 == 0, got K={k}")


class Int4FusedExpert:
    """int4/int2 experts through torch's group-wise int4 matmul; activations in bf16."""

    def __init__(self, mats: list[QuantizedMatrix], device: torch.device) -> None:
        self.gate, self.up, self.down = (Int4Linear(m, device) for m in mats)
        self.hidden = self.gate.k
        self.nbytes = self.gate.nbytes + self.up.nbytes + self.down.nbytes

    def __call__(self, x: Tensor) -> Tensor:
        _check_input(x, self.hidden)
        if x.shape[0] == 0:
            return x.new_empty((0, self.hidden))
        xc = x.to(torch.bfloat16)
        h = F.silu(self.gate(xc)) * self.up(xc)  # [T, I] bf16
        return self.down(h).float()  # [T, H]

    def project_in(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_input(x, self.hidden)
        if x.shape[0] == 0:
            empty = x.new_empty((0, self.gate.n))
            return empty, empty
        xc = x.to(torch.bfloat16)
        return self.gate(xc).float(), self.up(xc).float()

    def project_out(self, h: Tensor) -> Tensor:
        if h.shape[0] == 0:
            return h.new_empty((0, self.hidden))
        return self.down(h.to(torch.bfloat16)).float()


def make_expert_compute(fmt: str, blob: BlobLike, hidden: int, inter: int, form: str,
                        device: torch.device | str = "cpu") -> ExpertCompute:
    """Build the compute object for one expert blob in `form` on `device`.

    form "auto" means default_compute_form(fmt, device). A form that cannot run this
    format (int4_fused on bf16/int8) raises CodecError rather than silently changing
    the numerics or the cache footprint the caller planned for.
    The result never references `blob`, so an mmap or a shared-memory slot can be reused.
    """
    device = torch.device(device)
    if form == "auto":
        form = default_compute_form(fmt, device)
    if form not in COMPUTE_FORMS:
        raise CodecError(f"unknown compute form {form!r}; known: {COMPUTE_FORMS} or 'auto'")
    spec = format_spec(fmt)
    views = view_expert(fmt, blob, hidden, inter)
    mats = [views["gate"], views["up"], views["down"]]
    if form in ("fp32", "bf16"):
        dtype = torch.float32 if form == "fp32" else torch.bfloat16
        w = [dequantize(m.to(device), dtype) if isinstance(m, QuantizedMatrix)
             else m.to(device=device, dtype=dtype, copy=True) for m in mats]
        return DenseExpert(w[0], w[1], w[2])
    if form == "int4_fused":
        if not spec.quantized or spec.bits not in (2, 4):
            raise CodecError(f"int4_fused cannot run {fmt!r} experts (only int4/int2 codes fit "
                             f"the int4 kernel); use 'fp32', 'bf16' or form='auto'")
        return Int4FusedExpert([m for m in mats if isinstance(m, QuantizedMatrix)], device)
    # dequant_per_use: own copies on the device, so the blob's buffer is released
    owned = [m.to(device, copy=True) if isinstance(m, QuantizedMatrix)
             else m.to(device=device, copy=True) for m in mats]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return DequantPerUseExpert(owned, dtype)


def default_compute_form(fmt: str, device: torch.device | str) -> str:
    """The per-device default, chosen from the measurements in docs/codec.md.

    CPU (bench/codec_bench.py, 2-core EPYC, torch 2.13, cold weights, expert h1024 i2816):
      - int4/int2 -> int4_fused: fastest at 1 and 8 tokens (0.23 ms vs bf16 0.88, fp32
        1.96 at T=1) with the smallest footprint (4.9 MB vs 17.3 / 34.6). At 64 tokens
        bf16 is faster (2.1 vs 3.6 ms) but 3.5x the bytes; decode calls dominate.
      - int8, bf16 -> dequant_per_use: bit-identical to the fp32 form, about as fast
        (1.72 vs 1.81 ms int8, 1.76 vs 1.87 bf16 at T=1; 4-10% slower at T=64) and
        4x / 2x fewer bytes in the cache. The bf16 form is 2x faster but adds bf16
        activation error (0.5%, as much as int8 itself) and needs native bf16 (the
        issue's reference machine: bf16 matmul 21.9 ms vs fp32 4.8 at 64 tokens).
    CUDA (not measured: no GPU on the bench machine): int4/int2 -> int4_fused (tinygemm,
    the bytes stay int4 in the cache), others -> bf16 (Fate's choice).
    """
    spec = format_spec(fmt)
    device = torch.device(device)
    if spec.quantized and spec.bits in (2, 4) and spec.group_size in INT4_KERNEL_GROUP_SIZES:
        return "int4_fused"
    return "bf16" if device.type == "cuda" else "dequant_per_use"
