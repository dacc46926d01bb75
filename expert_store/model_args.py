"""One `ModelArgs` for every supported MoE family, built from a Hugging Face config.json.

Config keys differ across families and transformers versions (RoPE as a top-level
`rope_theta` or inside `rope_parameters`/`rope_scaling`; the expert count as
`num_local_experts`, `num_experts`, `n_routed_experts`...): every reader below
tries all the names it knows, in order.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
    has_shared_expert: bool  # Qwen2-MoE's gated shared expert (shared_expert_intermediate_size)
    sparse_step_keys: bool  # honours decoder_sparse_step / mlp_only_layers
    attention: str = "gqa"  # "gqa" | "mla" (DeepSeek's multi-head latent attention)
    router: str = "softmax"  # softmax | deepseek_v2 | sigmoid_grouped (DeepSeek-V3 noaux_tc) | topk_softmax
    dense_prefix: bool = False  # first_k_dense_replace / moe_layer_freq pick the MoE layers; n_shared_experts
    rope_interleave: bool = False  # RoPE rotates adjacent pairs (DeepSeek) rather than the two halves


FAMILIES: dict[str, FamilySpec] = {
    "mixtral": FamilySpec("mixtral", "none", True, False, False),
    "qwen2_moe": FamilySpec("qwen2_moe", "none", False, True, True),
    "qwen3_moe": FamilySpec("qwen3_moe", "head", False, False, True),
    "olmoe": FamilySpec("olmoe", "full", False, False, False),
    "deepseek_v2": FamilySpec("deepseek_v2", "none", False, False, False, attention="mla", router="deepseek_v2",
                              dense_prefix=True, rope_interleave=True),
    "deepseek_v3": FamilySpec("deepseek_v3", "none", False, False, False, attention="mla",
                              router="sigmoid_grouped", dense_prefix=True, rope_interleave=True),
    "glm4_moe": FamilySpec("glm4_moe", "none", False, False, False, router="sigmoid_grouped", dense_prefix=True),
    "gpt_oss": FamilySpec("gpt_oss", "none", False, False, False, router="topk_softmax"),
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
    # -- attention variants (defaults: plain GQA with full RoPE, as the first four families) --
    attention: str = "gqa"  # "gqa" | "mla"
    q_lora_rank: int = 0  # MLA: rank of the query compression (0: a plain q_proj)
    kv_lora_rank: int = 0  # MLA: width of the compressed KV latent the cache holds
    qk_nope_head_dim: int = 0  # MLA: per-head query/key dims without RoPE
    qk_rope_head_dim: int = 0  # MLA: per-head dims with RoPE (the key part shared by all heads)
    v_head_dim: int = 0  # per-head value dim (0: head_dim)
    rotary_dim: int = 0  # leading dims of each head that RoPE rotates (0: all of head_dim)
    rope_interleave: bool = False  # rotate adjacent pairs (x0, x1), (x2, x3)... instead of the two halves
    rope_type: str = "default"  # default | linear (positions / rope_scaling_factor) | yarn
    rope_original_max_position: int = 0  # yarn: pre-training context length
    rope_beta_fast: float = 32.0  # yarn: extrapolation boundary (rotations)
    rope_beta_slow: float = 1.0  # yarn: interpolation boundary (rotations)
    rope_truncate: bool = True  # yarn: round the correction range to whole dims
    rope_attention_factor: float = 1.0  # yarn: scale of cos/sin (transformers' attention_scaling)
    softmax_scale: float = 0.0  # attention logit scale (0: 1/sqrt(head_dim)); DeepSeek folds YaRN's mscale in
    attention_sinks: bool = False  # gpt-oss: a learned per-head logit that joins every softmax
    full_attention_layers: tuple[int, ...] = field(default_factory=tuple)  # exempt from sliding_window
    # -- routing (defaults: softmax over all experts, then top-k) --
    router_scoring: str = "softmax"  # softmax | sigmoid (DeepSeek-V3 / GLM) | topk_softmax (gpt-oss)
    router_group_score: str = "none"  # none | max (V2 group_limited_greedy) | top2_sum (V3 noaux_tc)
    n_group: int = 1  # expert groups for group-limited routing
    topk_group: int = 1  # groups a token may route into
    router_bias: bool = False  # gpt-oss: the router has a bias
    router_correction_bias: bool = False  # e_score_correction_bias: added for selection only
    routed_scaling_factor: float = 1.0  # routed experts' weights scaled by it
    shared_expert_gated: bool = True  # Qwen2-MoE's sigmoid gate on the shared expert (DeepSeek: none)
    # -- experts --
    expert_bias: bool = False  # gpt-oss: gate/up/down biases (kept with the dense tensors)
    expert_activation: str = "silu"  # silu: silu(g) * u | clamped_swiglu (gpt-oss)
    swiglu_limit: float = 0.0  # clamped_swiglu: g <= limit, |u| <= limit
    swiglu_alpha: float = 1.0  # clamped_swiglu: g * sigmoid(alpha g) * (u + 1)

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one token costs over all layers: MLA keeps the latent and the shared rope key."""
        if self.attention == "mla":
            per_layer = self.kv_lora_rank + self.qk_rope_head_dim
        else:
            per_layer = self.num_kv_heads * (self.head_dim + self.value_head_dim)
        return per_layer * self.num_layers * dtype_bytes

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("moe_layers", "eos_token_ids", "full_attention_layers"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("moe_layers", "eos_token_ids", "full_attention_layers"):
            kw[k] = tuple(kw.get(k, ()))
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


def _rope_params(cfg: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
    """The RoPE parameter object and the key it came from (for error messages)."""
    key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    params = cfg.get(key) or {}
    if not isinstance(params, dict):
        raise ModelConfigError(f"{source}: {key} must be an object")
    # rope_parameters may be per layer type ({"full_attention": {...}}); take the full-attention one.
    if "rope_theta" not in params and "rope_type" not in params and "type" not in params:
        nested = params.get("full_attention") or next((v for v in params.values() if isinstance(v, dict)), {})
        params, key = nested, f"{key}.full_attention"
    return params, key


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope(cfg: dict[str, Any], source: str, rotary_dim: int) -> dict[str, Any]:
    """RoPE fields of ModelArgs from any of the spellings (transformers' semantics for yarn)."""
    params, key = _rope_params(cfg, source)
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    type_key = "rope_type" if "rope_type" in params else "type"
    rope_type = params.get(type_key, "default")
    out: dict[str, Any] = {"rope_theta": theta, "rope_type": "default", "rope_scaling_factor": 1.0}
    if rope_type == "default":
        return out
    if rope_type == "linear":
        return out | {"rope_type": "linear", "rope_scaling_factor": float(params["factor"])}
    if rope_type != "yarn":
        raise UnsupportedModelError(
            f"{source}: {key}.{type_key} {rope_type!r} is not supported (supported: default, linear, yarn)"
        )
    original = int(cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                   or cfg.get("max_position_embeddings", 4096))
    factor = params.get("factor")
    factor = float(factor) if factor is not None else cfg.get("max_position_embeddings", original) / original
    attention_factor = params.get("attention_factor")
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
        else:
            attention_factor = yarn_mscale(factor)
    if rotary_dim < 2:
        raise ModelConfigError(f"{source}: yarn RoPE needs a rotary dim of at least 2, got {rotary_dim}")
    return out | {
        "rope_type": "yarn", "rope_scaling_factor": factor, "rope_original_max_position": original,
        "rope_beta_fast": float(params.get("beta_fast") or 32.0), "rope_beta_slow": float(params.get("beta_slow") or 1.0),
        "rope_truncate": bool(params.get("truncate", True)), "rope_attention_factor": float(attention_factor),
    }


def _deepseek_softmax_scale(cfg: dict[str, Any], source: str, qk_head_dim: int) -> float:
    """qk_head_dim^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2 as DeepSeek's attention does."""
    scale = qk_head_dim**-0.5
    params, _ = _rope_params(cfg, source)
    if params.get("rope_type", params.get("type", "default")) != "default" and params.get("mscale_all_dim"):
        m = yarn_mscale(float(params["factor"]), float(params["mscale_all_dim"]))
        scale *= m * m
    return scale


def _routing(cfg: dict[str, Any], fam: FamilySpec, num_experts: int, top_k: int, source: str) -> dict[str, Any]:
    """Router fields: scoring, grouping, biases, scaling (transformers' routers are the reference)."""
    if fam.router == "softmax":
        return {}
    if fam.router == "topk_softmax":
        return {"router_scoring": "topk_softmax", "router_bias": True}
    scoring_func = cfg.get("scoring_func")
    method = cfg.get("topk_method")
    out: dict[str, Any] = {"routed_scaling_factor": float(cfg.get("routed_scaling_factor") or 1.0)}
    if fam.router == "deepseek_v2":
        method = method or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedModelError(
                f"{source}: topk_method {method!r} is not supported for {fam.name} (supported: greedy, "
                "group_limited_greedy)")
        if scoring_func not in (None, "softmax"):
            raise UnsupportedModelError(f"{source}: scoring_func {scoring_func!r} is not supported for {fam.name} "
                                        "(supported: softmax)")
        out |= {"router_scoring": "softmax", "router_group_score": "max" if method == "group_limited_greedy" else "none"}
    else:  # sigmoid_grouped: DeepSeek-V3 / GLM-4.5
        if method not in (None, "noaux_tc"):
            raise UnsupportedModelError(
                f"{source}: topk_method {method!r} is not supported for {fam.name} (supported: noaux_tc)")
        if scoring_func not in (None, "sigmoid"):
            raise UnsupportedModelError(f"{source}: scoring_func {scoring_func!r} is not supported for {fam.name} "
                                        "(supported: sigmoid)")
        out |= {"router_scoring": "sigmoid", "router_group_score": "top2_sum", "router_correction_bias": True}
    n_group = int(cfg.get("n_group") or 1)
    topk_group = int(cfg.get("topk_group") or n_group)
    if out["router_group_score"] != "none":
        if num_experts % n_group or not 0 < topk_group <= n_group:
            raise ModelConfigError(f"{source}: n_group {n_group} must divide the {num_experts} experts and "
                                   f"topk_group {topk_group} be in 1..n_group")
        per_group = num_experts // n_group
        if top_k > topk_group * per_group or (out["router_group_score"] == "top2_sum" and per_group < 2):
            raise ModelConfigError(f"{source}: top-k {top_k} cannot be chosen from topk_group {topk_group} groups "
                                   f"of {per_group} experts")
    out |= {"n_group": n_group, "topk_group": topk_group}
    return out


def _attention(cfg: dict[str, Any], fam: FamilySpec, head_dim: int, num_layers: int, source: str) -> dict[str, Any]:
    """Attention fields: MLA dims, partial/interleaved RoPE, softmax scale, sinks and layer types."""
    if fam.attention == "mla":
        dims = {k: int(_first(cfg, (k,), source)) for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                                           "v_head_dim")}
        qk = dims["qk_nope_head_dim"] + dims["qk_rope_head_dim"]
        interleave = fam.name == "deepseek_v2" or bool(cfg.get("rope_interleave", True))
        return dims | {
            "attention": "mla", "q_lora_rank": int(cfg.get("q_lora_rank") or 0), "head_dim": qk,
            "rotary_dim": dims["qk_rope_head_dim"], "rope_interleave": interleave,
            "softmax_scale": _deepseek_softmax_scale(cfg, source, qk),
        }
    params, _ = _rope_params(cfg, source)
    partial = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    rotary = int(head_dim * partial)
    out: dict[str, Any] = {"rotary_dim": rotary if rotary != head_dim else 0}
    if fam.name == "gpt_oss":
        types = cfg.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
        unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
        if len(types) != num_layers or unknown:
            raise UnsupportedModelError(f"{source}: layer_types must list sliding_attention/full_attention for each "
                                        f"of the {num_layers} layers (got {unknown or len(types)})")
        out |= {"attention_sinks": True,
                "full_attention_layers": tuple(i for i, t in enumerate(types) if t == "full_attention")}
    return out


def _moe_layers(cfg: dict[str, Any], fam: FamilySpec, num_layers: int) -> tuple[int, ...]:
    if fam.sparse_step_keys:
        step = int(cfg.get("decoder_sparse_step") or 1)
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        return tuple(l for l in range(num_layers) if l not in mlp_only and (l + 1) % step == 0)
    if fam.dense_prefix:
        first = int(cfg.get("first_k_dense_replace") or 0)
        freq = int(cfg.get("moe_layer_freq") or 1)
        return tuple(l for l in range(num_layers) if l >= first and l % freq == 0)
    return tuple(range(num_layers))


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
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: mlp_bias true is not supported (dense MLPs without biases only)")

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
    if model_type in ("mixtral", "gpt_oss"):
        expert_inter = int(_first(cfg, ("intermediate_size",), source))
    else:
        expert_inter = int(_first(cfg, ("moe_intermediate_size", "intermediate_size"), source))

    moe_layers = _moe_layers(cfg, fam, num_layers)
    if len(moe_layers) < num_layers and not dense_inter:
        raise ModelConfigError(f"{source}: intermediate_size is needed for the dense (non-MoE) layers")

    norm_topk = True if fam.always_norm_topk else bool(cfg.get("norm_topk_prob", False))
    attention = _attention(cfg, fam, head_dim, num_layers, source)
    head_dim = attention.pop("head_dim", head_dim)
    rope = _rope(cfg, source, attention.get("rotary_dim") or head_dim)
    routing = _routing(cfg, fam, num_experts, top_k, source)

    if model_type == "qwen2_moe":
        qkv_bias, o_bias = bool(cfg.get("qkv_bias", True)), False
    elif model_type == "glm4_moe":
        qkv_bias, o_bias = bool(cfg.get("attention_bias", False)), False
    else:
        qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
    qk_norm = fam.qk_norm
    if model_type == "glm4_moe" and cfg.get("use_qk_norm"):
        qk_norm = "head"

    shared, shared_gated = 0, True
    if fam.has_shared_expert:
        shared = int(cfg.get("shared_expert_intermediate_size") or 0)
    elif fam.dense_prefix:
        shared, shared_gated = expert_inter * int(cfg.get("n_shared_experts") or 0), False
    experts: dict[str, Any] = {}
    if model_type == "gpt_oss":
        experts = {"expert_bias": True, "expert_activation": "clamped_swiglu",
                   "swiglu_limit": float(cfg.get("swiglu_limit", 7.0)), "swiglu_alpha": float(cfg.get("swiglu_alpha", 1.702))}

    sliding = cfg.get("sliding_window")
    if model_type in ("qwen2_moe", "qwen3_moe") and not cfg.get("use_sliding_window", False):
        sliding = None
    if model_type in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        sliding = None  # the key may be present; these families never use it
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
        num_kv_heads=num_heads if fam.attention == "mla" else num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        num_experts=num_experts,
        top_k=top_k,
        expert_intermediate_size=expert_inter,
        dense_intermediate_size=dense_inter,
        norm_topk_prob=norm_topk,
        moe_layers=moe_layers,
        shared_expert_intermediate_size=shared,
        shared_expert_gated=shared_gated,
        qk_norm=qk_norm,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        clip_qkv=float(cfg["clip_qkv"]) if cfg.get("clip_qkv") is not None else None,
        sliding_window=int(sliding) if sliding else None,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id") if isinstance(cfg.get("bos_token_id"), int) else None,
        eos_token_ids=eos_ids,
        **rope,
        **attention,
        **routing,
        **experts,
    )
