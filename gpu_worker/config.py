"""Settings of the worker server: one frozen dataclass, filled by a TOML file and CLI flags.

Precedence: the dataclass defaults, then the TOML file (`--config worker.toml`), then flags
given on the command line. The file holds WorkerConfig's field names as keys, at the top
level or in a `[worker]` table (when a `[worker]` table is present only it is read, so one
deploy file can also carry the store's `[store]` table). An unknown key is an error that
names it. Sizes are integers (bytes) or strings with a unit ("512MiB", "2GiB"); the budget
may also be a share of the pack's expert bytes in the chosen format ("25%"), resolved once
the store's manifest is known. The flags and the TOML keys come from the fields (the store's
expert_store.settings converter): adding a setting is adding a field with its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Mapping

from expert_store.settings import (
    FORMAT_NAMES,
    LOG_LEVELS,
    Budget,
    Choices,
    ConfigError,
    CountOrAuto,
    ListenAddress,
    Size,
    build,
    check,
    check_address,
    check_settings,
    read_toml,
)

from .policy import ALLOCATION_NAMES, POLICY_NAMES
from .policy.predictors import PREDICTOR_NAMES

__all__ = ["COMPUTE_FORMS", "Budget", "ConfigError", "WorkerConfig", "build_config", "load_toml", "resolve_budget",
           "resolve_staging"]

DEFAULT_LISTEN = "unix:/run/fate-moe/worker.sock"
SECTION = "worker"
COMPUTE_FORMS = ("fp32", "bf16", "int4_fused", "dequant_per_use")
"""How cached experts are held and computed (gpu_worker.expert_compute implements each)."""
TRANSPORTS = ("auto", "shm", "grpc")


@dataclass(frozen=True)
class WorkerConfig:
    """Every setting of the worker process (`python -m gpu_worker serve`)."""

    store: str
    """Address of the expert store: `host:port` or `unix:/path/to.sock`."""

    listen: ListenAddress = DEFAULT_LISTEN
    """Address to serve Generate on: `host:port` (port 0 picks a free one) or `unix:/path/to.sock`."""

    budget_bytes: Budget = Budget(share=1.0)
    """Expert-cache budget on the device, never exceeded: bytes (an int or "512MiB") or a share of the
    pack's expert bytes in `expert_format` ("25%"). Below the minimum (one layer's top-k experts) the
    worker refuses to start and prints the minimum."""

    expert_format: Annotated[str | None, Choices(FORMAT_NAMES)] = None
    """Stored expert format to fetch: bf16, int8, int4, int2; None: int4 when the store has it."""

    compute_form: Annotated[str | None, Choices(COMPUTE_FORMS)] = None
    """How cached experts are held and computed (fp32, bf16, int4_fused, dequant_per_use); None: the
    device's default for the format (gpu_worker.expert_compute.default_compute_form)."""

    device: str = "auto"
    """auto (cuda when present), cpu, cuda, cuda:N."""

    transport: Annotated[str, Choices(TRANSPORTS)] = "auto"
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

    policy: Annotated[str, Choices(POLICY_NAMES)] = "lru"
    """Cache replacement policy per MoE layer: lru, lfu, lfu_decay, arc (Fate: arc)."""

    lfu_decay: float = 0.9
    """lfu_decay's factor: every count is multiplied by it at each forward step, in (0, 1]."""

    allocation: Annotated[str, Choices(ALLOCATION_NAMES, ("learned:PATH",))] = "uniform"
    """How the budget's slots are split across MoE layers: uniform, shallow_favoring (Fate: every MoE
    layer at least its top-k, then as many shallow layers fully resident as the rest buys), or
    learned:PATH (a fate-allocation/1 file written by `python -m gpu_worker analyze`)."""

    full_layers: CountOrAuto = "auto"
    """shallow_favoring: MoE layers kept fully resident before the others get anything; "auto" (the
    default) derives it from the budget, the layer count and the top-k, never leaving a layer under
    top-k when the budget allows top-k everywhere."""

    staging_slots: CountOrAuto = "auto"
    """Expert units of the budget set aside for prefetched experts not used yet (and a layer's misses beyond
    its slots): a count, or "auto" (predictor none: 0; else one layer's experts, at most half the budget)."""

    predictor: Annotated[str, Choices(PREDICTOR_NAMES)] = "none"
    """Expert predictor for prefetching: none (load on demand), cross_layer (Fate), eap (MoE-Infinity's
    expert activation paths), prev_token."""

    prefetch_width: int = 0
    """Experts proposed per token row (decode); 0: measured at start-up, then tracked online: max(top_k,
    floor(layer compute time / one expert's fetch + build time))."""

    lookahead: Annotated[int, Choices((1, 2))] = 1
    """Layers ahead the predictor proposes: 1 (layer l + 1 from layer l's gate input) or 2 (also l + 2)."""

    store_hint_lookahead: int = 2
    """Layers ahead whose predicted experts (not resident here) are sent to the store as one batched,
    one-way hint per MoE layer, so it promotes them from its NVMe tier into RAM before the worker asks:
    layers l + 1 .. l + N from layer l; 0: no hints (also off with predictor none)."""

    throttle: bool = True
    """Narrow the measured width when prefetched experts go unused or the prefetch queue backs up."""

    copy_engine: bool = True
    """With a predictor on a CPU, over shared memory: a copier process (gpu_worker.copier) copies predicted
    experts from the store's RAM tier into the cache's arena (one shared-memory segment of expert slots)
    while the worker computes; this is the CPU's stand-in for a GPU's copy engine. Fetches it cannot
    serve (not in the store's RAM) go to the prefetch thread as before. Off: no arena, no copier."""

    prefetch_inline: bool = False
    """Copy predicted experts that the store holds at memory speed (its RAM tier, through the slot directory
    over shared memory) on the compute thread, right when they are predicted; only slower fetches (a round
    trip, a disk read) go to the prefetch thread. On a CPU such a copy is CPU work either way, and a second
    Python thread doing it costs the compute thread more (the GIL, cache misses on another core) than the copy
    itself. Off: every prefetch goes to the thread. CPU device only."""

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

    log_level: Annotated[str, Choices(LOG_LEVELS)] = "info"
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

    max_request_bytes: Size = 1 << 20
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
        object.__setattr__(self, "budget_bytes", Budget.parse(self.budget_bytes))  # parsed once, here
        check_settings(self)
        check(0 <= self.metrics_port <= 65535, "metrics_port", self.metrics_port, "must be 0 (off) to 65535")
        check(1 <= self.max_batch_size <= 1024, "max_batch_size", self.max_batch_size, "must be 1..1024")
        check(self.max_queue >= 0, "max_queue", self.max_queue, "must be >= 0")
        check(self.default_max_new_tokens >= 1, "default_max_new_tokens", self.default_max_new_tokens,
              "must be >= 1")
        check(1 <= self.threads <= 256, "threads", self.threads, "must be 1..256")
        check(0.0 < self.lfu_decay <= 1.0, "lfu_decay", self.lfu_decay, "must be in (0, 1]")
        check(self.store_hint_lookahead >= 0, "store_hint_lookahead", self.store_hint_lookahead, "must be >= 0")
        check(self.full_layers == "auto" or (isinstance(self.full_layers, int) and self.full_layers >= 0),
              "full_layers", self.full_layers, 'must be "auto" or a count >= 0')
        check(self.staging_slots == "auto" or (isinstance(self.staging_slots, int) and self.staging_slots >= 0),
              "staging_slots", self.staging_slots, 'must be "auto" or a count >= 0')
        check(self.prefetch_width >= 0, "prefetch_width", self.prefetch_width, "must be >= 0 (0: measured)")
        check(0.0 <= self.int2_tail < 1.0, "int2_tail", self.int2_tail, "must be in [0, 1) (0: off)")
        check(self.store_wait_s >= 0, "store_wait_s", self.store_wait_s, "must be >= 0")
        check(self.grace_s >= 0, "grace_s", self.grace_s, "must be >= 0")
        check(self.trace_every >= 0, "trace_every", self.trace_every, "must be >= 0")
        check(self.store_retry_s >= 0, "store_retry_s", self.store_retry_s, "must be >= 0")
        check(self.max_request_bytes >= 4096, "max_request_bytes", self.max_request_bytes, "must be >= 4096")
        check(self.max_prompt_bytes >= 0, "max_prompt_bytes", self.max_prompt_bytes, "must be >= 0 (0: auto)")
        check(self.max_stop_strings >= 0, "max_stop_strings", self.max_stop_strings, "must be >= 0")
        check(self.max_stop_string_bytes >= 1, "max_stop_string_bytes", self.max_stop_string_bytes, "must be >= 1")
        check_address("store", self.store, "127.0.0.1:50051")


def resolve_staging(value: int | str, predictor: str, total_slots: int, num_experts: int) -> int:
    """Staging units: a count as given, or "auto": 0 without a predictor, else one layer's experts, at most
    half the budget's units."""
    if value != "auto":
        return min(int(value), total_slots)
    if predictor == "none":
        return 0
    return min(num_experts, total_slots // 2)


def resolve_budget(value: Budget | int | str, expert_bytes_total: int) -> int:
    """The budget in bytes, a share taken of `expert_bytes_total` (every expert in the format)."""
    return Budget.parse(value).resolve(expert_bytes_total)


def load_toml(path: str | Path) -> dict[str, Any]:
    """The WorkerConfig keys of a TOML file (top level, or its [worker] table), converted and checked."""
    return read_toml(WorkerConfig, path, SECTION)


def build_config(toml_path: str | Path | None, overrides: Mapping[str, Any]) -> WorkerConfig:
    """Defaults < TOML file < overrides (flags given on the command line; None: not given)."""
    return build(WorkerConfig, toml_path, SECTION, overrides)
