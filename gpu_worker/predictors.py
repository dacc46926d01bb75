"""Expert predictors: which experts an MoE layer will route to, proposed before it runs.

The worker's prefetch controller (gpu_worker.prefetch) and the offline simulator drive
these same classes. No gRPC here; torch only where a predictor needs tensors
(`cross_layer` applies routers to hidden states), numpy for `eap`.

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
from typing import Any, ClassVar, Sequence

import numpy as np


class PredictorError(ValueError):
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


class CrossLayerPredictor(Predictor):
    """Fate's predictor: MoE layer t's router applied to an earlier layer's gate input (layer t - 1's for a
    lookahead of one, t - 2's for two): the top-`width` experts of its logits, per row.

    `routers[t]`: MoE layer t's router: the runtime's `gpu_worker.routing.Router` (its `rank` applies the
    family's bias, correction and group limits), or a bare weight [E, H] (fp32), ranked by its logits
    (only the ranking matters, so the softmax, monotonic, is skipped)."""

    name = "cross_layer"
    needs_gate_input = True

    def __init__(self, routers: Sequence[Any]):
        if not routers:
            raise PredictorError("cross_layer needs the model's routers (routers=[tensor [E, H] per MoE layer])")
        self.routers = list(routers)

    def predict(self, moe_layer: int, rids: Sequence[int], width: int, gate_input=None) -> list[list[int]]:
        import torch

        if gate_input is None:
            raise PredictorError("cross_layer predicts from hidden states: pass gate_input [rows, hidden]")
        if not 0 <= moe_layer < len(self.routers):
            raise PredictorError(f"cross_layer: MoE layer {moe_layer} out of range 0..{len(self.routers) - 1}")
        router = self.routers[moe_layer]
        if width <= 0:
            return [[] for _ in rids]
        if hasattr(router, "rank"):
            return router.rank(gate_input, width).tolist()  # [T, min(width, E)]
        width = min(width, router.shape[0])
        logits = torch.nn.functional.linear(gate_input.float(), router)  # [T, E]
        return torch.topk(logits, width, dim=-1).indices.tolist()  # [T, width]


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
    c.name: c for c in (NonePredictor, CrossLayerPredictor, EAPPredictor, PrevTokenPredictor, RandomPredictor)
}


def make_predictor(name: str, **kw) -> Predictor:
    """A predictor by name. Keyword arguments a predictor does not take are ignored, so callers may pass
    one set for all: routers (cross_layer), num_moe_layers and num_experts (eap, random), library_size
    (eap), seed (random)."""
    cls = _CLASSES.get(name)
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
