"""Turn a stored expert blob into an object that computes the expert on a device.

An expert is SwiGLU: down(silu(gate x) * up x), x [T, hidden] fp32 -> [T, hidden] fp32
(Mixtral's w2(silu(w1 x) * w3 x)). The compute form decides what the expert cache
holds for it, so it trades bytes in the cache budget against time per call:

    fp32             dequantize once, fp32 weights (4 B/param), the exact path
    bf16             dequantize once, bf16 weights, bf16 matmuls (2 B/param)
    int4_fused       torch's group-wise int4 matmul on the codes as stored
                     (~0.56 B/param for int4 g64)
    dequant_per_use  keep the stored blob and dequantize at every call

int4 blobs are stored in the CPU int4 kernel's own layout with its bf16 scales_and_zeros
(expert_store/codec.py), so on CPU the int4_fused form is one copy of the blob into
owned memory and views of it: no unpacking, no repacking. int2 blobs expand to int4
bytes with one table lookup per matrix. A pack written on a CPU whose kernel uses
another layout still works: `accept_pack_layout` warns at start-up and every int4/int2
expert is converted on arrival (the slow path, counted by `layout_conversions()`).
CUDA: one host-to-device copy of the blob, then standard torch ops on the device turn
the CPU layout into tinygemm's (`_convert_weight_to_int4pack`); nothing on the host.

Measured trade-offs and the per-device defaults: docs/codec.md.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Mapping, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from expert_store.codec import (
    BlobLike,
    CodecError,
    FORMATS,
    Int4KernelMatrix,
    QuantizedMatrix,
    as_uint8,
    blob_sections,
    dequantize,
    expert_nbytes,
    format_spec,
    view_expert,
)
from expert_store.errors import PackError
from expert_store.int4_layout import (
    Int4Layout,
    Int4LayoutError,
    expand_int2,
    kernel_fingerprint,
    native_layout,
    pack_nibbles,
)

log = logging.getLogger(__name__)

from .config import COMPUTE_FORMS  # the names live with the settings (torch-free)

# Group sizes the int4 matmul kernels accept (CPU: _weight_int4pack_mm_cpu checks this list).
INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)


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


# -- the pack's int4 layout against this machine's kernel ------------------------------------------


class _LayoutState:
    """The int4 layout of the served pack's blobs, and how many experts were converted from it."""

    def __init__(self) -> None:
        self.pack_layout: Int4Layout | None = None  # None: this machine's kernel layout
        self.conversions = 0
        self.lock = threading.Lock()


_layout = _LayoutState()


def accept_pack_layout(manifest: Mapping[str, Any], device: torch.device | str = "cpu") -> Int4Layout | None:
    """Start-up check: the int4 layout a pack's manifest records, against this machine's CPU kernel.

    Returns the pack's layout (None when it has no int4/int2 experts) and makes it the one
    `make_expert_compute` reads blobs in. A layout that differs from this machine's kernel
    is logged once: on CPU every int4/int2 expert is then converted on arrival (slow).
    """
    if not any(f in FORMATS and FORMATS[f].kernel_layout for f in manifest.get("formats", {})):
        return None
    record = manifest.get("int4_layout")
    try:
        layout = Int4Layout.from_record(record) if isinstance(record, Mapping) else None
    except (Int4LayoutError, KeyError) as e:
        raise PackError(f"the pack's int4 layout record is unusable ({e}); re-pack with "
                         f"`python -m expert_store pack CHECKPOINT_DIR OUT_DIR`") from None
    if layout is None:
        raise PackError("the pack's manifest has no int4_layout record; re-pack with "
                         "`python -m expert_store pack CHECKPOINT_DIR OUT_DIR`")
    here = native_layout()
    if torch.device(device).type == "cpu" and layout != here:
        log.warning(
            "the pack's int4/int2 experts are in layout %s (fingerprint %s); this machine's torch int4 CPU kernel "
            "uses %s (fingerprint %s): every int4/int2 expert is converted on arrival (~1 ms each, counted as "
            "layout conversions). Re-pack on this machine with `python -m expert_store pack CHECKPOINT_DIR "
            "OUT_DIR` to remove the cost.", layout.name, layout.fingerprint(),
            here.name if here else "an unknown layout", kernel_fingerprint())
    _layout.pack_layout = layout
    return layout


def layout_conversions() -> int:
    """int4/int2 matrices converted because the pack's layout is not this machine's kernel's."""
    return _layout.conversions


def _blob_layout(layout: Int4Layout | None) -> Int4Layout:
    chosen = layout or _layout.pack_layout or native_layout()
    if chosen is None:
        raise CodecError(f"torch {torch.__version__}'s int4 CPU kernel uses an unknown weight layout; pass the "
                         f"pack's layout (accept_pack_layout) to read int4/int2 blobs")
    return chosen


# -- compute forms ---------------------------------------------------------------------------------


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
    """Keeps the stored blob (one owned copy); expands every call (no second copy lives in the cache).

    Expansion and matmul run in `dtype`: fp32 on CPU, bf16 on CUDA (see default below).
    """

    def __init__(self, owned: Tensor, mats: list[QuantizedMatrix | Int4KernelMatrix | Tensor],
                 dtype: torch.dtype) -> None:
        self.blob = owned  # uint8: every matrix below is a view of it
        self.mats = mats
        self.dtype = dtype
        self.hidden = mats[0].shape[1]
        self.nbytes = _tensor_bytes(owned)

    def _weight(self, m: QuantizedMatrix | Int4KernelMatrix | Tensor) -> Tensor:
        return m.to(self.dtype) if isinstance(m, Tensor) else dequantize(m, self.dtype)

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


_CPU = torch.device("cpu")
_CPU_MM = torch.ops.aten._weight_int4pack_mm_for_cpu
_CUDA_MM = torch.ops.aten._weight_int4pack_mm


class Int4Linear:
    """One [N, K] matrix in an int4 kernel's layout: w = (q - 8) * scale + zero.

    `weight` is what the kernel takes (CPU: uint8 [Np, Kp/2]; CUDA: tinygemm's int32
    tiles), `scales_and_zeros` bf16 [K/G, Np, 2]. K is the padded input (whole groups;
    the caller's x is zero-padded), N is padded to 16 rows (sliced off the output).
    The CPU kernel's fast path is bf16 (fp32 x measured 27x slower at 1 token, ~100x at 64,
    docs/codec.md); CUDA (tinygemm) takes bf16 only.
    """

    def __init__(self, weight: Tensor, scales_and_zeros: Tensor, n: int, k: int, group_size: int) -> None:
        self.weight = weight
        self.scales_and_zeros = scales_and_zeros
        self.n, self.k = n, k
        self.k_pad = scales_and_zeros.shape[0] * group_size
        self.group_size = group_size
        self._mm = _CUDA_MM if weight.device.type == "cuda" else _CPU_MM
        self.nbytes = _tensor_bytes(weight, scales_and_zeros)

    @classmethod
    def _of_views(cls, weight: Tensor, scales_and_zeros: Tensor, n: int, k: int, k_pad: int,
                  group_size: int, nbytes: int) -> "Int4Linear":
        """The hot path's constructor: the caller already knows every derived field (no tensor calls)."""
        self = cls.__new__(cls)
        self.weight, self.scales_and_zeros = weight, scales_and_zeros
        self.n, self.k, self.k_pad, self.group_size, self.nbytes = n, k, k_pad, group_size, nbytes
        self._mm = _CPU_MM
        return self

    def __call__(self, x: Tensor) -> Tensor:
        """x bf16 [T, K] -> bf16 [T, N]."""
        if self.k_pad != self.k:
            x = F.pad(x, (0, self.k_pad - self.k))  # padded codes meet zeros
        y = self._mm(x.contiguous(), self.weight, self.group_size, self.scales_and_zeros)
        return y if y.shape[1] == self.n else y[:, :self.n]


def _inner_k_tiles(k: int) -> int:
    """CUDA tinygemm: K must be a multiple of inner_k_tiles * 16, inner_k_tiles in {2, 4, 8}."""
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    raise CodecError(f"int4_fused on CUDA needs K % 32 == 0, got K={k}")


def _converted_for_cpu(m: Int4KernelMatrix) -> Tensor:
    """The slow path: m's codes re-laid for this machine's kernel (the pack was written elsewhere)."""
    n_pad, k_pad = m.padded_shape
    nib = m.nibbles()
    here = native_layout()
    weight = pack_nibbles(nib, here).view(n_pad, k_pad // 2) if here else \
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(nib.to(torch.int32), 1)
    with _layout.lock:
        _layout.conversions += 1
    return weight


def int4_linear(m: Int4KernelMatrix, device: torch.device) -> Int4Linear:
    """An Int4Linear of matrix `m` (already on `device`) that does not reference m's memory."""
    n, k = m.shape
    if device.type == "cuda":
        nib = m.nibbles()  # [Np, Kp] on the device
        packed = (nib[:, 0::2] << 4) | nib[:, 1::2]  # tinygemm's input: even element in the high nibble
        weight = torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), _inner_k_tiles(nib.shape[1]))
        return Int4Linear(weight, _owned_contiguous(m.scales_and_zeros), n, k, m.group_size)
    if m.layout != native_layout():
        return Int4Linear(_converted_for_cpu(m), _owned_contiguous(m.scales_and_zeros), n, k, m.group_size)
    weight = m.kernel_bytes()  # int2: expanded (new memory); int4: a view of the blob
    return Int4Linear(weight.clone() if m.bits == 4 else weight, _owned_contiguous(m.scales_and_zeros), n, k,
                      m.group_size)


def _owned_contiguous(t: Tensor) -> Tensor:
    """A contiguous copy (gate's and up's scales_and_zeros are strided views of one tensor in the blob)."""
    return t.clone(memory_format=torch.contiguous_format)


class Int4FusedExpert:
    """int4/int2 experts through torch's group-wise int4 matmul; activations in bf16.

    Either `gate_up` (gate's and up's rows as one [2 Np, K] matrix: one kernel call, the blob's
    own layout when Np is a multiple of the kernel's block) or `gate` and `up` apart.
    """

    def __init__(self, down: Int4Linear, gate: Int4Linear | None = None, up: Int4Linear | None = None,
                 gate_up: Int4Linear | None = None, inter: int = 0, blob: Tensor | None = None,
                 blob_nbytes: int = 0) -> None:
        self.gate, self.up, self.gate_up, self.down = gate, up, gate_up, down
        self.inter = inter  # rows of gate (and of up) in gate_up's output
        self.up_row = gate_up.n // 2 if gate_up is not None else 0  # up's first row in gate_up (Np)
        self.blob = blob  # the owned copy the matrices view (CPU int4), or None
        parts = [m for m in (gate, up, gate_up, down) if m is not None]
        self.hidden = parts[0].k
        self.nbytes = blob_nbytes if blob is not None else sum(m.nbytes for m in parts)

    @classmethod
    def _fused_views(cls, gate_up: Int4Linear, down: Int4Linear, inter: int, blob: Tensor,
                     blob_nbytes: int) -> "Int4FusedExpert":
        """The hot path's constructor (the same fields as __init__ with gate_up, without its generic work)."""
        self = cls.__new__(cls)
        self.gate = self.up = None
        self.gate_up, self.down, self.inter, self.up_row = gate_up, down, inter, gate_up.n // 2
        self.blob, self.hidden, self.nbytes = blob, gate_up.k, blob_nbytes
        return self

    def __call__(self, x: Tensor) -> Tensor:
        _check_input(x, self.hidden)
        if x.shape[0] == 0:
            return x.new_empty((0, self.hidden))
        xc = x.to(torch.bfloat16)
        if self.gate_up is not None:
            gu = self.gate_up(xc)  # [T, 2 Np] bf16
            h = F.silu(gu[:, :self.inter]) * gu[:, self.up_row:self.up_row + self.inter]  # [T, I]
        else:
            h = F.silu(self.gate(xc)) * self.up(xc)  # [T, I] bf16
        return self.down(h).float()  # [T, H]

    def project_in(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_input(x, self.hidden)
        if x.shape[0] == 0:
            empty = x.new_empty((0, self.inter if self.gate_up is not None else self.gate.n))
            return empty, empty
        xc = x.to(torch.bfloat16)
        if self.gate_up is not None:
            gu = self.gate_up(xc).float()  # [T, 2 Np]
            return gu[:, :self.inter], gu[:, self.up_row:self.up_row + self.inter]
        return self.gate(xc).float(), self.up(xc).float()

    def project_out(self, h: Tensor) -> Tensor:
        if h.shape[0] == 0:
            return h.new_empty((0, self.hidden))
        return self.down(h.to(torch.bfloat16)).float()


@functools.lru_cache(maxsize=32)
def _blob_plan(fmt: str, hidden: int, inter: int, block_n: int) -> tuple[int, bool, tuple[tuple[int, ...], ...]]:
    """The hot path's geometry from the codec's blob_sections: (blob bytes, gate and up fused, per kernel call
    (codes offset, codes bytes, rows Np, Kp/2, scales_and_zeros offset and group stride in bf16 units, NG,
    N, K, Kp))."""
    spec = FORMATS[fmt]
    sec = {(name, section): (off, n) for name, section, off, n in blob_sections(fmt, hidden, inter)}
    np_gu, np_d = -(-inter // 16) * 16, -(-hidden // 16) * 16
    ng_gu, ng_d = -(-hidden // spec.group_size), -(-inter // spec.group_size)
    kp_gu, kp_d = ng_gu * spec.group_size, ng_d * spec.group_size
    (g_off, g_n), (u_off, _) = sec[("gate", "codes")], sec[("up", "codes")]
    sz_gu, _ = sec[("gate_up", "scales_and_zeros")]
    fused = np_gu % block_n == 0 and u_off == g_off + g_n  # stacked rows = the blob's bytes as they are
    if fused:
        calls = [(g_off, 2 * g_n, 2 * np_gu, kp_gu // 2, sz_gu // 2, 4 * np_gu, ng_gu, 2 * np_gu, hidden, kp_gu)]
    else:  # gate's and up's scales_and_zeros are the two halves of each group's [2 Np, 2]
        calls = [(off, g_n, np_gu, kp_gu // 2, sz_gu // 2 + i * np_gu * 2, 4 * np_gu, ng_gu, inter, hidden, kp_gu)
                 for i, off in enumerate((g_off, u_off))]
    (d_off, d_n), (sz_d, _) = sec[("down", "codes")], sec[("down", "scales_and_zeros")]
    calls.append((d_off, d_n, np_d, kp_d // 2, sz_d // 2, 2 * np_d, ng_d, hidden, inter, kp_d))
    total = expert_nbytes(fmt, hidden, inter)
    return total, fused, tuple(calls)


def _owned_copy(blob: BlobLike) -> Tensor:
    """The blob's bytes as a flat uint8 tensor in memory nobody can change or reuse: immutable `bytes`, or a
    contiguous view of them (a gRPC reply message, bytes copied out of shared memory), are viewed with no
    copy (the tensor keeps them alive); anything else (an mmap, a shared-memory slot, a bytearray, a
    tensor) is copied once."""
    if isinstance(blob, memoryview) and isinstance(blob.obj, bytes) and blob.c_contiguous or type(blob) is bytes:
        return _view_immutable(blob)
    if isinstance(blob, (bytes, bytearray, memoryview)):
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8)  # bytearray(): one memcpy
    return as_uint8(blob).clone()


def _view_immutable(blob: bytes | memoryview) -> Tensor:
    """torch.frombuffer of read-only memory (nothing writes into a blob's tensor)."""
    view = memoryview(blob)
    if view.format != "B":
        view = view.cast("B")
    return torch.frombuffer(view, dtype=torch.uint8) if view.nbytes else torch.empty(0, dtype=torch.uint8)


def _spend_readonly_warning() -> None:
    """torch warns once per process that a tensor over read-only memory is writable: spend that warning
    here, at import (one thread), so `_view_immutable` stays quiet."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.frombuffer(b"\0", dtype=torch.uint8)


_spend_readonly_warning()


def _cpu_fused_from_blob(fmt: str, blob: BlobLike, hidden: int, inter: int, layout: Int4Layout,
                         copy: bool = True) -> Int4FusedExpert:
    """The hot path, blob in this machine's kernel layout. int4: one copy of the blob into owned memory
    (none with copy=False: the caller owns `blob`), then strided views of it. int2: one table lookup per
    call expands the codes, scales_and_zeros copied."""
    total, fused, plan = _blob_plan(fmt, hidden, inter, layout.block_n)
    int4 = fmt == "int4"
    data = _owned_copy(blob) if int4 and copy else as_uint8(blob)  # int4: a shm slot may be reused after this
    if data.numel() != total:
        raise CodecError(f"{fmt} expert blob for hidden={hidden} inter={inter} must be {total} bytes, "
                         f"got {data.numel()}")
    if data.data_ptr() % 2:  # bf16 views need an even address
        data = data.clone()
    halves = data.view(torch.bfloat16)
    group = FORMATS[fmt].group_size
    lin, copied = [], 0
    for code_off, code_bytes, n_pad, row, sz_off, sz_stride, n_groups, n, k, k_pad in plan:
        # as_strided's offsets count from the storage's start: `data` may be a view further in (an arena slot)
        sz = torch.as_strided(halves, (n_groups, n_pad, 2), (sz_stride, 2, 1), halves.storage_offset() + sz_off)
        if int4:
            weight = torch.as_strided(data, (n_pad, row), (row, 1), data.storage_offset() + code_off)
        else:
            weight = expand_int2(data[code_off:code_off + code_bytes]).view(n_pad, row)
        if not int4 or not sz.is_contiguous():  # int2, or gate and up apart: own copies
            sz = _owned_contiguous(sz)
            copied += n_groups * n_pad * 4 if int4 else 0
        lin.append(Int4Linear._of_views(weight, sz, n, k, k_pad, group, n_pad * row + n_groups * n_pad * 4))
    keep = data if int4 else None
    if fused and int4:
        return Int4FusedExpert._fused_views(lin[0], lin[1], inter, data, total)
    if fused:
        return Int4FusedExpert(lin[1], gate_up=lin[0], inter=inter, blob=keep, blob_nbytes=total)
    return Int4FusedExpert(lin[2], gate=lin[0], up=lin[1], blob=keep, blob_nbytes=total + copied)


def int4_in_place(data: Tensor, hidden: int, inter: int) -> ExpertCompute | None:
    """An int4 expert that computes straight from `data` (uint8 on the CPU, the blob's bytes), views only:
    the caller may later overwrite `data` with another expert's blob of the same shape, and this object
    then computes that expert (an arena slot's compute form is built once). None when this machine cannot
    (no known kernel layout, a pack in another layout, or a shape whose scales need their own copy)."""
    native = native_layout()
    if native is None or _layout.pack_layout not in (None, native):
        return None
    c = _cpu_fused_from_blob("int4", data, hidden, inter, native, copy=False)
    base = data.untyped_storage().data_ptr()
    parts = [m for m in (c.gate, c.up, c.gate_up, c.down) if m is not None]
    if any(t.untyped_storage().data_ptr() != base for m in parts for t in (m.weight, m.scales_and_zeros)):
        return None
    return c


def make_expert_compute(fmt: str, blob: BlobLike, hidden: int, inter: int, form: str,
                        device: torch.device | str = "cpu", layout: Int4Layout | None = None) -> ExpertCompute:
    """Build the compute object for one expert blob in `form` on `device`.

    form "auto" means default_compute_form(fmt, device). A form that cannot run this
    format (int4_fused on bf16/int8) raises CodecError rather than silently changing
    the numerics or the cache footprint the caller planned for. `layout`: the int4
    layout of the blob (default: the accepted pack's, else this machine's kernel's).
    The result never references `blob`, so an mmap or a shared-memory slot can be reused, except
    immutable `bytes` (or a view of them), which the CPU int4 form views rather than copies.
    """
    native = native_layout()
    if form == "int4_fused" and layout is None and (device == "cpu" or device == _CPU) and native is not None \
            and _layout.pack_layout in (None, native) and fmt in ("int4", "int2"):
        return _cpu_fused_from_blob(fmt, blob, hidden, inter, native)  # the cache's hot path, decided in ~1 us
    device = torch.device(device)
    if form == "auto":
        form = default_compute_form(fmt, device)
    if form not in COMPUTE_FORMS:
        raise CodecError(f"unknown compute form {form!r}; known: {COMPUTE_FORMS} or 'auto'")
    spec = format_spec(fmt)
    kernel_layout = _blob_layout(layout) if spec.kernel_layout else None
    if form == "int4_fused":
        if not spec.kernel_layout or spec.group_size not in INT4_KERNEL_GROUP_SIZES:
            raise CodecError(f"int4_fused cannot run {fmt!r} experts (only int4/int2 codes fit "
                             f"the int4 kernel); use 'fp32', 'bf16' or form='auto'")
        if device.type == "cpu" and kernel_layout == native_layout():
            return _cpu_fused_from_blob(fmt, blob, hidden, inter, kernel_layout)
        if device.type not in ("cpu", "cuda"):
            raise CodecError(f"int4_fused has no kernel for device type {device.type!r}")
        # a foreign layout (converted: the slow path), CUDA (one copy to the device, converted there)
        data = as_uint8(blob).to(device) if device.type == "cuda" else blob
        views = view_expert(fmt, data, hidden, inter, kernel_layout)
        mats = [views[name] for name in ("gate", "up", "down")]
        gate, up, down = (int4_linear(m, device) for m in mats)  # type: ignore[arg-type]
        return Int4FusedExpert(down, gate=gate, up=up)
    if form in ("fp32", "bf16"):
        dtype = torch.float32 if form == "fp32" else torch.bfloat16
        data = as_uint8(blob).to(device) if device.type != "cpu" else blob  # expand where it will compute
        views = view_expert(fmt, data, hidden, inter, kernel_layout)
        w = [v.to(device=device, dtype=dtype, copy=True) if isinstance(v, Tensor) else dequantize(v, dtype)
             for v in (views["gate"], views["up"], views["down"])]
        return DenseExpert(w[0], w[1], w[2])
    # dequant_per_use: one owned copy on the device, so the blob's buffer is released
    owned = as_uint8(blob).to(device, copy=True)
    views = view_expert(fmt, owned, hidden, inter, kernel_layout)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return DequantPerUseExpert(owned, [views["gate"], views["up"], views["down"]], dtype)


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
    if spec.kernel_layout and spec.group_size in INT4_KERNEL_GROUP_SIZES:
        return "int4_fused"
    return "bf16" if device.type == "cuda" else "dequant_per_use"
