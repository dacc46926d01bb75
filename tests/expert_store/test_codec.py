"""Codec: quantization round trips, bit packing by hand (both int4 layouts), blob layout and blob types."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expert_store import codec
from expert_store.codec import (
    ALIGN,
    FORMATS,
    CodecError,
    Int4KernelMatrix,
    QuantizedMatrix,
    decode_expert,
    dequantize,
    encode_expert,
    expert_nbytes,
    format_spec,
    quantize,
    quantize_format,
    reconstruction_error,
    view_expert,
)
from expert_store.int4_layout import KNOWN_LAYOUTS, Int4Layout, Int4LayoutError, native_layout

SPLIT64, ADJACENT32 = Int4Layout(64, True), Int4Layout(32, False)  # AVX512's layout and the scalar build's

QUANTIZED = ("int8", "int4", "int2")


def _weights(hidden: int, inter: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(inter, hidden, generator=g) * 0.02, torch.randn(inter, hidden, generator=g) * 0.02,
            torch.randn(hidden, inter, generator=g) * 0.02)


def _scales(q: QuantizedMatrix | Int4KernelMatrix) -> torch.Tensor:
    """fp32 [out, NG] stored scales (the kernel form keeps them as [NG, Np, 2] bf16)."""
    if isinstance(q, Int4KernelMatrix):
        return q.scales_and_zeros[:, : q.shape[0], 0].float().t()
    return q.scales.float()


def _half_scale_per_element(q: QuantizedMatrix | Int4KernelMatrix) -> torch.Tensor:
    """scale/2 broadcast to [out, in] (each element's group)."""
    return _scales(q).repeat_interleave(q.group_size, dim=1)[:, : q.shape[1]] / 2


def test_format_table_matches_the_design():
    assert {f: (s.bits, s.group_size) for f, s in FORMATS.items()} == {
        "bf16": (16, 0), "int8": (8, 128), "int4": (4, 64), "int2": (2, 32)}
    assert format_spec("int4") is FORMATS["int4"]


def test_unknown_format_names_the_known_ones():
    with pytest.raises(CodecError, match="int3.*bf16.*int2.*int4.*int8"):
        format_spec("int3")
    with pytest.raises(CodecError):
        expert_nbytes("fp8", 64, 128)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("hidden,inter", [(128, 256), (200, 100), (192, 384)])
def test_blob_size_and_section_alignment(fmt, hidden, inter):
    blob = encode_expert(fmt, *_weights(hidden, inter))
    assert len(blob) == expert_nbytes(fmt, hidden, inter)
    arr = np.frombuffer(blob, dtype=np.uint8)
    base = torch.from_numpy(arr.copy())
    views = view_expert(fmt, base, hidden, inter)
    for v in views.values():
        tensors = ([v.codes, v.scales, v.mins] if isinstance(v, QuantizedMatrix)
                   else [v.codes, v.scales_and_zeros] if isinstance(v, Int4KernelMatrix) else [v])
        for t in tensors:
            assert (t.data_ptr() - base.data_ptr()) % ALIGN == 0
            assert t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()  # zero-copy


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("shape", [(48, 256), (16, 100), (8, 37)])
def test_quantized_round_trip_error_is_at_most_half_a_step(fmt, shape):
    spec = FORMATS[fmt]
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.02
    q = quantize_format(fmt, w)
    n_groups = -(-shape[1] // spec.group_size)
    k_pad, n_pad = n_groups * spec.group_size, -(-shape[0] // 16) * 16
    if fmt == "int8":
        assert isinstance(q, QuantizedMatrix) and q.codes.shape == (shape[0], k_pad)
        assert q.scales.dtype == q.mins.dtype == torch.float16 and q.scales.shape == (shape[0], n_groups)
    else:  # the int4 kernel's form: flat codes, bf16 [NG, Np, 2] scale and zero, padded rows zero
        assert isinstance(q, Int4KernelMatrix) and q.codes.shape == (n_pad * k_pad * spec.bits // 8,)
        assert q.scales_and_zeros.dtype == torch.bfloat16 and q.scales_and_zeros.shape == (n_groups, n_pad, 2)
        assert (q.scales_and_zeros[:, shape[0]:] == 0).all()
    assert q.codes.dtype == torch.uint8
    w2 = dequantize(q)
    assert w2.shape == w.shape and w2.dtype == torch.float32
    err = (w2 - w).abs()
    assert (err <= _half_scale_per_element(q) + 1e-7).all()
    rel = (err.norm() / w.norm()).item()
    assert rel < {"int8": 0.01, "int4": 0.12, "int2": 0.5}[fmt]
    assert dequantize(q, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("bits,group", [(8, 128), (4, 64), (2, 32)])
def test_fp16_bound_holds_when_fp16_cannot_hold_the_min(bits, group):
    # values in [100.05, 100.06]; fp16's nearest to the min is 100.0625, above them all:
    # the stored min is rounded down and the scale up, so the stored range covers them
    w = 100.05 + torch.rand(8, 128, generator=torch.Generator().manual_seed(2)) * 0.01
    q = quantize(w, bits, group)
    assert (q.scales > 0).all() and (q.mins.float() <= w.amin()).all()
    assert ((dequantize(q) - w).abs() <= _half_scale_per_element(q) + 1e-5).all()


@pytest.mark.parametrize("fmt", ["int4", "int2"])
@pytest.mark.parametrize("offset", [100.05, -3.3, 0.7])
def test_bf16_bound_holds_for_groups_far_from_zero(fmt, offset):
    # bf16 has 8 significant bits: around 100 its values are 0.5 apart, 50x this group's range,
    # so the scale must grow until some bf16 zero puts the grid within scale/2 of both ends
    w = offset + torch.rand(8, 128, generator=torch.Generator().manual_seed(2)) * 0.01
    q = quantize_format(fmt, w)
    assert ((dequantize(q) - w).abs() <= _half_scale_per_element(q) + 1e-5).all()
    assert (_scales(q) > 0).all()


def test_padded_last_group_keeps_its_own_range():
    # 100 inputs, int4 group 64: the second group holds 36 real values + 28 padding
    w = torch.zeros(2, 100)
    w[:, 64:] = torch.linspace(-1.0, 0.5, 36)
    w[:, :64] = torch.linspace(3.0, 4.0, 64)
    q = quantize(w, 4, 64)
    assert q.n_groups == 2 and q.shape == (2, 100)
    assert torch.equal(q.mins[:, 1].float(), torch.tensor([-1.0, -1.0]))
    assert (q.scales[:, 1].float() >= 1.5 / 15).all() and (q.scales[:, 1].float() < 1.5 / 15 * 1.001).all()
    assert dequantize(q).shape == (2, 100)


def test_padded_last_group_keeps_its_own_range_in_the_kernel_form():
    w = torch.zeros(16, 100)
    w[:, 64:] = torch.linspace(-1.0, 0.5, 36)
    w[:, :64] = torch.linspace(3.0, 4.0, 64)
    q = quantize_format("int4", w)
    scale = _scales(q)
    assert q.n_groups == 2 and q.shape == (16, 100)
    assert (scale[:, 1] >= 1.5 / 15).all() and (scale[:, 1] < 1.5 / 15 * 1.01).all()  # bf16 rounding up
    assert ((dequantize(q) - w).abs() <= _half_scale_per_element(q) + 1e-6).all()


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2"])
def test_constant_groups(fmt):
    w = torch.full((4, 128), 0.5)
    w[1] = -0.25
    w[2] = 0.0
    w[3] = 0.1234567  # neither an fp16 nor a bf16 value: a tiny step covers it
    q = quantize_format(fmt, w)
    out = dequantize(q)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:3], w[:3])  # exact, scale 0
    assert (_scales(q)[:3] == 0).all()
    assert (out[3] - w[3]).abs().max() < 1e-4


def test_fp16_packing_by_hand():
    row = torch.zeros(1, 64)
    row[0, :6] = torch.tensor([1.0, 2.0, 3.0, 4.0, 15.0, 0.0])  # min 0, max 15: scale 1, codes = values
    q = quantize(row, 4, 64)
    assert q.scales.item() == 1.0 and q.mins.item() == 0.0
    # element 2j in the low nibble, 2j+1 in the high nibble
    assert q.codes[0, :4].tolist() == [0x21, 0x43, 0x0F, 0x00]
    assert q.codes[0, 4:].sum().item() == 0
    row = torch.zeros(1, 32)
    row[0, :8] = torch.tensor([1.0, 2.0, 3.0, 0.0, 3.0, 3.0, 0.0, 0.0])
    q = quantize(row, 2, 32)
    # element 4j+i in bits 2i..2i+1: [1,2,3,0] -> 0b00_11_10_01, [3,3,0,0] -> 0b00_00_11_11
    assert q.codes[0, :2].tolist() == [0b00111001, 0b00001111]


def _ramp(rows: int, cols: int, top: int) -> torch.Tensor:
    """Every group spans 0..top (scale 1 and zero H: codes equal the values), values vary by row and column."""
    w = (torch.arange(rows).unsqueeze(1) * 3 + torch.arange(cols).unsqueeze(0)) % (top + 1)
    w[:, 0], w[:, 1] = 0, top  # each group of the first columns reaches both ends
    return w.float()


def test_int4_kernel_layout_by_hand():
    w = _ramp(64, 64, 15)  # one 64-row block, one group of 64
    for layout in (SPLIT64, ADJACENT32):
        q = quantize_format("int4", w, layout)
        assert q.scales_and_zeros[0, :, 0].float().eq(1.0).all() and q.scales_and_zeros[0, :, 1].float().eq(8).all()
        c = w.to(torch.uint8)
        first = q.codes[:4].tolist()
        if layout == SPLIT64:  # k-major; byte j of k = 0: row j (low nibble), row j + 32 (high)
            assert first == [int(c[j, 0]) | int(c[j + 32, 0]) << 4 for j in range(4)]
            assert q.codes[32].item() == int(c[0, 1]) | int(c[32, 1]) << 4  # k = 1 starts 32 bytes on
        else:  # 32-row blocks, rows 2j, 2j+1 share a byte
            assert first == [int(c[2 * j, 0]) | int(c[2 * j + 1, 0]) << 4 for j in range(4)]
            assert q.codes[16].item() == int(c[0, 1]) | int(c[1, 1]) << 4
            assert q.codes[64 * 16].item() == int(c[32, 0]) | int(c[33, 0]) << 4  # the second block
    blob = encode_expert("int4", w, w, w.t().contiguous(), SPLIT64)
    assert blob[:4] == bytes(quantize_format("int4", w, SPLIT64).codes[:4].tolist())  # gate codes open the blob
    assert blob[64 * 32:64 * 32 + 4] == blob[:4]  # up's codes (the same weights) follow gate's
    sz = np.frombuffer(blob[2 * 64 * 32:2 * 64 * 32 + 4], dtype=np.uint16)  # then bf16 (scale, zero), gate row 0
    assert sz.tolist() == [0x3F80, 0x4100]  # bf16 1.0 and 8.0


def test_int2_kernel_layout_by_hand():
    w = _ramp(32, 32, 3)
    q = quantize_format("int2", w, ADJACENT32)  # scale 1, zero 2: codes = values
    assert q.scales_and_zeros[0, :, 0].float().eq(1.0).all() and q.scales_and_zeros[0, :, 1].float().eq(2).all()
    c = w.to(torch.uint8)
    # the int4 stream's nibbles (rows 0, 1 | rows 2, 3 at k = 0) minus 6, two bits each from bit 0
    assert q.codes[0].item() == int(c[0, 0]) | int(c[1, 0]) << 2 | int(c[2, 0]) << 4 | int(c[3, 0]) << 6
    assert q.codes.numel() == 32 * 32 // 4
    assert torch.equal(q.nibbles(), c + 6)  # the kernel's q: int2 codes centred in the int4 range


@pytest.mark.skipif(native_layout() is None, reason="this torch's int4 CPU layout is not one we know")
@pytest.mark.parametrize("rows,cols", [(112, 64), (384, 192), (16, 128), (48, 32)])
def test_native_layout_is_what_the_kernel_writes(rows, cols):
    from expert_store.int4_layout import pack_nibbles

    c = torch.randint(0, 16, (rows, cols), generator=torch.Generator().manual_seed(rows), dtype=torch.int32)
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c, 1).reshape(-1)
    assert torch.equal(pack_nibbles(c.to(torch.uint8), native_layout()), want)


@pytest.mark.parametrize("layout", KNOWN_LAYOUTS, ids=lambda l: l.name)
def test_every_layout_round_trips(layout):
    from expert_store.int4_layout import compress_int2, expand_int2, pack_nibbles, unpack_nibbles

    c = torch.randint(0, 16, (112, 64), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    packed = pack_nibbles(c, layout)
    assert torch.equal(unpack_nibbles(packed, 112, 64, layout), c)
    c2 = torch.randint(6, 10, (112, 64), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    int4 = pack_nibbles(c2, layout)
    assert torch.equal(expand_int2(compress_int2(int4)), int4)
    assert Int4Layout.from_record(layout.record()) == layout


def test_layout_record_is_checked():
    record = SPLIT64.record()
    assert record["name"] == "n64-split" and record["fingerprint"].startswith("xxh3_64:")
    assert SPLIT64.fingerprint() != ADJACENT32.fingerprint()
    with pytest.raises(Int4LayoutError, match="fingerprint"):
        Int4Layout.from_record({**record, "fingerprint": ADJACENT32.fingerprint()})
    with pytest.raises(Int4LayoutError, match="unknown int4 layout"):
        Int4Layout.from_record({"name": "n128-zigzag", "fingerprint": "x"})


@pytest.mark.parametrize("fmt", ["int4", "int2"])
def test_gate_and_up_side_by_side_are_the_stacked_matrix(fmt):
    """With inter a multiple of the layout's block, the blob's gate codes + up codes + their scales_and_zeros
    are exactly the [2 inter, hidden] matrix quantized whole: the worker runs both in one kernel call."""
    gate, up, down = _weights(64, 128)
    for layout in KNOWN_LAYOUTS:
        views = view_expert(fmt, encode_expert(fmt, gate, up, down, layout), 64, 128, layout)
        both = quantize_format(fmt, torch.cat([gate, up]), layout)
        assert torch.equal(torch.cat([views["gate"].codes, views["up"].codes]), both.codes), layout.name
        assert torch.equal(torch.cat([views["gate"].scales_and_zeros, views["up"].scales_and_zeros], 1),
                           both.scales_and_zeros)


def test_a_blob_decodes_the_same_in_every_layout():
    gate, up, down = _weights(64, 96)
    ref = decode_expert("int4", encode_expert("int4", gate, up, down, SPLIT64), 64, 96, layout=SPLIT64)
    for layout in KNOWN_LAYOUTS:
        blob = encode_expert("int4", gate, up, down, layout)
        for got, want in zip(decode_expert("int4", blob, 64, 96, layout=layout), ref):
            assert torch.equal(got, want), layout.name


def test_dequantize_known_bytes():
    """The unpacking alone: hand-made codes/scales/zeros -> known weights."""
    # 16 rows: one partial block, rows 2j and 2j+1 in byte j of each k, in every layout
    codes = torch.zeros(16 * 64 // 2, dtype=torch.uint8)
    codes[0], codes[8] = 0x9A, 0x0F  # k = 0: row 0 -> 10, row 1 -> 9; k = 1: row 0 -> 15, row 1 -> 0
    sz = torch.zeros(1, 16, 2, dtype=torch.bfloat16)
    sz[0, 0] = torch.tensor([0.5, -1.0])
    sz[0, 1] = torch.tensor([2.0, 1.0])
    for layout in KNOWN_LAYOUTS:
        w = dequantize(Int4KernelMatrix(codes, sz, (2, 64), 4, 64, layout))  # w = (q - 8) * scale + zero
        assert w.shape == (2, 64) and w[:, :2].tolist() == [[0.0, 2.5], [3.0, -15.0]]
    codes = torch.tensor([[0x21, 0x43, 0xF0, 0x00] + [0] * 28], dtype=torch.uint8)  # 64 int4 codes
    q = QuantizedMatrix(codes, torch.tensor([[0.5]], dtype=torch.float16),
                        torch.tensor([[-1.0]], dtype=torch.float16), (1, 64), 4, 64)
    w = dequantize(q)
    assert w[0, :6].tolist() == [-0.5, 0.0, 0.5, 1.0, -1.0, 6.5]
    codes2 = torch.tensor([[0b11100100, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.uint8)  # 32 int2 codes
    q2 = QuantizedMatrix(codes2, torch.tensor([[2.0]], dtype=torch.float16),
                         torch.tensor([[1.0]], dtype=torch.float16), (1, 30), 2, 32)
    assert dequantize(q2)[0, :5].tolist() == [1.0, 3.0, 5.0, 7.0, 1.0]
    assert dequantize(q2).shape == (1, 30)


def test_row_bytes_not_a_multiple_of_four_take_the_general_unpack():
    w = torch.randn(3, 10)
    q = quantize(w, 4, 2)  # 5 groups of 2 -> 5 code bytes per row
    assert ((dequantize(q) - w).abs() <= _half_scale_per_element(q) + 1e-6).all()


def test_bf16_is_an_exact_passthrough():
    gate, up, down = _weights(64, 96)
    blob = encode_expert("bf16", gate, up, down)
    for got, ref in zip(decode_expert("bf16", blob, 64, 96), (gate, up, down)):
        assert torch.equal(got, ref.to(torch.bfloat16).float())
    g16, _, _ = decode_expert("bf16", blob, 64, 96, dtype=torch.bfloat16)
    assert g16.dtype == torch.bfloat16 and torch.equal(g16, gate.to(torch.bfloat16))
    assert reconstruction_error("bf16", gate.to(torch.bfloat16))["max_abs"] == 0.0


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_decode_accepts_every_blob_type(fmt):
    hidden, inter = 64, 128
    blob = encode_expert(fmt, *_weights(hidden, inter))
    ref = decode_expert(fmt, blob, hidden, inter)
    kinds = [bytearray(blob), memoryview(blob), np.frombuffer(blob, dtype=np.uint8),
             torch.frombuffer(bytearray(blob), dtype=torch.uint8)]
    for kind in kinds:
        for got, want in zip(decode_expert(fmt, kind, hidden, inter), ref):
            assert got.shape == want.shape and torch.equal(got, want), type(kind)
    odd = bytearray(len(blob) + 1)
    odd[1:] = blob
    for got, want in zip(decode_expert(fmt, memoryview(odd)[1:], hidden, inter), ref):  # odd address
        assert torch.equal(got, want)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_wrong_blob_size_or_type_raises(fmt):
    blob = encode_expert(fmt, *_weights(64, 128))
    with pytest.raises(CodecError, match=str(len(blob))):
        decode_expert(fmt, blob[:-1], 64, 128)
    with pytest.raises(CodecError):
        decode_expert(fmt, blob + b"\0" * 16, 64, 128)
    with pytest.raises(CodecError):
        decode_expert(fmt, blob, 64, 64)  # shapes that do not match the blob
    with pytest.raises(CodecError, match="uint8"):
        decode_expert(fmt, np.zeros(len(blob) // 4, dtype=np.float32), 64, 128)
    with pytest.raises(CodecError):
        decode_expert(fmt, "not a blob", 64, 128)


def test_encode_rejects_bad_inputs():
    gate, up, down = _weights(64, 128)
    with pytest.raises(CodecError, match="down"):
        encode_expert("int4", gate, up, down.t())
    with pytest.raises(CodecError):
        encode_expert("int4", gate, up[:, :32], down)
    with pytest.raises(CodecError, match="inf or nan"):
        encode_expert("int4", gate.clone().fill_(float("nan")), up, down)
    with pytest.raises(CodecError, match="fp16"):
        quantize(torch.tensor([[-1e6, 1e6] * 32]), 4, 64)  # the min has no fp16 value
    with pytest.raises(CodecError):
        quantize(torch.zeros(4, 64, dtype=torch.int32), 4, 64)


def test_views_share_the_buffer():
    hidden, inter = 64, 128
    buf = torch.frombuffer(bytearray(encode_expert("int4", *_weights(hidden, inter))), dtype=torch.uint8)
    views = view_expert("int4", buf, hidden, inter)
    before = dequantize(views["gate"]).clone()
    buf[:] = 0  # the views see the change: nothing was copied
    assert views["gate"].codes.sum().item() == 0 and not torch.equal(dequantize(views["gate"]), before)


def test_reconstruction_error_ranks_the_formats():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.02
    errs = {f: reconstruction_error(f, w) for f in FORMATS}
    assert set(errs["int4"]) >= {"rel_fro", "max_abs", "bits_per_param"}
    assert errs["bf16"]["rel_fro"] < errs["int8"]["rel_fro"] < errs["int4"]["rel_fro"] < errs["int2"]["rel_fro"]
    assert errs["int4"]["bits_per_param"] == 4 + 2 * 16 / 64
    assert errs["int2"]["bits_per_param"] == 2 + 2 * 16 / 32


def test_layout_version_is_exported():
    assert codec.LAYOUT_VERSION == 2
