"""`python -m client ...`: the command line of fate-moe's client.

    python -m client demo     # the README's run command: default model -> pack -> generation

`generate` (stream a generation from a running worker) and `stats` arrive with
the servers (issue 3); the subcommand layout leaves room for them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .demo import DEFAULT_PROMPT, DemoConfig, run_demo


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _cmd_demo(a: argparse.Namespace) -> int:
    cfg = DemoConfig(
        prompt=a.prompt,
        max_new_tokens=a.max_new_tokens,
        cache_dir=a.cache_dir,
        checkpoint=a.checkpoint,
        device=a.device,
        seed=a.seed,
    )
    return run_demo(cfg)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m client", description="fate-moe client")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    d = sub.add_parser(
        "demo",
        help="make (or reuse) the built-in default model, pack it, generate from it",
        description="End to end on a fresh machine. The default model has random weights: its text is noise.",
    )
    d.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text")
    d.add_argument("--max-new-tokens", type=_positive_int, default=32, help="tokens to generate (default 32)")
    d.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a Hugging Face checkpoint directory to use instead of the random default model "
        "(e.g. ../shared/models/tiny-mixtral)",
    )
    d.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the default model and packs go (default: $FATE_MOE_CACHE, $XDG_CACHE_HOME/fate-moe, "
        "or .cache/fate-moe in the checkout)",
    )
    d.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    d.add_argument("--seed", type=int, default=0, help="seed of the default model's random weights")
    d.set_defaults(func=_cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
