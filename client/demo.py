"""`python -m client demo`: the README's run command, end to end on a fresh machine.

Every step runs the project's own command lines, so the demo shows what a user types and
the client package imports neither the store nor the worker. One progress line per step
(so a failure says which step broke):
  1. make or reuse the built-in default model (`python -m gpu_worker make-default-model`:
     a tiny random-weight Mixtral), or take --checkpoint;
  2. pack it into INT4 experts (`python -m expert_store pack --reuse`), and read the pack's
     expert sizes (`python -m expert_store inspect --json`);
  3. start the expert store (`python -m expert_store serve`, RAM tier: half the experts) and
     the worker (`python -m gpu_worker serve`, cache budget 50% of the expert bytes) on unix
     sockets in a temp dir, and wait until both report SERVING (client.processes);
  4. stream one generation through the client library, print the request's expert
     statistics and the worker's;
  5. SIGTERM both and check they exited cleanly (status 0).
On a failure the processes' output tails are printed and both are stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .processes import REPO_ROOT, Service, ServiceError, module_command, run_command

DEFAULT_PROMPT = "The expert store keeps every expert, and the worker"
DEMO_FORMATS: tuple[str, ...] = ("int4",)
START_TIMEOUT_S = 120.0
STEP_TIMEOUT_S = 900.0  # one-shot commands (model recipe, pack) on a slow machine


class DemoError(RuntimeError):
    """A demo step failed; the message names the step and what to do."""


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs; the CLI fills it."""

    prompt: str = DEFAULT_PROMPT
    """Prompt text."""
    max_new_tokens: int = 32
    """Tokens to generate."""
    cache_dir: Path | None = None
    """Where the default model and the packs go; None: default_cache_dir()."""
    checkpoint: Path | None = None
    """A Hugging Face checkpoint to use instead of the random default model."""
    device: str = "auto"
    """The worker's device: auto, cpu, cuda, cuda:N."""
    seed: int = 0
    """Seed of the default model's random weights."""
    budget: str = "50%"
    """The worker's expert-cache budget (bytes, "512MiB" or a share of the experts)."""
    transport: str = "auto"
    """How experts travel store -> worker: auto, shm, grpc."""


def default_cache_dir() -> Path:
    """Where the default model and its pack live: $FATE_MOE_CACHE, else $XDG_CACHE_HOME/fate-moe,
    else the checkout's .cache/fate-moe (git-ignored), else ~/.cache/fate-moe."""
    if os.environ.get("FATE_MOE_CACHE"):
        return Path(os.environ["FATE_MOE_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "fate-moe"
    if (REPO_ROOT / "pyproject.toml").is_file() and os.access(REPO_ROOT, os.W_OK):
        return REPO_ROOT / ".cache" / "fate-moe"
    return Path.home() / ".cache" / "fate-moe"


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _step(title: str) -> Callable[[], None]:
    """Print the step's title now and return a function that prints its duration."""
    _say(f"{title} ...")
    t0 = time.perf_counter()
    return lambda: _say(f"{title}: done in {time.perf_counter() - t0:.2f} s")


def _run(what: str, *cmd: str | os.PathLike) -> str:
    """A one-shot command's stdout; DemoError naming the step (its stderr is already on ours)."""
    try:
        r = run_command(cmd, STEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DemoError(f"{what} took over {STEP_TIMEOUT_S:.0f} s: {' '.join(map(str, cmd[1:]))}") from None
    if r.returncode != 0:
        raise DemoError(f"{what} failed (exit status {r.returncode}): {' '.join(map(str, cmd[1:]))}")
    return r.stdout


def resolve_checkpoint(cfg: DemoConfig, cache_dir: Path) -> Path:
    """The user's checkpoint when given, else the default model (made on first use, then reused)."""
    if cfg.checkpoint is not None:
        if not (cfg.checkpoint / "config.json").is_file():
            raise DemoError(f"{cfg.checkpoint}: not a Hugging Face checkpoint directory (no config.json)")
        _say(f"checkpoint: {cfg.checkpoint}")
        return cfg.checkpoint
    done = _step("default model")
    out = _run("making the default model", *module_command("gpu_worker", "make-default-model", cache_dir,
                                                           "--seed", str(cfg.seed)))
    done()
    return Path(out.strip().splitlines()[-1])


def pack_dir_for(checkpoint: Path, cache_dir: Path) -> Path:
    """A pack location per checkpoint directory (its name plus a digest of its absolute path)."""
    digest = hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:8]
    return cache_dir / "packs" / f"{checkpoint.name}-{digest}-{'-'.join(DEMO_FORMATS)}"


def ensure_pack(checkpoint: Path, cache_dir: Path) -> Path:
    """Pack the checkpoint's experts as INT4 unless a complete pack with that format is already there."""
    out = pack_dir_for(checkpoint, cache_dir)
    done = _step(f"pack {checkpoint.name} ({', '.join(DEMO_FORMATS)} experts) into {out}")
    flags = ["--formats", ",".join(DEMO_FORMATS), "--reuse"] + ([] if sys.stderr.isatty() else ["--no-progress"])
    for line in _run(f"packing {checkpoint}", *module_command("expert_store", "pack", checkpoint, out,
                                                                *flags)).splitlines():
        _say(f"pack: {line}")
    done()
    return out


def expert_bytes(pack: Path) -> int:
    """Bytes of every expert in the demo's formats (`expert_store inspect --json`)."""
    facts = json.loads(_run("reading the pack", *module_command("expert_store", "inspect", pack, "--json")))
    return sum(facts["expert_bytes"][f] for f in DEMO_FORMATS) * facts["experts"]


def store_command(pack: Path, listen: str, ram_bytes: int) -> list[str]:
    return module_command("expert_store", "serve", pack, "--listen", listen, "--ram-bytes", str(ram_bytes))


def worker_command(store: str, listen: str, cfg: DemoConfig) -> list[str]:
    return module_command("gpu_worker", "serve", "--store", store, "--listen", listen, "--budget-bytes", cfg.budget,
                          "--device", cfg.device, "--transport", cfg.transport)


def stream_generation(address: str, cfg: DemoConfig) -> None:
    """One generation through the client library, tokens printed as they arrive, then the statistics."""
    from .api import WorkerClient, WorkerError
    from .formatting import summary_line

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
    """Start store and worker, generate, stop both; output tails on failure."""
    ram_bytes = expert_bytes(pack) // 2  # half of the experts in the store's RAM tier: fetches hit both tiers
    tmp = Path(tempfile.mkdtemp(prefix="fate-moe-demo-"))  # short: unix socket paths are limited to ~100 bytes
    store_addr, worker_addr = f"unix:{tmp}/store.sock", f"unix:{tmp}/worker.sock"
    services: list[Service] = []
    try:
        done = _step(f"starting the expert store on {store_addr} (RAM tier {ram_bytes} bytes)")
        services.append(Service("expert store", store_command(pack, store_addr, ram_bytes), tmp / "store.log"))
        services[-1].wait_serving(store_addr, START_TIMEOUT_S)
        done()
        done = _step(f"starting the worker on {worker_addr} (cache budget {cfg.budget} of the expert bytes)")
        services.append(Service("worker", worker_command(store_addr, worker_addr, cfg), tmp / "worker.log"))
        services[-1].wait_serving(worker_addr, START_TIMEOUT_S)
        done()
        stream_generation(worker_addr, cfg)
        for service in reversed(services):  # the worker first: it releases its leases at the store
            done = _step(f"stopping the {service.name} (SIGTERM)")
            rc = service.stop()
            if rc != 0:
                raise DemoError(f"the {service.name} exited with status {rc} after SIGTERM")
            done()
    except BaseException as e:
        for service in services:
            service.stop(timeout_s=5.0)
            print(f"[demo] --- {service.name} output (last lines) ---\n{service.tail(25)}", file=sys.stderr)
        if isinstance(e, ServiceError):
            raise DemoError(str(e)) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_demo(cfg: DemoConfig) -> int:
    """All the steps; returns the process exit status (0 on success)."""
    cache_dir = cfg.cache_dir if cfg.cache_dir is not None else default_cache_dir()
    _say(f"cache: {cache_dir}")
    try:
        ckpt = resolve_checkpoint(cfg, cache_dir)
        pack = ensure_pack(ckpt, cache_dir)
        run_services(pack, cfg)
    except (DemoError, OSError) as e:
        print(f"[demo] error: {e}", file=sys.stderr, flush=True)
        return 1
    _say("ok")
    return 0
