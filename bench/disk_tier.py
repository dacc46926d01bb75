"""The store's disk tier driven by predictions: LRU against Fate with and without store hints.

    python -m bench.disk_tier [--pack PACK] [--out DIR] [--ram-pct 10] [--budget 25]
                              [--workload decode:8:64] [--modes uncached[,cold]] [--repeats 1]

The setting: the store's RAM tier holds `--ram-pct` of the expert bytes (int4 only, so every slot
is one expert), the worker's cache `--budget` percent, shared-memory transport, one decode
workload of concurrent requests. Per mode, in one process each time (store and worker started
fresh per run, as in `python -m bench run`):

  cold      experts.bin is dropped from the page cache (posix_fadvise DONTNEED) after the warm-up,
            right before the measured workload: its first reads of each expert are disk reads,
            later ones may come from the page cache again
  uncached  the store runs with --nvme-uncached: each NVMe read drops its own pages afterwards, so
            every promotion is a disk read (a host whose page cache cannot hold the pack)

Configurations (every one without the INT2 prefill tail, so the store serves int4 alone):

  all_resident  (not run by default) worker budget 100%: the ceiling once the warm-up filled it
  lru           LRU per layer, uniform allocation, no predictor (no hints: nothing to predict)
  fate          cross_layer + shallow_favoring + ARC, store hints with --lookahead layers ahead
  fate_nohints  the same with store_hint_lookahead 0

Reported per run (deltas over the measured workload): decode tokens/s and its ratio to LRU in
the same mode and repeat; the worker's hit rate; how often a worker cache miss found the expert
already in the store's RAM (worker side: fetched_tier_ram_demand / demand fetches; store side:
demand_ram_hits / demand fetches, the slot directory's copies included); disk reads (NVMe bytes
read / one expert's bytes, and promotions); hints sent and what they promoted. Nothing here
asserts a target; the issue's (Fate >= 2x LRU decode tokens/s) is printed as met or missed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from client.processes import Service

from .harness import HarnessSettings, measure_workload, start_services
from .plan import CONFIGURATIONS, TINY_MIXTRAL, BenchError, Configuration, RunSpec, Transport, load_prompts

CONFIGS: dict[str, Configuration] = {
    "all_resident": CONFIGURATIONS["all_resident"],  # not by default: the ceiling (worker budget 100%)
    "lru": CONFIGURATIONS["lru"],
    "fate": Configuration("fate", "Fate (hints on)", dict(CONFIGURATIONS["fate_int4"].worker), "sweep",
                          "cross_layer + shallow_favoring + ARC, store hints on"),
    "fate_nohints": Configuration("fate_nohints", "Fate (hints off)",
                                  {**CONFIGURATIONS["fate_int4"].worker, "store_hint_lookahead": "0"}, "sweep",
                                  "cross_layer + shallow_favoring + ARC, no store hints"),
}
MODES = {"cold": {"cold": True}, "uncached": {"nvme_uncached": True}}
TARGET_RATIO = 2.0  # Fate / LRU decode tokens/s in this setting


def parse_workload(text: str):
    from .__main__ import parse_workloads

    wls = parse_workloads(text, False)
    if len(wls) != 1 or wls[0].kind != "decode":
        raise BenchError(f"--workload {text}: one decode workload (decode:C:T)")
    return wls[0]


def store_stats(address: str) -> dict[str, int]:
    """The store's GetStats as flat numbers (per-tier fields as ram_* / nvme_*)."""
    import grpc

    from moe.v1 import store_pb2 as pb
    from moe.v1 import store_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        s = store_pb2_grpc.ExpertStoreStub(ch).GetStats(pb.GetStoreStatsRequest(), timeout=30)
    out = {f.name: getattr(s, f.name) for f in s.DESCRIPTOR.fields
           if f.type != f.TYPE_MESSAGE and isinstance(getattr(s, f.name), int)}
    for t in s.tiers:
        name = "ram" if t.tier == pb.STORE_TIER_RAM else "nvme"
        for k in ("hits", "bytes_read", "read_ns", "resident_experts"):
            out[f"{name}_{k}"] = getattr(t, k)
    return out


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_cell(config: Configuration, mode: str, repeat: int, a: argparse.Namespace, s: HarnessSettings,
             workload, prompts, experts_file: Path) -> dict[str, Any]:
    transport = Transport(mode, MODES[mode], {"transport": "shm"})
    if config.name == "fate":
        config = dataclasses.replace(config, worker={**config.worker, "store_hint_lookahead": str(a.lookahead)})
    budget = 100.0 if config.budgets == "full" else a.budget
    spec = RunSpec(config, f"{budget:g}%", f"{budget:g}%", budget, transport, repeat)
    tmp = Path(tempfile.mkdtemp(prefix="fdt-"))
    r: dict[str, Any] = {"config": config.name, "mode": mode, "repeat": repeat, "status": "ok"}
    services: list[Service] = []
    t0 = time.perf_counter()
    try:
        store, worker, store_addr, worker_addr, cmd = start_services(s, spec, tmp, services)
        r["worker_command"] = cmd[1:]
        store.wait_serving(store_addr, s.start_timeout_s)
        worker.wait_serving(worker_addr, s.start_timeout_s)
        asyncio.run(asyncio.wait_for(_drive(worker_addr, store_addr, worker, workload, prompts, s, experts_file,
                                            mode, r), timeout=s.run_timeout_s))
    except Exception as e:  # noqa: BLE001 - a failed run is a result (its logs kept), the others go on
        r["status"], r["error"] = "failed", f"{type(e).__name__}: {e}"
    finally:
        for svc in reversed(services):
            svc.stop()
        if r["status"] != "ok":
            r["logs"] = {svc.name: svc.tail() for svc in services}
        shutil.rmtree(tmp, ignore_errors=True)
    r["wall_s"] = time.perf_counter() - t0
    return r


async def _drive(worker_addr: str, store_addr: str, worker: Service, workload, prompts, s: HarnessSettings,
                 experts_file: Path, mode: str, r: dict[str, Any]) -> None:
    from client.api import AsyncWorkerClient

    async with AsyncWorkerClient(worker_addr, timeout_s=s.request_timeout_s) as w:
        if s.warmup_tokens:
            await w.generate_text(token_ids=prompts.warmup(s.warmup_tokens, s.context), max_new_tokens=4,
                                  ignore_eos=True)
        if mode == "cold":
            drop_page_cache(experts_file)
        before = await asyncio.to_thread(store_stats, store_addr)
        reqs = prompts.for_workload(workload, s.context)
        m = await measure_workload(w, workload, reqs, worker)
        after = await asyncio.to_thread(store_stats, store_addr)
    gauges = {"ram_resident_experts", "leases_active", "uptime_ms"}
    r["store_delta"] = {k: v - before.get(k, 0) if k not in gauges else v for k, v in after.items()}
    r["figures"], r["worker_delta"] = m["figures"], m["stats_delta"]


def figures(r: dict[str, Any], blob_bytes: int) -> dict[str, Any]:
    """The row of one run: rate, hit rate, demand RAM warmth (worker and store side), disk reads."""
    f, wd, sd = r["figures"], r["worker_delta"], r["store_delta"]
    wd_ram, wd_nvme = wd.get("fetched_tier_ram_demand", 0), wd.get("fetched_tier_nvme_demand", 0)
    sd_hits, sd_miss = sd.get("demand_ram_hits", 0), sd.get("demand_ram_misses", 0)
    return {
        "decode_tokens_per_s": f["decode_tokens_per_s"], "hit_rate": f["hit_rate"],
        "fetch_wait_ms_per_token": f["fetch_wait_ms_per_token"],
        "worker_demand_fetches": wd_ram + wd_nvme,
        "worker_demand_ram_rate": wd_ram / (wd_ram + wd_nvme) if wd_ram + wd_nvme else None,
        "store_demand_ram_rate": sd_hits / (sd_hits + sd_miss) if sd_hits + sd_miss else None,
        "disk_reads": sd.get("nvme_bytes_read", 0) / blob_bytes, "disk_bytes": sd.get("nvme_bytes_read", 0),
        "promotions": sd.get("promotions", 0), "hints": sd.get("prefetch_hints", 0),
        "hint_promotions": sd.get("prefetch_promotions", 0), "hints_used": sd.get("hints_used", 0),
        "hints_refused": sd.get("hints_refused", 0), "nvme_ms_per_read": sd.get("nvme_read_ns", 0) / 1e6 / max(
            1, sd.get("promotions", 0)), "directory_refreshes": sd.get("directory_refreshes", 0),
    }  # fmt: skip


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table(rows: list[dict[str, Any]], mode: str) -> str:
    head = ("| config | decode tok/s | vs LRU | worker hits | miss found store RAM (worker / store) | "
            "NVMe reads (experts, MiB, ms each) | hints: sent, promoted, used, refused |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for row in (x for x in rows if x["mode"] == mode):
        lines.append(
            f"| {row['config']} | {row['decode_tokens_per_s']:.1f} | {row['vs_lru']:.2f}x | {_pct(row['hit_rate'])} | "
            f"{_pct(row['worker_demand_ram_rate'])} / {_pct(row['store_demand_ram_rate'])} of "
            f"{row['worker_demand_fetches']} | {row['disk_reads']:.0f}, {row['disk_bytes'] / 2**20:.1f}, "
            f"{row['nvme_ms_per_read']:.2f} | {row['hints']}, {row['hint_promotions']}, {row['hints_used']}, "
            f"{row['hints_refused']} |")
    return "\n".join(lines)


def summarize(runs: list[dict[str, Any]], blob_bytes: int) -> list[dict[str, Any]]:
    """Medians over repeats per (mode, config); vs_lru: the median of per-repeat ratios to LRU."""
    ok = [r for r in runs if r["status"] == "ok" and r["figures"].get("decode_tokens_per_s")]
    lru = {(r["mode"], r["repeat"]): r["figures"]["decode_tokens_per_s"] for r in ok if r["config"] == "lru"}
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in ok:
        row = figures(r, blob_bytes)
        base = lru.get((r["mode"], r["repeat"]))
        row["vs_lru"] = row["decode_tokens_per_s"] / base if base else float("nan")
        cells.setdefault((r["mode"], r["config"]), []).append(row)
    out = []
    for (mode, config), rows in cells.items():
        med = {k: statistics.median(x[k] for x in rows) if all(isinstance(x[k], (int, float)) for x in rows)
               else rows[0][k] for k in rows[0]}
        out.append({"mode": mode, "config": config, "repeats": len(rows), **med})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.disk_tier", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", type=Path, default=TINY_MIXTRAL, help="pack, or checkpoint to pack (default tiny-mixtral)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "fate-disk-tier",
                    help="directory for the pack (when packing) and disk_tier.json (default: %(default)s)")
    ap.add_argument("--ram-pct", type=float, default=10.0, help="store RAM tier, %% of int4 expert bytes (default 10)")
    ap.add_argument("--budget", type=float, default=25.0, help="worker budget, %% of expert bytes (default 25)")
    ap.add_argument("--workload", default="decode:8:64", help="decode:CONCURRENT:TOKENS (default decode:8:64)")
    ap.add_argument("--modes", default="uncached", help=f"from {', '.join(MODES)}, comma-separated (default: %(default)s)")
    ap.add_argument("--configs", default="lru,fate,fate_nohints",
                    help=f"from {', '.join(CONFIGS)} (default: %(default)s)")
    ap.add_argument("--lookahead", type=int, default=2, help="fate's store_hint_lookahead (default 2)")
    ap.add_argument("--repeats", type=int, default=1, help="repeats, interleaved (default 1)")
    ap.add_argument("--warmup-tokens", type=int, default=64, help="warm-up prompt length (default 64)")
    a = ap.parse_args(argv)
    try:
        return _run(a)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(a: argparse.Namespace) -> int:
    from .__main__ import pack_facts, prepare_pack

    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    for what, names, known in (("--modes", modes, MODES), ("--configs", configs, CONFIGS)):
        if not names or any(n not in known for n in names):
            raise BenchError(f"{what} {','.join(names)}: choose from {', '.join(known)}")
    if not 0 < a.ram_pct <= 100 or not 0 < a.budget <= 100:
        raise BenchError("--ram-pct and --budget are percentages in (0, 100]")
    a.out.mkdir(parents=True, exist_ok=True)
    pack = prepare_pack(a.pack, a.out).resolve()
    facts = pack_facts(pack, "int4", "cpu")
    workload = parse_workload(a.workload)
    from expert_store.packfile import Pack

    with Pack.open(pack) as p:
        n_experts, blob = len(p.expert_ids), p.expert_nbytes("int4")
        experts_file = p.path / p.manifest["experts_file"]
    ram_bytes = int(a.ram_pct / 100 * n_experts * blob)
    prompts = load_prompts(pack, None, None, facts["vocab_size"], 512)
    s = HarnessSettings(pack=pack, expert_format="int4", store_formats=("int4",), store_ram_bytes=ram_bytes,
                        context=facts["context"], warmup_tokens=a.warmup_tokens, run_timeout_s=300.0)
    print(f"[disk-tier] {facts['model']}: {n_experts} experts of {blob} bytes; store RAM {ram_bytes} bytes "
          f"({a.ram_pct:g}%), worker budget {a.budget:g}%, {workload.name}, modes {', '.join(modes)}", flush=True)
    t0, runs = time.perf_counter(), []
    for rep in range(a.repeats):
        for mode in modes:
            for c in configs:
                r = run_cell(CONFIGS[c], mode, rep, a, s, workload, prompts, experts_file)
                runs.append(r)
                rate = (r.get("figures") or {}).get("decode_tokens_per_s")
                print(f"[disk-tier] {mode}/{c} r{rep}: {r['status']} {r['wall_s']:.1f} s"
                      + (f", {rate:.1f} tok/s" if rate else f": {r.get('error', '')}"), flush=True)
    rows = summarize(runs, blob)
    result = {"settings": {**{k: str(v) for k, v in vars(a).items()}, "ram_bytes": ram_bytes, "blob_bytes": blob,
                           "experts": n_experts, "command": sys.argv}, "runs": runs, "summary": rows,
              "wall_s": time.perf_counter() - t0}
    (a.out / "disk_tier.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    for mode in modes:
        print(f"\n{mode}, {workload.name}, store RAM {a.ram_pct:g}%, worker {a.budget:g}%:\n{table(rows, mode)}")
        fate = next((x for x in rows if x["mode"] == mode and x["config"] == "fate"), None)
        if fate is not None and fate["vs_lru"] == fate["vs_lru"]:
            verdict = "met" if fate["vs_lru"] >= TARGET_RATIO else "missed"
            print(f"target Fate >= {TARGET_RATIO:g}x LRU decode tokens/s: {verdict} ({fate['vs_lru']:.2f}x)")
    print(f"\n[disk-tier] wrote {a.out / 'disk_tier.json'} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
