"""Our runtime against transformers on tiny random checkpoints of each family, packed as bf16."""

from __future__ import annotations

import pytest
import torch

from expert_store.pack import write_pack
from gpu_worker.generate import SamplingParams, generate
from gpu_worker.runtime import load_local

from .hf_models import FAMILY_CONFIGS, build_hf_checkpoint, hf_greedy

PROMPT_LEN = 24
NEW_TOKENS = 24


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def family_case(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    hf = build_hf_checkpoint(family, root / "ckpt")
    write_pack(root / "ckpt", root / "pack", formats=("bf16",), progress=False)
    rt = load_local(root / "pack", fmt="bf16", device="cpu", form="fp32")
    prompt = torch.randint(2, 256, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    return family, hf, rt, prompt


def test_prefill_logits_match_transformers(family_case):
    family, hf, rt, prompt = family_case
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]  # [T, V]
    ours = rt.model.forward([rt.model.new_sequence()], [torch.tensor(prompt)], all_logits=True)
    rel = float((ours - ref).abs().max() / ref.abs().max())
    print(f"{family}: max |diff| / max |logit| = {rel:.2e}")
    assert rel <= 1e-3


def test_decode_step_logits_match_transformers(family_case):
    """The KV-cache path: prefill then single steps equals a fresh full forward."""
    family, hf, rt, prompt = family_case
    seq = rt.model.new_sequence(capacity=4)  # forces the cache to grow
    rt.model.forward([seq], [torch.tensor(prompt[:10])])
    for t in prompt[10:14]:
        ours = rt.model.forward([seq], [torch.tensor([t])])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt[:14]])).logits[0, -1]
    assert float((ours - ref).abs().max() / ref.abs().max()) <= 1e-3


def test_greedy_tokens_identical(family_case):
    family, hf, rt, prompt = family_case
    ref = hf_greedy(hf, prompt, NEW_TOKENS)
    ours = list(generate(rt.model, prompt, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)))
    assert ours == ref


def test_batched_forward_equals_separate(family_case):
    """Two sequences in one ragged forward give the same logits as each alone."""
    _, _, rt, prompt = family_case
    m = rt.model
    a, b = m.new_sequence(), m.new_sequence()
    m.forward([a], [torch.tensor(prompt[:7])])
    alone = m.forward([a], [torch.tensor([prompt[7]])])
    m.forward([b], [torch.tensor(prompt[3:12])])
    a2 = m.new_sequence()
    m.forward([a2], [torch.tensor(prompt[:7])])
    both = m.forward([a2, b], [torch.tensor([prompt[7]]), torch.tensor(prompt[12:15])])
    torch.testing.assert_close(both[0], alone[0], rtol=1e-5, atol=1e-5)
    b_alone = m.new_sequence()
    ref_b = m.forward([b_alone], [torch.tensor(prompt[3:15])])
    torch.testing.assert_close(both[1], ref_b[0], rtol=1e-4, atol=1e-4)
