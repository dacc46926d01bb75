"""Trace analysis: a markdown report with PNG plots, and a learned per-layer allocation.

    python -m gpu_worker analyze TRACE... --out DIR [--budget 25%] [--policy lru] [--semantics worker] \
        [--hardware PROFILE]

For each trace: hit rate vs budget per policy (Belady included; uniform and shallow_favoring),
per-layer expert popularity, reuse-distance CDF per layer, per-layer prediction accuracy (the
recorded `predicted` field when present; prev_token and eap replayed through their classes),
layer-to-layer expert transitions, router entropy per layer, rarely used experts (pruning
candidates), and the per-layer allocation with the least projected time (the simulator's cost
model on --hardware) found for the budget, written as a
`fate-allocation/1` file (gpu_worker.policy.allocation) the worker can load.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..simulator import SIM_POLICIES, Replay, load_profile, parse_budget
from ..traces import Trace, load_trace
from .learned import budget_grid, hit_rate_curves, learn_allocation
from .plots import plot_accuracy, plot_entropy, plot_hit_rates, plot_popularity, plot_reuse, plot_transitions
from .stats import (
    RARE_SHARE, popularity, prediction_accuracy, rare_experts, reuse_distances, router_entropy, transitions,
)


def _fmt(x: float, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def analyze_trace(t: Trace, out: Path, budget: str = "25%", policy: str = "lru", semantics: str = "worker",
                  policies: Sequence[str] = SIM_POLICIES, allocations: Sequence[str] = ("uniform", "shallow_favoring"),
                  predictors: Sequence[str] = ("prev_token", "eap"), hardware: str = "this-machine"
                  ) -> tuple[list[str], dict[str, Any]]:
    """Plots into `out`, the report's markdown lines and a JSON summary for one trace."""
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in t.name)
    rp = Replay(t)
    L, E, K = t.num_layers, t.num_experts, t.experts.shape[2]
    pop = popularity(t)
    budgets = budget_grid(t)
    curves = hit_rate_curves(rp, policies, allocations, budgets, semantics)
    q = parse_budget(budget, L, E)
    learned = learn_allocation(rp, q, policy, semantics, budget, profile=load_profile(hardware)) if q >= K else None
    alloc_path = None
    if learned is not None:
        alloc_path = out / f"{stem}.allocation-{budget.rstrip('%')}pct.json"
        learned.allocation.save(alloc_path)
    dists = reuse_distances(t)
    accs, notes = prediction_accuracy(t, predictors)
    tr = transitions(t)
    ent = router_entropy(t, pop)
    rare = rare_experts(pop)
    figs = {
        "hit_rate": plot_hit_rates(out / f"{stem}.hit_rate_vs_budget.png", t, budgets, curves, allocations, learned),
        "popularity": plot_popularity(out / f"{stem}.popularity.png", t, pop),
        "reuse": plot_reuse(out / f"{stem}.reuse_distance.png", t, dists),
        "accuracy": plot_accuracy(out / f"{stem}.prediction_accuracy.png", t, accs) if accs else None,
        "transitions": plot_transitions(out / f"{stem}.transitions.png", t, tr) if L > 1 else None,
        "entropy": plot_entropy(out / f"{stem}.entropy.png", t, ent),
    }
    steps = rp.S
    phases = ""
    if t.phase is not None:
        phases = f", {int((t.phase == 0).sum())} prefill + {int((t.phase == 1).sum())} decode rows"
    md = [f"## {t.name}", "",
          f"`{t.path}`: {t.model}; {t.num_tokens} token rows{phases}; {L} MoE layers (ids {t.layer_ids[:8]}"
          f"{'...' if L > 8 else ''}), {E} experts, top-{K}; {steps} forward steps "
          f"({'recorded' if t.step is not None else 'inferred'}); fields: "
          f"{', '.join(n for n in ('weights', 'request', 'phase', 'position', 'predicted', 'step') if getattr(t, n) is not None) or 'experts and meta only'}.",
          ""]
    if t.meta.get("note"):
        md += [f"> {t.meta['note']}", ""]
    md += ["### Hit rate vs budget", "",
           f"Replayed with `{semantics}` semantics (the worker's demand path: per forward step each layer looks up the "
           f"distinct experts its rows routed to). Budget in experts (% of all {L * E}).", "",
           "| allocation | policy | " + " | ".join(f"{b} ({100 * b / (L * E):.0f}%)" for b in budgets) + " |",
           "|---|---|" + "---|" * len(budgets)]
    for (al, pol), ys in curves.items():
        md.append(f"| {al} | {pol} | " + " | ".join(_fmt(y) for y in ys) + " |")
    md += ["", f"![hit rate vs budget]({figs['hit_rate'].name})", ""]

    md += ["### Expert popularity", "", f"![popularity]({figs['popularity'].name})", "",
           "| layer | top experts (share) | least used (share) |", "|---|---|---|"]
    share = pop / np.maximum(pop.sum(axis=1, keepdims=True), 1)
    for col in range(L):
        o = np.argsort(-share[col], kind="stable")
        md.append(f"| {t.layer_ids[col]} | " + ", ".join(f"{e} ({share[col, e]:.2f})" for e in o[:3]) + " | " +
                  ", ".join(f"{e} ({share[col, e]:.3f})" for e in o[::-1][:3]) + " |")
    md += ["", "### Reuse distance", "",
           "Stack distance of each (token, expert) access within its layer; the CDF at d is the hit rate of an "
           "LRU cache of d slots on the flat access sequence.", "",
           f"![reuse distance]({figs['reuse'].name})", "",
           "| layer | first uses | median | P(d < top-k) | P(d < E/4) | P(d < E/2) |", "|---|---|---|---|---|---|"]
    for col, d in enumerate(dists):
        fin = d[np.isfinite(d)]
        md.append(f"| {t.layer_ids[col]} | {int((~np.isfinite(d)).sum())} | "
                  f"{_fmt(float(np.median(fin)) if len(fin) else float('nan'), 1)} | {_fmt((d < K).mean())} | "
                  f"{_fmt((d < E / 4).mean())} | {_fmt((d < E / 2).mean())} |")
    md += ["", "### Prediction accuracy per layer", ""]
    if accs:
        md += ["Per predicted layer, over decode rows: recall = share of the routed experts inside the proposal's "
               "first `width`; strict = the proposal's top-k equals the routed set. ID-based predictors are "
               "replayed through `gpu_worker.predictors` in the worker's call order (predict layer m+1 before "
               "observing layer m); layer 0 is never predicted.", "",
               f"![prediction accuracy]({figs['accuracy'].name})", "",
               "| predictor | width | " + " | ".join(str(x) for x in t.layer_ids) + " | mean |",
               "|---|---|" + "---|" * (L + 1)]
        for a in accs:
            for label, arr in (("recall", a.recall), ("strict", a.strict)):
                mean = float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")
                md.append(f"| {a.name} {label} | {a.width} | " + " | ".join(_fmt(float(v), 2) for v in arr) +
                          f" | {_fmt(mean)} |")
    md += [f"- note: {n}" for n in notes]
    if t.predicted is None:
        md.append("- the trace has no `predicted` field: the worker's own (e.g. cross_layer) proposals were not "
                  "recorded; cross_layer needs hidden states and cannot be replayed from ids.")
    md += [""]
    if figs["transitions"] is not None:
        tp = []
        for col in range(L - 1):
            m = tr[col].astype(np.float64)
            rows_tot = m.sum(axis=1)
            # predicting layer l+1 from one expert at l: the best next expert's share, weighted by use
            tp.append(float((m.max(axis=1)).sum() / max(1.0, rows_tot.sum())))
        md += ["### Layer-to-layer transitions", "",
               f"![transitions]({figs['transitions'].name})", "",
               "Share of (expert at l, expert at l+1) pairs that the single most likely successor of the expert at "
               "l accounts for (uniform: 1/E = " + f"{1 / E:.3f}" + "):", "",
               "| " + " | ".join(f"{t.layer_ids[c]}->{t.layer_ids[c + 1]}" for c in range(L - 1)) + " |",
               "|" + "---|" * (L - 1), "| " + " | ".join(_fmt(x) for x in tp) + " |", ""]
    md += ["### Router entropy", "", f"![entropy]({figs['entropy'].name})", "",
           "| layer | " + " | ".join(str(x) for x in t.layer_ids) + " |", "|---|" + "---|" * L,
           "| usage entropy / log E | " + " | ".join(_fmt(float(v), 2) for v in ent["usage"]) + " |"]
    if "weights" in ent:
        md.append("| top-k weight entropy / log K | " + " | ".join(_fmt(float(v), 2) for v in ent["weights"]) + " |")
    else:
        md.append("| (no router weights in the trace: usage entropy only) |" + " |" * L)
    md += ["", "### Rarely used experts (pruning candidates)", "",
           f"Experts with less than {RARE_SHARE:.2f}/E of their layer's token assignments "
           f"({100 * RARE_SHARE / E:.2f}%): {len(rare)} of {L * E}.", ""]
    if rare:
        md += ["| layer | expert | share |", "|---|---|---|"]
        md += [f"| {t.layer_ids[l]} | {e} | {s:.4f} |" for l, e, s in rare[:40]]
        if len(rare) > 40:
            md.append(f"| ... | {len(rare) - 40} more | |")
    md += [""]
    if learned is not None:
        lo = learned.allocation
        md += [f"### Learned allocation for {budget} ({q} experts, policy {policy})", "",
               "Starting points from per-layer hit curves (every layer at c slots, c = 0..E; the split that "
               "maximizes their sum, by dynamic programming) and the fixed allocations, then slot moves kept when "
               "a full replay's projected time (the cost model) falls:", "",
               "| layer | " + " | ".join(str(x) for x in t.layer_ids) + " |", "|---|" + "---|" * L,
               "| slots | " + " | ".join(str(lo.learned[x]) for x in t.layer_ids) + " |", "",
               f"| allocation | hit rate | projected s ({learned.profile}) | decode tokens/s |", "|---|---|---|---|"]
        md += [f"| {k} | {_fmt(v)} | {_fmt(learned.compared_s[k], 4)} | {_fmt(learned.compared_tps[k], 1)} |"
               for k, v in learned.compared.items()]
        md += ["", f"Written to `{alloc_path.name}` (format `fate-allocation/1`; load it with "
                   f"`gpu_worker.policy.LearnedAllocation.load`, or replay it with "
                   f"`simulate --allocations learned:{alloc_path.name}`).", ""]
    summary = {"trace": t.path, "budgets": budgets,
               "hit_rate": {f"{al}/{pol}": ys for (al, pol), ys in curves.items()},
               "accuracy": {a.name: {"width": a.width, "recall": [None if math.isnan(x) else x for x in a.recall.tolist()],
                                     "strict": [None if math.isnan(x) else x for x in a.strict.tolist()]} for a in accs},
               "entropy": {k: v.tolist() for k, v in ent.items()}, "rare": rare,
               "learned": learned.allocation.to_json() if learned else None,
               "figures": {k: v.name for k, v in figs.items() if v is not None}}
    return md, summary


def write_report(traces: Sequence[Trace], out: str | Path, budget: str = "25%", policy: str = "lru",
                 semantics: str = "worker", hardware: str = "this-machine") -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Expert-trace analysis", "",
          "Generated by `python -m gpu_worker analyze`. Hit rates replay the traces through the worker's own "
          "cache ledger, policy and allocation classes (gpu_worker.policy) with Belady's optimal replacement as the bound.", ""]
    summaries = []
    for t in traces:
        lines, summary = analyze_trace(t, out, budget, policy, semantics, hardware=hardware)
        md += lines
        summaries.append(summary)
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    (out / "summary.json").write_text(json.dumps(summaries, indent=1, default=float))
    return path


def add_analyze_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("analyze", help="markdown report + PNG plots from expert traces, and a learned allocation",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+", metavar="TRACE", help="moe-trace/1 .npz files")
    p.add_argument("--out", required=True, help="directory for report.md, the PNGs and the allocation file")
    p.add_argument("--budget", default="25%", help="budget the learned allocation is for (25%% or experts)")
    p.add_argument("--policy", default="lru", choices=[x for x in SIM_POLICIES if x != "belady"],
                   help="replacement policy the allocation is learned with")
    p.add_argument("--semantics", default="worker", choices=("worker", "flat"))
    p.add_argument("--hardware", default="this-machine",
                   help="cost model profile the allocation is learned against (simulate's --hardware)")
    p.set_defaults(func=cmd_analyze)
    return p


def cmd_analyze(a: argparse.Namespace) -> int:
    traces = [load_trace(t) for t in a.traces]
    path = write_report(traces, a.out, a.budget, a.policy, a.semantics, a.hardware)
    figs = sorted(p.name for p in Path(a.out).glob("*.png"))
    print(f"wrote {path} ({len(figs)} plots) and {', '.join(p.name for p in Path(a.out).glob('*.allocation-*.json'))}")
    return 0
