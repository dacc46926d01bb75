"""A trace prepared once for many simulations (the per-step distinct experts in the model's order)."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ..traces import Trace


class Replay:
    """A trace prepared once for many simulations: per layer the sorted distinct experts of every
    step (worker semantics), the rows as tuples (flat), and Belady's occurrence lists."""

    def __init__(self, trace: Trace):
        self.trace = trace
        ex = trace.experts
        self.N, self.L, self.K = ex.shape
        self.E = trace.num_experts
        steps = trace.steps()
        N = self.N
        if N:
            starts = np.flatnonzero(np.r_[True, steps[1:] != steps[:-1]])
        else:
            starts = np.zeros(0, np.int64)
        self.step_starts = starts
        self.step_ends = np.r_[starts[1:], N].astype(np.int64)
        self.S = len(starts)
        self.step_tokens = (self.step_ends - self.step_starts).astype(np.int32)
        phase = trace.phase
        if phase is not None and self.S:
            decode_rows = (phase == 1).astype(np.int64)
            per_step = np.add.reduceat(decode_rows, starts) if N else np.zeros(0)
            self.step_decode = per_step == self.step_tokens
        else:
            self.step_decode = np.ones(self.S, bool)
        self.step_of_row = np.repeat(np.arange(self.S), self.step_tokens)
        self._uniq: list[list[tuple[int, ...]]] | None = None
        self._by_step: list[list[tuple[int, ...]]] | None = None
        self._step_lookups: np.ndarray | None = None
        self._flat: list[list[tuple[int, ...]]] | None = None
        self._occ_step: list[dict[int, list[int]]] | None = None
        self._occ_flat: list[dict[int, list[int]]] | None = None
        req = trace.request
        self.rids = req.tolist() if req is not None else [0] * N

    @property
    def uniq(self) -> list[list[tuple[int, ...]]]:
        """[layer][step] -> the distinct experts the step routed to, in the order the model asks the cache
        for them: most token assignments in the step first, ties: lower id (gpu_worker.model._moe)."""
        if self._uniq is None:
            E, S = self.E, self.S
            out = []
            for col in range(self.L):
                cells = self.trace.experts[:, col, :].astype(np.int64)
                valid = cells >= 0
                key, counts = np.unique((self.step_of_row[:, None] * E + cells)[valid], return_counts=True)
                st, e = key // E, key % E
                order = np.lexsort((e, -counts, st))  # by step, then popularity, then id
                st, e = st[order], e[order].tolist()
                b = np.searchsorted(st, np.arange(S + 1)).tolist()
                out.append([tuple(e[b[i]:b[i + 1]]) for i in range(S)])
            self._uniq = out
        return self._uniq

    @property
    def by_step(self) -> list[list[tuple[int, ...]]]:
        """[step][layer] -> the same as `uniq`, step-major (the worker's loop order)."""
        if self._by_step is None:
            self._by_step = [list(x) for x in zip(*self.uniq)] if self.L else [[] for _ in range(self.S)]
        return self._by_step

    @property
    def step_lookups(self) -> np.ndarray:
        """[S, L] distinct experts each step asks each layer for."""
        if self._step_lookups is None:
            self._step_lookups = np.array([[len(x) for x in col] for col in self.uniq], np.int32).T.reshape(
                self.S, self.L)
        return self._step_lookups

    @property
    def flat_rows(self) -> list[list[tuple[int, ...]]]:
        """[layer][row] -> the row's experts in routing order (-1 dropped, duplicates dropped)."""
        if self._flat is None:
            out = []
            for col in range(self.L):
                cells = self.trace.experts[:, col, :]
                rows = [tuple(r) for r in cells.tolist()]
                srt = np.sort(cells, axis=1)
                if (cells < 0).any() or (self.K > 1 and (srt[:, 1:] == srt[:, :-1]).any()):
                    rows = [tuple(dict.fromkeys(x for x in r if x >= 0)) for r in rows]
                out.append(rows)
            self._flat = out
        return self._flat

    def occurrences(self, semantics: str) -> list[dict[int, list[int]]]:
        """Per layer: expert -> sorted clock values of its uses (steps, or flat access indices)."""
        if semantics == "worker":
            if self._occ_step is None:
                self._occ_step = [_group([(s, e) for s, ids in enumerate(col) for e in ids]) for col in self.uniq]
            return self._occ_step
        if self._occ_flat is None:
            occ = []
            for rows in self.flat_rows:
                flat = [e for r in rows for e in r]
                occ.append(_group([(i, e) for i, e in enumerate(flat)]))
            self._occ_flat = occ
        return self._occ_flat


def _group(pairs: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for clock, e in pairs:
        out.setdefault(e, []).append(clock)
    return out
