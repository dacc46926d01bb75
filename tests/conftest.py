"""Shared fixtures: ../shared (beside the repo) and packs built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FATE_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: CI runs with ../shared beside the repo (or set FATE_SHARED_DIR)")
    return SHARED


@pytest.fixture(scope="session")
def tiny_mixtral_dir(shared_dir) -> Path:
    return shared_dir / "models" / "tiny-mixtral"


@pytest.fixture(scope="session")
def tiny_mixtral_pack(tiny_mixtral_dir, tmp_path_factory) -> Path:
    """tiny-mixtral packed once with every format."""
    from expert_store.pack import write_pack

    out = tmp_path_factory.mktemp("packs") / "tiny-mixtral"
    write_pack(tiny_mixtral_dir, out, formats=("bf16", "int8", "int4", "int2"), progress=False)
    return out


# -- tiny random Hugging Face checkpoints, saved by transformers itself (pack tests) ---------------


def _save_tiny_hf(family: str, out: Path, **kw) -> Path:
    """A random model saved in bf16, so that a bf16 pack must reproduce it bit for bit."""
    import torch
    import transformers

    cfg_cls, model_cls = {
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    }[family]
    cfg = cfg_cls(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=False, **kw)
    torch.manual_seed(0)
    model_cls(cfg).to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def hf_tiny_mixtral_dir(tmp_path_factory) -> Path:
    """Mixtral, 2 layers x 8 experts (hidden 64, expert FFN 64), bf16, with a tiny tokenizer.json."""
    from tokenizers import Tokenizer, models

    out = _save_tiny_hf("mixtral", tmp_path_factory.mktemp("hf") / "tiny-mixtral", intermediate_size=64,
                        num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2)
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="session")
def hf_tiny_qwen2_moe_dir(tmp_path_factory) -> Path:
    """Qwen2-MoE, 3 layers with layer 1 dense (mlp_only_layers), a shared expert, bf16, no tokenizer."""
    return _save_tiny_hf("qwen2_moe", tmp_path_factory.mktemp("hf") / "tiny-qwen2-moe", num_hidden_layers=3,
                         num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96,
                         shared_expert_intermediate_size=48, mlp_only_layers=[1])
