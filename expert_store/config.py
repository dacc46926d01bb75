"""Configuration of the store server: one frozen dataclass, filled by a TOML file and CLI flags.

Precedence: the dataclass defaults, then the TOML file (`--config store.toml`),
then flags given on the command line. The TOML file holds StoreConfig's field
names as keys (`ram_bytes = "4GiB"`, `listen = "unix:/run/fate-moe/store.sock"`),
either at the top level or in a `[store]` table; when a `[store]` table is present
only it is read, so one deploy file can also carry a `[worker]` table for the
worker. An unknown key is an error that names it. Relative paths in the file are
relative to the file's directory. Sizes are integers (bytes) or strings with a
unit: "512MiB", "4GiB", "1.5G" (powers of 1024 for KiB/MiB/GiB, of 1000 for K/M/G).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping

from .errors import FateError

DEFAULT_LISTEN = "unix:/run/fate-moe/store.sock"
FORMAT_NAMES: tuple[str, ...] = ("bf16", "int8", "int4", "int2")


class ConfigError(FateError):
    """A bad flag value or config file; the message names the key and what is allowed."""


@dataclass(frozen=True)
class StoreConfig:
    pack: Path
    """Pack directory to serve (written by `python -m expert_store pack`)."""

    listen: str = DEFAULT_LISTEN
    """Address to serve on: `host:port` (port 0 picks a free one) or `unix:/path/to.sock`."""

    ram_bytes: int = 1 << 30
    """Size of the RAM tier (one shared-memory segment); 0: NVMe tier only. Capped at what the served
    formats of every expert need; must fit the free space of /dev/shm."""

    formats: tuple[str, ...] = ()
    """Expert formats to serve, a subset of the pack's; empty: all of the pack's. The RAM tier's slot
    size is the largest served blob, so serving only small formats makes more slots."""

    preferred_format: str | None = None
    """Format the RAM tier is filled with first at start-up; None: int4 if served, else the smallest."""

    popularity: Path | None = None
    """JSON popularity profile giving the RAM tier's start-up fill order (see tiers.load_popularity);
    None: shallow MoE layers first."""

    lease_ttl_ms: int = 30_000
    """Default lifetime of a shared-memory lease (when a request asks for 0)."""

    max_lease_ttl_ms: int = 300_000
    """Longest lease a request may ask for; longer asks are granted this."""

    chunk_bytes: int = 1 << 20
    """Default chunk size of streamed replies (when a request asks for 0)."""

    max_chunk_bytes: int = 4 << 20
    """Largest chunk the store sends; larger asks are cut to this."""

    zstd_level: int = 1
    """zstd level for replies when the client accepts zstd; 0 disables compression."""

    zstd_min_saving: float = 0.1
    """A chunk goes compressed only if that saves at least this fraction of its bytes."""

    io_threads: int = 4
    """Threads for blocking reads, copies and compression (the event loop never reads the disk)."""

    prefetch_queue: int = 1024
    """Experts waiting for background promotion at most; hints beyond it are dropped."""

    promote_on_grpc_miss: bool = True
    """After FetchExperts serves an expert from NVMe, promote it into RAM in the background."""

    verify_on_start: bool = True
    """Check every blob and the dense file against the manifest before serving. Off: each blob is
    still checked on its first read."""

    cold: bool = False
    """After start-up, drop experts.bin from the page cache (posix_fadvise DONTNEED), so NVMe-tier
    reads are real disk reads: for honest cold measurements."""

    grace_s: float = 5.0
    """On SIGTERM/SIGINT, how long in-flight RPCs get to finish before they are cancelled."""

    max_message_bytes: int = 64 << 20
    """gRPC send/receive message size limit (the manifest JSON of a large model exceeds the 4 MiB
    default)."""

    log_level: str = "info"
    """Logging level: debug, info, warning, error."""

    max_keys_per_fetch: int = 4096
    """Experts one FetchExperts / FetchExpertsShm / Prefetch request may name at most; more is
    INVALID_ARGUMENT before any work (a worker asks for one layer's experts at a time)."""

    max_request_bytes: int = 1 << 20
    """Largest request message the store accepts (replies may be up to max_message_bytes); a larger
    one is refused by gRPC with RESOURCE_EXHAUSTED before it is parsed."""

    max_leases_per_client: int = 65536
    """Shared-memory leases one client may hold at once; asking for more is RESOURCE_EXHAUSTED."""

    tls_cert: Path | None = None
    """PEM certificate chain for TLS on a TCP listener; None: no TLS (a warning on TCP)."""

    tls_key: Path | None = None
    """PEM private key of tls_cert."""

    tls_client_ca: Path | None = None
    """PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS)."""

    auth_token_file: Path | None = None
    """File holding the bearer token every call but health checks must carry
    (`authorization: Bearer <token>`); None: no token (a warning on TCP)."""

    def __post_init__(self) -> None:
        _check(self.ram_bytes >= 0, "ram_bytes", self.ram_bytes, "must be >= 0")
        for f in self.formats:
            _check(f in FORMAT_NAMES, "formats", f, f"formats are {', '.join(FORMAT_NAMES)}")
        _check(self.preferred_format is None or self.preferred_format in FORMAT_NAMES,
               "preferred_format", self.preferred_format, f"choose from {', '.join(FORMAT_NAMES)}")
        _check(self.lease_ttl_ms > 0, "lease_ttl_ms", self.lease_ttl_ms, "must be > 0")
        _check(self.max_lease_ttl_ms >= self.lease_ttl_ms, "max_lease_ttl_ms", self.max_lease_ttl_ms,
               f"must be >= lease_ttl_ms ({self.lease_ttl_ms})")
        _check(4096 <= self.chunk_bytes <= self.max_chunk_bytes, "chunk_bytes", self.chunk_bytes,
               f"must be between 4096 and max_chunk_bytes ({self.max_chunk_bytes})")
        _check(self.max_chunk_bytes + (1 << 16) <= self.max_message_bytes, "max_chunk_bytes", self.max_chunk_bytes,
               f"must leave 64 KiB of room under max_message_bytes ({self.max_message_bytes})")
        _check(0 <= self.zstd_level <= 22, "zstd_level", self.zstd_level, "must be 0 (off) to 22")
        _check(0.0 <= self.zstd_min_saving < 1.0, "zstd_min_saving", self.zstd_min_saving, "must be in [0, 1)")
        _check(1 <= self.io_threads <= 64, "io_threads", self.io_threads, "must be 1..64")
        _check(self.prefetch_queue >= 0, "prefetch_queue", self.prefetch_queue, "must be >= 0")
        _check(self.grace_s >= 0, "grace_s", self.grace_s, "must be >= 0")
        _check(self.max_keys_per_fetch >= 1, "max_keys_per_fetch", self.max_keys_per_fetch, "must be >= 1")
        _check(self.max_request_bytes >= 4096, "max_request_bytes", self.max_request_bytes, "must be >= 4096")
        _check(self.max_leases_per_client >= 1, "max_leases_per_client", self.max_leases_per_client, "must be >= 1")
        _check(self.log_level.lower() in ("debug", "info", "warning", "error"), "log_level", self.log_level,
               "choose from debug, info, warning, error")
        _check_listen(self.listen)


_FIELDS = {f.name: f for f in dataclasses.fields(StoreConfig)}
_SIZE_FIELDS = {"ram_bytes", "chunk_bytes", "max_chunk_bytes", "max_message_bytes", "max_request_bytes"}
_PATH_FIELDS = {"pack", "popularity", "tls_cert", "tls_key", "tls_client_ca", "auth_token_file"}
_BOOL_FIELDS = {"promote_on_grpc_miss", "verify_on_start", "cold"}
_INT_FIELDS = {"lease_ttl_ms", "max_lease_ttl_ms", "zstd_level", "io_threads", "prefetch_queue", "max_keys_per_fetch",
               "max_leases_per_client"}
_FLOAT_FIELDS = {"zstd_min_saving", "grace_s"}
_STR_FIELDS = {"listen", "preferred_format", "log_level"}

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int, name: str = "size") -> int:
    """Bytes from 123, "123", "64KiB", "1.5GiB", "2G"; a ConfigError naming `name` otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: {value!r} is not a size (give bytes, or a number with KiB/MiB/GiB)")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{name}: {value} is negative")
        return value
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{name}: {value!r} is not a size (examples: 1048576, 512MiB, 4GiB, 2G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def read_toml_table(path: str | Path, section: str, known: Collection[str]) -> tuple[dict[str, Any], str]:
    """The [section] table of a TOML file (or its top level when it has none), with every key in
    `known`; returns (table, where) with `where` naming the file and table for error messages.
    One reader for the store's and the worker's config, so a shared deploy file reads the same."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    table = data[section] if isinstance(data.get(section), dict) else data
    where = f"{path} [{section}]" if table is not data else str(path)
    unknown = sorted(k for k in table if k not in known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})")
    return table, where


def load_toml(path: str | Path) -> dict[str, Any]:
    """The StoreConfig keys of a TOML file (top level, or its [store] table), converted and checked."""
    table, where = read_toml_table(path, "store", _FIELDS)
    return {k: _convert(k, v, where, base=Path(path).parent) for k, v in table.items()}


def _convert(key: str, value: Any, where: str, base: Path | None) -> Any:
    """One TOML value to the field's type."""
    def bad(want: str) -> ConfigError:
        return ConfigError(f"{where}: {key} = {value!r}: expected {want}")

    if key in _SIZE_FIELDS:
        return parse_size(value, f"{where}: {key}")
    if key in _PATH_FIELDS:
        if not isinstance(value, str) or not value:
            raise bad("a path string")
        p = Path(value).expanduser()
        return p if p.is_absolute() or base is None else base / p
    if key in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if key in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if key in _STR_FIELDS:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if key == "formats":
        if isinstance(value, str):
            value = [v for v in value.split(",")]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad('a list of format names, e.g. ["int4", "int2"]')
        return tuple(v.strip() for v in value if v.strip())
    raise AssertionError(f"StoreConfig field {key} has no converter")  # a bug: a field added without one


def build_config(toml_path: str | Path | None, overrides: Mapping[str, Any]) -> StoreConfig:
    """Defaults < TOML file < overrides (the flags given on the command line, already typed)."""
    values: dict[str, Any] = load_toml(toml_path) if toml_path is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "pack" not in values:
        raise ConfigError("no pack to serve: give PACK on the command line or `pack = ...` in the config file")
    try:
        return StoreConfig(**values)
    except TypeError as e:  # a bug in the caller (an override that is no field)
        raise ConfigError(str(e)) from None


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {why}")


def _check_listen(listen: str) -> None:
    if listen.startswith("unix:"):
        if not listen[len("unix:"):]:
            raise ConfigError(f"listen = {listen!r}: give a socket path after unix:")
        return
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        hint = f" (a socket path needs the scheme: unix:{listen})" if "/" in listen else ""
        raise ConfigError(f"listen = {listen!r}: expected host:port (e.g. 127.0.0.1:50051) or "
                          f"unix:/path/to.sock{hint}")

