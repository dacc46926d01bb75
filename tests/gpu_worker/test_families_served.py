"""The new families served by real processes: for each tiny random transformers checkpoint, an expert
store (bf16 experts) and a worker at a 25% cache budget with cross_layer prefetch; the greedy tokens
through client -> worker -> store equal transformers' own.

A store serves one pack, so each family gets its own store + worker pair, started and stopped in
turn (one pair alive at a time). Helpers come from tests/test_end_to_end.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from client.api import WorkerClient
from expert_store.pack import write_pack
from tests.test_end_to_end import CALL_TIMEOUT_S, Service, shm_segments_of, start_worker

from .hf_models import build_hf_checkpoint, hf_greedy

pytestmark = pytest.mark.slow

CASES = ("deepseek_v2", "deepseek_v2_q_lora", "deepseek_v3", "glm4_moe", "gpt_oss")
PROMPT_LEN = 24
NEW_TOKENS = 24


def start_bf16_store(tmp: Path, pack: Path, name: str, ram_bytes: int) -> tuple[Service, str]:
    import sys

    address = f"unix:{tmp}/{name}.sock"
    cmd = [sys.executable, "-m", "expert_store", "serve", str(pack), "--listen", address, "--ram-bytes",
           str(ram_bytes), "--formats", "bf16", "--grace-s", "2"]
    return Service(name, cmd, tmp / f"{name}.log"), address


@pytest.fixture(scope="module")
def sock_dir():
    d = Path(tempfile.mkdtemp(prefix="fm-fam-"))  # short: unix socket paths are limited to ~100 bytes
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


@pytest.mark.parametrize("case", CASES)
def test_served_greedy_tokens_equal_transformers(case, sock_dir, tmp_path):
    hf = build_hf_checkpoint(case, tmp_path / "ckpt")
    pack = write_pack(tmp_path / "ckpt", tmp_path / "pack", formats=("bf16",), progress=False)
    prompt = torch.randint(2, 256, (PROMPT_LEN,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = hf_greedy(hf, prompt, NEW_TOKENS)
    del hf

    store, store_addr = start_bf16_store(sock_dir, pack, f"store-{case}", 1 << 20)
    worker = None
    try:
        store.wait_serving(store_addr)
        worker, addr = start_worker(sock_dir, store_addr, f"worker-{case}", "--format", "bf16", "--transport", "shm",
                                    "--budget-bytes", "25%", "--predictor", "cross_layer")
        worker.wait_serving(addr)
        with WorkerClient(addr, timeout_s=CALL_TIMEOUT_S) as w:
            done = w.generate_text(token_ids=prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
            stats = w.stats(include_layers=True)
        assert list(done.token_ids) == reference
        assert done.result.finish_reason == "length"
        assert stats.high_water_bytes <= stats.budget_bytes
        assert stats.evictions > 0 and stats.misses > 0  # 25%: experts really come and go
        assert stats.predictor == "cross_layer" and stats.predictions > 0 and stats.prefetches_issued > 0
        assert worker.terminate() == 0, worker.output()[-3000:]
        worker = None
    finally:
        if worker is not None:
            worker.terminate()
        assert store.terminate() == 0, store.output()[-3000:]
    assert shm_segments_of(store.proc.pid) == []
