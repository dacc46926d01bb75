"""ModelArgs from config.json: every spelling of the keys we know, and clear errors."""

from __future__ import annotations

import json

import pytest

from expert_store.model_args import ModelArgs, ModelConfigError, UnsupportedModelError

BASE = dict(
    model_type="mixtral", vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
)


def test_rope_theta_top_level_or_in_rope_parameters():
    old = ModelArgs.from_hf_config(BASE | {"rope_theta": 5e5})
    new = ModelArgs.from_hf_config(BASE | {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert old.rope_theta == new.rope_theta == 5e5
    lin = ModelArgs.from_hf_config(BASE | {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 1e4})
    assert (lin.rope_theta, lin.rope_scaling_factor) == (1e4, 2.0)
    with pytest.raises(UnsupportedModelError, match="rope_parameters.rope_type 'longrope'"):
        ModelArgs.from_hf_config(BASE | {"rope_parameters": {"rope_type": "longrope", "factor": 4.0}})


@pytest.mark.parametrize("key", ["num_local_experts", "num_experts", "n_routed_experts"])
def test_expert_count_under_any_name(key):
    cfg = {k: v for k, v in BASE.items() if k != "num_local_experts"} | {key: 12}
    assert ModelArgs.from_hf_config(cfg).num_experts == 12


def test_qwen_sparse_step_and_mlp_only_layers():
    cfg = BASE | dict(model_type="qwen2_moe", num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3],
                      moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8)
    a = ModelArgs.from_hf_config(cfg)
    assert a.moe_layers == (1, 5)  # (l+1) % 2 == 0 gives 1, 3, 5; 3 is mlp-only
    assert (a.expert_intermediate_size, a.dense_intermediate_size, a.shared_expert_intermediate_size) == (32, 96, 48)
    assert a.qkv_bias and not a.o_bias and not a.norm_topk_prob


def test_family_specifics():
    assert ModelArgs.from_hf_config(BASE | {"norm_topk_prob": False}).norm_topk_prob  # mixtral always renormalizes
    olmoe = ModelArgs.from_hf_config(BASE | {"model_type": "olmoe", "norm_topk_prob": True, "clip_qkv": 4})
    assert (olmoe.qk_norm, olmoe.norm_topk_prob, olmoe.clip_qkv) == ("full", True, 4.0)
    assert ModelArgs.from_hf_config(BASE | {"model_type": "qwen3_moe", "moe_intermediate_size": 8}).qk_norm == "head"
    assert ModelArgs.from_hf_config(BASE | {"head_dim": 24}).head_dim == 24
    assert ModelArgs.from_hf_config(BASE).head_dim == 16


def test_eos_list_and_out_of_vocab_ids():
    a = ModelArgs.from_hf_config(BASE | {"eos_token_id": [1, 7, 50279]})
    assert a.eos_token_ids == (1, 7)


def test_round_trip_through_dict():
    a = ModelArgs.from_hf_config(BASE | {"model_type": "qwen2_moe", "moe_intermediate_size": 8, "mlp_only_layers": [0]})
    assert ModelArgs.from_dict(json.loads(json.dumps(a.to_dict()))) == a


def test_unknown_family_names_the_file():
    with pytest.raises(UnsupportedModelError, match=r"cfg\.json.*'llama'.*mixtral"):
        ModelArgs.from_hf_config(BASE | {"model_type": "llama"}, source="cfg.json")


def test_missing_key_and_bad_values(tmp_path):
    cfg = {k: v for k, v in BASE.items() if k != "num_experts_per_tok"}
    with pytest.raises(ModelConfigError, match="num_experts_per_tok"):
        ModelArgs.from_hf_config(cfg)
    with pytest.raises(ModelConfigError, match="top-k 9"):
        ModelArgs.from_hf_config(BASE | {"num_experts_per_tok": 9})
    with pytest.raises(ModelConfigError, match="config.json: missing"):
        ModelArgs.from_checkpoint_dir(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        ModelArgs.from_checkpoint_dir(tmp_path)
