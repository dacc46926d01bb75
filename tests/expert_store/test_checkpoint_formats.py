"""FP8 block-scaled and MXFP4 checkpoints, written here from a bf16 model with the published encodings
(DeepSeek's weight_quant: e4m3 with amax / 448 per 128 x 128 block; OCP MX: FP4 e2m1 codes and an e8m0
exponent per 32 values), pack to experts that equal the reference dequantization (transformers' own
decoders), and generate transformers' tokens on the dequantized weights. Unsupported variants fail at
pack time with one line naming the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from expert_store import codec, hf_names
from expert_store.errors import FateError
from expert_store.model_args import ModelArgs
from expert_store.pack import write_pack
from expert_store.packfile import Pack
from gpu_worker.generate import SamplingParams, generate
from gpu_worker.runtime import load_local

from ..gpu_worker.hf_models import build_hf_checkpoint, hf_greedy

REPO = Path(__file__).resolve().parents[2]
NEW_TOKENS = 24
PROMPT = torch.randint(2, 256, (22,), generator=torch.Generator().manual_seed(5)).tolist()
FP4_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def fp8_block_encode(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's weight_quant: per block s = amax / 448, q = e4m3(w / s); returns (q, s) with s the scale_inv."""
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    scale = torch.empty(nr, nc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            b = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            s = b.abs().amax().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (b / s).to(torch.float8_e4m3fn)
    return q, scale


def mxfp4_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MX: w [..., K] -> blocks uint8 [..., K / 32, 16] (low nibble first), e8m0 scales [..., K / 32]."""
    g = w.float().reshape(*w.shape[:-1], -1, 32)
    amax = g.abs().amax(dim=-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=2.0**-126))) - 2, torch.full_like(amax, -127))
    scaled = g / torch.pow(2.0, exp)[..., None]
    idx = (scaled.abs().clamp(max=6.0)[..., None] - FP4_MAGNITUDES).abs().argmin(dim=-1)
    code = (idx | ((scaled < 0).long() << 3)).to(torch.uint8)
    return code[..., 0::2] | (code[..., 1::2] << 4), (exp + 127).to(torch.uint8)


def _rewrite(src: Path, dst: Path, tensors: dict[str, torch.Tensor], quantization_config: dict) -> None:
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def _experts(pack: Path, fmt: str = "bf16") -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    with Pack.open(pack) as p:
        a = p.args
        return {(l, e): {k: v.clone() for k, v in codec.view_expert(fmt, p.expert_blob(l, e, fmt), a.hidden_size,
                                                                   a.expert_intermediate_size).items()}
                for l, e in p.expert_ids}


def _check_tokens_and_logits(hf, pack: Path) -> None:
    rt = load_local(pack, fmt="bf16", device="cpu", form="fp32")
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]
    ours = rt.model.forward([rt.model.new_sequence()], [torch.tensor(PROMPT)], all_logits=True)
    assert float((ours - ref).abs().max() / ref.abs().max()) <= 1e-3
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert list(generate(rt.model, PROMPT, params)) == hf_greedy(hf, PROMPT, NEW_TOKENS)


def test_fp8_block_scaled_checkpoint(tmp_path):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    # expert FFN 160: two 128-row blocks, the second partial
    hf = build_hf_checkpoint("deepseek_v3", tmp_path / "bf16", moe_intermediate_size=160, intermediate_size=192)
    state = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    tensors, reference, reference32 = {}, {}, {}
    for name, t in state.items():
        quantized = name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight")
        if quantized:  # every linear but the router and the LM head, as DeepSeek-V3 ships
            q, s = fp8_block_encode(t)
            tensors[name], tensors[name + "_scale_inv"] = q, s
            reference32[name] = _dequantize_fp8_weight(q, s, [128, 128], torch.float32)
            reference[name] = reference32[name].bfloat16()  # what a bf16 pack stores
        else:
            tensors[name] = t
    assert sum(n.startswith("model.layers.1.mlp.experts.") for n in reference) == 3 * 16
    _rewrite(tmp_path / "bf16", tmp_path / "fp8", tensors, {"quant_method": "fp8", "fmt": "e4m3",
                                                           "activation_scheme": "dynamic",
                                                           "weight_block_size": [128, 128]})
    pack = write_pack(tmp_path / "fp8", tmp_path / "pack", formats=("bf16", "int4"), progress=False)

    args = ModelArgs.from_checkpoint_dir(tmp_path / "fp8")
    bf16 = _experts(pack, "bf16")
    with Pack.open(pack) as p:
        raw_int4 = {k: bytes(p.expert_blob(*k, "int4")) for k in p.expert_ids}
        dense = p.dense_tensors()
    for (layer, e), got in bf16.items():
        names = hf_names.expert(args, layer, e)
        for role, name in names.items():
            assert torch.equal(got[role], reference[name]), name
        ref = [reference32[names[r]] for r in ("gate", "up", "down")]
        assert raw_int4[(layer, e)] == bytes(codec.encode_expert("int4", *ref))  # quantized from the fp32 decode
    for name in hf_names.dense_tensor_names(args):
        if name in reference:
            assert dense[name].dtype == torch.bfloat16 and torch.equal(dense[name], reference[name]), name
        else:
            assert torch.equal(dense[name], state[name]), name  # stored as it was

    with torch.no_grad():
        params = dict(hf.named_parameters())
        for name, w in reference.items():
            if name in params:
                params[name].copy_(w.float())
            else:  # transformers fuses the experts: [E, 2I, H] gate then up, [E, H, I]
                layer, e, proj = int(name.split(".")[2]), int(name.split(".")[5]), name.split(".")[6]
                experts = hf.model.layers[layer].mlp.experts
                I = args.expert_intermediate_size
                if proj == "down_proj":
                    experts.down_proj[e].copy_(w.float())
                else:
                    rows = slice(0, I) if proj == "gate_proj" else slice(I, 2 * I)
                    experts.gate_up_proj[e, rows].copy_(w.float())
    _check_tokens_and_logits(hf, pack)


def test_mxfp4_checkpoint(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf = build_hf_checkpoint("gpt_oss", tmp_path / "bf16", intermediate_size=64)  # in-dims multiples of 32
    state = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    args = ModelArgs.from_checkpoint_dir(tmp_path / "bf16")
    tensors = dict(state)
    reference = {}
    for layer in args.moe_layers:
        for name in hf_names.fused_experts(args, layer).values():
            blocks, scales = mxfp4_encode(tensors.pop(name).transpose(1, 2))  # stored [E, out, in / 32, 16]
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
            reference[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    _rewrite(tmp_path / "bf16", tmp_path / "mxfp4", tensors, {"quant_method": "mxfp4",
                                                             "modules_to_not_convert": ["model.layers.*.self_attn"]})
    pack = write_pack(tmp_path / "mxfp4", tmp_path / "pack", formats=("bf16",), progress=False)

    for (layer, e), got in _experts(pack, "bf16").items():
        names = hf_names.fused_experts(args, layer)
        gate_up, down = reference[names["gate_up"]][e], reference[names["down"]][e]
        assert torch.equal(got["gate"].float(), gate_up[:, 0::2].T)  # exact: FP4 x 2^k fits bf16
        assert torch.equal(got["up"].float(), gate_up[:, 1::2].T)
        assert torch.equal(got["down"].float(), down.T)
    with Pack.open(pack) as p:
        dense = p.dense_tensors()
    assert all(torch.equal(dense[n], state[n]) for n in hf_names.dense_tensor_names(args))

    with torch.no_grad():
        params = dict(hf.named_parameters())
        for name, w in reference.items():
            params[name].copy_(w)
    _check_tokens_and_logits(hf, pack)


# -- unsupported variants: one line at pack time, naming the key ----------------------------------------

def _config(tmp_path: Path, case: str, **changes) -> Path:
    src = tmp_path / case
    build_hf_checkpoint(case, None).config.save_pretrained(src)  # config.json is all pack reads before failing
    cfg = json.loads((src / "config.json").read_text())
    for k, v in changes.items():
        cfg[k] = v
    (src / "config.json").write_text(json.dumps(cfg))
    return src


UNSUPPORTED = [
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method 'noaux_tc'"),
    ("deepseek_v3", {"topk_method": "sinkhorn"}, "topk_method 'sinkhorn'"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func 'softmax'"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
     "rope_parameters.rope_type 'longrope'"),
    ("glm4_moe", {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "rope_scaling.type 'dynamic'"),
    ("gpt_oss", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config.quant_method 'gptq'"),
    ("deepseek_v3", {"quantization_config": {"quant_method": "fp8", "weight_block_size": None}},
     "quantization_config.weight_block_size"),
    ("gpt_oss", {"layer_types": ["sliding_attention", "chunked_attention"] * 2}, "layer_types"),
]


@pytest.mark.parametrize("case,changes,message", UNSUPPORTED, ids=[m.split()[0] for _, _, m in UNSUPPORTED])
def test_unsupported_variants_fail_at_pack_time(tmp_path, case, changes, message):
    src = _config(tmp_path, case, **changes)
    with pytest.raises(FateError, match=message.replace("(", r"\(").replace(".", r"\.")) as err:
        write_pack(src, tmp_path / "pack", formats=("bf16",), progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pack").exists()


def test_unsupported_variant_is_one_line_from_the_cli(tmp_path):
    src = _config(tmp_path, "deepseek_v2", topk_method="bogus")
    out = subprocess.run([sys.executable, "-m", "expert_store", "pack", str(src), str(tmp_path / "pack")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and "topk_method 'bogus'" in lines[0], out.stderr
