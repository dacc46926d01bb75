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
import logging
import sys
from pathlib import Path
from typing import Callable

from .model_args import ModelConfigError

from .codec import CodecError
from .config import ConfigError, StoreConfig, build_config, parse_size
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


def _cmd_serve(ns: argparse.Namespace) -> int:
    from .server import serve  # grpc and the server stack only for this subcommand

    overrides = {k: v for k, v in vars(ns).items() if k in StoreConfig.__dataclass_fields__ and v is not None}
    return serve(build_config(ns.config, overrides))


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _formats_arg(text: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in text.split(",") if f.strip())


def _add_serve(sub: argparse._SubParsersAction) -> None:
    d = StoreConfig.__dataclass_fields__
    p = sub.add_parser(
        "serve", help="serve a pack over gRPC (and shared memory to co-located workers) until SIGTERM",
        description="Flags override the --config file, which overrides the defaults shown. Sizes take "
                    "KiB/MiB/GiB (or K/M/G) suffixes.",
    )
    p.add_argument("pack", metavar="PACK", nargs="?", type=Path, default=None,
                   help="pack directory (or `pack = ...` in the config file)")
    p.add_argument("--config", type=Path, default=None, metavar="TOML",
                   help="TOML file with StoreConfig keys, top level or in a [store] table")
    p.add_argument("--listen", default=None, help=f"host:port or unix:/path (default {d['listen'].default})")
    p.add_argument("--ram-bytes", type=_size_arg, default=None,
                   help=f"RAM tier size, 0 for NVMe only (default {d['ram_bytes'].default})")
    p.add_argument("--formats", type=_formats_arg, default=None,
                   help="comma-separated formats to serve (default: all of the pack's)")
    p.add_argument("--preferred-format", default=None, help="format the RAM tier is filled with first (default int4)")
    p.add_argument("--popularity", type=Path, default=None,
                   help='JSON profile for the RAM fill order: {"layer:expert": count} or [[layer, expert], ...]')
    p.add_argument("--lease-ttl-ms", type=int, default=None, help=f"default {d['lease_ttl_ms'].default}")
    p.add_argument("--max-lease-ttl-ms", type=int, default=None, help=f"default {d['max_lease_ttl_ms'].default}")
    p.add_argument("--chunk-bytes", type=_size_arg, default=None, help=f"default {d['chunk_bytes'].default}")
    p.add_argument("--max-chunk-bytes", type=_size_arg, default=None, help=f"default {d['max_chunk_bytes'].default}")
    p.add_argument("--zstd-level", type=int, default=None, help="0 disables compression (default 1)")
    p.add_argument("--zstd-min-saving", type=float, default=None,
                   help="compress a chunk only if that saves this fraction (default 0.1)")
    p.add_argument("--io-threads", type=int, default=None, help=f"default {d['io_threads'].default}")
    p.add_argument("--prefetch-queue", type=int, default=None, help=f"default {d['prefetch_queue'].default}")
    p.add_argument("--promote-on-grpc-miss", action=argparse.BooleanOptionalAction, default=None,
                   help="promote experts served from NVMe over gRPC into RAM in the background (default on)")
    p.add_argument("--verify-on-start", action=argparse.BooleanOptionalAction, default=None,
                   help="check every blob before serving (default on; off: on first read)")
    p.add_argument("--cold", action=argparse.BooleanOptionalAction, default=None,
                   help="drop experts.bin from the page cache after start-up (honest cold reads)")
    p.add_argument("--grace-s", type=float, default=None, help=f"default {d['grace_s'].default}")
    p.add_argument("--max-message-bytes", type=_size_arg, default=None,
                   help=f"default {d['max_message_bytes'].default}")
    p.add_argument("--log-level", default=None, choices=("debug", "info", "warning", "error"))
    p.add_argument("--max-keys-per-fetch", type=int, default=None,
                   help=f"experts one request may name (default {d['max_keys_per_fetch'].default})")
    p.add_argument("--max-request-bytes", type=_size_arg, default=None,
                   help=f"largest request message (default {d['max_request_bytes'].default})")
    p.add_argument("--max-leases-per-client", type=int, default=None,
                   help=f"shared-memory leases one client may hold (default {d['max_leases_per_client'].default})")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain: TLS on a TCP listener")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, default=None, help="PEM CA: require client certificates it signed")
    p.add_argument("--auth-token-file", type=Path, default=None, help="file with the bearer token callers must send")
    p.set_defaults(func=_cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m expert_store", description="fate-moe expert store")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_pack, _add_inspect, _add_verify, _add_serve):
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
