"""Every Hugging Face tensor name the project knows, in one place.

The runtime and the packer never spell a checkpoint name themselves: they ask
this module. Projections of an expert are called by role: "gate" (w1 /
gate_proj), "up" (w3 / up_proj), "down" (w2 / down_proj).
"""

from __future__ import annotations

from .model_args import ModelArgs

EXPERT_PROJS: tuple[str, ...] = ("gate", "up", "down")

_MIXTRAL_EXPERT = {"gate": "w1", "up": "w3", "down": "w2"}
_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _layer(i: int) -> str:
    return f"model.layers.{i}"


def embed_tokens() -> str:
    return "model.embed_tokens.weight"


def final_norm() -> str:
    return "model.norm.weight"


def lm_head() -> str:
    return "lm_head.weight"


def attention(args: ModelArgs, layer: int) -> dict[str, str]:
    """Role -> name for one layer's attention and its two norms (bias/q-k norm only where the family has them)."""
    p = f"{_layer(layer)}.self_attn"
    names = {
        "input_norm": f"{_layer(layer)}.input_layernorm.weight",
        "post_attention_norm": f"{_layer(layer)}.post_attention_layernorm.weight",
    }
    if args.attention == "mla":
        return names | _mla(args, p)
    names |= {"q": f"{p}.q_proj.weight", "k": f"{p}.k_proj.weight", "v": f"{p}.v_proj.weight",
              "o": f"{p}.o_proj.weight"}
    if args.attention_sinks:
        names["sinks"] = f"{p}.sinks"
    if args.qkv_bias:
        names |= {"q_bias": f"{p}.q_proj.bias", "k_bias": f"{p}.k_proj.bias", "v_bias": f"{p}.v_proj.bias"}
    if args.o_bias:
        names["o_bias"] = f"{p}.o_proj.bias"
    if args.qk_norm != "none":
        names |= {"q_norm": f"{p}.q_norm.weight", "k_norm": f"{p}.k_norm.weight"}
    return names


def _mla(args: ModelArgs, p: str) -> dict[str, str]:
    """DeepSeek's multi-head latent attention: q (direct or through its low-rank path), the KV latent path."""
    names = {"kv_a": f"{p}.kv_a_proj_with_mqa.weight", "kv_a_norm": f"{p}.kv_a_layernorm.weight",
             "kv_b": f"{p}.kv_b_proj.weight", "o": f"{p}.o_proj.weight"}
    if args.q_lora_rank:
        names |= {"q_a": f"{p}.q_a_proj.weight", "q_a_norm": f"{p}.q_a_layernorm.weight", "q_b": f"{p}.q_b_proj.weight"}
        if args.qkv_bias:
            names["q_a_bias"] = f"{p}.q_a_proj.bias"
    else:
        names["q"] = f"{p}.q_proj.weight"
    if args.qkv_bias:
        names["kv_a_bias"] = f"{p}.kv_a_proj_with_mqa.bias"
    if args.o_bias:
        names["o_bias"] = f"{p}.o_proj.bias"
    return names


def _moe_prefix(args: ModelArgs, layer: int) -> str:
    return f"{_layer(layer)}.block_sparse_moe" if args.family == "mixtral" else f"{_layer(layer)}.mlp"


def router(args: ModelArgs, layer: int) -> str:
    gate = "router" if args.family == "gpt_oss" else "gate"
    return f"{_moe_prefix(args, layer)}.{gate}.weight"


def router_extras(args: ModelArgs, layer: int) -> dict[str, str]:
    """The router's bias (gpt-oss) and e_score_correction_bias (DeepSeek-V3, GLM-4.5), where the family has them."""
    names = {}
    if args.router_bias:
        names["bias"] = f"{_moe_prefix(args, layer)}.router.bias"
    if args.router_correction_bias:
        names["correction"] = f"{_moe_prefix(args, layer)}.gate.e_score_correction_bias"
    return names


def fused_experts(args: ModelArgs, layer: int) -> dict[str, str]:
    """gpt-oss keeps a layer's experts in [E, ...] tensors: gate_up [E, H, 2I] with gate and up interleaved
    along the last dim (gate even, up odd), down [E, I, H] (both [in, out]). Empty for per-expert families."""
    if args.family != "gpt_oss":
        return {}
    p = f"{_moe_prefix(args, layer)}.experts"
    return {"gate_up": f"{p}.gate_up_proj", "down": f"{p}.down_proj"}


def expert_biases(args: ModelArgs, layer: int) -> dict[str, str]:
    """gpt-oss's expert biases, [E, 2I] (interleaved like gate_up) and [E, H]: small, so they stay dense."""
    if not args.expert_bias:
        return {}
    p = f"{_moe_prefix(args, layer)}.experts"
    return {"gate_up_bias": f"{p}.gate_up_proj_bias", "down_bias": f"{p}.down_proj_bias"}


def expert(args: ModelArgs, layer: int, expert_id: int) -> dict[str, str]:
    """Role ("gate", "up", "down") -> name of one routed expert's projection (per-expert families)."""
    if args.family == "gpt_oss":
        raise ValueError("gpt_oss experts are fused per layer: use fused_experts()")
    p = f"{_moe_prefix(args, layer)}.experts.{expert_id}"
    roles = _MIXTRAL_EXPERT if args.family == "mixtral" else _MLP
    return {role: f"{p}.{roles[role]}.weight" for role in EXPERT_PROJS}


def shared_expert(args: ModelArgs, layer: int) -> dict[str, str]:
    """The always-on expert: Qwen2-MoE's (with its sigmoid gate) or DeepSeek's n_shared_experts (one MLP
    of n_shared_experts x moe_intermediate_size, no gate); empty where the family has none."""
    if not args.shared_expert_intermediate_size:
        return {}
    p = f"{_layer(layer)}.mlp"
    if not args.shared_expert_gated:
        return {role: f"{p}.shared_experts.{_MLP[role]}.weight" for role in EXPERT_PROJS}
    names = {role: f"{p}.shared_expert.{_MLP[role]}.weight" for role in EXPERT_PROJS}
    names["gate_score"] = f"{p}.shared_expert_gate.weight"
    return names


def dense_mlp(args: ModelArgs, layer: int) -> dict[str, str]:
    """The plain MLP of a non-MoE layer (qwen mlp_only_layers / decoder_sparse_step)."""
    p = f"{_layer(layer)}.mlp"
    return {role: f"{p}.{_MLP[role]}.weight" for role in EXPERT_PROJS}


def dense_tensor_names(args: ModelArgs) -> list[str]:
    """Every non-expert tensor the runtime needs, in checkpoint order of layers."""
    names = [embed_tokens(), final_norm()]
    if not args.tie_word_embeddings:
        names.append(lm_head())
    for layer in range(args.num_layers):
        names += attention(args, layer).values()
        if layer in args.moe_layers:
            names.append(router(args, layer))
            names += router_extras(args, layer).values()
            names += shared_expert(args, layer).values()
            names += expert_biases(args, layer).values()
        else:
            names += dense_mlp(args, layer).values()
    return names


def expert_tensor_names(args: ModelArgs) -> list[str]:
    if args.family == "gpt_oss":
        return [name for layer in args.moe_layers for name in fused_experts(args, layer).values()]
    return [
        name
        for layer in args.moe_layers
        for e in range(args.num_experts)
        for name in expert(args, layer, e).values()
    ]
