"""Server processes started by their command lines: spawn, wait for SERVING, stop, read the log.

    with Service("store", module_command("expert_store", "serve", pack, "--listen", addr), log) as store:
        store.wait_serving(addr)          # the standard grpc health service says SERVING
        ...
    # leaving the block: SIGTERM, then SIGKILL after the grace period; store.returncode is its status

One helper for the demo, the benchmarks and the tests. It imports only grpc and its
health stubs: whatever runs the processes never imports the store or the worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The checkout the processes run from (its packages go on their PYTHONPATH)."""

STOP_TIMEOUT_S = 30.0


class ServiceError(RuntimeError):
    """A server process did not start or stop as it should; the message names it and says how."""

    def __init__(self, service: "Service", message: str):
        super().__init__(message)
        self.service = service


class ServiceExited(ServiceError):
    """The process exited while it was expected to start serving."""


class ServiceTimeout(ServiceError):
    """The process did not report SERVING in time."""


def module_command(module: str, *args: str | os.PathLike, python: str | None = None) -> list[str]:
    """`python -m module args...` with this interpreter (or `python`)."""
    return [python or sys.executable, "-m", module, *map(str, args)]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the checkout on PYTHONPATH and without systemd's NOTIFY_SOCKET
    (a child must not notify on behalf of its parent's unit)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra or {})
    return env


class Service:
    """A server subprocess whose stdout and stderr go to a log file."""

    def __init__(self, name: str, cmd: Sequence[str | os.PathLike], log_path: Path, *,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None, new_session: bool = False):
        self.name = name
        self.cmd = [str(c) for c in cmd]
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")
        self.t_start = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=child_env(env), cwd=cwd or REPO_ROOT, start_new_session=new_session)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        """The last lines of its output ('(no output)' when there is none)."""
        return "\n".join(self.output().splitlines()[-lines:]) or "(no output)"

    def error_line(self) -> str:
        """The last `error: ...` line it printed (a server refusing its flags says why there), else ''."""
        for line in reversed(self.output().splitlines()[-50:]):
            if "error:" in line:
                return line.strip()
        return ""

    def wait_serving(self, address: str, timeout_s: float = 120.0, service: str = "") -> float:
        """Poll the grpc health service at `address` until SERVING; returns the seconds since the spawn.
        ServiceExited when the process exits first, ServiceTimeout after timeout_s."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        last = "no answer"
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServiceExited(self, f"the {self.name} exited with status {self.proc.returncode} while "
                                              f"starting" + (f": {self.error_line()}" if self.error_line() else ""))
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.perf_counter() - self.t_start
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as e:
                    last = e.code().name
                time.sleep(0.05)
        raise ServiceTimeout(self, f"the {self.name} at {address} was not SERVING within {timeout_s:.0f} s "
                                   f"(last: {last})")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait; SIGKILL when it has not exited after timeout_s. Returns the exit status
        (negative: the signal that ended it)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_command(cmd: Sequence[str | os.PathLike], timeout_s: float, *, stream_stderr: bool = True
                ) -> subprocess.CompletedProcess[str]:
    """Run a one-shot command (a pack, a model recipe) to completion; its stdout is returned, its stderr
    passed through (or captured when stream_stderr is False)."""
    return subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE,
                          stderr=None if stream_stderr else subprocess.PIPE, text=True, env=child_env(),
                          cwd=REPO_ROOT, timeout=timeout_s, check=False)
