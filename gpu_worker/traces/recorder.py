"""Recording expert-activation traces in the worker (the file format: gpu_worker.traces.format).

`TraceRecorder` is one of the engine's step hooks (`Engine(recorder=...)`): a `RoutingObserver`
and a step listener. It keeps each forward's routing per token row and writes one file per
session, or one per N finished requests, atomically (temp file, fsync, rename) into a directory.
`RecordingPredictor` wraps the worker's predictor so what it proposed is recorded too; the
wiring (gpu_worker.wiring) composes both.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .format import DECODE, PREFILL, TRACE_FORMAT, Trace, TraceError, make_meta, save_trace


@dataclass
class _Step:
    rids: list[int]  # per token row
    phase: list[int]  # per token row
    experts: dict[int, np.ndarray] = field(default_factory=dict)  # MoE column -> int16 [T, K]
    weights: dict[int, np.ndarray] = field(default_factory=dict)  # MoE column -> float16 [T, K]
    predicted: dict[int, list[list[int]]] = field(default_factory=dict)  # MoE column -> per row, ranked


class TraceRecorder:
    """Records routing per token row; writes moe-trace/1 files into `out_dir`.

    Two of the engine's hooks: a `RoutingObserver` (on_routing per MoE layer: the routed experts
    and weights of every row of the forward) and a step listener (start_request, end_request,
    begin_step(rids, prefill) with one entry per token row, end_step). `on_prediction` takes
    what the predictor proposed (a `RecordingPredictor` around the worker's predictor calls it).
    Without begin_step calls (a bare model) a forward is detected by routing arriving at a layer
    already seen, and its rows get request -1.

    Files: `every_requests` = 0 writes one file per session (at `close()`); N > 0 writes a file
    each time N more requests have finished (cut at the next step boundary, so a request still
    running continues in the next file with the same request id). Rows carry `step` (the
    forward's number, continuing across files) and `position` (the row's index in its request).
    """

    def __init__(self, out_dir: str | Path, meta: dict[str, Any], every_requests: int = 0,
                 record_weights: bool = True, session: str | None = None):
        if every_requests < 0:
            raise TraceError(f"{out_dir}: every_requests must be >= 0, got {every_requests}")
        self.out_dir = Path(out_dir)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TraceError(f"{out_dir}: cannot create the trace directory ({e.strerror})") from None
        self.meta = dict(meta)
        self.meta.setdefault("format", TRACE_FORMAT)
        self.layer_ids: list[int] = [int(x) for x in self.meta.get("layer_ids") or range(int(meta["num_layers"]))]
        self._col = {layer: j for j, layer in enumerate(self.layer_ids)}
        self.top_k = int(self.meta["top_k"])
        self.every_requests = every_requests
        self.record_weights = record_weights
        self.session = session or time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        self.files: list[Path] = []
        self._lock = threading.Lock()
        self._steps: list[_Step] = []
        self._cur: _Step | None = None
        self._explicit = False  # begin_step was called for the current step
        self._positions: dict[int, int] = {}  # rid -> rows recorded so far (the next row's position)
        self._finished_since_write = 0
        self._rotate = False
        self._step_no = 0
        self._seq = 0
        self.record_ns = 0  # time spent inside the recorder's hooks (overhead accounting)

    # -- RoutingObserver --------------------------------------------------------------------

    def on_gate_input(self, layer: int, gate_input) -> None:
        pass

    def on_routing(self, layer: int, expert_ids, weights) -> None:
        t0 = time.perf_counter_ns()
        col = self._col.get(layer)
        if col is not None:
            if self._cur is None or (not self._explicit and col in self._cur.experts):
                self._implicit_step(int(expert_ids.shape[0]))
            cur = self._cur
            cur.experts[col] = _to_numpy(expert_ids, np.int16)
            if self.record_weights:
                cur.weights[col] = _to_numpy(weights, np.float16)
        self.record_ns += time.perf_counter_ns() - t0

    # -- step listener -------------------------------------------------------------------------

    def start_request(self, rid: int) -> None:
        self._positions.setdefault(int(rid), 0)

    def end_request(self, rid: int) -> None:
        """A request finished; a file is written after the step when `every_requests` are done."""
        self._positions.pop(int(rid), None)
        self._finished_since_write += 1
        if self.every_requests and self._finished_since_write >= self.every_requests:
            self._rotate = True
            if self._cur is None:  # between steps: write now
                self.flush()

    def begin_step(self, rids: Sequence[int], prefill: Sequence[bool]) -> None:
        """A forward starts: per token row, in the forward's order, its request id and whether it is prefill."""
        t0 = time.perf_counter_ns()
        self._close_step()
        self._cur = _Step([int(r) for r in rids], [PREFILL if p else DECODE for p in prefill])
        self._explicit = True
        self.record_ns += time.perf_counter_ns() - t0

    def end_step(self, outcome=None) -> None:
        t0 = time.perf_counter_ns()
        self._close_step()
        if self._rotate:
            self.flush()
        self.record_ns += time.perf_counter_ns() - t0
        return None

    def on_prediction(self, moe_layer: int, predicted: Sequence[Sequence[int]]) -> None:
        """What the predictor proposed for MoE layer `moe_layer` (index among MoE layers, as
        gpu_worker.predictors counts) in this step, before it ran: one ranked list per token row.
        A later call for the same layer and step replaces an earlier one (lookahead 2's guess is
        superseded by lookahead 1's)."""
        if self._cur is not None and 0 <= moe_layer < len(self.layer_ids):
            self._cur.predicted[moe_layer] = [list(map(int, p)) for p in predicted]

    def close(self) -> list[Path]:
        """Write what is buffered (the session's file, or the last partial one)."""
        self._close_step()
        self.flush()
        return self.files

    # -- buffering and files ----------------------------------------------------------------

    def _implicit_step(self, tokens: int) -> None:
        self._close_step()
        self._cur = _Step([-1] * tokens, [PREFILL if tokens > 1 else DECODE] * tokens)
        self._explicit = False

    def _close_step(self) -> None:
        cur, self._cur = self._cur, None
        self._explicit = False
        if cur is None or not cur.experts:
            return
        T = next(iter(cur.experts.values())).shape[0]
        if len(cur.rids) != T:  # rows told and rows routed disagree: keep the routing, drop the ids
            cur.rids, cur.phase = [-1] * T, [PREFILL if T > 1 else DECODE] * T
        pos = []
        for r in cur.rids:
            p = self._positions.get(r, 0) if r >= 0 else -1
            pos.append(p)
            if r >= 0:
                self._positions[r] = p + 1
        cur.position = pos  # type: ignore[attr-defined]
        cur.step = self._step_no  # type: ignore[attr-defined]
        self._step_no += 1
        with self._lock:
            self._steps.append(cur)

    def flush(self) -> Path | None:
        """Write the buffered steps as one trace file now (nothing when empty)."""
        with self._lock:
            steps, self._steps = self._steps, []
        self._finished_since_write = 0
        self._rotate = False
        if not steps:
            return None
        t = self._build(steps)
        path = self.out_dir / f"trace-{self.session}-{self._seq:05d}.npz"
        self._seq += 1
        save_trace(t, path)
        self.files.append(path)
        return path

    def _build(self, steps: list[_Step]) -> Trace:
        L, K = len(self.layer_ids), self.top_k
        N = sum(len(s.rids) for s in steps)
        experts = np.full((N, L, K), -1, np.int16)
        weights = np.zeros((N, L, K), np.float16) if self.record_weights else None
        W = max((len(p) for s in steps for rows in s.predicted.values() for p in rows), default=0)
        predicted = np.full((N, L, W), -1, np.int16) if W else None
        n = 0
        for s in steps:
            T = len(s.rids)
            for col, ids in s.experts.items():
                experts[n:n + T, col, :ids.shape[1]] = ids[:T]
                if weights is not None and col in s.weights:
                    weights[n:n + T, col, :ids.shape[1]] = s.weights[col][:T]
            if predicted is not None:
                for col, rows in s.predicted.items():
                    for i, p in enumerate(rows[:T]):
                        predicted[n + i, col, :len(p)] = p[:W]
            n += T
        request = np.array([r for s in steps for r in s.rids], np.int32)
        phase = np.array([p for s in steps for p in s.phase], np.uint8)
        position = np.array([p for s in steps for p in s.position], np.int32)  # type: ignore[attr-defined]
        step = np.repeat(np.array([s.step for s in steps], np.int32),  # type: ignore[attr-defined]
                         [len(s.rids) for s in steps])
        meta = dict(self.meta)
        meta["session"] = self.session
        return Trace(experts=experts, meta=meta, weights=weights, request=request, phase=phase, position=position,
                     predicted=predicted, step=step)


class RecordingPredictor:
    """Wraps the worker's predictor: every `predict` result also goes to `recorder.on_prediction`."""

    def __init__(self, inner, recorder: TraceRecorder):
        self.inner = inner
        self.recorder = recorder
        self.name = inner.name
        self.needs_gate_input = inner.needs_gate_input

    def start_request(self, rid: int) -> None:
        self.inner.start_request(rid)

    def end_request(self, rid: int) -> None:
        self.inner.end_request(rid)

    def observe(self, moe_layer: int, rids: Sequence[int], experts: Sequence[Sequence[int]]) -> None:
        self.inner.observe(moe_layer, rids, experts)

    def predict(self, moe_layer: int, rids: Sequence[int], width: int, gate_input=None) -> list[list[int]]:
        out = self.inner.predict(moe_layer, rids, width, gate_input)
        self.recorder.on_prediction(moe_layer, out)
        return out


def _to_numpy(t, dtype) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t.astype(dtype, copy=True)
    return t.detach().to("cpu").numpy().astype(dtype)


def recorder_for(args, out_dir: str | Path, every_requests: int = 0, model_name: str = "",
                 expert_bytes: dict[str, int] | None = None, cache=None, predictor_name: str = "",
                 record_weights: bool = True) -> TraceRecorder:
    """A recorder whose meta describes the model (`args`: ModelArgs), the cache (an ExpertCache, when
    given) and the predictor, so `simulate --budgets worker` can replay the worker's configuration."""
    extra: dict[str, Any] = {"layer_ids": list(args.moe_layers)}
    if cache is not None:
        c = cache_config_of(cache)
        if predictor_name:
            c["predictor"] = predictor_name
        extra["cache"] = c
    meta = make_meta(model_name or getattr(args, "family", "model"), len(args.moe_layers), args.num_experts,
                     args.top_k, expert_bytes, **extra)
    return TraceRecorder(out_dir, meta, every_requests, record_weights)


def cache_config_of(cache) -> dict[str, Any]:
    """The replayable configuration of an ExpertCache."""
    return {"budget_bytes": int(cache.budget_bytes), "expert_bytes": int(cache.expert_bytes),
            "total_slots": int(cache.total_slots), "staging_slots": int(cache.staging_slots),
            "slots": {str(k): int(v) for k, v in cache.slots().items()},
            "allocation": cache.allocation.name, "policy": cache.policy_name,
            "format": cache.fmt, "compute_form": cache.form}
