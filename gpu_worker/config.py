"""Configuration of the worker server: one frozen dataclass, filled by a TOML file and CLI flags.

Precedence: the dataclass defaults, then the TOML file (`--config worker.toml`),
then flags given on the command line. The file holds WorkerConfig's field names as
keys, at the top level or in a `[worker]` table (when a `[worker]` table is present
only it is read, so one deploy file can also carry the store's `[store]` table). An
unknown key is an error that names it. Sizes are integers (bytes) or strings with a
unit ("512MiB", "2GiB"); the budget may also be a share of the pack's expert bytes
in the chosen format ("25%"), resolved once the store's manifest is known.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from expert_store.config import ConfigError, parse_size, read_toml_table

from .policies import ALLOCATION_NAMES, POLICY_NAMES
from .predictors import PREDICTOR_NAMES

DEFAULT_LISTEN = "unix:/run/fate-moe/worker.sock"
FORMAT_NAMES = ("bf16", "int8", "int4", "int2")
COMPUTE_FORMS = ("fp32", "bf16", "int4_fused", "dequant_per_use")
TRANSPORTS = ("auto", "shm", "grpc")
POLICIES = POLICY_NAMES
PREDICTORS = PREDICTOR_NAMES
ALLOCATIONS = ALLOCATION_NAMES

__all__ = ["ConfigError", "WorkerConfig", "build_config", "load_toml", "parse_budget", "resolve_budget"]


@dataclass(frozen=True)
class WorkerConfig:
    store: str
    """Address of the expert store: `host:port` or `unix:/path/to.sock`."""

    listen: str = DEFAULT_LISTEN
    """Address to serve Generate on: `host:port` (port 0 picks a free one) or `unix:/path/to.sock`."""

    budget_bytes: int | str = "100%"
    """Expert-cache budget on the device, never exceeded: bytes (an int or "512MiB") or a share of the
    pack's expert bytes in `expert_format` ("25%"). Below the minimum (one layer's top-k experts) the
    worker refuses to start and prints the minimum."""

    expert_format: str | None = None
    """Stored expert format to fetch: bf16, int8, int4, int2; None: int4 when the store has it."""

    compute_form: str | None = None
    """How cached experts are held and computed (fp32, bf16, int4_fused, dequant_per_use); None: the
    device's default for the format (gpu_worker.expert_compute.default_compute_form)."""

    device: str = "auto"
    """auto (cuda when present), cpu, cuda, cuda:N."""

    transport: str = "auto"
    """How experts travel from the store: shm (shared memory, co-located only), grpc, or auto (shm when
    co-located)."""

    metrics_port: int = 0
    """Port of the Prometheus HTTP endpoint; 0: off."""

    metrics_host: str = "127.0.0.1"
    """Address the metrics endpoint binds."""

    max_batch_size: int = 8
    """Sequences in one decode step at most; more requests wait in the queue."""

    max_queue: int = 64
    """Requests waiting for a batch slot at most; beyond it Generate answers RESOURCE_EXHAUSTED."""

    default_max_new_tokens: int = 128
    """max_new_tokens of a request that sends 0."""

    threads: int = 1
    """torch.set_num_threads for the compute thread. 1 by default: on a small shared CPU, 2 threads on
    tiny matrices measured 10-40x slower per decode step than 1 (synchronisation under load)."""

    policy: str = "lru"
    """Cache replacement policy per MoE layer: lru, lfu, lfu_decay, arc (Fate: arc)."""

    lfu_decay: float = 0.9
    """lfu_decay's factor: every count is multiplied by it at each forward step, in (0, 1]."""

    allocation: str = "uniform"
    """How the budget's slots are split across MoE layers: uniform, shallow_favoring (Fate: the first
    `full_layers` MoE layers fully resident, the rest split evenly over the deeper ones), or
    learned:PATH (a fate-allocation/1 file written by `python -m gpu_worker analyze`)."""

    full_layers: int = 4
    """shallow_favoring: MoE layers kept fully resident (capped by the budget: fewer fit, fewer are)."""

    staging_slots: int | str = "auto"
    """Expert units of the budget set aside for prefetched experts not used yet (and a layer's misses beyond
    its slots): a count, or "auto" (predictor none: 0; else one layer's experts, at most half the budget)."""

    predictor: str = "none"
    """Expert predictor for prefetching: none (load on demand), cross_layer (Fate), eap (MoE-Infinity's
    expert activation paths), prev_token."""

    prefetch_width: int = 0
    """Experts proposed per token row (decode); 0: measured at start-up as max(top_k, floor(layer compute
    time / one expert's fetch + build time)) and tracked online."""

    lookahead: int = 1
    """Layers ahead the predictor proposes: 1 (layer l + 1 from layer l's gate input) or 2 (also l + 2)."""

    throttle: bool = True
    """Narrow the measured width when prefetched experts go unused or the prefetch queue backs up."""

    prefetch_sync: bool = False
    """Analysis only: run each prefetch to completion on the compute thread as soon as it is proposed (no
    prefetch thread). The hit rate is then that of an infinitely fast link; decoding is slower."""

    int2_tail: float = 0.0
    """Prefill: the least popular experts carrying up to this share of the prompt's token assignments are
    fetched as INT2 when they miss (used once, never cached); 0: off (the default). LOSSY and opt-in: with
    it, the output depends on what the cache held, so two identical greedy requests can differ. Needs the
    store to serve int2."""

    worker_id: str = ""
    """This worker's id (its client_id at the store, its leases' owner); empty: worker-<pid>-<random>."""

    store_wait_s: float = 60.0
    """How long start-up waits for the store to report SERVING."""

    grace_s: float = 10.0
    """On SIGTERM/SIGINT, how long in-flight requests get to finish before they end with UNAVAILABLE."""

    log_level: str = "info"
    """Logging level: debug, info, warning, error."""
    trace_dir: str = ""
    """Directory to write expert-activation traces (moe-trace/1, docs/traces.md) into; empty: off."""
    trace_every: int = 0
    """With trace_dir: one trace file per this many finished requests; 0: one file per session."""

    store_retry_s: float = 15.0
    """How long in-flight requests wait for an unreachable store (a restart) before they fail with
    UNAVAILABLE: their KV state is kept, fetches retry with backoff, and the store's manifest is checked
    again when it is back (another pack: FAILED_PRECONDITION, NOT_SERVING, and the worker exits 3 so its
    supervisor restarts it on the new pack). 0: fail after a few quick retries."""

    max_request_bytes: int = 1 << 20
    """Largest Generate request message accepted; gRPC refuses a larger one (RESOURCE_EXHAUSTED) before
    it is parsed."""

    max_prompt_bytes: int = 0
    """Largest prompt text in UTF-8 bytes, checked before tokenizing (OUT_OF_RANGE above it); 0: 32 bytes
    per token of the model's context (no ordinary text that fits the context is longer)."""

    max_stop_strings: int = 16
    """Stop strings one request may send at most."""

    max_stop_string_bytes: int = 256
    """Longest stop string, in UTF-8 bytes."""

    tls_cert: str = ""
    """PEM certificate chain for TLS on a TCP listener; empty: no TLS (a warning on TCP)."""

    tls_key: str = ""
    """PEM private key of tls_cert."""

    tls_client_ca: str = ""
    """PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS)."""

    auth_token_file: str = ""
    """File holding the bearer token every Generate/GetStats call must carry (`authorization: Bearer
    <token>`; health checks need none); empty: no token (a warning on TCP)."""

    store_tls_ca: str = ""
    """PEM CA that signed the store's certificate: set it to reach a store that listens with TLS."""

    store_tls_cert: str = ""
    """PEM client certificate for a store that requires one (with store_tls_key)."""

    store_tls_key: str = ""
    """PEM private key of store_tls_cert."""

    store_auth_token_file: str = ""
    """File holding the store's bearer token; empty: send none."""

    def __post_init__(self) -> None:
        if not self.store:
            raise ConfigError("store: give the expert store's address (--store host:port or unix:/path)")
        parse_budget(self.budget_bytes)
        _check(self.expert_format is None or self.expert_format in FORMAT_NAMES, "expert_format",
               self.expert_format, f"choose from {', '.join(FORMAT_NAMES)}")
        _check(self.compute_form is None or self.compute_form in COMPUTE_FORMS, "compute_form",
               self.compute_form, f"choose from {', '.join(COMPUTE_FORMS)}")
        _check(self.transport in TRANSPORTS, "transport", self.transport, f"choose from {', '.join(TRANSPORTS)}")
        _check(0 <= self.metrics_port <= 65535, "metrics_port", self.metrics_port, "must be 0 (off) to 65535")
        _check(1 <= self.max_batch_size <= 1024, "max_batch_size", self.max_batch_size, "must be 1..1024")
        _check(self.max_queue >= 0, "max_queue", self.max_queue, "must be >= 0")
        _check(self.default_max_new_tokens >= 1, "default_max_new_tokens", self.default_max_new_tokens,
               "must be >= 1")
        _check(1 <= self.threads <= 256, "threads", self.threads, "must be 1..256")
        _check(self.policy in POLICIES, "policy", self.policy, f"choose from {', '.join(POLICIES)}")
        _check(self.predictor in PREDICTORS, "predictor", self.predictor, f"choose from {', '.join(PREDICTORS)}")
        _check(self.allocation in ALLOCATIONS or self.allocation.startswith("learned:"), "allocation",
               self.allocation, f"choose from {', '.join(ALLOCATIONS)}, or learned:PATH")
        _check(0.0 < self.lfu_decay <= 1.0, "lfu_decay", self.lfu_decay, "must be in (0, 1]")
        _check(self.full_layers >= 0, "full_layers", self.full_layers, "must be >= 0")
        _check(self.staging_slots == "auto" or (isinstance(self.staging_slots, int) and self.staging_slots >= 0),
               "staging_slots", self.staging_slots, 'must be "auto" or a count >= 0')
        _check(self.prefetch_width >= 0, "prefetch_width", self.prefetch_width, "must be >= 0 (0: measured)")
        _check(self.lookahead in (1, 2), "lookahead", self.lookahead, "must be 1 or 2")
        _check(0.0 <= self.int2_tail < 1.0, "int2_tail", self.int2_tail, "must be in [0, 1) (0: off)")
        _check(self.store_wait_s >= 0, "store_wait_s", self.store_wait_s, "must be >= 0")
        _check(self.store_retry_s >= 0, "store_retry_s", self.store_retry_s, "must be >= 0")
        _check(self.max_request_bytes >= 4096, "max_request_bytes", self.max_request_bytes, "must be >= 4096")
        _check(self.max_prompt_bytes >= 0, "max_prompt_bytes", self.max_prompt_bytes, "must be >= 0 (0: auto)")
        _check(self.max_stop_strings >= 0, "max_stop_strings", self.max_stop_strings, "must be >= 0")
        _check(self.max_stop_string_bytes >= 1, "max_stop_string_bytes", self.max_stop_string_bytes, "must be >= 1")
        _check(self.grace_s >= 0, "grace_s", self.grace_s, "must be >= 0")
        _check(self.log_level.lower() in ("debug", "info", "warning", "error"), "log_level", self.log_level,
               "choose from debug, info, warning, error")
        _check_address("listen", self.listen)
        _check_address("store", self.store)


def parse_budget(value: int | str) -> int | float:
    """Bytes (int) or a fraction of the expert bytes (float in (0, 1]) from 123, "512MiB", "25%"."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            pct = float(value.strip()[:-1])
        except ValueError:
            raise ConfigError(f"budget_bytes = {value!r}: expected a percentage like '25%'") from None
        if not 0 < pct <= 100 or math.isnan(pct):
            raise ConfigError(f"budget_bytes = {value!r}: a percentage must be in (0, 100]")
        return pct / 100.0
    return parse_size(value, "budget_bytes")


def resolve_staging(value: int | str, predictor: str, total_slots: int, num_experts: int) -> int:
    """Staging units: a count as given, or "auto": 0 without a predictor, else one layer's experts, at most
    half the budget's units."""
    if value != "auto":
        return min(int(value), total_slots)
    if predictor == "none":
        return 0
    return min(num_experts, total_slots // 2)


def resolve_budget(value: int | str, expert_bytes_total: int) -> int:
    """The budget in bytes, a percentage taken of `expert_bytes_total` (every expert in the format)."""
    b = parse_budget(value)
    return int(b * expert_bytes_total) if isinstance(b, float) else b


_FIELDS = {f.name: f for f in dataclasses.fields(WorkerConfig)}
_INT_FIELDS = {"metrics_port", "max_batch_size", "max_queue", "default_max_new_tokens", "threads", "full_layers",
               "prefetch_width", "lookahead", "trace_every", "max_request_bytes", "max_prompt_bytes",
               "max_stop_strings", "max_stop_string_bytes"}
_FLOAT_FIELDS = {"store_wait_s", "grace_s", "lfu_decay", "int2_tail", "store_retry_s"}
_BOOL_FIELDS = {"throttle", "prefetch_sync"}
_OPTIONAL_STR_FIELDS = {"expert_format", "compute_form"}


def load_toml(path: str | Path) -> dict[str, Any]:
    """The WorkerConfig keys of a TOML file (top level, or its [worker] table), type-checked."""
    table, where = read_toml_table(path, "worker", _FIELDS)
    return {k: _convert(k, v, where) for k, v in table.items()}


def _convert(key: str, value: Any, where: str) -> Any:
    def bad(want: str) -> ConfigError:
        return ConfigError(f"{where}: {key} = {value!r}: expected {want}")

    if key == "budget_bytes":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise bad('bytes, a size like "512MiB", or a share like "25%"')
        return value
    if key in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if key in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key == "staging_slots":
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise bad('"auto" or an integer')
    if key in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if not isinstance(value, str):
        raise bad("a string")
    if key in _OPTIONAL_STR_FIELDS and value in ("", "auto"):
        return None
    return value


def build_config(toml_path: str | Path | None, overrides: Mapping[str, Any]) -> WorkerConfig:
    """Defaults < TOML file < overrides (flags given on the command line, already typed; None = not given)."""
    values: dict[str, Any] = load_toml(toml_path) if toml_path is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if not values.get("store"):
        raise ConfigError("no store address: give --store ADDR or `store = ...` in the config file")
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}")
    return WorkerConfig(**values)


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {why}")


def _check_address(key: str, address: str) -> None:
    if address.startswith("unix:"):
        if not address[len("unix:"):]:
            raise ConfigError(f"{key} = {address!r}: give a socket path after unix:")
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        hint = f" (a socket path needs the scheme: unix:{address})" if "/" in address else ""
        raise ConfigError(f"{key} = {address!r}: expected host:port (e.g. 127.0.0.1:50061) or "
                          f"unix:/path/to.sock{hint}")
