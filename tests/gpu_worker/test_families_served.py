"""The new families served by real processes: for each tiny random transformers checkpoint, an expert
store (bf16 experts) and a worker at a 25% cache budget with cross_layer prefetch; the greedy tokens
through client -> worker -> store equal transformers' own.

A store serves one pack, so each family gets its own store + worker pair, started and stopped in
turn (one pair alive at a time), with the suite's process helper (tests.conftest.Processes).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from client.api import WorkerClient
from client.processes import module_command
from expert_store.pack import write_pack
from tests.conftest import Processes, shm_segments_of
from tests.test_end_to_end import CALL_TIMEOUT_S

from .hf_models import build_hf_checkpoint, hf_greedy

pytestmark = pytest.mark.slow

CASES = ("deepseek_v2", "deepseek_v2_q_lora", "deepseek_v3", "glm4_moe", "gpt_oss")
PROMPT_LEN = 24
NEW_TOKENS = 24


@pytest.mark.parametrize("case", CASES)
def test_served_greedy_tokens_equal_transformers(case, sock_dir, tmp_path):
    hf = build_hf_checkpoint(case, tmp_path / "ckpt")
    pack = write_pack(tmp_path / "ckpt", tmp_path / "pack", formats=("bf16",), progress=False)
    prompt = torch.randint(2, 256, (PROMPT_LEN,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = hf_greedy(hf, prompt, NEW_TOKENS)
    del hf

    procs = Processes(sock_dir)
    try:
        store_addr = f"unix:{sock_dir}/store-{case}.sock"
        procs.start(f"store-{case}", module_command("expert_store", "serve", pack, "--listen", store_addr,
                                                   "--ram-bytes", str(1 << 20), "--formats", "bf16", "--grace-s", "2"),
                    store_addr)
        procs.wait(f"store-{case}")
        addr = procs.start_worker(store_addr, f"worker-{case}", "--format", "bf16", "--transport", "shm",
                                  "--budget-bytes", "25%", "--predictor", "cross_layer")
        procs.wait(f"worker-{case}")
        with WorkerClient(addr, timeout_s=CALL_TIMEOUT_S) as w:
            done = w.generate_text(token_ids=prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
            stats = w.stats(include_layers=True)
        assert list(done.token_ids) == reference
        assert done.result.finish_reason == "length"
        assert stats.high_water_bytes <= stats.budget_bytes
        assert stats.evictions > 0 and stats.misses > 0  # 25%: experts really come and go
        assert stats.predictor == "cross_layer" and stats.predictions > 0 and stats.prefetches_issued > 0
    finally:
        rcs = procs.stop_all()
    assert rcs == {name: 0 for name in rcs}, {n: procs.output(n) for n in rcs if rcs[n]}
    assert shm_segments_of(procs.services[f"store-{case}"].pid) == []
