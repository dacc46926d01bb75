"""`python -m client demo`: the README's run command, end to end on a fresh machine.

Today (before the servers exist) it: makes or reuses the built-in default model
(a tiny random-weight Mixtral, see gpu_worker.default_model), packs it into
INT4 experts, and generates from the pack in a worker subprocess
(`python -m gpu_worker generate`). Issue 3 turns the last step into: start the
store and worker servers on loopback, stream one generation through the
client, print the expert statistics, stop both.

Every step prints one progress line, so a failure says which step broke.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PROMPT = "The expert store keeps every expert, and the worker"
DEMO_FORMATS: tuple[str, ...] = ("int4",)


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


def generate_command(pack: Path, cfg: DemoConfig) -> list[str]:
    return [
        sys.executable, "-m", "gpu_worker", "generate",
        "--pack", str(pack),
        "--prompt", cfg.prompt,
        "--max-new-tokens", str(cfg.max_new_tokens),
        "--device", cfg.device,
    ]  # fmt: skip


def run_generation(pack: Path, cfg: DemoConfig) -> None:
    """Generate in a worker subprocess, its output going straight to this terminal."""
    _say(f"generating {cfg.max_new_tokens} tokens in a worker process; prompt: {cfg.prompt!r}")
    t0 = time.perf_counter()
    rc = subprocess.call(generate_command(pack, cfg))
    if rc != 0:
        raise DemoError(f"the worker's generate exited with status {rc} (its error is printed above)")
    _say(f"generation: done in {time.perf_counter() - t0:.1f} s")


def run_demo(cfg: DemoConfig) -> int:
    """All the steps; returns the process exit status (0 on success)."""
    from gpu_worker.default_model import DefaultModelError, default_cache_dir
    from gpu_worker.model_args import ModelConfigError

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    cache_dir = cfg.cache_dir if cfg.cache_dir is not None else default_cache_dir()
    _say(f"cache: {cache_dir}")
    try:
        ckpt = resolve_checkpoint(cfg, cache_dir)
        pack = ensure_pack(ckpt, cache_dir)
        run_generation(pack, cfg)
    except (DemoError, DefaultModelError, ModelConfigError, OSError) as e:
        print(f"[demo] error: {e}", file=sys.stderr, flush=True)
        return 1
    _say("ok")
    return 0
