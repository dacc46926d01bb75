"""Expert compute forms: each matches the dequantized fp32 reference; nbytes is honest."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import logging

from expert_store.codec import (
    FORMATS, CodecError, Int4KernelMatrix, QuantizedMatrix, decode_expert, encode_expert, expert_nbytes,
)
from expert_store.errors import PackError
from expert_store.int4_layout import KNOWN_LAYOUTS, native_layout
from gpu_worker import expert_compute
from gpu_worker.expert_compute import (
    COMPUTE_FORMS,
    accept_pack_layout,
    default_compute_form,
    layout_conversions,
    make_expert_compute,
)

needs_known_layout = pytest.mark.skipif(native_layout() is None, reason="this torch's int4 CPU layout is unknown")

# (hidden, inter): aligned to every kernel constraint; then K and N that need padding
SHAPES = [(128, 256), (200, 100)]
# relative Frobenius error of the expert output vs the fp32 reference of the same codes
TOLERANCE = {"fp32": 0.0, "dequant_per_use": 0.0, "bf16": 2e-2, "int4_fused": 2e-2}


def _swiglu(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _expert(hidden: int, inter: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(inter, hidden, generator=g) * 0.02, torch.randn(inter, hidden, generator=g) * 0.02,
            torch.randn(hidden, inter, generator=g) * 0.02)


def _kept_storages(obj, seen: dict | None = None) -> dict[int, int]:
    """Every tensor storage reachable from an expert object (its classes, lists, matrices): data_ptr -> bytes."""
    seen = {} if seen is None else seen
    if isinstance(obj, torch.Tensor):
        seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _kept_storages(o, seen)
    elif isinstance(obj, (QuantizedMatrix, Int4KernelMatrix)) or type(obj).__module__ == "gpu_worker.expert_compute":
        for o in vars(obj).values():
            _kept_storages(o, seen)
    return seen


@pytest.fixture
def fresh_layout_state(monkeypatch):
    """accept_pack_layout sets process-wide state: each test gets its own."""
    monkeypatch.setattr(expert_compute, "_layout", expert_compute._LayoutState())


def _cases():
    for fmt in FORMATS:
        for form in COMPUTE_FORMS:
            if form == "int4_fused" and fmt in ("bf16", "int8"):
                continue
            yield fmt, form


@pytest.mark.parametrize("hidden,inter", SHAPES)
@pytest.mark.parametrize("fmt,form", list(_cases()))
def test_form_matches_dequantized_reference(fmt, form, hidden, inter):
    blob = encode_expert(fmt, *_expert(hidden, inter))
    x = torch.randn(7, hidden, generator=torch.Generator().manual_seed(1))
    ref = _swiglu(x, *decode_expert(fmt, blob, hidden, inter))
    expert = make_expert_compute(fmt, blob, hidden, inter, form)
    y = expert(x)
    assert y.shape == (7, hidden) and y.dtype == torch.float32
    rel = ((y - ref).norm() / ref.norm()).item()
    if TOLERANCE[form] == 0.0:
        assert torch.equal(y, ref)  # same weights, same fp32 ops
    else:
        assert 0 < rel < TOLERANCE[form]


def test_bf16_format_fp32_form_is_bit_identical_to_f_linear():
    gate, up, down = _expert(96, 160)
    blob = encode_expert("bf16", gate, up, down)
    x = torch.randn(5, 96)
    up32 = [w.to(torch.bfloat16).float() for w in (gate, up, down)]
    assert torch.equal(make_expert_compute("bf16", blob, 96, 160, "fp32")(x), _swiglu(x, *up32))


@pytest.mark.parametrize("fmt", ["int4", "int2"])
def test_fused_kernel_matches_dequant_reference_on_tiny_mixtral_shape(fmt):
    hidden, inter = 192, 384
    blob = encode_expert(fmt, *_expert(hidden, inter, seed=4))
    x = torch.randn(3, hidden)
    ref = _swiglu(x, *decode_expert(fmt, blob, hidden, inter))
    bf16_ref = make_expert_compute(fmt, blob, hidden, inter, "bf16")(x)  # bf16 activations too
    y = make_expert_compute(fmt, blob, hidden, inter, "int4_fused")(x)
    rel = ((y - ref).norm() / ref.norm()).item()
    rel_bf16 = ((bf16_ref - ref).norm() / ref.norm()).item()
    assert rel < 2 * rel_bf16 + 1e-3  # no worse than bf16 compute (int2 codes are re-centred)


@pytest.mark.parametrize("hidden,inter", SHAPES)
@pytest.mark.parametrize("fmt,form", list(_cases()))
def test_nbytes_is_the_sum_of_kept_tensors(fmt, form, hidden, inter):
    blob = encode_expert(fmt, *_expert(hidden, inter))
    expert = make_expert_compute(fmt, blob, hidden, inter, form)
    kept = _kept_storages(expert)
    assert kept and expert.nbytes == sum(kept.values())
    n_params = 3 * hidden * inter
    if form == "fp32":
        assert expert.nbytes == 4 * n_params
    elif form == "bf16":
        assert expert.nbytes == 2 * n_params
    elif form == "int4_fused" and fmt == "int4" and hidden % 64 == 0 and inter % 64 == 0:
        assert expert.nbytes == n_params // 2 + 3 * 2 * 2 * (n_params // 3 // 64)  # codes + bf16 scale, zero
    elif form == "dequant_per_use":
        assert expert.nbytes == len(blob)  # one owned copy of the blob


@needs_known_layout
@pytest.mark.parametrize("hidden,inter", [(128, 256), (192, 384)])
def test_cpu_int4_fused_is_one_copy_of_the_blob(hidden, inter):
    """What the worker receives is compute-ready: the kernel's weights and scales are views of one copy,
    gate and up one [2 inter, hidden] matrix (inter a multiple of the kernel's block)."""
    blob = bytearray(encode_expert("int4", *_expert(hidden, inter)))
    expert = make_expert_compute("int4", blob, hidden, inter, "int4_fused", "cpu")
    kept = _kept_storages(expert)
    assert list(kept.values()) == [len(blob)]  # a single storage: the copy
    assert next(iter(kept)) != torch.frombuffer(blob, dtype=torch.uint8).data_ptr()  # not the blob itself
    assert expert.gate_up.weight.data_ptr() == expert.blob.data_ptr()  # gate codes open the blob
    assert expert.gate_up.weight.shape == (2 * inter, hidden // 2) and expert.gate_up.scales_and_zeros.dtype == \
        torch.bfloat16


@needs_known_layout
@pytest.mark.parametrize("fmt", ["int4", "int2"])
def test_foreign_layout_is_converted_counted_and_identical(fmt):
    """A pack written where the kernel lays int4 out differently: converted on arrival, same numerics."""
    weights = _expert(192, 384, seed=5)
    native = make_expert_compute(fmt, encode_expert(fmt, *weights), 192, 384, "int4_fused")
    x = torch.randn(3, 192)
    for layout in KNOWN_LAYOUTS:
        if layout == native_layout():
            continue
        before = layout_conversions()
        expert = make_expert_compute(fmt, encode_expert(fmt, *weights, layout), 192, 384, "int4_fused",
                                     layout=layout)
        assert layout_conversions() == before + 3  # gate, up, down
        assert expert.gate_up is None and native.gate_up is not None  # apart, and in one kernel call
        assert torch.equal(expert(x), native(x)), layout.name
        ref = make_expert_compute(fmt, encode_expert(fmt, *weights, layout), 192, 384, "fp32", layout=layout)
        assert torch.equal(ref(x), make_expert_compute(fmt, encode_expert(fmt, *weights), 192, 384, "fp32")(x))


@needs_known_layout
def test_accept_pack_layout(fresh_layout_state, caplog):
    manifest = {"formats": {"int4": {}}, "int4_layout": native_layout().record()}
    with caplog.at_level(logging.WARNING, logger="gpu_worker.expert_compute"):
        assert accept_pack_layout(manifest) == native_layout()
    assert not caplog.records
    foreign = next(l for l in KNOWN_LAYOUTS if l != native_layout())
    with caplog.at_level(logging.WARNING, logger="gpu_worker.expert_compute"):
        assert accept_pack_layout({**manifest, "int4_layout": foreign.record()}) == foreign
    assert "converted on arrival" in caplog.text and "python -m expert_store pack" in caplog.text
    # the accepted layout is the one blobs are read in from now on
    weights = _expert(64, 128)
    before = layout_conversions()
    make_expert_compute("int4", encode_expert("int4", *weights, foreign), 64, 128, "int4_fused")
    assert layout_conversions() == before + 3
    assert accept_pack_layout({"formats": {"bf16": {}}}) is None  # nothing to check
    with pytest.raises(PackError, match="re-pack"):
        accept_pack_layout({"formats": {"int2": {}}})
    with pytest.raises(PackError, match="re-pack"):
        accept_pack_layout({**manifest, "int4_layout": {"name": foreign.name, "fingerprint": "xxh3_64:0"}})


@pytest.mark.parametrize("form", COMPUTE_FORMS)
def test_expert_does_not_keep_the_blob(form):
    hidden, inter = 128, 256
    buf = bytearray(encode_expert("int4", *_expert(hidden, inter)))
    expert = make_expert_compute("int4", buf, hidden, inter, form)
    x = torch.randn(2, hidden)
    before = expert(x)
    buf[:] = bytes(len(buf))  # the store reuses the slot
    assert torch.equal(expert(x), before)


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_fused_form_refuses_formats_the_kernel_cannot_hold(fmt):
    blob = encode_expert(fmt, *_expert(64, 128))
    with pytest.raises(CodecError, match="int4_fused"):
        make_expert_compute(fmt, blob, 64, 128, "int4_fused")


def test_bad_form_and_bad_input():
    blob = encode_expert("int4", *_expert(64, 128))
    with pytest.raises(CodecError, match="compute form"):
        make_expert_compute("int4", blob, 64, 128, "int3_magic")
    expert = make_expert_compute("int4", blob, 64, 128, "int4_fused")
    with pytest.raises(CodecError, match=r"\[T, 64\]"):
        expert(torch.randn(2, 63))
    assert expert(torch.randn(0, 64)).shape == (0, 64)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_defaults_are_valid_forms_that_run(fmt):
    for device in ("cpu", "cuda"):
        assert default_compute_form(fmt, device) in COMPUTE_FORMS
    assert default_compute_form("int4", "cpu") == default_compute_form("int2", "cpu") == "int4_fused"
    assert default_compute_form("bf16", "cpu") == "dequant_per_use"  # exact, like fp32, at 2 B/param
    blob = encode_expert(fmt, *_expert(64, 128))
    assert make_expert_compute(fmt, blob, 64, 128, "auto")(torch.randn(2, 64)).shape == (2, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt,form", list(_cases()))
def test_cuda_forms_match_reference(fmt, form):
    hidden, inter = 192, 384
    blob = encode_expert(fmt, *_expert(hidden, inter))
    x = torch.randn(4, hidden)
    ref = _swiglu(x, *decode_expert(fmt, blob, hidden, inter))
    y = make_expert_compute(fmt, blob, hidden, inter, form, "cuda")(x.cuda()).cpu()
    assert ((y - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_staging_builds_what_a_direct_build_does_and_reuses_its_buffers():
    """Pinned staging + side stream (the cache's CUDA path): the same outputs as a direct build, more blobs
    than buffers, and results marked for the compute stream."""
    from gpu_worker.cuda_staging import CudaStaging, _tensors

    hidden, inter = 192, 384
    staging = CudaStaging(torch.device("cuda"), expert_nbytes("int4", hidden, inter), buffers=2)
    x = torch.randn(4, hidden).cuda()
    for i in range(5):
        blob = encode_expert("int4", *_expert(hidden, inter, seed=i))
        direct = make_expert_compute("int4", blob, hidden, inter, "int4_fused", "cuda")
        staged = staging.build(blob, lambda dev: make_expert_compute("int4", dev, hidden, inter, "int4_fused",
                                                                     torch.device("cuda")))
        assert torch.equal(staged(x), direct(x))
        assert all(t.is_cuda for t in _tensors(staged))
