"""Settings of the store server: one frozen dataclass, filled by a TOML file and CLI flags.

Precedence: the dataclass defaults, then the TOML file (`--config store.toml`), then flags
given on the command line. The TOML file holds StoreConfig's field names as keys
(`ram_bytes = "4GiB"`, `listen = "unix:/run/fate-moe/store.sock"`), either at the top level
or in a `[store]` table; when a `[store]` table is present only it is read, so one deploy
file can also carry a `[worker]` table for the worker. An unknown key is an error that names
it. Relative paths in the file are relative to the file's directory. Sizes are integers
(bytes) or strings with a unit: "512MiB", "4GiB", "1.5G" (powers of 1024 for KiB/MiB/GiB, of
1000 for K/M/G). The flags and the TOML keys come from the fields (expert_store.settings):
adding a setting is adding a field with its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Mapping

from .settings import (
    FORMAT_NAMES,
    LOG_LEVELS,
    Choices,
    ConfigError,
    ListenAddress,
    Size,
    build,
    check,
    check_settings,
    parse_size,
    read_toml,
)

__all__ = ["DEFAULT_LISTEN", "FORMAT_NAMES", "ConfigError", "StoreConfig", "build_config", "load_toml", "parse_size"]

DEFAULT_LISTEN = "unix:/run/fate-moe/store.sock"
SECTION = "store"


@dataclass(frozen=True)
class StoreConfig:
    pack: Path
    """Pack directory to serve (written by `python -m expert_store pack`)."""

    listen: ListenAddress = DEFAULT_LISTEN
    """Address to serve on: `host:port` (port 0 picks a free one) or `unix:/path/to.sock`."""

    ram_bytes: Size = 1 << 30
    """Size of the RAM tier (one shared-memory segment); 0: NVMe tier only. Capped at what the served
    formats of every expert need; must fit the free space of /dev/shm."""

    formats: Annotated[tuple[str, ...], Choices(FORMAT_NAMES)] = ()
    """Expert formats to serve, a subset of the pack's; empty: all of the pack's. The RAM tier's slot
    size is the largest served blob, so serving only small formats makes more slots."""

    preferred_format: Annotated[str | None, Choices(FORMAT_NAMES)] = None
    """Format the RAM tier is filled with first at start-up; None: int4 if served, else the smallest."""

    popularity: Path | None = None
    """JSON popularity profile giving the RAM tier's start-up fill order (see tiers.load_popularity);
    None: shallow MoE layers first."""

    lease_ttl_ms: int = 30_000
    """Default lifetime of a shared-memory lease (when a request asks for 0)."""

    max_lease_ttl_ms: int = 300_000
    """Longest lease a request may ask for; longer asks are granted this."""

    chunk_bytes: Size = 1 << 20
    """Default chunk size of streamed replies (when a request asks for 0)."""

    max_chunk_bytes: Size = 4 << 20
    """Largest chunk the store sends; larger asks are cut to this."""

    zstd_level: int = 1
    """zstd level for replies when the client accepts zstd; 0 disables compression."""

    zstd_min_saving: float = 0.1
    """A chunk goes compressed only if that saves at least this fraction of its bytes."""

    io_threads: int = 4
    """Threads for blocking reads, copies and compression (the event loop never reads the disk)."""

    prefetch_queue: int = 1024
    """Experts waiting for background promotion at most; hints beyond it are dropped."""

    hint_wait_ms: float = 20.0
    """How long a store hint that finds no slot it may take (every evictable one holds an expert other
    hints brought in that no one has read yet) keeps retrying before it is dropped; 0: dropped at once."""

    promote_on_grpc_miss: bool = True
    """After FetchExperts serves an expert from NVMe, promote it into RAM in the background."""

    verify_on_start: bool = True
    """Check every blob and the dense file against the manifest before serving. Off: each blob is
    still checked on its first read."""

    cold: bool = False
    """After start-up, drop experts.bin from the page cache (posix_fadvise DONTNEED), so NVMe-tier
    reads are real disk reads: for honest cold measurements."""

    nvme_uncached: bool = False
    """Drop each blob's pages from the page cache right after the NVMe tier read it (posix_fadvise
    DONTNEED), so every NVMe read stays a disk read, as on a host whose page cache cannot hold the
    pack (`cold` empties it only once): for measurements of the disk tier."""

    grace_s: float = 5.0
    """On SIGTERM/SIGINT, how long in-flight RPCs get to finish before they are cancelled."""

    max_message_bytes: Size = 64 << 20
    """gRPC send/receive message size limit (the manifest JSON of a large model exceeds the 4 MiB
    default)."""

    log_level: Annotated[str, Choices(LOG_LEVELS)] = "info"
    """Logging level: debug, info, warning, error."""

    max_keys_per_fetch: int = 4096
    """Experts one FetchExperts / FetchExpertsShm / Prefetch request may name at most; more is
    INVALID_ARGUMENT before any work (a worker asks for one layer's experts at a time)."""

    max_request_bytes: Size = 1 << 20
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
        check_settings(self)
        check(self.ram_bytes >= 0, "ram_bytes", self.ram_bytes, "must be >= 0")
        check(self.lease_ttl_ms > 0, "lease_ttl_ms", self.lease_ttl_ms, "must be > 0")
        check(self.max_lease_ttl_ms >= self.lease_ttl_ms, "max_lease_ttl_ms", self.max_lease_ttl_ms,
              f"must be >= lease_ttl_ms ({self.lease_ttl_ms})")
        check(4096 <= self.chunk_bytes <= self.max_chunk_bytes, "chunk_bytes", self.chunk_bytes,
              f"must be between 4096 and max_chunk_bytes ({self.max_chunk_bytes})")
        check(self.max_chunk_bytes + (1 << 16) <= self.max_message_bytes, "max_chunk_bytes", self.max_chunk_bytes,
              f"must leave 64 KiB of room under max_message_bytes ({self.max_message_bytes})")
        check(0 <= self.zstd_level <= 22, "zstd_level", self.zstd_level, "must be 0 (off) to 22")
        check(0.0 <= self.zstd_min_saving < 1.0, "zstd_min_saving", self.zstd_min_saving, "must be in [0, 1)")
        check(1 <= self.io_threads <= 64, "io_threads", self.io_threads, "must be 1..64")
        check(self.prefetch_queue >= 0, "prefetch_queue", self.prefetch_queue, "must be >= 0")
        check(self.hint_wait_ms >= 0, "hint_wait_ms", self.hint_wait_ms, "must be >= 0")
        check(self.grace_s >= 0, "grace_s", self.grace_s, "must be >= 0")
        check(self.max_keys_per_fetch >= 1, "max_keys_per_fetch", self.max_keys_per_fetch, "must be >= 1")
        check(self.max_request_bytes >= 4096, "max_request_bytes", self.max_request_bytes, "must be >= 4096")
        check(self.max_leases_per_client >= 1, "max_leases_per_client", self.max_leases_per_client, "must be >= 1")


def load_toml(path: str | Path) -> dict[str, Any]:
    """The StoreConfig keys of a TOML file (top level, or its [store] table), converted and checked."""
    return read_toml(StoreConfig, path, SECTION)


def build_config(toml_path: str | Path | None, overrides: Mapping[str, Any]) -> StoreConfig:
    """Defaults < TOML file < overrides (flags given on the command line; None: not given)."""
    return build(StoreConfig, toml_path, SECTION, overrides)
