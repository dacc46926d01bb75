"""RoPE frequencies against transformers' own (default, partial, YaRN), and what MLA's cache holds."""

from __future__ import annotations

import pytest
import torch

from expert_store.model_args import ModelArgs
from gpu_worker.attention import SequenceKV, rope_inv_freq

from .hf_models import FAMILY_CONFIGS


def _configs(case: str):
    import transformers

    cfg_name, _, kw = FAMILY_CONFIGS[case]
    common = {"vocab_size": 256, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    cfg = getattr(transformers, cfg_name)(**(common | kw))
    return cfg, ModelArgs.from_hf_config(cfg.to_dict())


@pytest.mark.parametrize("case", ["deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss"])
def test_rope_frequencies_and_attention_factor_equal_transformers(case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg, args = _configs(case)
    rope_type = cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        import importlib

        module = importlib.import_module(getattr(__import__("transformers"), FAMILY_CONFIGS[case][1]).__module__)
        rotary = next(v for k, v in vars(module).items() if k.endswith("RotaryEmbedding"))
        ref, factor = rotary.compute_default_rope_parameters(cfg)
    else:
        ref, factor = ROPE_INIT_FUNCTIONS[rope_type](cfg)
    torch.testing.assert_close(rope_inv_freq(args, torch.device("cpu")), ref.float(), rtol=1e-6, atol=0)
    assert args.rope_attention_factor == pytest.approx(factor)


def test_mla_cache_holds_the_latent_and_the_rope_key():
    _, args = _configs("deepseek_v3")
    seq = SequenceKV(args, torch.device("cpu"), torch.bfloat16, capacity=10)
    per_token = sum(t.shape[0] * t.shape[2] * t.element_size() for t in (*seq.k, *seq.v))
    assert per_token == args.kv_bytes_per_token(2) == (32 + 8) * args.num_layers * 2
    assert (seq.k[0].shape, seq.v[0].shape) == ((1, 10, 32), (1, 10, 8))
