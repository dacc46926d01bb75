"""Results of a benchmark: medians and spread per cell, ratios, targets, results.json, markdown, PNG plots.

A *cell* is (transport, configuration, budget, workload); its runs are the repeats. Each figure
of a cell is summarised as median, min, max and quartiles over its repeats. Ratios are paired:
repeat r of a configuration over repeat r of all-resident (or load-on-demand) on the same
transport and workload (they ran back to back, so they share the machine's noise), then the
median and range of those ratios; without pairs, the ratio of medians.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plan import CONFIGURATIONS, EXTRA_FIGURES, FIGURES

RESULTS_FORMAT = "fate-moe-bench/1"
REFERENCES = ("all_resident", "load_on_demand")
RATIOS = {  # ratio name -> (figure, reference configuration)
    "decode_vs_all_resident": ("decode_tokens_per_s", "all_resident"),
    "decode_vs_load_on_demand": ("decode_tokens_per_s", "load_on_demand"),
    "prefill_vs_all_resident": ("prefill_tokens_per_s", "all_resident"),
    "prefill_vs_load_on_demand": ("prefill_tokens_per_s", "load_on_demand"),
    "decode_vs_lru": ("decode_tokens_per_s", "lru"),
    "decode_vs_lfu_decay": ("decode_tokens_per_s", "lfu_decay"),
}
SAME_BUDGET_REFERENCES = ("lru", "lfu_decay")  # compared at the same budget (the others have one budget)


# -- the machine --------------------------------------------------------------------------------


def machine_description() -> dict[str, Any]:
    """CPU model, cores, RAM, versions, date: what a reader needs to weigh the numbers."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a description, never a reason to fail
        pass
    return {
        "cpu_model": cpu, "cores": os.cpu_count(), "usable_cores": usable, "ram_bytes": ram, "gpu": gpu,
        "torch": version("torch"), "grpcio": version("grpcio"), "python": platform.python_version(),
        "platform": platform.platform(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }  # fmt: skip


# -- aggregation ------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    v = sorted(x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x)))
    if not v:
        return {"median": None, "min": None, "max": None, "q1": None, "q3": None, "n": 0}
    q1, q3 = (statistics.quantiles(v, n=4, method="inclusive")[i] for i in (0, 2)) if len(v) > 1 else (v[0], v[0])
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q1, "q3": q3, "n": len(v)}


@dataclass(frozen=True)
class CellKey:
    transport: str
    config: str
    budget: str
    workload: str


def summarize(runs: Sequence[Mapping[str, Any]], workload_names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per cell, every figure summarised (None when no repeat measured it) and the ratios."""
    by_cell: dict[CellKey, list[Mapping[str, Any]]] = {}
    for r in runs:
        for w in workload_names:
            by_cell.setdefault(CellKey(r["transport"], r["config"], r["budget"], w), []).append(r)

    def per_repeat(key: CellKey, figure: str) -> dict[int, float]:
        out = {}
        for r in by_cell.get(key, []):
            v = ((r.get("workloads") or {}).get(key.workload) or {}).get("figures", {}).get(figure)
            if r.get("status") == "ok" and v is not None:
                out[r["repeat"]] = v
        return out

    rows = []
    for key, rs in by_cell.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        row: dict[str, Any] = {
            "transport": key.transport, "config": key.config, "budget": key.budget, "workload": key.workload,
            "budget_pct": rs[0].get("budget_pct"), "runs": len(rs), "ok": len(ok),
            "statuses": sorted({r.get("status") for r in rs}),
            "errors": sorted({r["error"] for r in rs if r.get("error")}),
            "figures": {f: spread(list(per_repeat(key, f).values())) for f in FIGURES + EXTRA_FIGURES},
            "ratios": {},
        }  # fmt: skip
        for name, (figure, ref) in RATIOS.items():
            row["ratios"][name] = _ratio(per_repeat(key, figure), _reference(by_cell, key, ref, per_repeat, figure))
        rows.append(row)
    return rows


def _reference(by_cell, key: CellKey, ref: str, per_repeat, figure: str) -> dict[int, float]:
    refs = [k for k in by_cell if k.transport == key.transport and k.workload == key.workload and k.config == ref
            and (ref not in SAME_BUDGET_REFERENCES or k.budget == key.budget)]
    return per_repeat(refs[0], figure) if refs else {}


def _ratio(values: Mapping[int, float], refs: Mapping[int, float]) -> dict[str, Any]:
    pairs = [values[r] / refs[r] for r in values if refs.get(r)]
    if pairs:
        s = spread(pairs)
        s["paired"] = True
        return s
    if values and refs and statistics.median(refs.values()):
        m = statistics.median(values.values()) / statistics.median(refs.values())
        return {"median": m, "min": None, "max": None, "q1": None, "q3": None, "n": 0, "paired": False}
    return {"median": None, "min": None, "max": None, "q1": None, "q3": None, "n": 0, "paired": False}


# -- targets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    transport: str
    config: str
    budget: str
    quantity: str  # a figure name or a ratio name
    threshold: float


def fate_targets(headline_workload: str) -> list[Target]:
    """Fate's targets (tiny-mixtral, int4, the 8 prompts served concurrently); reported, never asserted."""
    w = headline_workload
    return [
        *(Target(f"Fate decode at {b} >= LRU's (shm, {w})", "shm", "fate", b, "decode_vs_lru", 1.0)
          for b in ("50%", "25%")),
        *(Target(f"Fate decode at {b} >= LFU-decay's (shm, {w})", "shm", "fate", b, "decode_vs_lfu_decay", 1.0)
          for b in ("50%", "25%")),
        Target(f"Fate decode at 50% >= 0.90x all-resident (shm, {w})", "shm", "fate", "50%", "decode_vs_all_resident", 0.90),
        Target(f"Fate decode at 25% >= 0.80x all-resident (shm, {w})", "shm", "fate", "25%", "decode_vs_all_resident", 0.80),
        Target(f"Fate on-time hit rate at 50% >= 97% (shm, {w})", "shm", "fate", "50%", "on_time_hit_rate", 0.97),
        *(Target(f"Fate decode at {b} >= 4x load-on-demand (gRPC, {w})", "grpc", "fate", b, "decode_vs_load_on_demand", 4.0)
          for b in ("25%", "50%", "75%")),
    ]  # fmt: skip


def evaluate_targets(rows: Sequence[Mapping[str, Any]], targets: Sequence[Target], workload: str
                     ) -> list[dict[str, Any]]:
    out = []
    for t in targets:
        row = next((r for r in rows if (r["transport"], r["config"], r["budget"], r["workload"])
                    == (t.transport, t.config, t.budget, workload)), None)
        value = None
        if row is not None:
            src = row["ratios"] if t.quantity in row["ratios"] else row["figures"]
            value = (src.get(t.quantity) or {}).get("median")
        status = "not measured" if value is None else ("met" if value >= t.threshold else "missed")
        out.append({"name": t.name, "transport": t.transport, "config": t.config, "budget": t.budget,
                    "workload": workload, "quantity": t.quantity, "threshold": t.threshold, "value": value,
                    "status": status, "margin": None if value is None else value - t.threshold})
    return out


def target_lines(results: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = []
    for t in results:
        if t["value"] is None:
            lines.append(f"  NOT MEASURED  {t['name']}")
            continue
        pct = t["quantity"].endswith("hit_rate")
        fmt = (lambda v: f"{100 * v:.2f}%") if pct else (lambda v: f"{v:.3f}x")
        margin = f"{100 * t['margin']:+.2f} points" if pct else f"{t['margin']:+.3f}x"
        lines.append(f"  {t['status'].upper():7} {t['name']}: {fmt(t['value'])} (margin {margin})")
    return lines


# -- markdown ---------------------------------------------------------------------------------


def _num(s: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 1, spread_: bool = True) -> str:
    if not s or s.get("median") is None:
        return "–"
    m = s["median"] * scale
    text = f"{m:.{digits}f}"
    if spread_ and s.get("n", 0) > 1 and s.get("min") is not None:
        text += f" [{s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f}]"
    return text


def _order(rows: Iterable[Mapping[str, Any]], config_order: Sequence[str]) -> list[Mapping[str, Any]]:
    rank = {c: i for i, c in enumerate(config_order)}
    return sorted(rows, key=lambda r: (rank.get(r["config"], 99), r.get("budget_pct") or 0))


def markdown_table(rows: Sequence[Mapping[str, Any]], transport: str, workload: str, kind: str,
                   config_order: Sequence[str]) -> str:
    sel = _order([r for r in rows if r["transport"] == transport and r["workload"] == workload], config_order)
    rate, label = ("decode_tokens_per_s", "decode tok/s") if kind == "decode" else ("prefill_tokens_per_s",
                                                                                      "prefill tok/s")
    rk = "decode" if kind == "decode" else "prefill"
    head = (f"| configuration | budget | {label} median [min–max] | × all-resident | × load-on-demand | hit rate | "
            f"fetch wait ms/token | KiB fetched/token | TTFT ms | worker peak RSS MiB | ok/runs |")
    lines = [head, "|" + "---|" * 11]
    for r in sel:
        f, q = r["figures"], r["ratios"]
        title = CONFIGURATIONS[r["config"]].title if r["config"] in CONFIGURATIONS else r["config"]
        note = "" if r["ok"] == r["runs"] else f" ({', '.join(r['statuses'])})"
        lines.append(
            f"| {title} | {r['budget']} | {_num(f[rate])} | {_num(q[f'{rk}_vs_all_resident'], digits=2)} | "
            f"{_num(q[f'{rk}_vs_load_on_demand'], digits=2)} | {_num(f['hit_rate'], 100, 1, False)}% | "
            f"{_num(f['fetch_wait_ms_per_token'], 1, 3, False)} | {_num(f['bytes_fetched_per_token'], 1 / 1024, 1, False)} | "
            f"{_num(f['ttft_ms'], 1, 1, False)} | {_num(f['worker_peak_rss_bytes'], 1 / 2**20, 0, False)} | "
            f"{r['ok']}/{r['runs']}{note} |"
        )  # fmt: skip
    return "\n".join(lines)


def prefetch_table(rows: Sequence[Mapping[str, Any]], transport: str, workload: str,
                   config_order: Sequence[str]) -> str:
    """Where the hits come from and what prefetching costs (the worker's counters over the workload)."""
    sel = _order([r for r in rows if r["transport"] == transport and r["workload"] == workload
                  and r["config"] not in REFERENCES], config_order)
    lines = [("| configuration | budget | hit rate | cache hits | prefetch hits | on-time hits | strict top-k accuracy | "
              "prefetch recall | prefetch precision | misses found in store RAM | wasted prefetch KiB/token |"),
             "|" + "---|" * 11]
    for r in sel:
        f = r["figures"]
        title = CONFIGURATIONS[r["config"]].title if r["config"] in CONFIGURATIONS else r["config"]
        pct = [_num(f.get(k), 100, 1, False) for k in ("hit_rate", "cache_hit_rate", "prefetch_hit_rate", "on_time_hit_rate",
                                                    "strict_topk_accuracy", "prefetch_recall", "prefetch_precision",
                                                    "store_ram_demand_hit_rate")]
        lines.append(f"| {title} | {r['budget']} | " + " | ".join(f"{v}%" if v != "–" else v for v in pct)
                     + f" | {_num(f['wasted_prefetch_bytes_per_token'], 1 / 1024, 1, False)} |")
    return "\n".join(lines)


def layer_table(runs: Sequence[Mapping[str, Any]], transport: str, config_order: Sequence[str]) -> str:
    """Per MoE layer, from the worker's counters over a whole run (every workload; the first repeat that
    completed): resident slots, and hit rate (prefetch precision when it prefetched)."""
    first: dict[tuple[str, str], Mapping[str, Any]] = {}
    for r in runs:
        if r["transport"] == transport and r["status"] == "ok" and r.get("worker_stats_final"):
            first.setdefault((r["config"], r["budget"]), r)
    if not first:
        return ""
    rank = {c: i for i, c in enumerate(config_order)}
    keys = sorted(first, key=lambda k: (rank.get(k[0], 99), first[k]["budget_pct"]))
    n = max(len(first[k]["worker_stats_final"]["layers"]) for k in keys)
    lines = ["| configuration | budget | staging | " + " | ".join(f"L{i}" for i in range(n)) + " |",
             "|" + "---|" * (n + 3)]
    for k in keys:
        st = first[k]["worker_stats_final"]
        cells = []
        for layer in st["layers"]:
            hit = layer["hits"] / layer["lookups"] if layer["lookups"] else 0.0
            cell = f"{layer['slots']}: {100 * hit:.0f}%"
            if layer.get("prefetches_issued"):
                cell += f" ({100 * layer['prefetch_hits'] / layer['prefetches_issued']:.0f}%)"
            cells.append(cell)
        title = CONFIGURATIONS[k[0]].title if k[0] in CONFIGURATIONS else k[0]
        lines.append(f"| {title} | {k[1]} | {st.get('staging_slots', '–')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def transport_bench_table(tb: Mapping[str, Any]) -> str:
    if "results" not in tb:
        return f"transport micro-benchmark failed: {tb.get('error')}"
    lines = ["| format | batch | path | GB/s | ms per batch |", "|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['batch']} | {r['path']} | {r['GBps']:.2f} | {r['ms_per_batch']:.3f} |"
              for r in tb["results"]]
    return "\n".join(lines)


def markdown_report(results: Mapping[str, Any]) -> str:
    s, m = results["settings"], results["machine"]
    order = list(s["configurations"])
    gib = (m.get("ram_bytes") or 0) / 2**30
    out = [
        f"# Benchmark: {s['model']} ({s['expert_format']} experts)",
        "",
        (f"{m['date']} on {m['cpu_model']}, {m['cores']} cores ({m['usable_cores']} usable), {gib:.0f} GiB RAM, "
         f"{m.get('gpu') or 'no GPU'}; torch {m['torch']}, Python {m['python']}; worker device {s['device']}. "
         f"{s['repeats']} repeat(s) per cell, configurations interleaved; medians with [min–max] over repeats; "
         f"ratios paired per repeat. Whole run {results['wall_s'] / 60:.1f} min."),
        "",
        "## Targets (reported, not asserted)",
        "",
        "```",
        *target_lines(results["targets"]),
        "```",
        "",
    ]
    for t in s["transports"]:
        for w in s["workloads"]:
            out += [f"## {t}, {w['name']} ({_describe(w)})", "",
                    markdown_table(results["summary"], t, w["name"], w["kind"], order), ""]
            if w["name"] == s["headline_workload"]:
                out += [f"Prefetching, {t}, {w['name']}:", "", prefetch_table(results["summary"], t, w["name"], order),
                        ""]
    for t in s["transports"]:
        table = layer_table(results["runs"], t, order)
        if table:
            out += [f"## Per layer, {t}: resident slots: hit rate (prefetch precision), whole run", "", table, ""]
    if "transport_bench" in results:
        out += ["## Transport micro-benchmark (store -> worker, bench/transport.py)", "",
                transport_bench_table(results["transport_bench"]), ""]
    failed = [r for r in results["runs"] if r["status"] != "ok"]
    if failed:
        out += ["## Runs that did not complete", ""]
        seen = set()
        for r in failed:
            key = (r["transport"], r["config"], r["budget"], r["status"], r["error"])
            if key not in seen:
                seen.add(key)
                out.append(f"- {r['transport']}/{r['config']}@{r['budget']}: {r['status']}: {r['error']}")
        out.append("")
    out += ["## Configurations", ""]
    for name, c in s["configurations"].items():
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in c["worker"].items())
        out.append(f"- **{c['title']}** (`{name}`, budgets: {c['budgets']}): `{flags}`. {c['design']}.")
    out += ["", f"Plots: {', '.join(results['plots'])}.", ""]
    return "\n".join(out)


def _describe(w: Mapping[str, Any]) -> str:
    if w["kind"] == "prefill":
        return f"prefill of a {w['prompt_tokens']}-token prompt"
    return f"decode {w['max_new_tokens']} tokens, {w['concurrency']} concurrent request(s)"


# -- plots ------------------------------------------------------------------------------------


PLOTS = {  # file -> (figure, y label, workload kind, scale)
    "decode_tokens_per_s_vs_budget.png": ("decode_tokens_per_s", "decode tokens/s", "decode", 1.0),
    "hit_rate_vs_budget.png": ("hit_rate", "hit rate (cache + prefetch), %", "decode", 100.0),
    "prefill_tokens_per_s_vs_budget.png": ("prefill_tokens_per_s", "prefill tokens/s", "prefill", 1.0),
}


def write_plots(results: Mapping[str, Any], out_dir: Path) -> list[str]:
    """PNG per PLOTS entry: rows = transports, columns = workloads of that kind; a line per swept
    configuration (median, min-max bars) and the references as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, rows = results["settings"], results["summary"]
    written = []
    for fname, (figure, ylabel, kind, scale) in PLOTS.items():
        workloads = [w["name"] for w in s["workloads"] if w["kind"] == kind]
        transports = s["transports"]
        if not workloads:
            continue
        fig, axes = plt.subplots(len(transports), len(workloads), squeeze=False,
                                 figsize=(4.2 * len(workloads), 3.4 * len(transports)))
        for i, t in enumerate(transports):
            for j, w in enumerate(workloads):
                ax = axes[i][j]
                cell = [r for r in rows if r["transport"] == t and r["workload"] == w]
                for c in s["configurations"]:
                    pts = sorted((r for r in cell if r["config"] == c and r["figures"][figure]["median"] is not None),
                                 key=lambda r: r["budget_pct"])
                    if not pts:
                        continue
                    title = s["configurations"][c]["title"]
                    med = [r["figures"][figure]["median"] * scale for r in pts]
                    if s["configurations"][c]["budgets"] != "sweep":
                        style = {"all_resident": ("k", "--"), "load_on_demand": ("tab:red", ":")}.get(c, ("gray", "-."))
                        ax.axhline(med[0], color=style[0], linestyle=style[1], label=f"{title} ({pts[0]['budget']})")
                        continue
                    lo = [m - r["figures"][figure]["min"] * scale for m, r in zip(med, pts)]
                    hi = [r["figures"][figure]["max"] * scale - m for m, r in zip(med, pts)]
                    ax.errorbar([r["budget_pct"] for r in pts], med, yerr=[lo, hi], marker="o", capsize=3,
                                label=title)
                ax.set_title(f"{t}, {w}", fontsize=9)
                ax.set_xlabel("expert-cache budget, % of expert bytes")
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
                if i == 0 and j == 0:
                    ax.legend(fontsize=7)
        fig.suptitle(f"{s['model']}, {s['expert_format']}: {ylabel} vs budget ({results['machine']['date'][:10]})",
                     fontsize=10)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=80)
        plt.close(fig)
        written.append(fname)
    return written


# -- writing ----------------------------------------------------------------------------------


def write_results(results: dict[str, Any], out_dir: Path) -> None:
    """results.json, results.md and the plots (their names recorded in results["plots"])."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results["plots"] = write_plots(results, out_dir)
    (out_dir / "results.md").write_text(markdown_report(results))
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")


# -- py-spy profiles --------------------------------------------------------------------------


def summarize_profile(raw_path: Path, top: int = 12) -> dict[str, Any]:
    """A py-spy raw file (`thread;frame;...;frame COUNT` per line, idle samples included) as, per thread
    name: its samples, and its heaviest functions by self samples and by inclusive samples (line numbers
    dropped, so one function is one row). Shares are of the thread's samples: wall time, waits included."""
    import re

    threads: dict[str, dict[str, Any]] = {}
    for line in Path(raw_path).read_text().splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        name = re.sub(r"^thread \(\d+\): ", "", frames[0])
        funcs = [re.sub(r":\d+\)$", ")", f) for f in frames[1:]]
        t = threads.setdefault(name, {"samples": 0, "self": {}, "inclusive": {}})
        n = int(count)
        t["samples"] += n
        if funcs:
            t["self"][funcs[-1]] = t["self"].get(funcs[-1], 0) + n
        for f in set(funcs):
            t["inclusive"][f] = t["inclusive"].get(f, 0) + n
    out = {}
    for name, t in sorted(threads.items(), key=lambda kv: -kv[1]["samples"]):
        total = t["samples"]
        out[name] = {
            "samples": total,
            "self": [(f, n / total) for f, n in sorted(t["self"].items(), key=lambda kv: -kv[1])[:top]],
            "inclusive": [(f, n / total) for f, n in sorted(t["inclusive"].items(), key=lambda kv: -kv[1])
                          if "fate" in f or "gpu_worker" in f or "expert_store" in f][:top],
        }  # fmt: skip
    return out


def profile_text(summary: Mapping[str, Any], threads: Sequence[str] = ("engine-compute", "prefetch")) -> str:
    lines = []
    for name in [t for t in threads if t in summary] or list(summary)[:2]:
        t = summary[name]
        lines.append(f"thread {name}: {t['samples']} samples (wall time, waits included)")
        lines.append("  self:")
        lines += [f"    {100 * share:5.1f}%  {f}" for f, share in t["self"]]
        lines.append("  inclusive (project functions):")
        lines += [f"    {100 * share:5.1f}%  {f}" for f, share in t["inclusive"]]
    return "\n".join(lines)
