"""Quantized checkpoint formats, decoded tensor by tensor as the packer reads them.

`config.json`'s `quantization_config.quant_method` names the format:

- `fp8` (DeepSeek-V3 / R1, Kimi-K2): a linear weight `X.weight` is float8_e4m3fn with
  `X.weight_scale_inv` fp32 [ceil(rows / 128), ceil(cols / 128)] beside it
  (`weight_block_size`); the weight is w = fp8 * scale_inv of its 128 x 128 block. Decoded in fp32,
  then stored as bf16 (dense tensors) or quantized to the pack's expert formats.
- `mxfp4` (gpt-oss): an expert tensor `X` is stored as `X_blocks` uint8 [E, out, in / 32, 16] (two
  FP4 e2m1 codes per byte, low nibble first) and `X_scales` uint8 [E, out, in / 32] (e8m0: the block
  of 32 is scaled by 2^(s - 127)). Decoded exactly (every value is bf16-representable) and returned
  in the bf16 checkpoint's [E, in, out] layout, so the rest of the packer sees one layout.

`DecodedCheckpoint` gives the packer logical names (`X.weight`, `X`) over a `CheckpointReader`;
nothing is decoded before it is asked for, and one fused tensor can be read one expert at a time.
Tensors that are not quantized come back in their stored dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointReader
from .errors import PackError

# FP4 e2m1 code -> value (the OCP microscaling spec's table; sign in the top bit).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32
E8M0_BIAS = 127
FP8_SCALE_SUFFIX = "_scale_inv"
MXFP4_SUFFIXES = ("_blocks", "_scales")
# safetensors header dtype -> torch dtype, for the ones a pack may store
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class CheckpointQuantization:
    """How the checkpoint's weights are stored."""

    method: str = "none"  # none | fp8 | mxfp4
    block: tuple[int, int] = (128, 128)  # fp8: rows x cols of one scale block


def checkpoint_quantization(cfg: dict[str, Any], source: str) -> CheckpointQuantization:
    """From config.json's quantization_config; anything we cannot decode is a one-line error naming the key."""
    qc = cfg.get("quantization_config")
    if not qc:
        return CheckpointQuantization()
    if not isinstance(qc, dict):
        raise PackError(f"{source}: quantization_config must be an object")
    method = qc.get("quant_method")
    if method == "mxfp4":
        return CheckpointQuantization("mxfp4")
    if method != "fp8":
        raise PackError(f"{source}: quantization_config.quant_method {method!r} is not supported "
                        "(supported: fp8 block-scaled, mxfp4)")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise PackError(f"{source}: quantization_config.fmt {qc.get('fmt')!r} is not supported (supported: e4m3)")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise PackError(f"{source}: quantization_config.activation_scheme {qc.get('activation_scheme')!r} is not "
                        "supported (supported: dynamic)")
    block = qc.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise PackError(f"{source}: quantization_config.weight_block_size must be [rows, cols], got {block!r} "
                        "(per-tensor FP8 is not supported)")
    return CheckpointQuantization("fp8", (block[0], block[1]))


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """e4m3 [R, C] with fp32 [ceil(R / br), ceil(C / bc)] block scales -> fp32 [R, C]."""
    rows, cols = weight.shape
    s = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]
    return weight.float() * s


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """uint8 blocks [..., G, 16] and e8m0 scales [..., G] -> fp32 [..., G * 32] (low nibble first)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).long()  # [..., G, 16, 2]
    values = lut[codes].flatten(-2)  # [..., G, 32]
    values = torch.ldexp(values, (scales.to(torch.int32) - E8M0_BIAS)[..., None].float())
    return values.flatten(-2)


class DecodedCheckpoint:
    """Logical name -> decoded tensor over one checkpoint directory (the packer's only view of it)."""

    def __init__(self, reader: CheckpointReader, quant: CheckpointQuantization):
        self.reader, self.quant = reader, quant
        self.path: Path = reader.path
        present = reader.names()
        self._mxfp4: set[str] = set()
        self._fp8: set[str] = set()
        if quant.method == "mxfp4":
            self._mxfp4 = {n[: -len("_blocks")] for n in present if n.endswith("_blocks")
                           and n[: -len("_blocks")] + "_scales" in present}
        elif quant.method == "fp8":
            self._fp8 = {n[: -len(FP8_SCALE_SUFFIX)] for n in present if n.endswith(FP8_SCALE_SUFFIX)}
        hidden = {n + s for n in self._mxfp4 for s in MXFP4_SUFFIXES} | {n + FP8_SCALE_SUFFIX for n in self._fp8}
        self._names = (present - hidden) | self._mxfp4

    def names(self) -> set[str]:
        return set(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def file_of(self, name: str) -> Path:
        return self.reader.file_of(name + "_blocks" if name in self._mxfp4 else name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._mxfp4:
            e, out, g, _ = self.reader.shape(name + "_blocks")
            return (e, g * MXFP4_BLOCK, out)  # the bf16 checkpoint's [E, in, out]
        return self.reader.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        """The dtype `get` returns: bf16 for decoded tensors, else the stored one."""
        if name in self._mxfp4 or name in self._fp8:
            return torch.bfloat16
        stored = self.reader.dtype(name)
        if stored.startswith("F8"):
            raise PackError(f"{self.file_of(name)}: tensor {name!r} is {stored} without a {name}{FP8_SCALE_SUFFIX} "
                            "beside it (only block-scaled FP8 is supported)")
        if stored not in SAFETENSORS_DTYPES:
            raise PackError(f"{self.file_of(name)}: tensor {name!r} has dtype {stored}, which the packer cannot store")
        return SAFETENSORS_DTYPES[stored]

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, decoded (bf16 for FP8 dense tensors; experts go through get_float)."""
        return self.get_float(name).to(torch.bfloat16) if name in self._fp8 or name in self._mxfp4 else \
            self.reader.get(self._checked(name))

    def get_float(self, name: str) -> torch.Tensor:
        """The whole tensor, decoded to fp32 where it is quantized (experts are re-quantized from this)."""
        if name in self._fp8:
            return self._fp8_decode(name, self.reader.get(name), self.reader.get(name + FP8_SCALE_SUFFIX))
        if name in self._mxfp4:
            return decode_mxfp4(self.reader.get(name + "_blocks"), self.reader.get(name + "_scales")).transpose(1, 2)
        return self.reader.get(self._checked(name))

    def get_expert(self, name: str, index: int) -> torch.Tensor:
        """tensor[index] of a fused [E, ...] tensor, read and decoded alone ([in, out] for gpt-oss)."""
        if name in self._mxfp4:
            blocks = self.reader.get_index(name + "_blocks", index)  # [out, G, 16]
            return decode_mxfp4(blocks, self.reader.get_index(name + "_scales", index)).T  # [in, out]
        return self.reader.get_index(self._checked(name), index)

    def _checked(self, name: str) -> str:
        self.dtype(name)  # rejects an unscaled FP8 tensor
        return name

    def _fp8_decode(self, name: str, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        br, bc = self.quant.block
        want = (-(-w.shape[0] // br), -(-w.shape[1] // bc)) if w.dim() == 2 else None
        if w.dtype != torch.float8_e4m3fn or want is None or tuple(s.shape) != want:
            raise PackError(f"{self.file_of(name)}: tensor {name!r} ({w.dtype}, {list(w.shape)}) with scales "
                            f"{list(s.shape)} is not e4m3 with {br}x{bc} block scales {list(want or ())}")
        return dequantize_fp8_block(w, s, self.quant.block)
