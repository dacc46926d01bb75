"""Each family's router against transformers' own router module on random inputs, the group limit
really limiting, and cross_layer ranking with the family's router (bias, correction, groups)."""

from __future__ import annotations

import pytest
import torch

from expert_store.model_args import ModelArgs
from gpu_worker.predictors import CrossLayerPredictor
from gpu_worker.routing import Router

from .hf_models import FAMILY_CONFIGS

ROUTERS = {  # case -> transformers router class
    "deepseek_v2": "DeepseekV2TopkRouter",
    "deepseek_v2_q_lora": "DeepseekV2TopkRouter",
    "deepseek_v3": "DeepseekV3TopkRouter",
    "glm4_moe": "Glm4MoeTopkRouter",
    "gpt_oss": "GptOssTopKRouter",
}


def _case(case: str):
    import importlib

    import transformers

    cfg_name, model_name, kw = FAMILY_CONFIGS[case]
    cfg = getattr(transformers, cfg_name)(**({"vocab_size": 256, "hidden_size": 64, "num_attention_heads": 4,
                                              "num_key_value_heads": 2} | kw))
    module = importlib.import_module(getattr(transformers, model_name).__module__)
    hf_router = getattr(module, ROUTERS[case])(cfg).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        hf_router.weight.copy_(torch.randn(hf_router.weight.shape, generator=g) * 0.3)
        extras = {}
        if hasattr(hf_router, "bias"):
            hf_router.bias.copy_(torch.randn(hf_router.bias.shape, generator=g) * 0.3)
            extras["bias"] = hf_router.bias.detach().clone()
        if hasattr(hf_router, "e_score_correction_bias"):
            hf_router.e_score_correction_bias.copy_(torch.randn(hf_router.weight.shape[0], generator=g) * 0.1)
            extras["correction"] = hf_router.e_score_correction_bias.detach().clone()
    args = ModelArgs.from_hf_config(cfg.to_dict())
    return args, hf_router, Router(args, hf_router.weight.detach().clone(), **extras)


@pytest.mark.parametrize("case", sorted(ROUTERS))
def test_router_equals_transformers(case):
    args, hf_router, ours = _case(case)
    h = torch.randn(300, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        _, ref_w, ref_ids = hf_router(h)
    ids, w = ours(h)
    ref_order, order = ref_ids.argsort(dim=-1), ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(w.gather(1, order), ref_w.float().gather(1, ref_order), rtol=1e-6, atol=1e-7)
    # the prediction ranking's first k are exactly the routed experts
    assert torch.equal(ours.rank(h, args.top_k).sort(dim=-1).values, ids.sort(dim=-1).values)


@pytest.mark.parametrize("case", ["deepseek_v2_q_lora", "deepseek_v3", "glm4_moe"])
def test_group_limit_changes_the_choice_and_ranks_allowed_groups_first(case):
    import dataclasses

    args, _, ours = _case(case)
    h = torch.randn(300, 64, generator=torch.Generator().manual_seed(9))
    ungrouped = Router(dataclasses.replace(args, router_group_score="none"), ours.weight, ours.bias, ours.correction)
    ids, _ = ours(h)
    free, _ = ungrouped(h)
    assert (ids.sort(dim=-1).values != free.sort(dim=-1).values).any(dim=-1).sum() > 10
    per_group = args.num_experts // args.n_group
    ranked = ours.rank(h, args.num_experts)  # every expert, once per row
    assert torch.equal(ranked.sort(dim=-1).values, torch.arange(args.num_experts).expand_as(ranked))
    groups = ranked // per_group
    allowed = groups[:, : args.topk_group * per_group]
    rest = groups[:, args.topk_group * per_group:]
    assert not (allowed[:, :, None] == rest[:, None, :]).any()  # whole allowed groups come first


def test_cross_layer_uses_the_correction_bias():
    args, _, ours = _case("deepseek_v3")
    h = torch.randn(50, 64, generator=torch.Generator().manual_seed(10))
    p = CrossLayerPredictor([ours])
    assert p.predict(0, list(range(50)), args.top_k, h) == ours.rank(h, args.top_k).tolist()
    big = torch.zeros(args.num_experts)
    big[[5, 6, 7]] = 10.0  # the correction alone decides the selection (groups 1: experts 4-7)
    biased = Router(args, ours.weight, correction=big)
    assert all(sorted(row) == [5, 6, 7] for row in CrossLayerPredictor([biased]).predict(0, [0] * 50, 3, h))
