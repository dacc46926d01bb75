"""`python -m client demo`: the README's run command, end to end on a fresh machine.

Steps, one progress line each (so a failure says which step broke):
  1. make or reuse the built-in default model (a tiny random-weight Mixtral, see
     gpu_worker.default_model), or take --checkpoint;
  2. pack it into INT4 experts (reused when already packed);
  3. start the expert store (`python -m expert_store serve`) and the worker
     (`python -m gpu_worker serve`, cache budget 50% of the expert bytes) as
     subprocesses on unix sockets in a temp dir, and wait until both report SERVING;
  4. stream one generation through the client library, print the request's expert
     statistics and the worker's;
  5. SIGTERM both and check they exited cleanly (status 0).
On a failure the subprocesses' stderr tails are printed and both are stopped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PROMPT = "The expert store keeps every expert, and the worker"
DEMO_FORMATS: tuple[str, ...] = ("int4",)
REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


class DemoError(RuntimeError):
    """A demo step failed; the message names the step and what to do."""


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs; the CLI fills it."""

    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 32  # tokens to generate
    cache_dir: Path | None = None  # default model and packs; None: gpu_worker.default_model.default_cache_dir()
    checkpoint: Path | None = None  # a Hugging Face checkpoint to use instead of the random default model
    device: str = "auto"  # passed to the worker: auto, cpu, cuda, cuda:N
    seed: int = 0  # seed of the default model's random weights
    budget: str = "50%"  # the worker's expert-cache budget (bytes, "512MiB" or a share of the experts)
    transport: str = "auto"  # how experts travel store -> worker: auto, shm, grpc


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _step(title: str) -> Callable[[], None]:
    """Print the step's title now and return a function that prints its duration."""
    _say(f"{title} ...")
    t0 = time.perf_counter()
    return lambda: _say(f"{title}: done in {time.perf_counter() - t0:.2f} s")


def resolve_checkpoint(cfg: DemoConfig, cache_dir: Path) -> Path:
    """The user's checkpoint when given, else the default model (made on first use, then reused)."""
    if cfg.checkpoint is not None:
        if not (cfg.checkpoint / "config.json").is_file():
            raise DemoError(f"{cfg.checkpoint}: not a Hugging Face checkpoint directory (no config.json)")
        _say(f"checkpoint: {cfg.checkpoint}")
        return cfg.checkpoint
    from gpu_worker.default_model import ensure_default_checkpoint

    done = _step("default model")
    ckpt = ensure_default_checkpoint(cache_dir, seed=cfg.seed, log=_say)
    done()
    return ckpt


def pack_dir_for(checkpoint: Path, cache_dir: Path) -> Path:
    """A pack location per checkpoint directory (its name plus a digest of its absolute path)."""
    digest = hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:8]
    return cache_dir / "packs" / f"{checkpoint.name}-{digest}-{'-'.join(DEMO_FORMATS)}"


def ensure_pack(checkpoint: Path, cache_dir: Path) -> Path:
    """Pack the checkpoint's experts as INT4 unless a complete pack with that format is already there."""
    # Imported here: the packer pulls in torch and the codec, which `client generate` will not need.
    from expert_store.errors import FateError
    from expert_store.pack import write_pack
    from expert_store.packfile import Pack

    out = pack_dir_for(checkpoint, cache_dir)
    if out.exists():
        try:
            with Pack.open(out) as pack:
                if all(f in pack.formats for f in DEMO_FORMATS):
                    _say(f"pack: reusing {out}")
                    return out
        except FateError as e:
            _say(f"pack: {out} is unusable ({e}); repacking")
    done = _step(f"packing {checkpoint.name} ({', '.join(DEMO_FORMATS)} experts) into {out}")
    try:
        write_pack(checkpoint, out, formats=DEMO_FORMATS, force=out.exists(), progress=sys.stderr.isatty())
    except FateError as e:
        raise DemoError(f"packing {checkpoint} failed: {e}") from e
    done()
    return out


class _Service:
    """A server subprocess whose output goes to a log file (its tail is printed on failure)."""

    def __init__(self, name: str, cmd: list[str], log_path: Path):
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
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


def wait_serving(service: _Service, address: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll the standard health service until SERVING; DemoError if the process exits or time runs out."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if service.proc.poll() is not None:
                raise DemoError(f"the {service.name} exited with status {service.proc.returncode} while starting")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as e:
                last = e.code().name
            time.sleep(0.1)
    raise DemoError(f"the {service.name} at {address} was not SERVING within {timeout_s:.0f} s (last: {last})")


def store_command(pack: Path, listen: str, ram_bytes: int) -> list[str]:
    return [sys.executable, "-m", "expert_store", "serve", str(pack), "--listen", listen,
            "--ram-bytes", str(ram_bytes)]


def worker_command(store: str, listen: str, cfg: DemoConfig) -> list[str]:
    return [
        sys.executable, "-m", "gpu_worker", "serve",
        "--store", store, "--listen", listen,
        "--budget-bytes", cfg.budget, "--device", cfg.device, "--transport", cfg.transport,
    ]  # fmt: skip


def stream_generation(address: str, cfg: DemoConfig) -> None:
    """One generation through the client library, tokens printed as they arrive, then the statistics."""
    from client.__main__ import summary_line
    from client.api import WorkerClient, WorkerError

    _say(f"generating {cfg.max_new_tokens} tokens; prompt: {cfg.prompt!r}")
    try:
        with WorkerClient(address) as w:
            gen = w.generate(cfg.prompt, max_new_tokens=cfg.max_new_tokens, ignore_eos=True)
            sys.stdout.write(cfg.prompt)
            for tok in gen:
                sys.stdout.write(tok.text)
                sys.stdout.flush()
            print(gen.result.trailing_text, flush=True)
            r = gen.result
            s = w.stats(include_layers=True)
    except WorkerError as e:
        raise DemoError(f"generation failed: {e}") from None
    _say(summary_line(r))
    e = r.experts
    _say(f"request expert stats: lookups {e.lookups}, hits {e.hits}, misses {e.misses}, "
         f"bytes fetched {e.bytes_fetched}, fetch wait {e.fetch_wait_ns / 1e6:.1f} ms")
    _say(f"worker stats: {s.model_family} on {s.device}, experts {s.expert_format}, policy {s.cache_policy}; "
         f"budget {s.budget_bytes} bytes, used {s.used_bytes}, high water {s.high_water_bytes}; "
         f"{s.resident_experts} experts resident; lookups {s.lookups}, hits {s.hits}, misses {s.misses}, "
         f"evictions {s.evictions}; fetched {s.bytes_fetched_shm} bytes over shm, {s.bytes_fetched_grpc} over gRPC")
    for layer in s.layers:
        _say(f"  layer {layer.layer}: {layer.slots} slots, {layer.resident_experts} resident, "
             f"{layer.hits}/{layer.lookups} hits, {layer.evictions} evictions")


def run_services(pack: Path, cfg: DemoConfig) -> None:
    """Start store and worker, generate, stop both; stderr tails on failure."""
    from expert_store.packfile import Pack

    with Pack.open(pack) as p:
        expert_bytes = sum(p.expert_nbytes(f) for f in DEMO_FORMATS) * len(p.expert_ids)
    ram_bytes = expert_bytes // 2  # half of the experts in the store's RAM tier: fetches hit both tiers
    tmp = Path(tempfile.mkdtemp(prefix="fate-moe-demo-"))  # short: unix socket paths are limited to ~100 bytes
    store_addr, worker_addr = f"unix:{tmp}/store.sock", f"unix:{tmp}/worker.sock"
    services: list[_Service] = []
    try:
        done = _step(f"starting the expert store on {store_addr} (RAM tier {ram_bytes} bytes)")
        store = _Service("expert store", store_command(pack, store_addr, ram_bytes), tmp / "store.log")
        services.append(store)
        wait_serving(store, store_addr)
        done()
        done = _step(f"starting the worker on {worker_addr} (cache budget {cfg.budget} of the expert bytes)")
        worker = _Service("worker", worker_command(store_addr, worker_addr, cfg), tmp / "worker.log")
        services.append(worker)
        wait_serving(worker, worker_addr)
        done()
        stream_generation(worker_addr, cfg)
        for service in reversed(services):  # the worker first: it releases its leases at the store
            done = _step(f"stopping the {service.name} (SIGTERM)")
            rc = service.stop()
            if rc != 0:
                raise DemoError(f"the {service.name} exited with status {rc} after SIGTERM")
            done()
    except BaseException:
        for service in services:
            service.stop(timeout_s=5.0)
            print(f"[demo] --- {service.name} output (last lines) ---\n{service.tail()}", file=sys.stderr)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_demo(cfg: DemoConfig) -> int:
    """All the steps; returns the process exit status (0 on success)."""
    from gpu_worker.default_model import DefaultModelError, default_cache_dir
    from expert_store.model_args import ModelConfigError

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    cache_dir = cfg.cache_dir if cfg.cache_dir is not None else default_cache_dir()
    _say(f"cache: {cache_dir}")
    try:
        ckpt = resolve_checkpoint(cfg, cache_dir)
        pack = ensure_pack(ckpt, cache_dir)
        run_services(pack, cfg)
    except (DemoError, DefaultModelError, ModelConfigError, OSError) as e:
        print(f"[demo] error: {e}", file=sys.stderr, flush=True)
        return 1
    _say("ok")
    return 0
