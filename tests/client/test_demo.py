"""`python -m client demo` end to end: every step runs as the project's own command, both servers
stop cleanly, and a second run reuses the model and the pack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_demo_runs_and_reuses_its_cache(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "client", "demo", "--cache-dir", str(tmp_path), "--max-new-tokens", "4",
           "--device", "cpu"]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[demo] ok" in first.stdout and "4 tokens" in first.stdout
    assert "writing a tiny random-weight Mixtral" in first.stderr
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "default model: reusing" in again.stderr and "pack: reusing the pack" in again.stdout
