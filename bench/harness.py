"""The benchmark harness: real store and worker processes per run, driven through the client.

One *run* is one configuration (a table row of worker flags) at one cache budget over one
transport: start `python -m expert_store serve` and `python -m gpu_worker serve` as
subprocesses on unix sockets in a fresh temp dir, wait until both report SERVING, send one
warm-up request, then drive each workload through `client.api.AsyncWorkerClient` and read the
worker's `GetStats` before and after it; read the worker's peak RSS (VmHWM in
/proc/PID/status), SIGTERM the worker, then the store. Every request has a deadline and every
run a time limit; a run that fails keeps the tails of both processes' logs.

A workload's figures (`FIGURES`):
  decode_tokens_per_s      decode workloads: generated tokens after each request's first,
                           summed over requests, per second of client wall time from the first
                           first-token to the last token (one request: its own decode rate;
                           concurrent requests: the batch's aggregate rate)
  prefill_tokens_per_s     prefill workload: prompt tokens / the worker's prefill time
  ttft_ms                  median over requests of the worker's accepted -> first token
  hit_rate                 (cache hits + prefetch hits) / lookups, from GetStats deltas
  fetch_wait_ms_per_token  compute stalled on experts, per token (decode: generated
                           tokens; prefill: prompt tokens), from GetStats deltas
  bytes_fetched_per_token  expert bytes moved store -> worker (shm + gRPC) per token (same)
  worker_peak_rss_bytes    the worker's VmHWM after the workload (peak since it started)
Figures that do not apply to a workload are None (decode rate of a prefill, and back). EXTRA_FIGURES
split the hit rate (cache hits, prefetch hits, on-time hits: prefetch hits that did not arrive late)
and rate the predictor (strict top-k accuracy, prefetch recall and precision, wasted prefetch bytes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.processes import Service, ServiceExited, module_command

from .figures import RequestRecord, stats_delta, workload_figures
from .plan import BenchError, Prompts, RunSpec, Workload


@dataclass(frozen=True)
class HarnessSettings:
    pack: Path
    expert_format: str = "int4"
    store_formats: tuple[str, ...] = ("int4",)
    store_ram_bytes: int = 1 << 30  # every served expert (computed by the caller)
    device: str = "cpu"
    context: int = 1024
    warmup_tokens: int = 256
    start_timeout_s: float = 120.0
    request_timeout_s: float = 300.0
    run_timeout_s: float = 600.0
    worker_extra: tuple[str, ...] = ()
    store_extra: tuple[str, ...] = ()
    python: str = sys.executable
    profile_path: Path | None = None  # py-spy raw samples of the worker over the measured workloads


class Profiler:
    """py-spy sampling a process (every thread, idle samples included, so waits show) into a raw file."""

    def __init__(self, pid: int, path: Path, rate_hz: int = 200):
        self.pid, self.path, self.rate_hz = pid, path, rate_hz
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(exe).exists():
            raise BenchError("--profile needs py-spy: pip install py-spy (into this venv)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([exe, "record", "--pid", str(self.pid), "--output", str(self.path), "--format",
                                      "raw", "--rate", str(self.rate_hz), "--threads", "--idle"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # attached before the first request

    def stop(self) -> str | None:
        """SIGINT (py-spy writes its file then); the file's path, or None when it failed."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            err = b"py-spy did not stop"
        if not self.path.is_file():
            raise BenchError(f"py-spy wrote no profile: {err.decode(errors='replace')[-300:]}")
        return str(self.path)


def proc_status_bytes(pid: int, key: str) -> int | None:
    """A `kB` line of /proc/PID/status (VmHWM: peak resident set) in bytes; None when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def flag_args(values: Mapping[str, str | bool]) -> list[str]:
    """{"budget_bytes": "25%", "cold": True, "throttle": False} -> ["--budget-bytes", "25%", "--cold",
    "--no-throttle"] (boolean flags are argparse.BooleanOptionalAction in both servers)."""
    out: list[str] = []
    for k, v in values.items():
        flag = k.replace("_", "-")
        if v is True or v is False:
            out.append(f"--{'' if v else 'no-'}{flag}")
        else:
            out += [f"--{flag}", str(v)]
    return out


def store_command(s: HarnessSettings, spec: RunSpec, listen: str) -> list[str]:
    values: dict[str, str | bool] = {"ram_bytes": str(s.store_ram_bytes), "formats": ",".join(s.store_formats),
                                     "log_level": "warning", "grace_s": "2"}
    values.update(spec.transport.store)
    return [*module_command("expert_store", "serve", s.pack, "--listen", listen, python=s.python),
            *flag_args(values), *s.store_extra]


def worker_command(s: HarnessSettings, spec: RunSpec, store: str, listen: str) -> list[str]:
    values: dict[str, str | bool] = {"budget_bytes": spec.budget, "format": s.expert_format, "device": s.device,
                                     "log_level": "warning", "grace_s": "2", "max_batch_size": "8"}
    values.update(spec.config.worker)
    values.update(spec.transport.worker)
    return [*module_command("gpu_worker", "serve", "--store", store, "--listen", listen, python=s.python),
            *flag_args(values), *s.worker_extra]


def worker_flags_missing(flags: Sequence[str], help_text: str) -> list[str]:
    """The `--flags` of a command line that the worker's `serve --help` does not list."""
    return [f for f in flags if f.startswith("--") and f not in help_text]


def start_services(s: HarnessSettings, spec: RunSpec, tmp: Path, services: list[Service]
                   ) -> tuple[Service, Service, str, str, list[str]]:
    """A run's store and worker on unix sockets in `tmp`, both started at once (the worker waits for the
    store's health itself, so their imports overlap), appended to `services` as they start (the caller
    stops them); (store, worker, store address, worker address, worker command)."""
    store_addr, worker_addr = f"unix:{tmp}/store.sock", f"unix:{tmp}/worker.sock"
    store = Service("store", store_command(s, spec, store_addr), tmp / "store.log", new_session=True)
    services.append(store)
    cmd = worker_command(s, spec, store_addr, worker_addr)
    worker = Service("worker", cmd, tmp / "worker.log", new_session=True)
    services.append(worker)
    return store, worker, store_addr, worker_addr, cmd


def run_one(spec: RunSpec, workloads: Sequence[Workload], prompts: Prompts, s: HarnessSettings, *,
            before_measure: Callable[[], None] | None = None, stop_later: bool = False) -> dict[str, Any]:
    """One run (start, warm up, drive every workload, stop). Never raises for a failed run: the result
    says `status` ("ok", "unsupported": the worker refused its flags, "failed", "timeout") and why.

    before_measure: called once both servers are SERVING, before the warm-up (Runner: waits until the
    previous run's processes are gone). stop_later: stop the processes in a thread, left in
    result["_stopping"] (it fills exit_codes, stop_s and logs when done)."""
    result: dict[str, Any] = {
        "config": spec.config.name, "budget": spec.budget_label, "budget_pct": spec.budget_pct,
        "budget_arg": spec.budget, "transport": spec.transport.name, "repeat": spec.repeat, "status": "ok",
        "error": None, "workloads": {},
    }  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="fb-"))  # short: unix socket paths are limited to ~100 bytes
    services: list[Service] = []
    t0 = time.perf_counter()
    try:
        store, worker, store_addr, worker_addr, cmd = start_services(s, spec, tmp, services)
        result["worker_command"] = cmd[1:]
        result["store_start_s"] = store.wait_serving(store_addr, s.start_timeout_s)
        result["worker_start_s"] = worker.wait_serving(worker_addr, s.start_timeout_s)
        if before_measure is not None:
            before_measure()
        left = s.run_timeout_s - (time.perf_counter() - t0)
        spy = Profiler(worker.proc.pid, s.profile_path) if s.profile_path else None
        drive = drive_run(worker_addr, worker, workloads, prompts, s, result, spy.start if spy else None)
        try:
            asyncio.run(asyncio.wait_for(drive, timeout=max(1.0, left)))
        except (asyncio.TimeoutError, TimeoutError):
            result["status"] = "timeout"
            result["error"] = f"the run passed its limit of {s.run_timeout_s:.0f} s"
        finally:
            if spy is not None:
                result["profile"] = spy.stop()
        result["worker_peak_rss_bytes"] = proc_status_bytes(worker.pid, "VmHWM")
        result["store_peak_rss_bytes"] = proc_status_bytes(store.pid, "VmHWM")
    except ServiceExited as e:
        line = e.service.error_line()
        result["status"] = "unsupported" if e.service.name == "worker" and line else "failed"
        result["error"] = line or str(e)
    except Exception as e:  # noqa: BLE001 - a failed run is a result, the benchmark goes on
        result["status"] = "failed"
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        result["wall_s"] = time.perf_counter() - t0

        def stop() -> None:
            t_stop = time.perf_counter()
            codes = {svc.name: svc.stop() for svc in reversed(services)}  # the worker first: it releases leases
            result["stop_s"] = time.perf_counter() - t_stop
            result["exit_codes"] = codes
            if result["status"] == "ok" and any(c != 0 for c in codes.values()):
                result["error"] = f"exit codes after SIGTERM: {codes}"
            if result["status"] not in ("ok", "unsupported") or result["error"]:
                result["logs"] = {svc.name: svc.tail() for svc in services}
            shutil.rmtree(tmp, ignore_errors=True)

        if stop_later:
            result["_stopping"] = threading.Thread(target=stop, name="bench-stop", daemon=True)
            result["_stopping"].start()
        else:
            stop()
    return result


class Runner:
    """Runs RunSpecs one after another. A run's processes stop in the background while the next run's
    start, and are gone before the next run measures anything (its warm-up included)."""

    def __init__(self, workloads: Sequence[Workload], prompts: Prompts, settings: HarnessSettings):
        self.workloads, self.prompts, self.settings = workloads, prompts, settings
        self._stopping: threading.Thread | None = None

    def run(self, spec: RunSpec) -> dict[str, Any]:
        r = run_one(spec, self.workloads, self.prompts, self.settings, before_measure=self.wait_stopped,
                    stop_later=True)
        self.wait_stopped()  # when the run failed before measuring
        self._stopping = r.pop("_stopping", None)
        return r

    def wait_stopped(self) -> None:
        if self._stopping is not None:
            self._stopping.join()
            self._stopping = None


async def drive_run(address: str, worker: Service, workloads: Sequence[Workload], prompts: Prompts,
                    s: HarnessSettings, result: dict[str, Any], on_measure: Callable[[], None] | None = None
                    ) -> None:
    """Warm up, then every workload in order (the cache carries over, as in a long-running service)."""
    from client.api import AsyncWorkerClient

    async with AsyncWorkerClient(address, timeout_s=s.request_timeout_s) as w:
        t0 = time.perf_counter()
        if s.warmup_tokens > 0:  # fills the cache (all-resident: most experts), warms allocators
            await w.generate_text(token_ids=prompts.warmup(s.warmup_tokens, s.context), max_new_tokens=4,
                                  ignore_eos=True)
        result["warmup_s"] = time.perf_counter() - t0
        st = await w.stats()
        result["resident_after_warmup"] = st.resident_experts
        result["budget_bytes"] = st.budget_bytes
        if on_measure is not None:
            on_measure()
        for wl in workloads:
            reqs = prompts.for_workload(wl, s.context)
            result["workloads"][wl.name] = await measure_workload(w, wl, reqs, worker)
        final = await w.stats(include_layers=True)
        result["worker_stats_final"] = final.to_dict()


async def measure_workload(w, wl: Workload, reqs: list[list[int]], worker: Service) -> dict[str, Any]:
    before = await w.stats()
    t0 = time.perf_counter()

    async def one(ids: list[int]) -> RequestRecord:
        gen = w.generate(token_ids=ids, max_new_tokens=wl.max_new_tokens, ignore_eos=True, seed=0)
        first = last = None
        async for _ in gen:
            last = time.perf_counter() - t0
            first = first if first is not None else last
        r = gen.result
        return RequestRecord(
            r.usage.prompt_tokens, r.usage.completion_tokens, first, last, r.timings.prefill_ns,
            r.timings.decode_ns, r.timings.time_to_first_token_ns, r.timings.queue_ns, r.experts.hits,
            r.experts.lookups, r.experts.prefetch_hits, r.experts.bytes_fetched, r.experts.fetch_wait_ns,
            r.decode_tokens_per_s,
        )  # fmt: skip

    records = await asyncio.gather(*(one(ids) for ids in reqs))
    wall = time.perf_counter() - t0
    after = await w.stats()
    delta = stats_delta(before.to_dict(), after.to_dict())
    figures = workload_figures(wl, records, delta, wall)
    figures["worker_peak_rss_bytes"] = proc_status_bytes(worker.pid, "VmHWM")
    return {"figures": figures, "stats_delta": delta, "requests": [dataclasses.asdict(r) for r in records]}


