"""bench/disk_tier.py: its figures from counter deltas, and one small real run (slow) that yields every
figure. Values of a real run are not checked: benchmarks are programs, not timed tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.disk_tier import summarize, table

REPO = Path(__file__).resolve().parents[2]
BLOB = 1000


def _run(config: str, mode: str, repeat: int, rate: float, **store) -> dict:
    worker = {"hits": 50, "lookups": 100, "fetched_tier_ram_demand": 3, "fetched_tier_nvme_demand": 9}
    sd = {"demand_ram_hits": 3, "demand_ram_misses": 9, "nvme_bytes_read": 20 * BLOB, "promotions": 20, **store}
    return {"config": config, "mode": mode, "repeat": repeat, "status": "ok", "worker_delta": worker,
            "store_delta": sd, "figures": {"decode_tokens_per_s": rate, "hit_rate": 0.5,
                                           "fetch_wait_ms_per_token": 1.0}}


def test_ratios_are_per_mode_and_repeat_and_rates_come_from_the_deltas():
    runs = [_run("lru", "cold", 0, 100.0), _run("fate", "cold", 0, 150.0, prefetch_hints=8, prefetch_promotions=6,
                                                hints_used=4),
            _run("lru", "cold", 1, 50.0), _run("fate", "cold", 1, 100.0),
            _run("lru", "uncached", 0, 10.0), _run("fate", "uncached", 0, 30.0),
            {"config": "fate", "mode": "cold", "repeat": 2, "status": "failed", "figures": {}}]
    rows = {(r["mode"], r["config"]): r for r in summarize(runs, BLOB)}
    fate = rows[("cold", "fate")]
    assert fate["repeats"] == 2 and fate["vs_lru"] == pytest.approx(1.75)  # median of 1.5x and 2x
    assert fate["decode_tokens_per_s"] == pytest.approx(125.0)
    assert rows[("uncached", "fate")]["vs_lru"] == pytest.approx(3.0)
    assert fate["worker_demand_ram_rate"] == pytest.approx(0.25) and fate["store_demand_ram_rate"] == pytest.approx(0.25)
    assert fate["disk_reads"] == 20 and rows[("cold", "lru")]["vs_lru"] == 1.0
    text = table(list(rows.values()), "cold")
    assert text.count("\n") == 3 and "| fate | 125.0 | 1.75x |" in text and "25.0% / 25.0% of 12" in text


@pytest.mark.slow
def test_a_small_run_yields_every_row(hf_tiny_mixtral_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.disk_tier", "--pack", str(hf_tiny_mixtral_dir), "--out", str(out),
           "--configs", "lru,fate", "--modes", "uncached,cold", "--workload", "decode:2:4", "--warmup-tokens", "8"]
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                       check=False, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "disk_tier.json").read_text())
    bad = [(x["config"], x["mode"], x.get("error"), x.get("logs")) for x in res["runs"] if x["status"] != "ok"]
    assert not bad, bad
    assert {(x["mode"], x["config"]) for x in res["summary"]} == {(m, c) for m in ("cold", "uncached")
                                                                  for c in ("lru", "fate")}
    for row in res["summary"]:
        assert row["worker_demand_fetches"] >= 0 and row["disk_bytes"] >= 0
    assert "target Fate >= 2x LRU" in r.stdout
