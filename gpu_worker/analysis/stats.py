"""Trace statistics (numpy, no plotting): popularity, reuse distance, transitions, router entropy, rare
experts, prediction accuracy of the replayable predictors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..simulator import Replay, make_sim_predictor
from ..traces import Trace

RARE_SHARE = 0.25  # an expert with less than a quarter of the uniform share (1/E) of a layer's assignments


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
