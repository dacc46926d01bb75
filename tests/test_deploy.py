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
    assert worker["listen"].startswith("unix:/run/fate-moe/")  # no TCP unless asked for (then with TLS)
    assert store["ram_bytes"] == 8 << 30
    assert worker.get("int2_tail", 0.0) == 0.0  # the lossy INT2 tail is opt-in


def _bytes(size: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def test_units_are_hardened_and_sized_from_the_config():
    store, worker = (_unit(n)["Service"] for n in UNITS)
    for name, s in zip(UNITS, (store, worker)):
        lines = (DEPLOY / name).read_text().splitlines()  # repeated keys add up in systemd, not in configparser
        assert "SystemCallFilter=@system-service" in lines and "SystemCallFilter=~@privileged" in " ".join(lines)
        assert s["ProtectProc"] == "invisible"
        assert s["IPAddressDeny"] == "any" and s["DevicePolicy"] == "closed"
        assert int(s["WatchdogSec"]) > 0
    # the RAM tier is charged to the store's cgroup: its MemoryMax leaves room above ram_bytes
    ram = load_store_toml(DEPLOY / "store.toml")["ram_bytes"]
    assert _bytes(store["MemoryMax"]) >= ram + (1 << 30)
    assert _bytes(worker["MemoryMax"]) > 0
    # the worker waits out a store restart inside a step: the watchdog must outlast that
    retry = load_worker_toml(DEPLOY / "worker.toml").get("store_retry_s", 15.0)
    assert int(worker["WatchdogSec"]) > retry


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", UNITS)
def test_units_exposure_scores(unit, capsys):
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(DEPLOY / unit)],
                       capture_output=True, text=True, timeout=60)
    line = next(x for x in r.stdout.splitlines() if "Overall exposure level" in x)
    score = float(line.split(":")[1].split()[0])
    with capsys.disabled():
        print(f"\n{line.strip()}")
    assert score <= 2.0, r.stdout[-3000:]


def test_the_worker_can_write_the_example_trace_dir():
    """ProtectSystem=strict makes the file system read-only: the example trace_dir must lie in the
    unit's StateDirectory (/var/lib/<name>), the one place systemd makes writable for the service."""
    import re

    unit = (DEPLOY / "fate-moe-worker.service").read_text()
    state = re.search(r"^StateDirectory=(\S+)$", unit, re.M)
    assert state, "the worker unit has no StateDirectory= (trace_dir would be unwritable)"
    trace = re.search(r'^#?\s*trace_dir\s*=\s*"([^"]+)"', (DEPLOY / "worker.toml").read_text(), re.M)
    assert trace and trace.group(1).startswith(f"/var/lib/{state.group(1)}/")
