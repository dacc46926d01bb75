"""Expert-activation traces (`moe-trace/1`, one .npz file): read, validate, write, concatenate.

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

Recording in the worker: gpu_worker.traces.recorder.
"""

from __future__ import annotations

import json
import os
import threading
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from expert_store.errors import FateError

TRACE_FORMAT = "moe-trace/1"
PREFILL, DECODE = 0, 1


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
