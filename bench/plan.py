"""What a benchmark measures, as data: configurations (worker flags), transports (store flags),
workloads, prompts, and the plan of runs (configuration x budget x transport x repeat, interleaved).
The figures each workload yields are listed in FIGURES and EXTRA_FIGURES (bench/figures.py)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_MIXTRAL = REPO.parent / "shared" / "models" / "tiny-mixtral"

FIGURES = (
    "decode_tokens_per_s", "prefill_tokens_per_s", "ttft_ms", "hit_rate", "fetch_wait_ms_per_token",
    "bytes_fetched_per_token", "worker_peak_rss_bytes",
)  # fmt: skip
EXTRA_FIGURES = (
    "per_request_decode_tokens_per_s", "cache_hit_rate", "prefetch_hit_rate", "on_time_hit_rate", "strict_topk_accuracy",
    "prefetch_recall", "prefetch_precision", "wasted_prefetch_bytes_per_token", "wall_s", "store_ram_hit_rate",
    "store_ram_demand_hit_rate",
)  # fmt: skip


class BenchError(RuntimeError):
    """A benchmark could not be set up (bad pack, bad option); the message says what to do."""


# -- what is measured: configurations, transports, workloads (data, not code) -------------------


@dataclass(frozen=True)
class Configuration:
    name: str
    title: str
    worker: Mapping[str, str]
    """WorkerConfig field -> value, given to the worker as `--field-name value` (the budget apart)."""
    budgets: str
    """"sweep": each budget of --budgets; "full": 100% (every expert fits); "min": the smallest budget
    the worker accepts (one layer's top-k experts)."""
    design: str
    """The published design it stands for, and how it is realised here."""


NO_INT2 = {"int2_tail": "0"}  # the baselines fetch every expert in the run format (no INT2 prefill tail)

CONFIGURATIONS: dict[str, Configuration] = {c.name: c for c in (
    Configuration(
        "all_resident", "all-resident", {"policy": "lru", "predictor": "none", **NO_INT2}, "full",
        "the physical limit: budget 100% of the expert bytes; the warm-up request and the first workloads "
        "fill the cache, nothing is evicted"),
    Configuration(
        "load_on_demand", "load-on-demand",
        {"policy": "lru", "predictor": "none", "allocation": "uniform", **NO_INT2}, "min",
        "no reuse beyond the current layer: the smallest budget the worker accepts (top-k experts of one layer; "
        "uniform allocation leaves at most one resident slot in a few layers), no predictor"),
    Configuration(
        "lru", "LRU", {"policy": "lru", "predictor": "none", "allocation": "uniform", **NO_INT2}, "sweep",
        "mixtral-offloading: LRU per layer, equal slots, no prefetch"),
    Configuration(
        "lfu_decay", "LFU-decay", {"policy": "lfu_decay", "predictor": "none", "allocation": "uniform", **NO_INT2},
        "sweep",
        "In-depth Analysis on Caching and Pre-fetching in MoE Offloading: LFU with decayed counts, no prefetch"),
    Configuration(
        "eap", "EAP", {"policy": "lfu", "predictor": "eap", "allocation": "uniform", **NO_INT2}, "sweep",
        "MoE-Infinity: expert-activation-path matching prefetch, activation-count (LFU) caching"),
    Configuration(
        "fate", "Fate",
        {"predictor": "cross_layer", "allocation": "shallow_favoring", "policy": "arc", "int2_tail": "0.3"}, "sweep",
        "Fate: cross-layer gate prefetch, shallow-favoring allocation, ARC per layer, INT2 prefill tail 0.3"),
    Configuration(  # not in the default set: Fate without its INT2 tail (generated tokens as the baselines')
        "fate_int4", "Fate (no INT2 tail)",
        {"predictor": "cross_layer", "allocation": "shallow_favoring", "policy": "arc", **NO_INT2}, "sweep",
        "Fate as above with every expert in the run format (no INT2 prefill tail)"),
)}  # fmt: skip
DEFAULT_CONFIGS = ("all_resident", "load_on_demand", "lru", "lfu_decay", "eap", "fate")


@dataclass(frozen=True)
class Transport:
    name: str
    store: Mapping[str, str | bool]
    """StoreConfig field -> value (True: a bare flag); ram_bytes defaults to every served expert."""
    worker: Mapping[str, str]


TRANSPORTS: dict[str, Transport] = {t.name: t for t in (
    Transport("shm", {}, {"transport": "shm"}),
    Transport("grpc", {}, {"transport": "grpc"}),
    # NVMe cold: no RAM tier, experts.bin dropped from the page cache after start-up (first reads are disk reads)
    Transport("nvme-cold", {"ram_bytes": "0", "cold": True}, {"transport": "grpc"}),
)}  # fmt: skip


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "decode" | "prefill"
    concurrency: int
    max_new_tokens: int
    prompt_tokens: int = 0  # prefill: the prompt's length; decode: 0 (the short prompts as they are)


def default_workloads(quick: bool) -> list[Workload]:
    """Prefill of a 512-token prompt, then decode of 128 tokens at 1, 4 and 8 concurrent requests
    (--quick: 64-token prefill, 16 tokens at 1 and 2)."""
    if quick:
        return [Workload("prefill-64", "prefill", 1, 1, 64), Workload("decode-c1", "decode", 1, 16),
                Workload("decode-c2", "decode", 2, 16)]
    return [Workload("prefill-512", "prefill", 1, 1, 512), Workload("decode-c1", "decode", 1, 128),
            Workload("decode-c4", "decode", 4, 128), Workload("decode-c8", "decode", 8, 128)]


@dataclass(frozen=True)
class Prompts:
    """Token ids the workloads draw from: short prompts (decode), one long text (prefill, warm-up)."""

    short: tuple[tuple[int, ...], ...]
    text: tuple[int, ...]
    source: str

    def for_workload(self, w: Workload, context: int) -> list[list[int]]:
        if w.kind == "prefill":
            n = min(w.prompt_tokens, context - w.max_new_tokens)
            return [list(self.text[:n])] * w.concurrency
        reqs = [list(self.short[i % len(self.short)]) for i in range(w.concurrency)]
        return [r[: max(1, context - w.max_new_tokens)] for r in reqs]

    def warmup(self, n: int, context: int) -> list[int]:
        """A slice of the text away from the prefill prompt's start (the second half)."""
        n = min(n, context - 4)
        start = max(0, min(len(self.text) - n, len(self.text) // 2))
        return list(self.text[start : start + n])


def load_prompts(pack_dir: Path, prompts_file: Path | None, text_file: Path | None, vocab_size: int,
                 min_text_tokens: int) -> Prompts:
    """Tokenize the prompts (JSONL with a "prompt" field, or plain lines) and the text with the pack's
    tokenizer. Without a tokenizer or without the files, deterministic synthetic ids stand in."""
    from gpu_worker.tokenizer import TextTokenizer

    tok_path = pack_dir / "tokenizer.json"
    tok = TextTokenizer(tok_path) if tok_path.is_file() else None
    prompts_file = prompts_file or (TINY_MIXTRAL / "prompts.jsonl")
    text_file = text_file or (TINY_MIXTRAL / "eval.txt")
    sources = []

    def ok(ids: Sequence[int]) -> bool:
        return len(ids) > 0 and all(0 <= i < vocab_size for i in ids)

    short: list[tuple[int, ...]] = []
    if tok is not None and prompts_file.is_file():
        for line in prompts_file.read_text().splitlines():
            if line.strip():
                text = json.loads(line)["prompt"] if line.lstrip().startswith("{") else line
                ids = tok.encode(text)
                if ok(ids):
                    short.append(tuple(ids))
        sources.append(f"prompts {prompts_file}")
    if not short:  # synthetic: 8 prompts of 32 ids, spread over the vocabulary
        short = [tuple((17 * i + 5 * j + 2) % vocab_size for j in range(32)) for i in range(8)]
        sources.append("synthetic short prompts")
    text: tuple[int, ...] = ()
    if tok is not None and text_file.is_file():
        ids = tok.encode(text_file.read_text())
        if ok(ids) and len(ids) >= min_text_tokens:
            text = tuple(ids)
            sources.append(f"text {text_file}")
    if not text:
        text = tuple((31 * j + 7) % vocab_size for j in range(max(min_text_tokens, 1024)))
        sources.append("synthetic text")
    return Prompts(tuple(short), text, "; ".join(sources))


@dataclass(frozen=True)
class RunSpec:
    config: Configuration
    budget: str  # as given to --budget-bytes: "25%", "100%" or bytes
    budget_label: str  # "25%", "100%", "min"
    budget_pct: float  # of every expert's bytes in the compute form
    transport: Transport
    repeat: int

    @property
    def key(self) -> str:
        return f"{self.transport.name}/{self.config.name}@{self.budget_label}"


@dataclass
class Plan:
    """Every run of a benchmark, in the order they execute (configurations interleaved per repeat)."""

    runs: list[RunSpec] = field(default_factory=list)


def make_plan(configs: Sequence[Configuration], budgets_pct: Sequence[float], transports: Sequence[Transport],
              repeats: int, min_budget: str, min_budget_pct: float) -> Plan:
    """A B C ... A B C ...: repeat r of every (transport, configuration, budget) before repeat r+1."""
    cells: list[tuple[Configuration, str, str, float, Transport]] = []
    for t in transports:
        for c in configs:
            if c.budgets == "full":
                cells.append((c, "100%", "100%", 100.0, t))
            elif c.budgets == "min":
                cells.append((c, min_budget, "min", min_budget_pct, t))
            else:
                for b in budgets_pct:
                    cells.append((c, f"{b:g}%", f"{b:g}%", float(b), t))
    return Plan([RunSpec(c, b, label, pct, t, r) for r in range(repeats) for (c, b, label, pct, t) in cells])
