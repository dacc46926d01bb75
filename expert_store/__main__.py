"""Command line of the expert store: `python -m expert_store {pack,inspect,verify,serve} ...` (or `fate-store`).

User errors (a bad checkpoint, a damaged pack, a wrong path) print one line
`error: ...` on stderr and exit 2, without a traceback: the message already
says what to do. Only bugs show a traceback. `verify` exits 1 when the pack is
corrupt. Each subcommand is one `_add_*` function. `serve` runs until SIGTERM or
SIGINT and then exits 0; its flags and a `--config` TOML file fill the same
`StoreConfig` (flags win).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable

from .config import SECTION, StoreConfig, build_config
from .errors import FateError
from .settings import FORMAT_NAMES, add_config_flag, add_flags, flags_given, prog_name

EXIT_OK, EXIT_CORRUPT, EXIT_USER_ERROR = 0, 1, 2
DEFAULT_PACK_FORMATS = "int4,int2"  # expert_store.pack.DEFAULT_FORMATS (a test keeps them equal)

Command = Callable[[argparse.Namespace], int]


def _cmd_pack(ns: argparse.Namespace) -> int:
    from .pack import write_pack  # torch and the codec only for the subcommands that need them

    formats = [f.strip() for f in ns.formats.split(",") if f.strip()]
    force = ns.force
    if ns.reuse and Path(ns.out_dir).exists():
        from .packfile import Pack

        try:
            with Pack.open(ns.out_dir) as pack:
                if all(f in pack.formats for f in formats):
                    print(f"reusing the pack {ns.out_dir} (it has {', '.join(formats)})")
                    return EXIT_OK
        except FateError as e:
            print(f"{ns.out_dir} is unusable ({' '.join(str(e).split())}); packing it again")
        force = True  # a pack of other formats, or a damaged one (write_pack still refuses a non-pack)
    write_pack(ns.checkpoint_dir, ns.out_dir, formats=formats, force=force, progress=not ns.no_progress)
    return EXIT_OK


def _cmd_inspect(ns: argparse.Namespace) -> int:
    from .packfile import Pack

    with Pack.open(ns.pack) as pack:
        if ns.json:
            a = pack.args
            print(json.dumps({
                "pack": str(pack.path), "model": pack.name, "family": a.family, "moe_layers": list(a.moe_layers),
                "experts_per_layer": a.num_experts, "top_k": a.top_k, "experts": len(pack.expert_ids),
                "expert_bytes": {f: pack.expert_nbytes(f) for f in pack.formats},
            }))  # fmt: skip
        else:
            print(pack.summary())
    return EXIT_OK


def _cmd_verify(ns: argparse.Namespace) -> int:
    from .packfile import Pack

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
    p.add_argument("--formats", default=DEFAULT_PACK_FORMATS,
                   help=f"comma-separated expert formats from {','.join(FORMAT_NAMES)} (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it is an existing pack")
    p.add_argument("--reuse", action="store_true",
                   help="keep OUT_DIR when it is a complete pack with these formats; else (re)pack it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pack)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="describe a pack: model, layers, experts, formats, sizes")
    p.add_argument("pack", metavar="PACK", help="pack directory (written by `pack`)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object: model, layers, experts and each format's bytes per expert")
    p.set_defaults(func=_cmd_inspect)


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check every expert blob and the dense file against their checksums")
    p.add_argument("pack", metavar="PACK", help="pack directory (written by `pack`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_verify)


def _cmd_serve(ns: argparse.Namespace) -> int:
    from .server import serve  # grpc and the server stack only for this subcommand

    return serve(build_config(ns.config, flags_given(ns, StoreConfig)))


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a pack over gRPC (and shared memory to co-located workers) until SIGTERM",
        description="Every flag is a StoreConfig key of the --config file too. Flags override the file, which "
                    "overrides the defaults shown. Sizes take KiB/MiB/GiB (or K/M/G) suffixes.",
    )
    add_config_flag(p, StoreConfig, SECTION)
    add_flags(p, StoreConfig, positional=("pack",))
    p.set_defaults(func=_cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog_name("expert_store"), description="fate-moe expert store")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_pack, _add_inspect, _add_verify, _add_serve):
        add(sub)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user causes: printed as one line, never a traceback."""
    errors: list[type[BaseException]] = [FateError, OSError]  # ModelConfigError is a FateError
    codec = sys.modules.get("expert_store.codec")  # loaded (with torch) only by the commands that use it
    if codec is not None:
        errors.append(codec.CodecError)
    return tuple(errors)


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
    except user_errors() as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
