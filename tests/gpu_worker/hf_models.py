"""Tiny random Hugging Face checkpoints of each family, built by transformers itself (the reference)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILY_CONFIGS: dict[str, tuple[str, str, dict]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2, intermediate_size=96)),
    # a dense layer (mlp_only_layers), the shared expert with its sigmoid gate, unnormalized top-k
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
        shared_expert_intermediate_size=80, intermediate_size=112, mlp_only_layers=[2],
        decoder_sparse_step=1, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_hidden_layers=3, num_experts=10, num_experts_per_tok=3, moe_intermediate_size=48,
        intermediate_size=96, norm_topk_prob=True, head_dim=24)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, intermediate_size=64,
        norm_topk_prob=False, clip_qkv=8.0)),
    # MLA without the query's low-rank path, greedy softmax routing, 2 shared experts, a dense first layer
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, intermediate_size=96, n_shared_experts=2, first_k_dense_replace=1,
        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        routed_scaling_factor=1.5)),
    # with q_lora_rank and group-limited greedy routing (4 groups of 3, 2 allowed)
    "deepseek_v2_q_lora": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=12, num_experts_per_tok=3,
        moe_intermediate_size=32, intermediate_size=96, n_shared_experts=1, first_k_dense_replace=1,
        q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        topk_method="group_limited_greedy", n_group=4, topk_group=2)),
    # sigmoid scores with e_score_correction_bias, 4 groups of 4 with 2 allowed, YaRN with mscale_all_dim
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        num_hidden_layers=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=3,
        moe_intermediate_size=32, intermediate_size=96, n_shared_experts=1, first_k_dense_replace=1,
        q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=512,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
                             beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.8))),
    # partial rotary, per-head q/k norm, q/k/v biases, V3 routing in 2 groups (1 allowed), shared expert
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        intermediate_size=96, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
        head_dim=16, use_qk_norm=True, attention_bias=True, routed_scaling_factor=1.5,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))),
    # sliding (window 8) and full layers, sinks, biases, YaRN, clamped SwiGLU (a low limit so it clamps)
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2, intermediate_size=48, head_dim=16,
        sliding_window=8, swiglu_limit=1.0, layer_types=["sliding_attention", "full_attention"] * 2)),
}


def build_hf_checkpoint(family: str, out: Path | None, seed: int = 0, **overrides):
    """Save a tiny fp32 model whose weights are all bf16-representable, so a bf16 pack is lossless
    (out None: build it only). `overrides` replace config keys of the family's case."""
    import transformers

    cfg_name, model_name, kw = FAMILY_CONFIGS[family]
    common = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  initializer_range=0.08, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                  pad_token_id=None, tie_word_embeddings=False)
    cfg = getattr(transformers, cfg_name)(**(common | kw | overrides))
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if "bias" in name or name.endswith("sinks"):
                p.normal_(0.0, 0.05)  # biases, corrections, sinks: transformers starts some at zero
            elif p.dim() == 1 and family != "olmoe" and p.is_floating_point() and "inv_freq" not in name:
                p.uniform_(0.8, 1.2)  # norms: not all ones, so a missed norm shows
            if p.is_floating_point() and "inv_freq" not in name:
                p.copy_(p.bfloat16().float())
    if out is not None:
        model.save_pretrained(out)
    return model


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by transformers' own generate, EOS disabled."""
    from transformers import GenerationConfig

    ids = torch.tensor([prompt])
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids, generation_config=gc, attention_mask=torch.ones_like(ids))
    return out[0, len(prompt):].tolist()
