"""Hit-rate curves over budgets and the learned allocation (the per-layer split that minimizes the replay's
projected time)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..policy import LearnedAllocation
from ..simulator import (
    PROFILES, HardwareProfile, Replay, SimConfig, estimate_cost, layer_slots, resolve_expert_bytes, simulate,
)
from ..traces import Trace

BUDGET_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8)


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
