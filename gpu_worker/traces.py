"""Expert-activation traces (`moe-trace/1`, one .npz file): read, validate, write, record.

Fields (../shared/DESIGN.md), N token rows in execution order, L MoE layers, K = top-k:
    experts    int16 [N, L, K]   routed expert ids (-1: unknown)            required
    meta       JSON str          {"format": "moe-trace/1", "model", "num_layers",
                                  "num_experts", "top_k", "expert_bytes": {fmt: bytes}, ...}  required
    weights    float16|32 [N, L, K] router weights                           optional
    request    int32 [N]         request id of each row                     optional
    phase      uint8 [N]         0 prefill, 1 decode                        optional
    position   int32 [N]         position of the token in its sequence      optional
    predicted  int16 [N, L, W]   what the predictor proposed for (n, l), -1 padded   optional
    step       int32 [N]         forward step of each row (our extension: the worker's
                                 recorder writes it; without it steps are inferred)   optional
Optional meta keys we read: "layer_ids" (decoder index of each MoE column), "cache" (the
recording worker's cache configuration: budget, slots, staging, policy, allocation, predictor:
what `simulate --budgets worker` replays).

A malformed file raises `TraceError` with one line naming the file and the field.

`TraceRecorder` is a `RoutingObserver` + `StepController` the worker attaches (`attach_recorder`):
it keeps each forward's routing per token row and writes one file per session, or one per N
finished requests, atomically (temp file, fsync, rename) into a directory.
"""

from __future__ import annotations

import json
import os
import threading
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from expert_store.errors import FateError

TRACE_FORMAT = "moe-trace/1"
PREFILL, DECODE = 0, 1
_ROW_FIELDS = ("request", "phase", "position", "step")
_KNOWN = ("experts", "weights", "request", "phase", "position", "predicted", "step", "meta")


class TraceError(FateError, ValueError):
    """A trace file that cannot be read as moe-trace/1 (the message names the file and the field)."""


@dataclass
class Trace:
    """One trace in memory. Arrays are validated and in the format's dtypes."""

    experts: np.ndarray  # int16 [N, L, K]
    meta: dict[str, Any]
    weights: np.ndarray | None = None  # float16/float32 [N, L, K]
    request: np.ndarray | None = None  # int32 [N]
    phase: np.ndarray | None = None  # uint8 [N]
    position: np.ndarray | None = None  # int32 [N]
    predicted: np.ndarray | None = None  # int16 [N, L, W]
    step: np.ndarray | None = None  # int32 [N]
    path: str = "<memory>"

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.meta.get("top_k", self.experts.shape[2]))

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def model(self) -> str:
        return str(self.meta.get("model", "?"))

    @property
    def name(self) -> str:
        return Path(self.path).stem if self.path != "<memory>" else self.model

    @property
    def layer_ids(self) -> list[int]:
        """Decoder-layer index of each MoE column (meta "layer_ids"; default 0..L-1)."""
        ids = self.meta.get("layer_ids")
        return [int(x) for x in ids] if ids else list(range(self.num_layers))

    @property
    def expert_bytes(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in (self.meta.get("expert_bytes") or {}).items()}

    def steps(self) -> np.ndarray:
        """Forward step of each row [N]: the `step` field, else inferred (see `infer_steps`)."""
        return self.step if self.step is not None else infer_steps(self.request, self.phase, self.num_tokens)

    def save(self, path: str | Path) -> Path:
        return save_trace(self, path)


def infer_steps(request: np.ndarray | None, phase: np.ndarray | None, n: int) -> np.ndarray:
    """Forward steps for a trace without a `step` field.

    Without request ids (or all -1) every row is its own step (the (token, expert) view of
    the published traces). With them, a step is the longest run of rows in which no request
    comes back, a request's prefill rows (phase 0, consecutive) counting as one block: that
    is how a batched forward lays out its rows (each sequence's new tokens, contiguous). A
    request's decode rows are one per step. Ambiguous cases (a prefill right after another
    request's decode row) are merged as a batch would run them.
    """
    if request is None or n == 0 or bool(np.all(request < 0)):
        return np.arange(n, dtype=np.int32)
    out = np.empty(n, dtype=np.int32)
    req = request.tolist()
    ph = phase.tolist() if phase is not None else [DECODE] * n
    step = 0
    seen: set[int] = set()
    for i in range(n):
        r = req[i]
        continuing_prefill = i > 0 and ph[i] == PREFILL and ph[i - 1] == PREFILL and req[i - 1] == r
        if r < 0 or (r in seen and not continuing_prefill):
            if i > 0:
                step += 1
            seen = set()
        seen.add(r)
        out[i] = step
    return out


# -- reading and validation -----------------------------------------------------------------------


def _fail(path: str, fieldname: str, problem: str) -> TraceError:
    return TraceError(f"{path}: {fieldname}: {' '.join(problem.split())}")


def load_trace(path: str | Path) -> Trace:
    """Read and validate a moe-trace/1 file; only `experts` and `meta` are required."""
    p = str(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise TraceError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise TraceError(f"{p}: is a directory, not a trace file") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise TraceError(f"{p}: not a readable .npz file ({' '.join(str(e).split())[:120]})") from None
    if isinstance(arrays, np.ndarray):  # np.load of a bare .npy
        raise TraceError(f"{p}: a .npy array, not an .npz trace")
    return validate(arrays, p)


def validate(arrays: dict[str, np.ndarray], path: str = "<memory>") -> Trace:
    """Check fields, dtypes, ranks, shapes and meta; return a Trace in the format's dtypes."""
    if "meta" not in arrays:
        raise _fail(path, "meta", "missing (every moe-trace/1 file carries a JSON meta string)")
    meta = _parse_meta(arrays["meta"], path)
    if "experts" not in arrays:
        raise _fail(path, "experts", "missing (int16 [N, L, K] routed expert ids)")
    ex = arrays["experts"]
    _int_array(ex, path, "experts", 3, "int16 [N, L, K]")
    N, L, K = ex.shape
    for key in ("num_layers", "num_experts", "top_k"):
        v = meta.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise _fail(path, f"meta.{key}", f"expected a positive integer, got {v!r}")
    E = meta["num_experts"]
    if meta["num_layers"] != L:
        raise _fail(path, "experts", f"has {L} layers (shape {tuple(ex.shape)}) but meta.num_layers is "
                                     f"{meta['num_layers']}")
    if K > E:
        raise _fail(path, "experts", f"K = {K} experts per row exceeds meta.num_experts = {E}")
    if ex.size and (int(ex.min()) < -1 or int(ex.max()) >= E):
        raise _fail(path, "experts", f"ids must be -1 or 0..{E - 1}, found {int(ex.min())}..{int(ex.max())}")
    layer_ids = meta.get("layer_ids")
    if layer_ids is not None and (not isinstance(layer_ids, list) or len(layer_ids) != L
                                  or not all(isinstance(x, int) for x in layer_ids)):
        raise _fail(path, "meta.layer_ids", f"expected {L} integers, got {layer_ids!r}")
    eb = meta.get("expert_bytes")
    if eb is not None and (not isinstance(eb, dict) or not all(isinstance(v, int) for v in eb.values())):
        raise _fail(path, "meta.expert_bytes", f"expected {{format: bytes}}, got {eb!r}")
    t = Trace(experts=ex.astype(np.int16, copy=False), meta=meta, path=path)

    if "weights" in arrays:
        w = arrays["weights"]
        if w.dtype not in (np.float16, np.float32, np.float64):
            raise _fail(path, "weights", f"dtype {w.dtype}, expected float16 or float32 [N, L, K]")
        if w.shape != ex.shape:
            raise _fail(path, "weights", f"shape {tuple(w.shape)} differs from experts {tuple(ex.shape)}")
        t.weights = w if w.dtype != np.float64 else w.astype(np.float32)
    for name, dtype in (("request", np.int32), ("phase", np.uint8), ("position", np.int32), ("step", np.int32)):
        if name in arrays:
            a = arrays[name]
            _int_array(a, path, name, 1, f"{np.dtype(dtype).name} [N]")
            if a.shape[0] != N:
                raise _fail(path, name, f"has {a.shape[0]} rows, experts has {N}")
            if name == "phase" and a.size and not np.isin(a, (PREFILL, DECODE)).all():
                raise _fail(path, name, "values must be 0 (prefill) or 1 (decode)")
            if name == "step" and a.size > 1 and bool(np.any(np.diff(a.astype(np.int64)) < 0)):
                raise _fail(path, name, "must be non-decreasing (rows are in execution order)")
            setattr(t, name, a.astype(dtype, copy=False))
    if "predicted" in arrays:
        pr = arrays["predicted"]
        _int_array(pr, path, "predicted", 3, "int16 [N, L, W]")
        if pr.shape[:2] != (N, L):
            raise _fail(path, "predicted", f"shape {tuple(pr.shape)} does not start with experts' [N, L] = "
                                           f"[{N}, {L}]")
        if pr.size and (int(pr.min()) < -1 or int(pr.max()) >= E):
            raise _fail(path, "predicted", f"ids must be -1 or 0..{E - 1}")
        t.predicted = pr.astype(np.int16, copy=False)
    return t


def _parse_meta(raw: np.ndarray, path: str) -> dict[str, Any]:
    if not isinstance(raw, np.ndarray) or raw.ndim != 0 or raw.dtype.kind not in "US":
        raise _fail(path, "meta", f"expected a JSON string (a 0-d str array), got dtype {raw.dtype} "
                                  f"shape {tuple(raw.shape)}")
    text = raw.item()
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(path, "meta", f"not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(meta, dict):
        raise _fail(path, "meta", "expected a JSON object")
    if meta.get("format") != TRACE_FORMAT:
        raise _fail(path, "meta.format", f"{meta.get('format')!r}, expected {TRACE_FORMAT!r}")
    return meta


def _int_array(a: np.ndarray, path: str, name: str, rank: int, want: str) -> None:
    if a.dtype.kind not in "iu":
        raise _fail(path, name, f"dtype {a.dtype}, expected {want}")
    if a.ndim != rank:
        raise _fail(path, name, f"rank {a.ndim} (shape {tuple(a.shape)}), expected {want}")
    if a.size and a.dtype.kind == "i" and np.iinfo(a.dtype).bits > 16 and name in ("experts", "predicted"):
        if int(a.max()) > np.iinfo(np.int16).max:
            raise _fail(path, name, "values do not fit int16")


# -- writing --------------------------------------------------------------------------------------


def trace_arrays(t: Trace) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {"experts": t.experts.astype(np.int16, copy=False),
                                  "meta": np.array(json.dumps(t.meta))}
    for name in ("weights", "request", "phase", "position", "predicted", "step"):
        a = getattr(t, name)
        if a is not None:
            out[name] = a
    return out


def save_trace(t: Trace, path: str | Path) -> Path:
    """Write atomically: a temp file in the same directory, fsync, rename (never a half file)."""
    path = Path(path)
    validate(trace_arrays(t), str(path))  # never write what we could not read back
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **trace_arrays(t))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def make_meta(model: str, num_layers: int, num_experts: int, top_k: int, expert_bytes: dict[str, int] | None = None,
              **extra: Any) -> dict[str, Any]:
    meta = {"format": TRACE_FORMAT, "model": model, "num_layers": num_layers, "num_experts": num_experts,
            "top_k": top_k, "expert_bytes": dict(expert_bytes or {})}
    meta.update(extra)
    return meta


# -- recording in the worker ----------------------------------------------------------------------


@dataclass
class _Step:
    rids: list[int]  # per token row
    phase: list[int]  # per token row
    experts: dict[int, np.ndarray] = field(default_factory=dict)  # MoE column -> int16 [T, K]
    weights: dict[int, np.ndarray] = field(default_factory=dict)  # MoE column -> float16 [T, K]
    predicted: dict[int, list[list[int]]] = field(default_factory=dict)  # MoE column -> per row, ranked


class TraceRecorder:
    """Records routing per token row; writes moe-trace/1 files into `out_dir`.

    It is two things the engine already drives (so no engine change is needed, see
    `attach_recorder`): a `RoutingObserver` (on_routing per MoE layer: the routed experts and
    weights of every row of the forward) and a `StepController` (start_request, end_request,
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
                 record_weights: bool = True, inner=None, session: str | None = None):
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
        self.inner = inner  # a RoutingObserver to pass every call on to
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
        if self.inner is not None:
            self.inner.on_gate_input(layer, gate_input)

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
        if self.inner is not None:
            self.inner.on_routing(layer, expert_ids, weights)

    # -- StepController ------------------------------------------------------------------------

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

    def predict(self, moe_layer: int, rids: Sequence[int], width: int, gate_input=None) -> list[list[int]]:
        out = self.inner.predict(moe_layer, rids, width, gate_input)
        self.recorder.on_prediction(moe_layer, out)
        return out

    def __getattr__(self, name: str):  # name, needs_gate_input, observe, start_request, ...
        return getattr(self.inner, name)


class _TeeController:
    """The engine's StepController slot holding the worker's controller and the recorder."""

    def __init__(self, controller, recorder: TraceRecorder):
        self.controller = controller
        self.recorder = recorder

    def start_request(self, rid: int) -> None:
        self.recorder.start_request(rid)
        if self.controller is not None:
            self.controller.start_request(rid)

    def end_request(self, rid: int) -> None:
        if self.controller is not None:
            self.controller.end_request(rid)
        self.recorder.end_request(rid)

    def begin_step(self, rids: Sequence[int], prefill: Sequence[bool]) -> None:
        self.recorder.begin_step(rids, prefill)
        if self.controller is not None:
            self.controller.begin_step(rids, prefill)

    def end_step(self, outcome=None):
        out = self.controller.end_step(outcome) if self.controller is not None else None
        self.recorder.end_step()
        return out

    def __getattr__(self, name: str):  # stats(), close(), predictor, ... of the worker's controller
        if self.controller is None:
            raise AttributeError(name)
        return getattr(self.controller, name)


def _to_numpy(t, dtype) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t.astype(dtype, copy=True)
    return t.detach().to("cpu").numpy().astype(dtype)


def recorder_for_engine(engine, out_dir: str | Path, every_requests: int = 0, model_name: str = "",
                        expert_bytes: dict[str, int] | None = None, record_weights: bool = True) -> TraceRecorder:
    """A recorder whose meta describes the engine's model and (when it is an ExpertCache) its cache
    and the controller's predictor, so `simulate --budgets worker` can replay the worker's configuration."""
    args = engine.model.args
    extra: dict[str, Any] = {"layer_ids": list(args.moe_layers)}
    cache = cache_config_of(engine.model.experts)
    controller = getattr(engine, "controller", None)
    predictor = getattr(controller, "predictor", None)
    if cache:
        if predictor is not None:
            cache["predictor"] = getattr(predictor, "name", "")
        extra["cache"] = cache
    meta = make_meta(model_name or getattr(args, "family", "model"), len(args.moe_layers), args.num_experts,
                     args.top_k, expert_bytes, **extra)
    return TraceRecorder(out_dir, meta, every_requests, record_weights)


def cache_config_of(provider) -> dict[str, Any]:
    """The replayable configuration of an ExpertCache (empty for another provider)."""
    if not hasattr(provider, "budget_bytes") or not hasattr(provider, "slots"):
        return {}
    layers = getattr(provider, "_layers", {})
    policy = next((L.policy.name for L in layers.values()), "")
    return {"budget_bytes": int(provider.budget_bytes), "expert_bytes": int(provider.expert_bytes),
            "total_slots": int(getattr(provider, "total_slots", provider.budget_bytes // provider.expert_bytes)),
            "staging_slots": int(getattr(provider, "staging_slots", 0)),
            "slots": {str(k): int(v) for k, v in provider.slots().items()},
            "allocation": getattr(provider.allocation, "name", str(provider.allocation)), "policy": policy,
            "format": getattr(provider, "fmt", ""), "compute_form": getattr(provider, "form", "")}


def attach_recorder(engine, recorder: TraceRecorder) -> Callable[[], None]:
    """Record every forward of `engine` through the hooks it already has (engine.py unchanged).

    - routing: the recorder joins the model's observer chain, in front of the observer already
      there (the prefetch controller), before or after `engine.start()`;
    - rows and requests: `engine.controller` becomes a tee of the worker's controller (if any) and
      the recorder (begin_step(rids, prefill), end_step, start_request, end_request); the
      controller's results are returned unchanged;
    - predictions: the controller's predictor is wrapped in a `RecordingPredictor`.
    Call it before requests arrive; `recorder.close()` at shutdown writes the last file. Returns a
    function that undoes all three.
    """
    model = engine.model
    routing = getattr(engine, "_routing", None)
    started = routing is not None and model.observer is routing
    if started:  # join behind the engine's own step observer
        recorder.inner, routing.inner = routing.inner, recorder
    else:
        recorder.inner, model.observer = model.observer, recorder
    controller = getattr(engine, "controller", None)
    tee = _TeeController(controller, recorder)
    engine.controller = tee
    predictor = getattr(controller, "predictor", None)
    if predictor is not None and not isinstance(predictor, RecordingPredictor):
        controller.predictor = RecordingPredictor(predictor, recorder)

    def detach() -> None:
        if engine.controller is tee:
            engine.controller = controller
        if controller is not None and isinstance(getattr(controller, "predictor", None), RecordingPredictor):
            controller.predictor = controller.predictor.inner
        if model.observer is recorder:
            model.observer = recorder.inner
        elif routing is not None and routing.inner is recorder:
            routing.inner = recorder.inner

    return detach


def concat_traces(traces: Sequence[Trace]) -> Trace:
    """Files of one session (or any traces of one model) as one, in order."""
    if not traces:
        raise TraceError("<none>: experts: no traces to concatenate")
    first = traces[0]
    for t in traces[1:]:
        if t.experts.shape[1:] != first.experts.shape[1:] or t.num_experts != first.num_experts:
            raise TraceError(f"{t.path}: experts: shape {t.experts.shape[1:]} differs from {first.path}'s")

    def cat(name: str):
        parts = [getattr(t, name) for t in traces]
        if any(p is None for p in parts):
            return None
        if name == "predicted":
            W = max(p.shape[2] for p in parts)
            parts = [np.pad(p, ((0, 0), (0, 0), (0, W - p.shape[2])), constant_values=-1) for p in parts]
        if name == "step":
            off, fixed = 0, []
            for p in parts:
                fixed.append(p - (p[0] if len(p) else 0) + off)
                off = int(fixed[-1][-1]) + 1 if len(p) else off
            parts = fixed
        return np.concatenate(parts)

    return replace(first, experts=np.concatenate([t.experts for t in traces]), weights=cat("weights"),
                   request=cat("request"), phase=cat("phase"), position=cat("position"), predicted=cat("predicted"),
                   step=cat("step"), path=first.path)
