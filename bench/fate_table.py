"""The Fate table: `python -m bench.fate_table [--pack DIR] [--out DIR] [--repeats N] [--budgets 50%,25%]`.

For each configuration (by default: every predictor with shallow_favoring ("sf") + arc, and
lru + none) and budget, starts an expert store and a worker as subprocesses (unix sockets, shared
memory transport, int4 experts), sends the prompts of prompts.jsonl concurrently (decode of
`--new-tokens` each, ignore_eos) through client/api.py, and reads the requests' final
messages and the worker's statistics. Configurations are interleaved (A B C A B C ...) and
repeated; the table shows medians (and min-max of decode tokens/s).

Columns (decode steps only, from the requests' `decode` statistics, unless noted):
  hit rate      (cache hits + prefetch hits) / lookups
  strict top-k  predicted top-k == routed top-k, per (token, layer) predicted
  pf recall     prefetch hits / (prefetch hits + misses): of what the cache lacked, the share prefetched
  pf precision  prefetch hits / experts prefetched (worker totals, prefill included)
  wasted B/tok  blob bytes of prefetched experts evicted unused / generated tokens (worker totals)
  fetched/tok   experts fetched (demand misses + prefetches) / generated tokens (worker totals): the
                CPU work of this box (each fetch is an RPC share, a copy and a ~0.4 ms int4 build)
  stall ms/tok  compute time waiting for experts / generated tokens (worker totals)
  decode tok/s  sum over the concurrent requests of (tokens - 1) / decode time
Writes results.json and table.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from client.api import WorkerClient
from client.processes import Service

REPO = Path(__file__).resolve().parents[1]
TINY_MIXTRAL = REPO.parent / "shared" / "models" / "tiny-mixtral"

# name -> worker flags
CONFIGS: dict[str, tuple[str, ...]] = {
    "lru+none": ("--policy", "lru", "--allocation", "uniform", "--predictor", "none"),
    "sf+arc+none": ("--policy", "arc", "--allocation", "shallow_favoring", "--predictor", "none"),
    "sf+arc+cross_layer": ("--policy", "arc", "--allocation", "shallow_favoring", "--predictor", "cross_layer"),
    "sf+arc+eap": ("--policy", "arc", "--allocation", "shallow_favoring", "--predictor", "eap"),
    "sf+arc+prev_token": ("--policy", "arc", "--allocation", "shallow_favoring", "--predictor", "prev_token"),
}


@dataclass
class Run:
    config: str
    budget: str
    repeat: int
    mode: str
    decode_tokens_per_s: float
    hit_rate: float
    strict_topk: float
    prefetch_recall: float
    prefetch_precision: float
    wasted_bytes_per_token: float
    fetched_per_token: float
    stall_ms_per_token: float
    all_hit_rate: float  # prefill included, worker totals
    width: int
    measured_width: int
    staging_slots: int
    total_slots: int
    high_water_ok: bool
    tokens: list[list[int]] = field(default_factory=list)
    worker_stats: dict = field(default_factory=dict)


def ensure_pack(pack: Path | None, tmp: Path) -> Path:
    if pack is not None:
        return pack
    from expert_store.pack import write_pack

    out = REPO / ".cache" / "fate-moe" / "tiny-mixtral-pack"
    if not (out / "manifest.json").exists():
        print(f"packing {TINY_MIXTRAL} -> {out}", flush=True)
        write_pack(TINY_MIXTRAL, out, formats=("int4", "int2"), progress=False)
    return out


def run_one(pack: Path, tmp: Path, name: str, flags: tuple[str, ...], budget: str, prompts: list[str],
            new_tokens: int, repeat: int, extra: tuple[str, ...], warmup: list[str], mode: str) -> Run:
    tag = f"{name.replace(':', '-').replace('+', '-')}-{budget.rstrip('%')}-{repeat}-{mode}"
    store_addr, worker_addr = f"unix:{tmp}/s-{tag}.sock", f"unix:{tmp}/w-{tag}.sock"
    store = Service("store", [sys.executable, "-m", "expert_store", "serve", str(pack), "--listen", store_addr,
                              "--ram-bytes", "1GiB", "--formats", "int4,int2", "--log-level", "warning"],
                    tmp / f"store-{tag}.log")
    worker = None
    try:
        store.wait_serving(store_addr, 180)
        worker = Service("worker", [sys.executable, "-m", "gpu_worker", "serve", "--store", store_addr, "--listen",
                                    worker_addr, "--device", "cpu", "--format", "int4", "--transport", "shm",
                                    "--budget-bytes", budget, "--max-batch-size", str(len(prompts)), *flags, *extra,
                                    *(("--prefetch-sync",) if mode == "sync" else ())],
                         tmp / f"worker-{tag}.log")
        worker.wait_serving(worker_addr, 180)
        with WorkerClient(worker_addr, timeout_s=1800) as w:
            if warmup:  # fills the cache and EAP's library with other text, the same for every configuration
                with ThreadPoolExecutor(len(warmup)) as pool:
                    list(pool.map(lambda p: w.generate_text(p, max_new_tokens=32, ignore_eos=True), warmup))
            before = w.stats()
            with ThreadPoolExecutor(len(prompts)) as pool:
                done = list(pool.map(lambda p: w.generate_text(p, max_new_tokens=new_tokens, ignore_eos=True),
                                     prompts))
            s = _minus(w.stats(include_layers=True), before)
    finally:
        if worker is not None:
            worker.stop(60)
        store.stop(60)
    dec = [c.result.experts.decode for c in done]
    lookups = sum(d.lookups for d in dec)
    hits = sum(d.hits for d in dec)
    pre = sum(d.prefetch_hits for d in dec)
    miss = sum(d.misses for d in dec)
    preds = sum(d.predictions for d in dec)
    exact = sum(d.predictions_exact for d in dec)
    gen = s.generated_tokens_total or 1
    return Run(
        config=name, budget=budget, repeat=repeat, mode=mode,
        decode_tokens_per_s=sum(c.result.decode_tokens_per_s for c in done),
        hit_rate=hits / lookups if lookups else 0.0,
        strict_topk=exact / preds if preds else float("nan"),
        prefetch_recall=pre / (pre + miss) if pre + miss else float("nan"),
        prefetch_precision=s.prefetch_hits / s.prefetches_issued if s.prefetches_issued else float("nan"),
        wasted_bytes_per_token=s.prefetch_wasted_bytes / gen,
        fetched_per_token=(s.prefetches_issued + s.misses) / gen,
        stall_ms_per_token=s.fetch_wait_ns / 1e6 / gen,
        all_hit_rate=s.hit_rate, width=s.prefetch_width, measured_width=s.measured_width,
        staging_slots=s.staging_slots, total_slots=s.total_slots, high_water_ok=s.high_water_bytes <= s.budget_bytes,
        tokens=[list(c.token_ids) for c in done], worker_stats=s.to_dict(),
    )


_COUNTERS = (
    "requests_total", "requests_failed", "requests_cancelled", "prompt_tokens_total", "generated_tokens_total",
    "lookups", "hits", "misses", "prefetch_hits", "prefetches_issued", "evictions", "bytes_fetched_shm",
    "bytes_fetched_grpc", "fetch_wait_ns", "prefetch_bytes", "prefetch_wasted_bytes", "prefetch_unused_evictions",
    "prefetch_late_hits", "prefetch_dropped", "predictions", "predictions_exact", "predicted_routed", "int2_misses",
    "int2_bytes", "demand_bytes", "steps_total",
)


def _minus(after, before):
    """The worker's counters of the measured round (after - before); gauges and layers as `after` has them."""
    import dataclasses

    return dataclasses.replace(after, **{k: getattr(after, k) - getattr(before, k) for k in _COUNTERS})


def _predictor(flags: tuple[str, ...]) -> str:
    return flags[flags.index("--predictor") + 1] if "--predictor" in flags else "none"


def _fmt(x: float, pct: bool = False) -> str:
    if x != x:  # nan
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.0f}"


def table(runs: list[Run], configs: list[str], budgets: list[str], mode: str = "thread") -> str:
    runs = [r for r in runs if r.mode == mode]
    lines = ["| budget | configuration | hit rate | strict top-k | pf recall | pf precision | wasted B/tok | "
             "fetched/tok | stall ms/tok | decode tok/s (min-max) | width | staging/slots | runs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in budgets:
        for c in configs:
            rs = [r for r in runs if r.config == c and r.budget == b]
            if not rs:
                continue

            def med(attr: str) -> float:
                vals = [getattr(r, attr) for r in rs if getattr(r, attr) == getattr(r, attr)]
                return statistics.median(vals) if vals else float("nan")

            tps = [r.decode_tokens_per_s for r in rs]
            lines.append(
                f"| {b} | {c} | {_fmt(med('hit_rate'), True)} | {_fmt(med('strict_topk'), True)} | "
                f"{_fmt(med('prefetch_recall'), True)} | {_fmt(med('prefetch_precision'), True)} | "
                f"{_fmt(med('wasted_bytes_per_token'))} | {med('fetched_per_token'):.2f} | "
                f"{med('stall_ms_per_token'):.2f} | "
                f"{statistics.median(tps):.0f} ({min(tps):.0f}-{max(tps):.0f}) | "
                f"{rs[-1].width}/{rs[-1].measured_width} | {rs[-1].staging_slots}/{rs[-1].total_slots} | {len(rs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fate_table", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", type=Path, default=None, help="pack with int4 and int2 (default: tiny-mixtral, packed)")
    ap.add_argument("--prompts", type=Path, default=TINY_MIXTRAL / "prompts.jsonl")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "fate_table")
    ap.add_argument("--budgets", default="50%,25%")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sync-repeats", type=int, default=1,
                    help="runs per configuration with --prefetch-sync (the ideal-link hit rate); 0: none")
    ap.add_argument("--warmup", type=int, default=8,
                    help="requests of eval.txt text (64-token prompts, 32 new tokens) before the measured round")
    ap.add_argument("--worker-flags", default="", help="extra flags for every worker (e.g. '--lookahead 2')")
    ap.add_argument("--add", action="append", default=[], metavar="NAME=FLAGS",
                    help="another configuration, e.g. 'fate-uniform=--policy arc --predictor cross_layer' (repeatable)")
    a = ap.parse_args(argv)
    for spec in a.add:
        name, _, flags = spec.partition("=")
        CONFIGS[name] = tuple(flags.split())
    configs = a.configs.split(",") + [spec.partition("=")[0] for spec in a.add]
    budgets = a.budgets.split(",")
    prompts = [json.loads(line)["prompt"] for line in a.prompts.read_text().splitlines() if line.strip()]
    a.out.mkdir(parents=True, exist_ok=True)
    eval_ids = (TINY_MIXTRAL / "eval.txt").read_text().split("\n\n")
    warmup = [chunk[:300] for chunk in eval_ids if len(chunk) > 300][: a.warmup]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="fm-ft-") as tmp_s:
        tmp = Path(tmp_s)
        pack = ensure_pack(a.pack, tmp)
        t0 = time.time()
        plan = [("thread", rep) for rep in range(a.repeats)] + [("sync", rep) for rep in range(a.sync_repeats)]
        for mode, rep in plan:
            for b in budgets:
                for c in configs:
                    if mode == "sync" and _predictor(CONFIGS[c]) == "none":
                        continue  # nothing to prefetch: the same as the threaded run
                    r = run_one(pack, tmp, c, CONFIGS[c], b, prompts, a.new_tokens, rep, tuple(a.worker_flags.split()),
                                warmup, mode)
                    runs.append(r)
                    print(f"[{time.time() - t0:6.0f} s] {mode:6} {b:>4} {c:18} hit {100 * r.hit_rate:5.1f}% strict "
                          f"{_fmt(r.strict_topk, True):>6} recall {_fmt(r.prefetch_recall, True):>6} precision "
                          f"{_fmt(r.prefetch_precision, True):>6} wasted {r.wasted_bytes_per_token:7.0f} B/tok stall "
                          f"{r.stall_ms_per_token:5.2f} ms/tok decode {r.decode_tokens_per_s:6.0f} tok/s width "
                          f"{r.width}/{r.measured_width}", flush=True)
    identical = all(r.tokens == runs[0].tokens for r in runs)  # INT2 tail changes prefill numerics: may differ
    md = "Measured (prefetch thread):\n\n" + table(runs, configs, budgets)
    if a.sync_repeats:
        md += "\n\nIdeal link (--prefetch-sync: each prefetch completes before its layer runs):\n\n" + table(
            runs, configs, budgets, "sync")
    print(md)
    (a.out / "table.md").write_text(md + "\n")
    (a.out / "results.json").write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "new_tokens": a.new_tokens, "prompts": len(prompts),
        "worker_flags": a.worker_flags, "tokens_identical_across_runs": identical,
        "runs": [{k: v for k, v in vars(r).items() if k != "tokens"} for r in runs],
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
