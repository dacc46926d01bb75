"""The built-in default checkpoint: deterministic, complete, and readable by transformers and our own parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from expert_store import hf_names
from gpu_worker.default_model import (
    MARKER_FILE,
    RANDOM_WEIGHTS_NOTICE,
    DefaultModelError,
    create_default_checkpoint,
    ensure_default_checkpoint,
    is_complete,
)
from expert_store.model_args import ModelArgs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_default_checkpoint(tmp_path_factory.mktemp("default") / "ckpt", seed=0)


def test_same_seed_gives_identical_files(checkpoint: Path, tmp_path: Path) -> None:
    again = create_default_checkpoint(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (checkpoint / name).read_bytes(), name
    other = create_default_checkpoint(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (checkpoint / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()


def test_model_args_parse_and_tensors_match_hf_names(checkpoint: Path) -> None:
    args = ModelArgs.from_checkpoint_dir(checkpoint)
    assert (args.family, args.num_layers, args.hidden_size) == ("mixtral", 4, 128)
    assert (args.num_heads, args.num_kv_heads, args.head_dim) == (4, 2, 32)
    assert (args.num_experts, args.top_k, args.expert_intermediate_size) == (8, 2, 256)
    assert args.bos_token_id == 0 and args.eos_token_ids == (1,)
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert names == set(hf_names.dense_tensor_names(args)) | set(hf_names.expert_tensor_names(args))
        w1 = f.get_tensor(hf_names.expert(args, 0, 0)["gate"])
        w2 = f.get_tensor(hf_names.expert(args, 0, 0)["down"])
        norm = f.get_tensor(hf_names.final_norm())
    assert w1.dtype == torch.bfloat16 and tuple(w1.shape) == (256, 128) and tuple(w2.shape) == (128, 256)
    assert 0.015 < w1.float().std().item() < 0.025
    assert torch.equal(norm, torch.ones(128, dtype=torch.bfloat16))


def test_tokenizer_round_trips_and_matches_config(checkpoint: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    text = "The expert store serves quantized weights to the worker, 42 times. Ünïcödé too!"
    assert tok.decode(tok.encode(text).ids) == text
    assert [tok.token_to_id(t) for t in ("<s>", "</s>", "<unk>")] == [0, 1, 2]
    cfg = json.loads((checkpoint / "config.json").read_text())
    assert cfg["vocab_size"] == tok.get_vocab_size()
    assert 512 <= cfg["vocab_size"] <= 1024


def test_transformers_loads_it_with_no_missing_or_unexpected_keys(checkpoint: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model, info = transformers.MixtralForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    ids = torch.tensor([[0, 5, 9, 100]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()
    hf_tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    assert hf_tok.decode(hf_tok("hello world", add_special_tokens=False)["input_ids"]) == "hello world"


def test_ensure_reuses_a_complete_checkpoint(tmp_path: Path) -> None:
    logged: list[str] = []
    first = ensure_default_checkpoint(tmp_path, log=logged.append)
    assert is_complete(first, seed=0) and RANDOM_WEIGHTS_NOTICE in logged
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    logged.clear()
    assert ensure_default_checkpoint(tmp_path, log=logged.append) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert any("reusing" in m for m in logged) and RANDOM_WEIGHTS_NOTICE in logged
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_ensure_rebuilds_an_incomplete_directory(tmp_path: Path) -> None:
    first = ensure_default_checkpoint(tmp_path, log=None)
    (first / MARKER_FILE).unlink()
    assert not is_complete(first)
    again = ensure_default_checkpoint(tmp_path, log=None)
    assert again == first and is_complete(again, seed=0)


def test_create_refuses_an_existing_path(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(DefaultModelError, match="already exists"):
        create_default_checkpoint(tmp_path / "taken")
