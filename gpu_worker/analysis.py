"""Trace analysis: a markdown report with PNG plots, and a learned per-layer allocation.

    python -m gpu_worker analyze TRACE... --out DIR [--budget 25%] [--policy lru] [--semantics worker]

For each trace: hit rate vs budget per policy (Belady included; uniform and shallow_favoring),
per-layer expert popularity, reuse-distance CDF per layer, per-layer prediction accuracy (the
recorded `predicted` field when present; prev_token and eap replayed through their classes),
layer-to-layer expert transitions, router entropy per layer, rarely used experts (pruning
candidates), and the best per-layer allocation found for the budget, written as a
`fate-allocation/1` file (gpu_worker.policy.allocation) the worker can load.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .policy import LearnedAllocation
from .simulator import (
    PROFILES, SIM_POLICIES, HardwareProfile, Replay, SimConfig, estimate_cost, layer_slots, make_sim_predictor,
    parse_budget, resolve_expert_bytes, simulate,
)
from .traces import Trace, load_trace

BUDGET_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8)
RARE_SHARE = 0.25  # an expert with less than a quarter of the uniform share (1/E) of a layer's assignments


# -- statistics (numpy; no plotting) -------------------------------------------------------------------


def popularity(t: Trace) -> np.ndarray:
    """[L, E] token assignments per layer and expert (-1 cells skipped)."""
    L, E = t.num_layers, t.num_experts
    out = np.zeros((L, E), np.int64)
    for col in range(L):
        cells = t.experts[:, col, :].ravel()
        out[col] = np.bincount(cells[cells >= 0], minlength=E)[:E]
    return out


def reuse_distances(t: Trace) -> list[np.ndarray]:
    """Per layer: the stack (reuse) distance of every (token, expert) access, in row order: how many
    distinct other experts of the layer were used since this expert's previous use (inf: first use).
    A cache of c slots under LRU hits exactly the accesses with distance < c (flat, unpinned)."""
    out = []
    for col in range(t.num_layers):
        order: list[int] = []  # most recent first
        dist = []
        for row in t.experts[:, col, :].tolist():
            for e in dict.fromkeys(x for x in row if x >= 0):
                try:
                    d = order.index(e)
                    del order[d]
                except ValueError:
                    d = math.inf
                order.insert(0, e)
                dist.append(d)
        out.append(np.array(dist, np.float64))
    return out


def transitions(t: Trace) -> np.ndarray:
    """[L-1, E, E]: tokens routed to expert a at layer l and to b at layer l+1 (all top-k pairs)."""
    L, E, K = t.num_layers, t.num_experts, t.experts.shape[2]
    out = np.zeros((max(0, L - 1), E, E), np.int64)
    for col in range(L - 1):
        a, b = t.experts[:, col, :], t.experts[:, col + 1, :]
        for i in range(K):
            for j in range(K):
                ok = (a[:, i] >= 0) & (b[:, j] >= 0)
                np.add.at(out[col], (a[ok, i], b[ok, j]), 1)
    return out


def router_entropy(t: Trace, pop: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per layer, in [0, 1]: `usage` = entropy of the expert usage distribution / log E (1 = uniform use);
    `weights` = mean over tokens of the entropy of the renormalized top-k router weights / log K (1 = the
    top-k experts weigh the same), when the trace has weights."""
    pop = popularity(t) if pop is None else pop
    E = t.num_experts
    p = pop / np.maximum(pop.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        usage = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1) / math.log(E)
    out = {"usage": usage}
    if t.weights is not None and t.experts.shape[2] > 1:
        w = np.where(t.experts >= 0, t.weights.astype(np.float64), 0.0)  # [N, L, K]
        w = w / np.maximum(w.sum(axis=2, keepdims=True), 1e-12)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(w > 0, w * np.log(w), 0.0).sum(axis=2) / math.log(t.experts.shape[2])  # [N, L]
        out["weights"] = h.mean(axis=0)
    return out


def rare_experts(pop: np.ndarray, share: float = RARE_SHARE) -> list[tuple[int, int, float]]:
    """(layer column, expert, share of the layer's assignments) for experts below share/E, rarest first."""
    L, E = pop.shape
    tot = np.maximum(pop.sum(axis=1, keepdims=True), 1)
    frac = pop / tot
    out = [(l, e, float(frac[l, e])) for l in range(L) for e in range(E) if frac[l, e] < share / E]
    return sorted(out, key=lambda x: (x[2], x[0], x[1]))


@dataclass
class Accuracy:
    """Per layer (MoE column) prediction quality over the rows predicted."""

    name: str
    width: int
    recall: np.ndarray  # [L] mean |predicted[:width] & actual| / |actual|; nan where never predicted
    strict: np.ndarray  # [L] share of rows whose predicted top-k equals the actual top-k set
    rows: np.ndarray  # [L] rows counted


def _score(pred_rows: Sequence[Sequence[int]], actual: np.ndarray, width: int, k: int) -> tuple[float, float, int]:
    rec = strict = 0.0
    n = 0
    for p, a in zip(pred_rows, actual.tolist()):
        act = {x for x in a if x >= 0}
        if not act:
            continue
        n += 1
        rec += len(act.intersection(p[:width])) / len(act)
        strict += set(p[:k]) == act
    return rec, strict, n


def prediction_accuracy(t: Trace, names: Sequence[str] = ("prev_token", "eap"), decode_only: bool = True
                        ) -> tuple[list[Accuracy], list[str]]:
    """Accuracy of the recorded proposals (if any) and of ID-based predictors replayed in the worker's call
    order (predict(m + 1) before observe(m)); rows of decode steps only when the trace has phases."""
    rp = Replay(t)
    K, L = t.experts.shape[2], t.num_layers
    notes: list[str] = []
    rows_ok = (t.phase == 1) if (decode_only and t.phase is not None) else np.ones(t.num_tokens, bool)
    out: list[Accuracy] = []
    if t.predicted is not None:
        W = t.predicted.shape[2]
        rec, st, n = np.zeros(L), np.zeros(L), np.zeros(L, np.int64)
        for col in range(L):
            pr = t.predicted[:, col, :]
            has = (pr >= 0).any(axis=1) & rows_ok
            if has.any():
                preds = [[x for x in r if x >= 0] for r in pr[has].tolist()]
                rec[col], st[col], n[col] = _score(preds, t.experts[has, col, :], W, K)
        out.append(_accuracy("recorded", W, rec, st, n))
    for name in names:
        pred, note = make_sim_predictor(name, t, K, t.num_experts, t.layer_ids)
        if pred is None:
            if note:
                notes.append(note)
            continue
        rec, st, n = np.zeros(L), np.zeros(L), np.zeros(L, np.int64)
        started: set[int] = set()
        last: dict[int, int] = {}
        for s in range(rp.S):
            for rid in rp.rids[rp.step_starts[s]:rp.step_ends[s]]:
                last[rid] = s
        for s in range(rp.S):
            a, b = int(rp.step_starts[s]), int(rp.step_ends[s])
            rids = rp.rids[a:b]
            for rid in dict.fromkeys(rids):
                if rid not in started:
                    started.add(rid)
                    pred.start_request(rid)
            ok = rows_ok[a:b]
            for col in range(L):
                actual = t.experts[a:b, col, :]
                if col + 1 < L:
                    p = pred.predict(col + 1, rids, K)
                    if ok.any():
                        nxt = t.experts[a:b, col + 1, :]
                        r_, s_, n_ = _score([p[i] for i in range(len(p)) if ok[i]], nxt[ok], K, K)
                        rec[col + 1] += r_
                        st[col + 1] += s_
                        n[col + 1] += n_
                pred.observe(col, rids, [[x for x in row if x >= 0] for row in actual.tolist()])
            for rid in dict.fromkeys(rids):
                if last.get(rid) == s:
                    pred.end_request(rid)
        out.append(_accuracy(name, K, rec, st, n))
    return out, notes


def _accuracy(name: str, width: int, rec: np.ndarray, st: np.ndarray, n: np.ndarray) -> Accuracy:
    with np.errstate(invalid="ignore", divide="ignore"):
        return Accuracy(name, width, np.where(n > 0, rec / np.maximum(n, 1), np.nan),
                        np.where(n > 0, st / np.maximum(n, 1), np.nan), n)


# -- hit-rate curves and the learned allocation -------------------------------------------------------


def budget_grid(t: Trace) -> list[int]:
    total = t.num_layers * t.num_experts
    out = sorted({int(f * total) for f in BUDGET_FRACTIONS} | {total})
    return [q for q in out if q >= t.experts.shape[2]]


def hit_rate_curves(rp: Replay, policies: Sequence[str], allocations: Sequence[str], budgets: Sequence[int],
                    semantics: str = "worker") -> dict[tuple[str, str], list[float]]:
    out: dict[tuple[str, str], list[float]] = {}
    for al in allocations:
        for pol in policies:
            out[(al, pol)] = [simulate(rp, SimConfig(pol, q, allocation=al, semantics=semantics)).hit_rate
                              for q in budgets]
    return out


@dataclass
class LearnedResult:
    allocation: LearnedAllocation
    total_slots: int
    policy: str
    curves: np.ndarray  # [L, E + 1] hits of each layer with c slots (every layer at c)
    compared: dict[str, float] = field(default_factory=dict)  # allocation -> hit rate at the budget
    compared_s: dict[str, float] = field(default_factory=dict)  # allocation -> projected seconds (the objective)
    compared_tps: dict[str, float] = field(default_factory=dict)  # allocation -> projected decode tokens/s
    profile: str = ""  # the cost model's hardware profile


def _dp_split(curves: np.ndarray, Q: int, floor: int) -> list[int] | None:
    """Slots per layer maximizing sum_l curves[l, c_l] with sum c_l <= Q and c_l >= floor (exact DP)."""
    L, E1 = curves.shape
    E = E1 - 1
    if floor * L > Q:
        return None
    NEG = -1 << 60
    best = np.full((L + 1, Q + 1), NEG, np.int64)  # best[l][q]: max hits of layers < l using q slots
    choice = np.zeros((L + 1, Q + 1), np.int64)
    best[0, 0] = 0
    for l in range(L):
        for q in range(Q + 1):
            if best[l, q] == NEG:
                continue
            for c in range(floor, min(E, Q - q) + 1):
                v = best[l, q] + curves[l, c]
                if v > best[l + 1, q + c]:
                    best[l + 1, q + c] = v
                    choice[l + 1, q + c] = c
    q = int(np.argmax(best[L]))
    out = [0] * L
    for l in range(L, 0, -1):
        out[l - 1] = int(choice[l, q])
        q -= out[l - 1]
    return out


def learn_allocation(rp: Replay, total_slots: int, policy: str = "lru", semantics: str = "worker",
                     budget_label: str = "", max_evals: int = 120, profile: HardwareProfile | None = None,
                     expert_bytes: int = 0, fmt: str = "int4") -> LearnedResult:
    """The per-layer slots that minimize the replay's projected time (the cost model on `profile`, default
    this-machine, with the trace's expert bytes) for `total_slots` experts: hits alone ignore how misses
    group into demand waves (one wave of n misses costs one link latency), so the fewest misses are not
    always the fastest decode.

    1. Each layer's hit curve h_l(c), c = 0..E, from the simulator with every layer at c slots (one
       run per c gives every layer's point).
    2. Starting points: the split maximizing sum_l h_l(c_l) (exact, by dynamic programming; once with
       no floor and once with at least top-k slots per layer), uniform and shallow_favoring; each is
       replayed in full and the best one kept (layers interact through the budget's free units: a
       layer with fewer slots than its step needs borrows other layers' experts).
    3. Greedy marginal-gain search with the full replay: try moving one slot from the layer whose
       curve loses least to the one whose curve gains most (the best few pairs), keep a move that
       lowers the projected time, until none does or `max_evals` replays were spent.
    """
    t = rp.trace
    profile = profile or PROFILES["this-machine"]
    eb = expert_bytes or resolve_expert_bytes(profile, t, fmt)
    L, E, K = rp.L, rp.E, rp.K
    Q = min(total_slots, L * E)
    curves = np.zeros((L, E + 1), np.int64)
    for c in range(1, E + 1):
        if c * L < K:
            continue
        r = simulate(rp, SimConfig(policy, c * L, semantics=semantics,
                                   slots_override=tuple((col, c) for col in range(L))))
        curves[:, c] = r.hits + r.prefetch_hits
    evals = 0
    seen: dict[tuple[int, ...], tuple[float, float, float]] = {}  # slots -> (seconds, hits, decode tokens/s)

    def replay(slots_col: Sequence[int]) -> tuple[float, float, float]:
        nonlocal evals
        key = tuple(int(x) for x in slots_col)
        if key not in seen:
            evals += 1
            r = simulate(rp, SimConfig(policy, total_slots, semantics=semantics, slots_override=tuple(enumerate(key))))
            c = estimate_cost(r, profile, eb)
            seen[key] = (c.decode_s + c.prefill_s, float((r.hits + r.prefetch_hits).sum()), c.decode_tokens_per_s)
        return seen[key]

    def score(slots_col: Sequence[int]) -> float:  # higher is better: less projected time
        return -replay(slots_col)[0]

    starts: dict[str, list[int]] = {}
    for name, floor in (("curves", 0), ("curves_min_topk", K)):
        split = _dp_split(curves, Q, floor)
        if split is not None:
            starts[name] = split
    for name in ("uniform", "shallow_favoring"):
        starts[name] = layer_slots(rp, SimConfig(policy, total_slots, allocation=name))
    start_name = max(starts, key=lambda k: score(starts[k]))
    cur = list(starts[start_name])
    cur_score = score(cur)
    improved = True
    while improved and evals < max_evals:
        improved = False
        gain = [curves[j, cur[j] + 1] - curves[j, cur[j]] if cur[j] < E else -1 << 40 for j in range(L)]
        loss = [curves[i, cur[i]] - curves[i, cur[i] - 1] if cur[i] > 0 else 1 << 40 for i in range(L)]
        pairs = sorted(((gain[j] - loss[i], i, j) for i in range(L) for j in range(L) if i != j and cur[i] > 0
                        and cur[j] < E), reverse=True)[:6]
        for _, i, j in pairs:
            if evals >= max_evals:
                break
            cand = list(cur)
            cand[i] -= 1
            cand[j] += 1
            sc = score(cand)
            if sc > cur_score:
                cur, cur_score, improved = cand, sc, True
                break
    slots = {t.layer_ids[col]: cur[col] for col in range(L)}
    meta = {"model": t.model, "num_experts": E, "moe_layers": t.layer_ids, "policy": policy,
            "budget": budget_label or f"{total_slots} experts", "source": [t.path], "semantics": semantics,
            "search": {"start": start_name, "replays": evals}}
    alloc = LearnedAllocation(slots, total_slots, meta)
    lookups = float(rp.step_lookups.sum()) if semantics == "worker" else float(
        sum(len(r) for rows in rp.flat_rows for r in rows))
    final = {name: replay(starts[name]) for name in ("uniform", "shallow_favoring")}
    final["learned"] = replay(cur)
    compared = {k: v[1] / lookups for k, v in final.items()}
    alloc.meta["expected_hit_rate"] = round(compared["learned"], 6)
    alloc.meta["compared"] = {k: round(v, 6) for k, v in compared.items()}
    alloc.meta["objective"] = f"projected seconds on {profile.name} ({eb} bytes per expert)"
    alloc.meta["projected_s"] = {k: round(v[0], 6) for k, v in final.items()}
    return LearnedResult(alloc, total_slots, policy, curves, compared, {k: v[0] for k, v in final.items()},
                         {k: v[2] for k, v in final.items()}, profile.name)


# -- plots --------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def hit_rate_figure(t: Trace, budgets: list[int], curves: dict[tuple[str, str], list[float]],
                    allocations: Sequence[str], learned: LearnedResult | None):
    """One panel per allocation; the learned allocation's point (a star) on the first; one legend, on the
    right panel, with every panel's entries."""
    plt = _plt()
    total = t.num_layers * t.num_experts
    fig, axes = plt.subplots(1, len(allocations), figsize=(5.2 * len(allocations), 4), sharey=True, squeeze=False)
    x = [100 * q / total for q in budgets]
    for k, (ax, al) in enumerate(zip(axes[0], allocations)):
        for (a, pol), ys in curves.items():
            if a != al:
                continue
            style = dict(color="black", linestyle="--", linewidth=2) if pol == "belady" else {}
            ax.plot(x, ys, marker="o", markersize=3, label=pol, **style)
        if learned is not None and k == 0:  # its own allocation: shown once
            ax.scatter([100 * learned.total_slots / total], [learned.compared["learned"]], marker="*", s=120,
                       color="crimson", zorder=5, label=f"learned allocation ({learned.policy})")
        ax.set_title(f"{al}")
        ax.set_xlabel("budget (% of all experts)")
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("hit rate")
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    axes[0][-1].legend(list(handles.values()), list(handles), fontsize=8, loc="lower right")
    fig.suptitle(f"{t.name}: hit rate vs budget (worker replay)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_hit_rates(path: Path, t: Trace, budgets: list[int], curves: dict[tuple[str, str], list[float]],
                   allocations: Sequence[str], learned: LearnedResult | None) -> Path:
    fig = hit_rate_figure(t, budgets, curves, allocations, learned)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_popularity(path: Path, t: Trace, pop: np.ndarray) -> Path:
    plt = _plt()
    share = pop / np.maximum(pop.sum(axis=1, keepdims=True), 1)
    L, E = share.shape
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.35 * E), min(10, 1.5 + 0.3 * L)))
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(L))
    ax.set_yticklabels([str(x) for x in t.layer_ids], fontsize=7)
    fig.colorbar(im, ax=ax, label="share of the layer's assignments")
    ax.set_title(f"{t.name}: expert popularity per layer (uniform = {1 / E:.3f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reuse(path: Path, t: Trace, dists: list[np.ndarray]) -> Path:
    plt = _plt()
    E = t.num_experts
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = np.arange(0, E + 1)
    cmap = plt.get_cmap("viridis")
    for col, d in enumerate(dists):
        if not len(d):
            continue
        ys = [(d < x).mean() for x in xs]
        ax.plot(xs, ys, color=cmap(col / max(1, len(dists) - 1)), linewidth=1.2,
                label=f"layer {t.layer_ids[col]}" if len(dists) <= 12 or col % max(1, len(dists) // 8) == 0 else None)
    ax.set_xlabel("reuse distance d (distinct other experts since the last use)")
    ax.set_ylabel("P(distance < d) = LRU hit rate with d slots")
    ax.set_title(f"{t.name}: reuse-distance CDF per layer", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy(path: Path, t: Trace, accs: list[Accuracy]) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = np.arange(t.num_layers)
    for a in accs:
        ax.plot(x, a.recall, marker="o", markersize=3, label=f"{a.name}: recall@{a.width}")
        ax.plot(x, a.strict, marker="x", markersize=3, linestyle=":", label=f"{a.name}: strict top-k")
    ax.set_xticks(x)
    ax.set_xticklabels([str(v) for v in t.layer_ids], fontsize=7)
    ax.set_xlabel("MoE layer predicted")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{t.name}: prediction accuracy per layer (decode rows)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_transitions(path: Path, t: Trace, tr: np.ndarray) -> Path:
    plt = _plt()
    n = tr.shape[0]
    show = list(range(n)) if n <= 8 else sorted(set(np.linspace(0, n - 1, 8).astype(int).tolist()))
    cols = min(4, max(1, len(show)))
    rows = math.ceil(len(show) / cols) if show else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, col in zip(axes.ravel(), show):
        m = tr[col].astype(np.float64)
        m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        ax.imshow(m, cmap="magma", vmin=0, vmax=max(0.05, float(m.max())), interpolation="nearest")
        ax.set_title(f"{t.layer_ids[col]} -> {t.layer_ids[col + 1]}", fontsize=8)
        ax.set_xlabel("expert at next layer", fontsize=7)
        ax.set_ylabel("expert", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.axis("on")
    fig.suptitle(f"{t.name}: P(expert at layer l+1 | expert at layer l)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_entropy(path: Path, t: Trace, ent: dict[str, np.ndarray]) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = np.arange(t.num_layers)
    ax.plot(x, ent["usage"], marker="o", label="usage entropy / log E")
    if "weights" in ent:
        ax.plot(x, ent["weights"], marker="s", label="top-k weight entropy / log K")
    ax.set_xticks(x)
    ax.set_xticklabels([str(v) for v in t.layer_ids], fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("MoE layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{t.name}: router entropy per layer (1 = uniform)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the report ---------------------------------------------------------------------------------------


def _fmt(x: float, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def analyze_trace(t: Trace, out: Path, budget: str = "25%", policy: str = "lru", semantics: str = "worker",
                  policies: Sequence[str] = SIM_POLICIES, allocations: Sequence[str] = ("uniform", "shallow_favoring"),
                  predictors: Sequence[str] = ("prev_token", "eap")) -> tuple[list[str], dict[str, Any]]:
    """Plots into `out`, the report's markdown lines and a JSON summary for one trace."""
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in t.name)
    rp = Replay(t)
    L, E, K = t.num_layers, t.num_experts, t.experts.shape[2]
    pop = popularity(t)
    budgets = budget_grid(t)
    curves = hit_rate_curves(rp, policies, allocations, budgets, semantics)
    q = parse_budget(budget, L, E)
    learned = learn_allocation(rp, q, policy, semantics, budget) if q >= K else None
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
                 semantics: str = "worker") -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Expert-trace analysis", "",
          "Generated by `python -m gpu_worker analyze`. Hit rates replay the traces through the worker's own "
          "cache ledger, policy and allocation classes (gpu_worker.policy) with Belady's optimal replacement as the bound.", ""]
    summaries = []
    for t in traces:
        lines, summary = analyze_trace(t, out, budget, policy, semantics)
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
    p.set_defaults(func=cmd_analyze)
    return p


def cmd_analyze(a: argparse.Namespace) -> int:
    traces = [load_trace(t) for t in a.traces]
    path = write_report(traces, a.out, a.budget, a.policy, a.semantics)
    figs = sorted(p.name for p in Path(a.out).glob("*.png"))
    print(f"wrote {path} ({len(figs)} plots) and {', '.join(p.name for p in Path(a.out).glob('*.allocation-*.json'))}")
    return 0
