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
}


def build_hf_checkpoint(family: str, out: Path, seed: int = 0):
    """Save a tiny fp32 model whose weights are all bf16-representable, so a bf16 pack is lossless."""
    import transformers

    cfg_name, model_name, kw = FAMILY_CONFIGS[family]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        initializer_range=0.08, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
        pad_token_id=None, tie_word_embeddings=False, **kw,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and family != "olmoe":
                p.uniform_(0.8, 1.2)  # norms: not all ones, so a missed norm shows
            p.copy_(p.bfloat16().float())
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
