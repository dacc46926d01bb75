"""Command line of the worker: `python -m gpu_worker COMMAND ...` (installed as `fate-worker`).

Each subcommand is one `_add_*` function registered in COMMANDS; a subcommand's heavy modules
(torch, the runtime, the simulator) are imported only when it runs (or when its own --help is
asked for), so `--help` answers at once. User errors (bad flags or config, a budget below the
minimum, an unreachable store) print one line `error: ...` on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from expert_store.errors import FateError
from expert_store.settings import add_config_flag, add_flags, flags_given, prog_name

from .config import SECTION, WorkerConfig

EXIT_USER_ERROR = 2


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pack", required=True, help="pack directory (written by `python -m expert_store pack`)")
    p.add_argument("--format", default=None, help="expert format to run (default: int4 if the pack has it)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--compute-form", default=None,
                   help="fp32, bf16, int4_fused, dequant_per_use (default: the device's choice for the format)")


def _cmd_generate(a: argparse.Namespace) -> int:
    from .generate import SamplingError, SamplingParams, generate
    from .runtime import load_local

    rt = load_local(a.pack, a.format, a.device, a.compute_form)
    if a.prompt_ids:
        ids = [int(t) for t in a.prompt_ids.split(",")]
    else:
        if rt.tokenizer is None:
            raise SamplingError("this pack has no tokenizer: pass --prompt-ids")
        ids = rt.tokenizer.encode(a.prompt)
    params = SamplingParams(
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
        seed=a.seed, ignore_eos=a.ignore_eos,
    )
    print(f"[{rt.pack.name}: {rt.pack.args.family}, experts {rt.source.fmt} as {rt.source.form} "
          f"on {rt.model.device}; prompt {len(ids)} tokens]", file=sys.stderr)
    stream = rt.tokenizer.stream() if rt.tokenizer else None
    t0 = time.perf_counter()
    t_first = None
    out: list[int] = []
    for tok in generate(rt.model, ids, params):
        t_first = t_first or time.perf_counter()
        out.append(tok)
        sys.stdout.write(stream.push(tok) if stream else f"{tok} ")
        sys.stdout.flush()
    t1 = time.perf_counter()
    print(file=sys.stdout)
    decode_s = t1 - t_first if t_first else 0.0
    rate = f"{(len(out) - 1) / decode_s:.1f} tokens/s" if len(out) > 1 and decode_s > 0 else "n/a"
    print(f"[{len(out)} tokens; first token {1e3 * ((t_first or t1) - t0):.0f} ms; decode {rate}; "
          f"{rt.source.loads} experts loaded from the pack]", file=sys.stderr)
    if a.print_ids:
        print(",".join(map(str, out)))
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate in process, reading experts straight from a pack (no servers)",
                       description="The runtime alone, for debugging: the text on stdout, timings on stderr.")
    _add_runtime_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (encoded with the pack's tokenizer)")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0: no cut (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="sample within the smallest set of tokens of this probability mass; 1: no cut (default: 1)")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: none, nondeterministic)")
    g.add_argument("--ignore-eos", action="store_true", help="go on past the model's end-of-sequence token")
    g.add_argument("--print-ids", action="store_true", help="also print the generated ids, comma-separated")
    g.set_defaults(func=_cmd_generate)


def _cmd_perplexity(a: argparse.Namespace) -> int:
    from .generate import SamplingError
    from .perplexity import perplexity
    from .runtime import load_local

    rt = load_local(a.pack, a.format, a.device, a.compute_form)
    if rt.tokenizer is None:
        raise SamplingError("this pack has no tokenizer")
    ids = rt.tokenizer.encode(Path(a.text).read_text())
    r = perplexity(rt.model, ids, window=a.window, max_tokens=a.max_tokens)
    print(f"{rt.source.fmt}\tperplexity {r.perplexity:.3f}\t({r.tokens_scored} tokens, {r.windows} windows)")
    return 0


def _add_perplexity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a pack on a text file (in process, no servers)")
    _add_runtime_args(p)
    p.add_argument("--text", required=True, help="UTF-8 text file to score (encoded with the pack's tokenizer)")
    p.add_argument("--window", type=int, default=512,
                   help="tokens per scored window (non-overlapping; default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=8192,
                   help="score at most this many tokens of the text (default: %(default)s)")
    p.set_defaults(func=_cmd_perplexity)


def _cmd_serve(a: argparse.Namespace) -> int:
    import logging

    from .config import build_config
    from .server import run

    cfg = build_config(a.config, flags_given(a, WorkerConfig))
    logging.basicConfig(level=cfg.log_level.upper(), format="[worker] %(levelname)s %(name)s: %(message)s")
    return run(cfg)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve", help="serve Generate over gRPC with a budgeted expert cache fed by an expert store",
        description="Every flag is a WorkerConfig key of the --config file too. Flags override the file, "
                    "which overrides the defaults shown. Sizes take KiB/MiB/GiB (or K/M/G) suffixes.",
    )
    add_config_flag(s, WorkerConfig, SECTION)
    add_flags(s, WorkerConfig, aliases={"expert_format": ("--format",)})
    s.set_defaults(func=_cmd_serve)


def _cmd_make_default_model(a: argparse.Namespace) -> int:
    from .default_model import ensure_default_checkpoint

    print(ensure_default_checkpoint(a.cache_dir, seed=a.seed, log=lambda m: print(m, file=sys.stderr)))
    return 0


def _add_make_default_model(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("make-default-model", help="make (or reuse) the built-in tiny random-weight Mixtral "
                                                  "checkpoint; prints its directory",
                       description="Writes CACHE_DIR/default-mixtral-v<version>-seed<seed> in Hugging Face layout "
                                   "(reused when complete). Its weights are random: its text is noise.")
    m.add_argument("cache_dir", metavar="CACHE_DIR", type=Path, help="directory to make the checkpoint in")
    m.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    m.set_defaults(func=_cmd_make_default_model)


def _lazy(module: str, function: str) -> Callable[[argparse._SubParsersAction], object]:
    """A subcommand whose parser lives in `module` (imported only when that subcommand is chosen)."""
    def add(sub: argparse._SubParsersAction) -> object:
        return getattr(importlib.import_module(module, __package__), function)(sub)

    return add


COMMANDS: dict[str, tuple[str, Callable[[argparse._SubParsersAction], object], bool]] = {
    # name: (help, adds its parser, heavy: the parser is built only when this subcommand is chosen)
    "serve": ("the worker server (gRPC Generate and GetStats) over an expert store", _add_serve, False),
    "generate": ("generate in process, reading experts straight from a pack", _add_generate, False),
    "perplexity": ("perplexity of a pack on a text file", _add_perplexity, False),
    "simulate": ("replay expert traces through the cache policies (Belady's optimum as the bound) and "
                 "project decode speed", _lazy(".simulator", "add_simulate_parser"), True),
    "analyze": ("report, plots and a learned allocation (--allocation learned:PATH) from traces",
                _lazy(".analysis", "add_analyze_parser"), True),
    "make-default-model": ("make (or reuse) the built-in tiny random-weight checkpoint",
                           _add_make_default_model, False),
}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; a heavy subcommand's own parser only when argv chooses it (else a one-line entry)."""
    ap = argparse.ArgumentParser(prog=prog_name("gpu_worker"), description="fate-moe worker")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    chosen = next((x for x in argv if not x.startswith("-")), None)
    for name, (help_text, add, heavy) in COMMANDS.items():
        if heavy and name != chosen:
            sub.add_parser(name, help=help_text, add_help=False)
        else:
            add(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser(argv).parse_args(argv)
    try:
        return a.func(a)
    except (FateError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
