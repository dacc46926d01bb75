"""One `ModelArgs` for every supported MoE family, built from a Hugging Face config.json.

Config keys differ across families and transformers versions (RoPE as a top-level
`rope_theta` or inside `rope_parameters`/`rope_scaling`; the expert count as
`num_local_experts`, `num_experts`, `n_routed_experts`...): every reader below
tries all the names it knows, in order.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expert_store.errors import FateError


class ModelConfigError(FateError, ValueError):
    """A config.json that cannot be turned into ModelArgs (says which file and key)."""


class UnsupportedModelError(ModelConfigError):
    """A model_type or feature this runtime does not implement."""


@dataclass(frozen=True)
class FamilySpec:
    """What differs between families beyond config values."""

    name: str
    qk_norm: str  # "none" | "head" (RMSNorm over head_dim) | "full" (over all heads' projection)
    always_norm_topk: bool  # renormalize the top-k router weights whatever the config says
    has_shared_expert: bool
    sparse_step_keys: bool  # honours decoder_sparse_step / mlp_only_layers


FAMILIES: dict[str, FamilySpec] = {
    "mixtral": FamilySpec("mixtral", "none", True, False, False),
    "qwen2_moe": FamilySpec("qwen2_moe", "none", False, True, True),
    "qwen3_moe": FamilySpec("qwen3_moe", "head", False, False, True),
    "olmoe": FamilySpec("olmoe", "full", False, False, False),
}

_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k")


@dataclass(frozen=True)
class ModelArgs:
    """Normalized architecture of one checkpoint. Field names are ours, not Hugging Face's."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling_factor: float  # 1.0 for default RoPE; positions divided by it for "linear"
    max_position_embeddings: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int  # width of one routed expert's FFN
    dense_intermediate_size: int  # width of the MLP in non-MoE layers
    norm_topk_prob: bool
    moe_layers: tuple[int, ...]  # decoder layers whose MLP is routed experts
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    qk_norm: str = "none"
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["moe_layers"] = tuple(kw.get("moe_layers", ()))
        kw["eos_token_ids"] = tuple(kw.get("eos_token_ids", ()))
        return cls(**kw)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelArgs":
        return _from_hf_config(cfg, source)

    @classmethod
    def from_checkpoint_dir(cls, path: str | Path) -> "ModelArgs":
        return cls.from_hf_config(*read_hf_config(path))


def read_hf_config(path: str | Path) -> tuple[dict[str, Any], str]:
    """Read <path>/config.json; returns (config, file name for error messages)."""
    cfg_path = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise ModelConfigError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
    if not cfg_path.is_file():
        raise ModelConfigError(f"{cfg_path}: missing (a checkpoint directory needs config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelConfigError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"{cfg_path}: expected a JSON object")
    return cfg, str(cfg_path)


def _first(cfg: dict[str, Any], keys: tuple[str, ...], source: str, default: Any = ...) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    if default is ...:
        raise ModelConfigError(f"{source}: none of the keys {', '.join(keys)} is set")
    return default


def _rope(cfg: dict[str, Any], source: str) -> tuple[float, float]:
    """(theta, linear scaling factor) from any of the RoPE spellings."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ModelConfigError(f"{source}: rope_parameters must be an object")
    # rope_parameters may be per layer type ({"full_attention": {...}}); take the full-attention one.
    if "rope_theta" not in params and "rope_type" not in params and "type" not in params:
        nested = params.get("full_attention") or next((v for v in params.values() if isinstance(v, dict)), {})
        params = nested
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), 1.0
    if rope_type == "linear":
        return float(theta), float(params["factor"])
    raise UnsupportedModelError(f"{source}: RoPE type {rope_type!r} is not supported (supported: default, linear)")


def _from_hf_config(cfg: dict[str, Any], source: str) -> ModelArgs:
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})"
        )
    fam = FAMILIES[model_type]
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported (only silu)")

    hidden = int(_first(cfg, ("hidden_size", "d_model"), source))
    num_layers = int(_first(cfg, ("num_hidden_layers", "n_layer", "num_layers"), source))
    num_heads = int(_first(cfg, ("num_attention_heads", "n_head"), source))
    num_kv_heads = int(_first(cfg, ("num_key_value_heads",), source, num_heads))
    head_dim = int(cfg.get("head_dim") or hidden // num_heads)
    num_experts = int(_first(cfg, _EXPERT_COUNT_KEYS, source))
    top_k = int(_first(cfg, _TOP_K_KEYS, source))
    if not 0 < top_k <= num_experts:
        raise ModelConfigError(f"{source}: top-k {top_k} must be in 1..{num_experts} (the expert count)")
    if num_heads % num_kv_heads:
        raise ModelConfigError(f"{source}: {num_heads} attention heads not divisible by {num_kv_heads} KV heads")
    dense_inter = int(cfg.get("intermediate_size") or 0)
    if model_type == "mixtral":
        expert_inter = int(_first(cfg, ("intermediate_size",), source))
    else:
        expert_inter = int(_first(cfg, ("moe_intermediate_size", "intermediate_size"), source))

    if fam.sparse_step_keys:
        step = int(cfg.get("decoder_sparse_step") or 1)
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        moe_layers = tuple(l for l in range(num_layers) if l not in mlp_only and (l + 1) % step == 0)
    else:
        moe_layers = tuple(range(num_layers))
    if len(moe_layers) < num_layers and not dense_inter:
        raise ModelConfigError(f"{source}: intermediate_size is needed for the dense (non-MoE) layers")

    norm_topk = True if fam.always_norm_topk else bool(cfg.get("norm_topk_prob", False))
    theta, scaling = _rope(cfg, source)

    if model_type == "qwen2_moe":
        qkv_bias, o_bias = bool(cfg.get("qkv_bias", True)), False
    else:
        qkv_bias = o_bias = bool(cfg.get("attention_bias", False))

    sliding = cfg.get("sliding_window")
    if model_type in ("qwen2_moe", "qwen3_moe") and not cfg.get("use_sliding_window", False):
        sliding = None
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    vocab = int(_first(cfg, ("vocab_size",), source))
    eos_ids = tuple(e for e in eos_ids if 0 <= e < vocab)

    return ModelArgs(
        family=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling_factor=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        num_experts=num_experts,
        top_k=top_k,
        expert_intermediate_size=expert_inter,
        dense_intermediate_size=dense_inter,
        norm_topk_prob=norm_topk,
        moe_layers=moe_layers,
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0)
        if fam.has_shared_expert
        else 0,
        qk_norm=fam.qk_norm,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        clip_qkv=float(cfg["clip_qkv"]) if cfg.get("clip_qkv") is not None else None,
        sliding_window=int(sliding) if sliding else None,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id") if isinstance(cfg.get("bos_token_id"), int) else None,
        eos_token_ids=eos_ids,
    )
