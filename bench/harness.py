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
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TINY_MIXTRAL = REPO.parent / "shared" / "models" / "tiny-mixtral"

FIGURES = (
    "decode_tokens_per_s", "prefill_tokens_per_s", "ttft_ms", "hit_rate", "fetch_wait_ms_per_token",
    "bytes_fetched_per_token", "worker_peak_rss_bytes",
)  # fmt: skip
EXTRA_FIGURES = (
    "per_request_decode_tokens_per_s", "cache_hit_rate", "prefetch_hit_rate", "on_time_hit_rate", "strict_topk_accuracy",
    "prefetch_recall", "prefetch_precision", "wasted_prefetch_bytes_per_token", "wall_s",
)  # fmt: skip


class BenchError(RuntimeError):
    """A benchmark could not be set up (bad pack, bad option); the message says what to do."""


# -- what is measured: configurations, transports, workloads (data, not code) -------------------


@dataclass(frozen=True)
class Configuration:
    name: str
    title: str
    worker: Mapping[str, str]
    """WorkerConfig field -> value, given to the worker as `--field-name value` (the budget apart)."""
    budgets: str
    """"sweep": each budget of --budgets; "full": 100% (every expert fits); "min": the smallest budget
    the worker accepts (one layer's top-k experts)."""
    design: str
    """The published design it stands for, and how it is realised here."""


NO_INT2 = {"int2_tail": "0"}  # the baselines fetch every expert in the run format (no INT2 prefill tail)

CONFIGURATIONS: dict[str, Configuration] = {c.name: c for c in (
    Configuration(
        "all_resident", "all-resident", {"policy": "lru", "predictor": "none", **NO_INT2}, "full",
        "the physical limit: budget 100% of the expert bytes; the warm-up request and the first workloads "
        "fill the cache, nothing is evicted"),
    Configuration(
        "load_on_demand", "load-on-demand",
        {"policy": "lru", "predictor": "none", "allocation": "uniform", **NO_INT2}, "min",
        "no reuse beyond the current layer: the smallest budget the worker accepts (top-k experts of one layer; "
        "uniform allocation leaves at most one resident slot in a few layers), no predictor"),
    Configuration(
        "lru", "LRU", {"policy": "lru", "predictor": "none", "allocation": "uniform", **NO_INT2}, "sweep",
        "mixtral-offloading: LRU per layer, equal slots, no prefetch"),
    Configuration(
        "lfu_decay", "LFU-decay", {"policy": "lfu_decay", "predictor": "none", "allocation": "uniform", **NO_INT2},
        "sweep",
        "In-depth Analysis on Caching and Pre-fetching in MoE Offloading: LFU with decayed counts, no prefetch"),
    Configuration(
        "eap", "EAP", {"policy": "lfu", "predictor": "eap", "allocation": "uniform", **NO_INT2}, "sweep",
        "MoE-Infinity: expert-activation-path matching prefetch, activation-count (LFU) caching"),
    Configuration(
        "fate", "Fate",
        {"predictor": "cross_layer", "allocation": "shallow_favoring", "policy": "arc", "int2_tail": "0.3"}, "sweep",
        "Fate: cross-layer gate prefetch, shallow-favoring allocation, ARC per layer, INT2 prefill tail 0.3"),
    Configuration(  # not in the default set: Fate without its INT2 tail (generated tokens as the baselines')
        "fate_int4", "Fate (no INT2 tail)",
        {"predictor": "cross_layer", "allocation": "shallow_favoring", "policy": "arc", **NO_INT2}, "sweep",
        "Fate as above with every expert in the run format (no INT2 prefill tail)"),
)}  # fmt: skip
DEFAULT_CONFIGS = ("all_resident", "load_on_demand", "lru", "lfu_decay", "eap", "fate")


@dataclass(frozen=True)
class Transport:
    name: str
    store: Mapping[str, str | bool]
    """StoreConfig field -> value (True: a bare flag); ram_bytes defaults to every served expert."""
    worker: Mapping[str, str]


TRANSPORTS: dict[str, Transport] = {t.name: t for t in (
    Transport("shm", {}, {"transport": "shm"}),
    Transport("grpc", {}, {"transport": "grpc"}),
    # NVMe cold: no RAM tier, experts.bin dropped from the page cache after start-up (first reads are disk reads)
    Transport("nvme-cold", {"ram_bytes": "0", "cold": True}, {"transport": "grpc"}),
)}  # fmt: skip


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "decode" | "prefill"
    concurrency: int
    max_new_tokens: int
    prompt_tokens: int = 0  # prefill: the prompt's length; decode: 0 (the short prompts as they are)


def default_workloads(quick: bool) -> list[Workload]:
    """Prefill of a 512-token prompt, then decode of 128 tokens at 1, 4 and 8 concurrent requests
    (--quick: 64-token prefill, 16 tokens at 1 and 2)."""
    if quick:
        return [Workload("prefill-64", "prefill", 1, 1, 64), Workload("decode-c1", "decode", 1, 16),
                Workload("decode-c2", "decode", 2, 16)]
    return [Workload("prefill-512", "prefill", 1, 1, 512), Workload("decode-c1", "decode", 1, 128),
            Workload("decode-c4", "decode", 4, 128), Workload("decode-c8", "decode", 8, 128)]


@dataclass(frozen=True)
class Prompts:
    """Token ids the workloads draw from: short prompts (decode), one long text (prefill, warm-up)."""

    short: tuple[tuple[int, ...], ...]
    text: tuple[int, ...]
    source: str

    def for_workload(self, w: Workload, context: int) -> list[list[int]]:
        if w.kind == "prefill":
            n = min(w.prompt_tokens, context - w.max_new_tokens)
            return [list(self.text[:n])] * w.concurrency
        reqs = [list(self.short[i % len(self.short)]) for i in range(w.concurrency)]
        return [r[: max(1, context - w.max_new_tokens)] for r in reqs]

    def warmup(self, n: int, context: int) -> list[int]:
        """A slice of the text away from the prefill prompt's start (the second half)."""
        n = min(n, context - 4)
        start = max(0, min(len(self.text) - n, len(self.text) // 2))
        return list(self.text[start : start + n])


def load_prompts(pack_dir: Path, prompts_file: Path | None, text_file: Path | None, vocab_size: int,
                 min_text_tokens: int) -> Prompts:
    """Tokenize the prompts (JSONL with a "prompt" field, or plain lines) and the text with the pack's
    tokenizer. Without a tokenizer or without the files, deterministic synthetic ids stand in."""
    from gpu_worker.tokenizer import TextTokenizer

    tok_path = pack_dir / "tokenizer.json"
    tok = TextTokenizer(tok_path) if tok_path.is_file() else None
    prompts_file = prompts_file or (TINY_MIXTRAL / "prompts.jsonl")
    text_file = text_file or (TINY_MIXTRAL / "eval.txt")
    sources = []

    def ok(ids: Sequence[int]) -> bool:
        return len(ids) > 0 and all(0 <= i < vocab_size for i in ids)

    short: list[tuple[int, ...]] = []
    if tok is not None and prompts_file.is_file():
        for line in prompts_file.read_text().splitlines():
            if line.strip():
                text = json.loads(line)["prompt"] if line.lstrip().startswith("{") else line
                ids = tok.encode(text)
                if ok(ids):
                    short.append(tuple(ids))
        sources.append(f"prompts {prompts_file}")
    if not short:  # synthetic: 8 prompts of 32 ids, spread over the vocabulary
        short = [tuple((17 * i + 5 * j + 2) % vocab_size for j in range(32)) for i in range(8)]
        sources.append("synthetic short prompts")
    text: tuple[int, ...] = ()
    if tok is not None and text_file.is_file():
        ids = tok.encode(text_file.read_text())
        if ok(ids) and len(ids) >= min_text_tokens:
            text = tuple(ids)
            sources.append(f"text {text_file}")
    if not text:
        text = tuple((31 * j + 7) % vocab_size for j in range(max(min_text_tokens, 1024)))
        sources.append("synthetic text")
    return Prompts(tuple(short), text, "; ".join(sources))


# -- one run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    config: Configuration
    budget: str  # as given to --budget-bytes: "25%", "100%" or bytes
    budget_label: str  # "25%", "100%", "min"
    budget_pct: float  # of every expert's bytes in the compute form
    transport: Transport
    repeat: int

    @property
    def key(self) -> str:
        return f"{self.transport.name}/{self.config.name}@{self.budget_label}"


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


class Service:
    """A server subprocess whose output goes to a log file (its tail is kept when a run fails)."""

    def __init__(self, name: str, cmd: list[str], log_path: Path):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env.pop("NOTIFY_SOCKET", None)
        self._log = open(log_path, "wb")
        self.t_start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                     start_new_session=True)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    def error_line(self) -> str:
        """The `error: ...` line a server prints when it refuses its flags, else ''."""
        for line in reversed(self.tail(50).splitlines()):
            if "error:" in line:
                return line.strip()
        return ""

    def peak_rss_bytes(self) -> int | None:
        return proc_status_bytes(self.proc.pid, "VmHWM")

    def wait_serving(self, address: str, timeout_s: float) -> float:
        """Poll the standard health service until SERVING; returns seconds since spawn."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        last = "no answer"
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServiceExited(self, f"the {self.name} exited with status {self.proc.returncode} "
                                              f"while starting")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.perf_counter() - self.t_start
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as e:
                    last = e.code().name
                time.sleep(0.05)
        raise BenchError(f"the {self.name} at {address} was not SERVING within {timeout_s:.0f} s (last: {last})")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL when it does not exit in time. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class ServiceExited(BenchError):
    def __init__(self, service: Service, message: str):
        super().__init__(message)
        self.service = service


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
    return [s.python, "-m", "expert_store", "serve", str(s.pack), "--listen", listen,
            *flag_args(values), *s.store_extra]


def worker_command(s: HarnessSettings, spec: RunSpec, store: str, listen: str) -> list[str]:
    values: dict[str, str | bool] = {"budget_bytes": spec.budget, "format": s.expert_format, "device": s.device,
                                     "log_level": "warning", "grace_s": "2", "max_batch_size": "8"}
    values.update(spec.config.worker)
    values.update(spec.transport.worker)
    return [s.python, "-m", "gpu_worker", "serve", "--store", store, "--listen", listen,
            *flag_args(values), *s.worker_extra]


def worker_flags_missing(flags: Sequence[str], help_text: str) -> list[str]:
    """The `--flags` of a command line that the worker's `serve --help` does not list."""
    return [f for f in flags if f.startswith("--") and f not in help_text]


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
    store_addr, worker_addr = f"unix:{tmp}/store.sock", f"unix:{tmp}/worker.sock"
    services: list[Service] = []
    t0 = time.perf_counter()
    try:
        # Both at once: the worker waits for the store's health itself (--store-wait-s), so their imports overlap.
        store = Service("store", store_command(s, spec, store_addr), tmp / "store.log")
        services.append(store)
        cmd = worker_command(s, spec, store_addr, worker_addr)
        result["worker_command"] = cmd[1:]
        worker = Service("worker", cmd, tmp / "worker.log")
        services.append(worker)
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
        result["worker_peak_rss_bytes"] = worker.peak_rss_bytes()
        result["store_peak_rss_bytes"] = store.peak_rss_bytes()
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


@dataclass
class RequestRecord:
    prompt_tokens: int
    completion_tokens: int
    t_first_s: float | None  # client clock, seconds since the workload started
    t_last_s: float | None
    prefill_ns: int
    decode_ns: int
    ttft_ns: int
    queue_ns: int
    hits: int
    lookups: int
    prefetch_hits: int
    bytes_fetched: int
    fetch_wait_ns: int
    decode_tokens_per_s: float


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
    figures["worker_peak_rss_bytes"] = worker.peak_rss_bytes()
    return {"figures": figures, "stats_delta": delta, "requests": [dataclasses.asdict(r) for r in records]}


def stats_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Counters as differences; gauges and ratios (floats, used/high-water bytes) as their value after."""
    gauges = {"budget_bytes", "used_bytes", "high_water_bytes", "resident_experts", "active_requests",
              "queued_requests", "uptime_ms"}
    out: dict[str, Any] = {}
    for k, v in after.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, int) and k not in gauges and isinstance(before.get(k), int):
            out[k] = v - before[k]
        else:
            out[k] = v
    return out


def workload_figures(wl: Workload, records: Sequence[RequestRecord], delta: Mapping[str, Any], wall_s: float
                     ) -> dict[str, Any]:
    f: dict[str, Any] = {k: None for k in FIGURES + EXTRA_FIGURES}
    f["wall_s"] = wall_s
    generated = sum(r.completion_tokens for r in records)
    prompt = sum(r.prompt_tokens for r in records)
    tokens = prompt if wl.kind == "prefill" else generated
    if wl.kind == "decode":
        firsts = [r.t_first_s for r in records if r.t_first_s is not None]
        lasts = [r.t_last_s for r in records if r.t_last_s is not None]
        n = sum(max(0, r.completion_tokens - 1) for r in records)
        span = max(lasts) - min(firsts) if firsts and lasts else 0.0
        f["decode_tokens_per_s"] = n / span if n and span > 0 else None
        f["per_request_decode_tokens_per_s"] = statistics.median(r.decode_tokens_per_s for r in records)
    else:
        ns = sum(r.prefill_ns for r in records)
        f["prefill_tokens_per_s"] = prompt / (ns / 1e9) if ns else None
    f["ttft_ms"] = statistics.median(r.ttft_ns for r in records) / 1e6 if records else None
    d = delta.get
    if d("lookups"):
        f["hit_rate"] = d("hits", 0) / d("lookups")  # the worker counts prefetch hits among hits
        f["prefetch_hit_rate"] = d("prefetch_hits", 0) / d("lookups")
        f["cache_hit_rate"] = f["hit_rate"] - f["prefetch_hit_rate"]
        if "prefetch_late_hits" in delta:  # a late prefetch counts as a hit but the compute waited for it
            f["on_time_hit_rate"] = (d("hits", 0) - d("prefetch_late_hits", 0)) / d("lookups")
    if d("predictions"):
        f["strict_topk_accuracy"] = d("predictions_exact", 0) / d("predictions")
    if d("prefetch_hits", 0) + d("misses", 0):
        f["prefetch_recall"] = d("prefetch_hits", 0) / (d("prefetch_hits", 0) + d("misses", 0))
    if d("prefetches_issued"):
        f["prefetch_precision"] = d("prefetch_hits", 0) / d("prefetches_issued")
    if tokens:
        f["fetch_wait_ms_per_token"] = d("fetch_wait_ns", 0) / 1e6 / tokens
        f["bytes_fetched_per_token"] = (d("bytes_fetched_shm", 0) + d("bytes_fetched_grpc", 0)) / tokens
        if "prefetch_wasted_bytes" in delta:
            f["wasted_prefetch_bytes_per_token"] = d("prefetch_wasted_bytes", 0) / tokens
    return f


@dataclass
class Plan:
    """Every run of a benchmark, in the order they execute (configurations interleaved per repeat)."""

    runs: list[RunSpec] = field(default_factory=list)


def make_plan(configs: Sequence[Configuration], budgets_pct: Sequence[float], transports: Sequence[Transport],
              repeats: int, min_budget: str, min_budget_pct: float) -> Plan:
    """A B C ... A B C ...: repeat r of every (transport, configuration, budget) before repeat r+1."""
    cells: list[tuple[Configuration, str, str, float, Transport]] = []
    for t in transports:
        for c in configs:
            if c.budgets == "full":
                cells.append((c, "100%", "100%", 100.0, t))
            elif c.budgets == "min":
                cells.append((c, min_budget, "min", min_budget_pct, t))
            else:
                for b in budgets_pct:
                    cells.append((c, f"{b:g}%", f"{b:g}%", float(b), t))
    return Plan([RunSpec(c, b, label, pct, t, r) for r in range(repeats) for (c, b, label, pct, t) in cells])
