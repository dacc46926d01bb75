"""deploy/: the systemd units verify cleanly and the example configs load through the CLIs' code."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from expert_store.config import load_toml as load_store_toml
from gpu_worker.config import load_toml as load_worker_toml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNITS = ("fate-moe-store.service", "fate-moe-worker.service")


def _unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(DEPLOY / name)
    return cp


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_pass_systemd_analyze_verify(tmp_path):
    # The units name /opt/fate-moe/.venv/bin/python; point that at this interpreter so
    # verify can check the executable, and change nothing else.
    for name in UNITS:
        text = (DEPLOY / name).read_text().replace("/opt/fate-moe/.venv/bin/python", sys.executable)
        (tmp_path / name).write_text(text)
    r = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / n) for n in UNITS)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == ""


def test_units_share_user_and_runtime_directory_and_notify():
    store, worker = (_unit(n)["Service"] for n in UNITS)
    for s in (store, worker):
        assert s["Type"] == "notify" and s["Restart"] == "on-failure"
        assert s["RuntimeDirectory"] == "fate-moe" and s["RuntimeDirectoryPreserve"] == "yes"
        # a private /dev/shm would cut the worker off the store's segment
        assert "PrivateIPC" not in s and "PrivateDevices" not in s
    assert store["User"] == worker["User"]
    assert "RemoveIPC" not in worker  # same user: it would remove the store's live segment
    assert "--config /etc/fate-moe/store.toml" in store["ExecStart"]
    assert "--config /etc/fate-moe/worker.toml" in worker["ExecStart"]
    assert "fate-moe-store.service" in _unit(UNITS[1])["Unit"]["After"]


def test_example_configs_load_and_agree():
    store = load_store_toml(DEPLOY / "store.toml")
    worker = load_worker_toml(DEPLOY / "worker.toml")
    assert store["listen"] == worker["store"]  # the worker talks to the store it is shipped with
    assert store["listen"].startswith("unix:/run/fate-moe/")  # inside the shared RuntimeDirectory
    assert store["ram_bytes"] == 8 << 30
