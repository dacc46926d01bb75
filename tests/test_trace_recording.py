"""`gpu_worker serve --trace-dir`: a real worker records its expert activations, and the simulator,
replaying that file at the worker's own configuration, reports the worker's hit rate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client.api import WorkerClient
from tests.conftest import Processes
from gpu_worker.traces import load_trace

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_worker_records_a_trace_the_simulator_replays_exactly(tiny_mixtral_pack, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = Processes(tmp_path)
    store = procs.start_store(tiny_mixtral_pack, "s", "--ram-bytes", "64MiB")
    address = procs.start_worker(store, "w", "--budget-bytes", "25%", "--int2-tail", "0",
                                 "--trace-dir", str(tmp_path / "traces"))
    try:
        procs.wait("s", "w")
        with WorkerClient(address) as client:
            for prompt in ("The command", "def main():", "Patch 8.2"):
                client.generate_text(prompt, max_new_tokens=16, ignore_eos=True)
            stats = client.stats()
        assert procs.stop("w") == 0, procs.output("w")
    finally:
        procs.stop_all()
    files = sorted((tmp_path / "traces").glob("*.npz"))
    assert len(files) == 1  # one file per session by default, written at shutdown
    trace = load_trace(files[0])
    assert trace.experts.shape[1:] == (8, 2)
    out = subprocess.run(
        [sys.executable, "-m", "gpu_worker", "simulate", str(files[0]), "--budgets", "worker", "--policies", "lru",
         "--json", str(tmp_path / "sim.json")], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert stats.lookups > 0
    # the worker's own hit rate, to the 3 decimals the simulator prints
    assert f"{stats.hits / stats.lookups:.3f}" in out.stdout, (stats.hits, stats.lookups, out.stdout)
    (result,) = json.loads((tmp_path / "sim.json").read_text())["results"]
    assert (result["policy"], result["semantics"], result["predictor"]) == ("lru", "worker", "none")
    assert sum(n for _, n in result["slots_override"]) == result["total_slots"]  # the worker's own slots
    assert (result["hits"], result["lookups"]) == (stats.hits, stats.lookups)  # exactly
