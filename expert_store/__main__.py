"""Command line of the expert store: `python -m expert_store {pack,inspect,verify} ...` (or `fate-store`).

User errors (a bad checkpoint, a damaged pack, a wrong path) print one line
`error: ...` on stderr and exit 2, without a traceback: the message already
says what to do. Only bugs show a traceback. `verify` exits 1 when the pack is
corrupt. Each subcommand is one `_add_*` function; `serve` joins them later.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from gpu_worker.model_args import ModelConfigError

from .codec import CodecError
from .errors import FateError
from .pack import DEFAULT_FORMATS, write_pack
from .packfile import Pack

EXIT_OK, EXIT_CORRUPT, EXIT_USER_ERROR = 0, 1, 2
USER_ERRORS: tuple[type[BaseException], ...] = (FateError, ModelConfigError, CodecError, OSError)

Command = Callable[[argparse.Namespace], int]


def _cmd_pack(ns: argparse.Namespace) -> int:
    formats = [f for f in ns.formats.split(",") if f.strip()]
    write_pack(ns.checkpoint_dir, ns.out_dir, formats=formats, force=ns.force, progress=not ns.no_progress)
    return EXIT_OK


def _cmd_inspect(ns: argparse.Namespace) -> int:
    with Pack.open(ns.pack) as pack:
        print(pack.summary())
    return EXIT_OK


def _cmd_verify(ns: argparse.Namespace) -> int:
    with Pack.open(ns.pack) as pack:
        problems = pack.verify(progress=not ns.no_progress)
        blobs = len(pack.expert_ids) * len(pack.formats)
    if problems:
        for p in problems:
            print(f"corrupt: {p}")
        print(f"error: {ns.pack}: {len(problems)} problem(s) in {blobs} blobs + dense file; re-pack the checkpoint",
              file=sys.stderr)
        return EXIT_CORRUPT
    print(f"ok: {ns.pack}: {blobs} expert blobs and the dense file match their checksums")
    return EXIT_OK


def _add_pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="pack a Hugging Face checkpoint directory into a pack directory")
    p.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR", help="directory with config.json and *.safetensors")
    p.add_argument("out_dir", metavar="OUT_DIR", help="pack directory to create (must not exist unless --force)")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                   help="comma-separated expert formats from bf16,int8,int4,int2 (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it is an existing pack")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pack)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="describe a pack: model, layers, experts, formats, sizes")
    p.add_argument("pack", metavar="PACK")
    p.set_defaults(func=_cmd_inspect)


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check every expert blob and the dense file against their checksums")
    p.add_argument("pack", metavar="PACK")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_verify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m expert_store", description="fate-moe expert store")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_pack, _add_inspect, _add_verify):  # `serve` adds its own _add_serve here
        add(sub)
    return parser


class _CliHandler(logging.Handler):
    """Info lines as they are on stdout; warnings and worse on stderr, prefixed with their level.

    Looks up sys.stdout/sys.stderr at each record, so redirection (tests, capture) is honoured.
    """

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.levelno < logging.WARNING:
            print(msg, file=sys.stdout, flush=True)
        else:
            print(f"{record.levelname.lower()}: {msg}", file=sys.stderr, flush=True)


def _setup_logging() -> None:
    log = logging.getLogger("expert_store")
    if any(isinstance(h, _CliHandler) for h in log.handlers):  # main() may run more than once per process
        return
    log.addHandler(_CliHandler())
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    _setup_logging()
    func: Command = ns.func
    try:
        return func(ns)
    except USER_ERRORS as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
