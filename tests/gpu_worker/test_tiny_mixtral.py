"""The trained tiny-mixtral (learned routing, bf16 weights): greedy parity with transformers
and the perplexity cost of each stored expert format."""

from __future__ import annotations

import json

import pytest
import torch

from gpu_worker.generate import SamplingParams, generate
from gpu_worker.perplexity import perplexity
from gpu_worker.runtime import load_local

from .hf_models import hf_greedy

pytestmark = pytest.mark.slow


def _prompts(tiny_mixtral_dir, n):
    lines = (tiny_mixtral_dir / "prompts.jsonl").read_text().splitlines()
    return [json.loads(l)["prompt"] for l in lines[:n]]


def test_greedy_tokens_identical_to_transformers(tiny_mixtral_dir, tiny_mixtral_pack):
    import transformers

    hf = transformers.MixtralForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.float32).eval()
    rt = load_local(tiny_mixtral_pack, fmt="bf16", device="cpu", form="fp32")
    for text in _prompts(tiny_mixtral_dir, 3):
        ids = rt.tokenizer.encode(text)
        ours = list(generate(rt.model, ids, SamplingParams(max_new_tokens=32, ignore_eos=True)))
        assert ours == hf_greedy(hf, ids, 32), text[:40]


@pytest.fixture(scope="module")
def eval_ids(tiny_mixtral_dir, tiny_mixtral_pack):
    rt = load_local(tiny_mixtral_pack, fmt="bf16", device="cpu")
    return rt.tokenizer.encode((tiny_mixtral_dir / "eval.txt").read_text())[:8192]


QUANTIZED_WINDOWS = 4  # the quantized formats are scored on the text's first 4 windows (2048 tokens)


@pytest.fixture(scope="module")
def ppl_by_format(tiny_mixtral_pack, eval_ids):
    """bf16 on all 8192 tokens (the published figure), and every format on the first 2048 tokens: the
    quantized formats are compared with bf16 on the same text (a quarter of the cost of 8192 tokens)."""
    rt = load_local(tiny_mixtral_pack, fmt="bf16", device="cpu")
    full = perplexity(rt.model, eval_ids, window=512)
    out = {"bf16_full": full.perplexity, "bf16": full.first(QUANTIZED_WINDOWS)}
    for fmt in ("int8", "int4", "int2"):
        rt = load_local(tiny_mixtral_pack, fmt=fmt, device="cpu")
        out[fmt] = perplexity(rt.model, eval_ids[: 512 * QUANTIZED_WINDOWS], window=512).perplexity
    print("perplexity on eval.txt (bf16_full: 8192 tokens; the rest: 2048):", {k: round(v, 3) for k, v in out.items()})
    return out


def test_bf16_perplexity_matches_the_published_value(ppl_by_format):
    # ../shared/models/tiny-mixtral/README.md: 45.6 (fp32 from the bf16 weights, 8,192 tokens, windows of 512)
    assert ppl_by_format["bf16_full"] == pytest.approx(45.6, rel=0.01)


def test_quantized_perplexity_within_budget(ppl_by_format):
    base = ppl_by_format["bf16"]  # the same 2048 tokens
    assert ppl_by_format["int8"] <= base * 1.005
    assert ppl_by_format["int4"] <= base * 1.01
    assert ppl_by_format["int2"] <= base * 1.05
    # quantization must cost something at 2 bits: a format that silently decodes bf16 would pass the above
    assert ppl_by_format["int2"] > ppl_by_format["int4"]
