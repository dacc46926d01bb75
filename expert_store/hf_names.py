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
        "q": f"{p}.q_proj.weight",
        "k": f"{p}.k_proj.weight",
        "v": f"{p}.v_proj.weight",
        "o": f"{p}.o_proj.weight",
    }
    if args.qkv_bias:
        names |= {"q_bias": f"{p}.q_proj.bias", "k_bias": f"{p}.k_proj.bias", "v_bias": f"{p}.v_proj.bias"}
    if args.o_bias:
        names["o_bias"] = f"{p}.o_proj.bias"
    if args.qk_norm != "none":
        names |= {"q_norm": f"{p}.q_norm.weight", "k_norm": f"{p}.k_norm.weight"}
    return names


def _moe_prefix(args: ModelArgs, layer: int) -> str:
    return f"{_layer(layer)}.block_sparse_moe" if args.family == "mixtral" else f"{_layer(layer)}.mlp"


def router(args: ModelArgs, layer: int) -> str:
    return f"{_moe_prefix(args, layer)}.gate.weight"


def expert(args: ModelArgs, layer: int, expert_id: int) -> dict[str, str]:
    """Role ("gate", "up", "down") -> name of one routed expert's projection."""
    p = f"{_moe_prefix(args, layer)}.experts.{expert_id}"
    roles = _MIXTRAL_EXPERT if args.family == "mixtral" else _MLP
    return {role: f"{p}.{roles[role]}.weight" for role in EXPERT_PROJS}


def shared_expert(args: ModelArgs, layer: int) -> dict[str, str]:
    """Qwen2-MoE's always-on expert and its sigmoid gate; empty where the family has none."""
    if not args.shared_expert_intermediate_size:
        return {}
    p = f"{_layer(layer)}.mlp"
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
            names += shared_expert(args, layer).values()
        else:
            names += dense_mlp(args, layer).values()
    return names


def expert_tensor_names(args: ModelArgs) -> list[str]:
    return [
        name
        for layer in args.moe_layers
        for e in range(args.num_experts)
        for name in expert(args, layer, e).values()
    ]
