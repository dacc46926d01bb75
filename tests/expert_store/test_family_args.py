"""ModelArgs of the released configs of the new families (as published on the Hub, abridged): MoE layers,
YaRN, the softmax scale, routing keys, and the MLA cache's bytes per token against plain attention."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from expert_store.model_args import ModelArgs, ModelConfigError, yarn_mscale

DEEPSEEK_V3 = dict(
    model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_hidden_layers=61, num_nextn_predict_layers=1, num_attention_heads=128,
    num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5,
    kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
    topk_method="noaux_tc", n_group=8, topk_group=4, num_experts_per_tok=8, moe_layer_freq=1,
    first_k_dense_replace=3, norm_topk_prob=True, scoring_func="sigmoid", hidden_act="silu",
    max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000,
    rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=1.0, mscale_all_dim=1.0,
                      original_max_position_embeddings=4096, type="yarn"),
    quantization_config=dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8", weight_block_size=[128, 128]),
    bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
)
DEEPSEEK_V2_LITE = dict(
    model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
    moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
    n_shared_experts=2, n_routed_experts=64, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None,
    qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
    num_experts_per_tok=6, moe_layer_freq=1, first_k_dense_replace=1, norm_topk_prob=False,
    scoring_func="softmax", max_position_embeddings=163840, rope_theta=10000,
    rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=0.707, mscale_all_dim=0.707,
                      original_max_position_embeddings=4096, type="yarn"),
)
GLM_45_AIR = dict(
    model_type="glm4_moe", vocab_size=151552, hidden_size=4096, intermediate_size=10944,
    moe_intermediate_size=1408, num_hidden_layers=46, num_attention_heads=96, num_key_value_heads=8,
    head_dim=128, partial_rotary_factor=0.5, n_routed_experts=128, n_shared_experts=1, num_experts_per_tok=8,
    first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
    use_qk_norm=False, attention_bias=True, rope_theta=1000000, max_position_embeddings=131072,
)
GPT_OSS_20B = dict(
    model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
    num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32, experts_per_token=4,
    num_experts_per_tok=4, sliding_window=128, attention_bias=True, swiglu_limit=7.0,
    layer_types=["sliding_attention", "full_attention"] * 12, max_position_embeddings=131072,
    rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                      original_max_position_embeddings=4096), rope_theta=150000,
    quantization_config=dict(quant_method="mxfp4", modules_to_not_convert=["model.layers.*.self_attn"]),
)


def test_deepseek_v3():
    a = ModelArgs.from_hf_config(DEEPSEEK_V3)
    assert a.moe_layers == tuple(range(3, 61)) and a.shared_expert_intermediate_size == 2048
    assert (a.attention, a.head_dim, a.rotary_dim, a.rope_interleave) == ("mla", 192, 64, True)
    assert (a.router_scoring, a.router_group_score, a.n_group, a.topk_group) == ("sigmoid", "top2_sum", 8, 4)
    assert a.router_correction_bias and a.routed_scaling_factor == 2.5 and a.norm_topk_prob
    assert (a.rope_type, a.rope_scaling_factor, a.rope_attention_factor) == ("yarn", 40.0, 1.0)
    assert math.isclose(a.softmax_scale, 192**-0.5 * yarn_mscale(40, 1.0) ** 2)
    # the cache keeps the 512-wide latent and the 64-wide rope key: 71x less than 128 heads' keys and values
    assert a.kv_bytes_per_token() == (512 + 64) * 61 * 2
    plain = dataclasses.replace(a, attention="gqa")
    assert plain.kv_bytes_per_token() == 128 * (192 + 128) * 61 * 2
    assert ModelArgs.from_dict(json.loads(json.dumps(a.to_dict()))) == a


def test_deepseek_v2_lite():
    a = ModelArgs.from_hf_config(DEEPSEEK_V2_LITE)
    assert a.moe_layers == tuple(range(1, 27)) and a.q_lora_rank == 0
    assert a.shared_expert_intermediate_size == 2 * 1408 and not a.shared_expert_gated
    assert (a.router_scoring, a.router_group_score, a.norm_topk_prob) == ("softmax", "none", False)
    assert math.isclose(a.softmax_scale, 192**-0.5 * yarn_mscale(40, 0.707) ** 2)
    assert a.kv_bytes_per_token() * 8 < dataclasses.replace(a, attention="gqa").kv_bytes_per_token()


def test_glm_45_air():
    a = ModelArgs.from_hf_config(GLM_45_AIR)
    assert a.moe_layers == tuple(range(1, 46)) and a.rotary_dim == 64 and a.qk_norm == "none"
    assert a.qkv_bias and not a.o_bias and a.router_correction_bias and a.n_group == 1


def test_gpt_oss_20b():
    a = ModelArgs.from_hf_config(GPT_OSS_20B)
    assert a.full_attention_layers == tuple(range(1, 24, 2)) and a.sliding_window == 128 and a.attention_sinks
    assert (a.router_scoring, a.router_bias, a.expert_bias, a.expert_activation) == (
        "topk_softmax", True, True, "clamped_swiglu")
    assert (a.swiglu_limit, a.swiglu_alpha, a.rope_truncate) == (7.0, 1.702, False)
    assert math.isclose(a.rope_attention_factor, 0.1 * math.log(32) + 1)


def test_moe_layer_freq_and_bad_groups():
    a = ModelArgs.from_hf_config(DEEPSEEK_V3 | {"num_hidden_layers": 8, "moe_layer_freq": 2})
    assert a.moe_layers == (4, 6)
    with pytest.raises(ModelConfigError, match="n_group 7"):
        ModelArgs.from_hf_config(DEEPSEEK_V3 | {"n_group": 7})
    with pytest.raises(ModelConfigError, match="topk_group 1"):  # 8 of 32 per group is fine, 9 is not
        ModelArgs.from_hf_config(DEEPSEEK_V3 | {"topk_group": 1, "num_experts_per_tok": 33})
