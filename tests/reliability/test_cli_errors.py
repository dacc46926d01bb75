"""What a new user sees when something is wrong: one line naming what to change, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from .conftest import REPO, Proc, store_cmd

pytestmark = pytest.mark.slow


def _run(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout_s, env=env,
                          cwd=REPO)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.fixture
def taken_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


def test_a_taken_port_is_named(tiny_mixtral_pack, taken_port):
    line = _one_error_line(_run("expert_store", "serve", str(tiny_mixtral_pack), "--listen",
                                f"127.0.0.1:{taken_port}", "--ram-bytes", "0"))
    assert str(taken_port) in line and "choose another port" in line


def test_a_store_address_without_the_unix_scheme_gets_a_hint(tmp_path):
    line = _one_error_line(_run("gpu_worker", "serve", "--store", f"{tmp_path}/store.sock"))
    assert f"unix:{tmp_path}/store.sock" in line


def test_the_worker_says_soon_that_it_waits_for_the_store(tmp_path):
    r = _run("gpu_worker", "serve", "--store", f"unix:{tmp_path}/nobody.sock", "--store-wait-s", "4",
             "--listen", f"unix:{tmp_path}/w.sock")
    line = _one_error_line(r)
    assert "not ready within 4 s" in line
    waiting = [x for x in r.stderr.splitlines() if "still waiting for the expert store" in x]
    assert waiting and "every second" in waiting[0]
    assert r.stderr.index(waiting[0]) < r.stderr.index(line)  # said before giving up


def test_negative_max_new_tokens_is_one_line(tmp_path):
    r = _run("client", "generate", "hello", "--max-new-tokens", "-5", "--address", f"unix:{tmp_path}/w.sock")
    assert "max_new_tokens must be in 0" in _one_error_line(r)


def test_a_taken_metrics_port_is_named(sock_dir, tiny_mixtral_pack, taken_port):
    store_addr = f"unix:{sock_dir}/store.sock"
    store = Proc("store", store_cmd(tiny_mixtral_pack, store_addr, "--ram-bytes", "0"), sock_dir / "store.log")
    try:
        store.wait_serving(store_addr)
        r = _run("gpu_worker", "serve", "--store", store_addr, "--listen", f"unix:{sock_dir}/w.sock", "--device",
                 "cpu", "--metrics-port", str(taken_port))
        line = _one_error_line(r)
        assert f"metrics_port = {taken_port}" in line and "Event loop is closed" not in r.stderr
        assert not (sock_dir / "w.sock").exists()
    finally:
        store.stop()
