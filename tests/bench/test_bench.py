"""`python -m bench run --quick` on a tiny pack: the result file has every configuration, workload and
figure, and the plots exist. Values are not checked: benchmarks are programs, not timed tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.figures import stats_delta
from bench.harness import flag_args
from bench.plan import CONFIGURATIONS, DEFAULT_CONFIGS, FIGURES
from bench.report import PLOTS, spread

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_pack(hf_tiny_mixtral_dir, tmp_path_factory) -> Path:
    from expert_store.pack import write_pack

    out = tmp_path_factory.mktemp("bench") / "pack"
    write_pack(hf_tiny_mixtral_dir, out, formats=("int4", "int2"), progress=False)
    return out


def test_quick_run_writes_every_configuration_and_figure(tiny_pack, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench", "run", "--pack", str(tiny_pack), "--out", str(out), "--quick",
           "--transports", "shm", "--budgets", "50", "--run-timeout-s", "60", "--time-limit-min", "3"]
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=False,
                       timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())

    assert res["format"] == "fate-moe-bench/1"
    for key in ("cpu_model", "cores", "ram_bytes", "torch", "date"):
        assert key in res["machine"], key
    assert set(res["settings"]["configurations"]) == set(DEFAULT_CONFIGS)
    workloads = [w["name"] for w in res["settings"]["workloads"]]
    assert {w["kind"] for w in res["settings"]["workloads"]} == {"decode", "prefill"}

    bad = [(x["config"], x["budget"], x["status"], x["error"], x.get("logs")) for x in res["runs"] if x["status"] != "ok"]
    assert not bad, bad
    assert {x["config"] for x in res["runs"]} == set(DEFAULT_CONFIGS)
    for run in res["runs"]:
        assert set(run["workloads"]) == set(workloads)
        for w in run["workloads"].values():
            assert set(FIGURES) <= set(w["figures"])
        assert run["worker_peak_rss_bytes"] > 0

    cells = {(row["config"], row["workload"]) for row in res["summary"]}
    assert cells == {(c, w) for c in DEFAULT_CONFIGS for w in workloads}
    for row in res["summary"]:
        assert set(FIGURES) <= set(row["figures"])
        assert {"decode_vs_all_resident", "decode_vs_load_on_demand"} <= set(row["ratios"])
    assert res["targets"] and all(t["status"] in ("met", "missed", "not measured") for t in res["targets"])

    assert set(res["plots"]) == set(PLOTS)
    for name in res["plots"]:
        assert (out / name).stat().st_size > 1000, name
    assert "all-resident" in (out / "results.md").read_text()

    (out / "results.md").unlink()  # `bench report` rebuilds it (and the figures) from results.json alone
    r = subprocess.run([sys.executable, "-m", "bench", "report", str(out)], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["summary"] == res["summary"]
    assert (out / "results.md").is_file()


def test_transport_subcommand_delegates():
    r = subprocess.run([sys.executable, "-m", "bench", "transport", "--help"], cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0 and "--batches" in r.stdout, r.stderr
    assert r.stdout.startswith("usage: python -m bench transport "), r.stdout  # not `python -m bench.transport`


def test_flag_args_and_stats_delta():
    assert flag_args({"budget_bytes": "25%", "cold": True, "throttle": False}) == [
        "--budget-bytes", "25%", "--cold", "--no-throttle"]
    d = stats_delta({"hits": 3, "used_bytes": 5, "hit_rate": 0.1}, {"hits": 10, "used_bytes": 7, "hit_rate": 0.5})
    assert d == {"hits": 7, "used_bytes": 7, "hit_rate": 0.5}
    assert spread([3.0, 1.0, 2.0])["median"] == 2.0 and spread([])["n"] == 0
    for c in CONFIGURATIONS.values():
        assert c.budgets in ("sweep", "full", "min")
