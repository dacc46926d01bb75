"""Expert predictors: which experts an MoE layer will route to, proposed before it runs.

The worker's prefetch controller (gpu_worker.prefetch) and the offline simulator drive
these same classes. Torch-free (numpy for `eap`); `cross_layer`, which applies routers to
hidden states, lives with torch in gpu_worker.predictors and plugs into `make_predictor`.

Indices: `moe_layer` is the index among MoE layers (0-based), not the decoder layer.
Rows: one call covers a forward step's token rows; `rids[i]` is row i's request (a
prefill brings many rows of one request, a decode step one row per request).

Call order the worker uses (a replay that wants the worker's predictions calls the same):
for every forward step, for each MoE layer m in order,
  1. `predict(m + d, rids, width, gate_input)` for d = 1 .. lookahead (m + d < MoE layers),
     with layer m's gate input (its post-attention norm output): made before layer m routes;
  2. `observe(m, rids, experts)` with layer m's actual routing (before its experts run).
So a prediction for layer m + 1 sees the routings of this step's layers <= m - 1, and of
every earlier step. `start_request(rid)` comes before a request's first row is observed or
predicted, `end_request(rid)` after its last step.
"""

from __future__ import annotations

import inspect
import random
from abc import ABC, abstractmethod
from collections import deque
from typing import ClassVar, Mapping, Sequence

import numpy as np

from expert_store.errors import FateError


class PredictorError(FateError, ValueError):
    """An unknown predictor, missing construction arguments, or a call it cannot serve."""


class Predictor(ABC):
    """Proposes, per token row, the experts an MoE layer will route to (most likely first)."""

    name: ClassVar[str]
    needs_gate_input: ClassVar[bool] = False  # True: predict() needs hidden states (a trace of ids can't replay it)

    def start_request(self, rid: int) -> None:
        """A request begins (before any of its rows is observed or predicted)."""

    def end_request(self, rid: int) -> None:
        """A request finished (or failed, or was cancelled): forget its state (EAP records it)."""

    def observe(self, moe_layer: int, rids: Sequence[int], experts: Sequence[Sequence[int]]) -> None:
        """The actual routing at MoE layer `moe_layer` (index among MoE layers, 0-based) for this step's token
        rows; rids[i] is row i's request."""

    @abstractmethod
    def predict(self, moe_layer: int, rids: Sequence[int], width: int, gate_input=None) -> list[list[int]]:
        """Per token row, up to `width` expert ids ranked most likely first, for MoE layer `moe_layer`, made
        before it runs."""


class NonePredictor(Predictor):
    """Load on demand: predicts nothing."""

    name = "none"

    def predict(self, moe_layer: int, rids: Sequence[int], width: int, gate_input=None) -> list[list[int]]:
        return [[] for _ in rids]


class PrevTokenPredictor(Predictor):
    """The experts the request's previous token used at the layer, then the ones before it.

    Per request and MoE layer a most-recently-used list: observing row [a, b] (a ranked first) moves b,
    then a, to the front, so the list starts [a, b, ...]; rows of one request in one step are observed
    in row order (the last prompt token counts as the most recent). A prediction is the list's first
    `width` ids; with width = top_k that is exactly the previous token's experts. A request with no
    history at the layer (its prefill) gets an empty list."""

    name = "prev_token"

    def __init__(self) -> None:
        self._mru: dict[int, dict[int, list[int]]] = {}  # rid -> moe layer -> experts, most recent first

    def start_request(self, rid: int) -> None:
        self._mru[rid] = {}

    def end_request(self, rid: int) -> None:
        self._mru.pop(rid, None)

    def observe(self, moe_layer: int, rids: Sequence[int], experts: Sequence[Sequence[int]]) -> None:
        for rid, row in zip(rids, experts):
            lst = self._mru.setdefault(rid, {}).setdefault(moe_layer, [])
            for e in reversed([int(x) for x in row]):
                if e in lst:
                    lst.remove(e)
                lst.insert(0, e)

    def predict(self, moe_layer: int, rids: Sequence[int], width: int, gate_input=None) -> list[list[int]]:
        return [list(self._mru.get(rid, {}).get(moe_layer, ())[: max(0, width)]) for rid in rids]


class EAPPredictor(Predictor):
    """Expert-activation-path matching, as MoE-Infinity does.

    Each running request keeps a count matrix [MoE layers, experts] (token assignments so far, prompt
    included). Finished requests' matrices go into a library (the most recent `library_size`).
    predict(m): compare the request's matrix with every library matrix by cosine similarity over the
    layers seen so far, rows [0, m) (for m = 0: all rows, i.e. earlier tokens); take the most similar
    one (ties: the most recently recorded); rank its row m's experts by count (ties: lower id) and fill
    up to `width` from global popularity (every routing observed at layer m, ties: lower id). With an
    empty library, nothing seen yet (similarity undefined), or no recorded matrix with a positive
    similarity, the prediction is global popularity alone.
    """

    name = "eap"

    def __init__(self, num_moe_layers: int, num_experts: int, library_size: int = 256):
        if num_moe_layers < 1 or num_experts < 1 or library_size < 1:
            raise PredictorError(f"eap needs num_moe_layers, num_experts and library_size >= 1, got "
                                 f"{num_moe_layers}, {num_experts}, {library_size}")
        self.num_moe_layers, self.num_experts = num_moe_layers, num_experts
        self.library_size = library_size
        self._running: dict[int, np.ndarray] = {}  # rid -> [L, E] float64 counts
        self._library: deque[np.ndarray] = deque(maxlen=library_size)  # oldest first
        self._stack: np.ndarray | None = None  # the library stacked [N, L, E], rebuilt when it changes
        self.popularity = np.zeros((num_moe_layers, num_experts), dtype=np.float64)

    def start_request(self, rid: int) -> None:
        self._running[rid] = np.zeros((self.num_moe_layers, self.num_experts), dtype=np.float64)

    def end_request(self, rid: int) -> None:
        m = self._running.pop(rid, None)
        if m is not None and m.any():
            self._library.append(m)
            self._stack = None

    def observe(self, moe_layer: int, rids: Sequence[int], experts: Sequence[Sequence[int]]) -> None:
        for rid, row in zip(rids, experts):
            mat = self._running.get(rid)
            if mat is None:
                mat = self._running[rid] = np.zeros((self.num_moe_layers, self.num_experts), dtype=np.float64)
            for e in row:
                mat[moe_layer, int(e)] += 1.0
                self.popularity[moe_layer, int(e)] += 1.0

    def matrix(self, rid: int) -> np.ndarray:
        """The running request's count matrix (a copy)."""
        return self._running[rid].copy()

    def best_match(self, rid: int, moe_layer: int) -> int | None:
        """Index into the library (0 = oldest) of the most similar matrix, or None."""
        q = self._running.get(rid)
        if q is None or not self._library:
            return None
        rows = slice(0, moe_layer) if moe_layer > 0 else slice(0, self.num_moe_layers)
        qv = q[rows].ravel()
        qn = float(np.linalg.norm(qv))
        if qn == 0.0:
            return None
        if self._stack is None:
            self._stack = np.stack(list(self._library))
        lib = self._stack[:, rows, :].reshape(len(self._stack), -1)  # [N, rows * E]
        norms = np.linalg.norm(lib, axis=1)
        sims = np.where(norms > 0, lib @ qv / (np.maximum(norms, 1e-300) * qn), -np.inf)
        best = float(sims.max())
        if best <= 0.0:  # nothing in common with any recorded path: no match
            return None
        return int(np.flatnonzero(sims == best)[-1])  # ties: the most recently recorded

    def _ranked(self, counts: np.ndarray, width: int, taken: list[int]) -> list[int]:
        order = sorted((e for e in range(self.num_experts) if counts[e] > 0 and e not in taken),
                       key=lambda e: (-counts[e], e))
        return order[: max(0, width - len(taken))]

    def predict(self, moe_layer: int, rids: Sequence[int], width: int, gate_input=None) -> list[list[int]]:
        if not 0 <= moe_layer < self.num_moe_layers:
            raise PredictorError(f"eap: MoE layer {moe_layer} out of range 0..{self.num_moe_layers - 1}")
        by_rid: dict[int, list[int]] = {}
        for rid in dict.fromkeys(rids):
            out: list[int] = []
            best = self.best_match(rid, moe_layer)
            if best is not None:
                out = self._ranked(self._stack[best][moe_layer], width, out)
            out += self._ranked(self.popularity[moe_layer], width, out)
            by_rid[rid] = out
        return [list(by_rid[rid]) for rid in rids]


class RandomPredictor(Predictor):
    """A uniformly random baseline (tests, accuracy comparisons): `width` distinct experts per row."""

    name = "random"

    def __init__(self, num_experts: int, seed: int = 0):
        self.num_experts = num_experts
        self._rng = random.Random(seed)

    def predict(self, moe_layer: int, rids: Sequence[int], width: int, gate_input=None) -> list[list[int]]:
        w = min(max(0, width), self.num_experts)
        return [self._rng.sample(range(self.num_experts), w) for _ in rids]


PREDICTOR_NAMES = ("none", "cross_layer", "eap", "prev_token")
BASELINE_PREDICTOR_NAMES = ("random",)  # accepted by make_predictor; not a serving choice

_CLASSES: dict[str, type[Predictor]] = {
    c.name: c for c in (NonePredictor, EAPPredictor, PrevTokenPredictor, RandomPredictor)
}


def make_predictor(name: str, extra: Mapping[str, type[Predictor]] | None = None, **kw) -> Predictor:
    """A predictor by name (`extra`: more classes by name, e.g. cross_layer's). Keyword arguments a
    predictor does not take are ignored, so callers may pass one set for all: routers (cross_layer),
    num_moe_layers and num_experts (eap, random), library_size (eap), seed (random)."""
    cls = {**_CLASSES, **(extra or {})}.get(name)
    if cls is None and name == "cross_layer":
        raise PredictorError("cross_layer needs hidden states and the model's routers (gpu_worker.predictors)")
    if cls is None:
        raise PredictorError(f"unknown predictor {name!r}; known: {', '.join(PREDICTOR_NAMES)}")
    params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} if cls.__init__ is not object.__init__ else {}
    accepted = {k: v for k, v in kw.items() if k in params}
    missing = [p.name for p in params.values()
               if p.name != "self" and p.default is inspect.Parameter.empty and p.name not in accepted]
    if missing:
        raise PredictorError(f"predictor {name!r} needs {', '.join(missing)}")
    return cls(**accepted)


# -- ranking proposals (the prefetch controller's, and the simulator's replay of it) ----------


def merge_ranked(lists: Sequence[Sequence[int]], top_k: int) -> list[int]:
    """One ranked list from per-row lists: more rows' top-k first, then more rows' lists, then best rank,
    then lower id."""
    in_topk: dict[int, int] = {}
    in_list: dict[int, int] = {}
    best: dict[int, int] = {}
    for row in lists:
        for rank, e in enumerate(row):
            in_list[e] = in_list.get(e, 0) + 1
            if rank < top_k:
                in_topk[e] = in_topk.get(e, 0) + 1
            if rank < best.get(e, 1 << 30):
                best[e] = rank
    return sorted(in_list, key=lambda e: (-in_topk.get(e, 0), -in_list[e], best[e], e))


def int2_tail(rows: Sequence[Sequence[int]], prefill: Sequence[bool], share: float) -> list[int]:
    """The least popular experts routed only by prefill rows whose token assignments add up to at most
    `share` of the prefill rows' assignments (least popular first; ties: higher id first, the reverse
    of the fetch order)."""
    counts: dict[int, int] = {}
    decode_used: set[int] = set()
    total = 0
    for row, pre in zip(rows, prefill):
        if pre:
            for e in row:
                counts[e] = counts.get(e, 0) + 1
            total += len(row)
        else:
            decode_used.update(row)
    if share <= 0 or not total:
        return []
    out, cum = [], 0
    for e in sorted((e for e in counts if e not in decode_used), key=lambda e: (counts[e], -e)):
        if cum + counts[e] > share * total:
            break
        cum += counts[e]
        out.append(e)
    return out
