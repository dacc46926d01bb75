"""moe-trace/1 files: round trip, a file with only experts and meta, one-line errors for malformed files
(also through the CLI), step inference, and the recorder (files per session / per N requests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpu_worker.traces import (
    Trace, TraceError, TraceRecorder, concat_traces, infer_steps, load_trace, make_meta, save_trace,
)

REPO = Path(__file__).resolve().parents[2]


def small_trace(N: int = 6, L: int = 2, E: int = 4, K: int = 2, **fields) -> Trace:
    rng = np.random.default_rng(0)
    ex = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(N)]).astype(np.int16)
    return Trace(ex, make_meta("toy", L, E, K, {"int4": 1000}), **fields)


def write_raw(path: Path, **arrays) -> Path:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def good_meta(L=2, E=4, K=2) -> np.ndarray:
    return np.array(json.dumps(make_meta("toy", L, E, K)))


def test_round_trip_with_every_field(tmp_path):
    N, L, K = 6, 2, 2
    t = small_trace(N, L, K=K, weights=np.full((N, L, K), 0.5, np.float16), request=np.arange(N, dtype=np.int32) % 2,
                    phase=np.array([0, 0, 1, 1, 1, 1], np.uint8), position=np.arange(N, dtype=np.int32),
                    predicted=np.full((N, L, 3), -1, np.int16), step=np.array([0, 0, 1, 1, 2, 2], np.int32))
    path = save_trace(t, tmp_path / "t.npz")
    u = load_trace(path)
    for name in ("experts", "weights", "request", "phase", "position", "predicted", "step"):
        a, b = getattr(t, name), getattr(u, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert u.meta["format"] == "moe-trace/1" and u.expert_bytes == {"int4": 1000}
    assert u.steps().tolist() == [0, 0, 1, 1, 2, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]  # no temp file left behind


def test_a_file_with_only_experts_and_meta_is_accepted(tmp_path):
    ex = np.array([[[0, 1]], [[1, 2]], [[-1, 3]]], np.int16)
    t = load_trace(write_raw(tmp_path / "min.npz", experts=ex, meta=good_meta(1, 4, 2)))
    assert t.num_tokens == 3 and t.weights is None and t.request is None
    assert t.steps().tolist() == [0, 1, 2]  # every row its own step
    assert t.layer_ids == [0]


@pytest.mark.parametrize("arrays, field", [
    (dict(experts=np.zeros((3, 2, 2), np.float32), meta=good_meta()), "experts"),  # wrong dtype
    (dict(experts=np.zeros((3, 2), np.int16), meta=good_meta()), "experts"),  # wrong rank
    (dict(experts=np.zeros((3, 2, 2), np.int16)), "meta"),  # missing meta
    (dict(experts=np.zeros((3, 2, 2), np.int16), meta=np.array("{not json")), "meta"),
    (dict(experts=np.zeros((3, 2, 2), np.int16), meta=np.array(json.dumps({"format": "other/9"}))), "meta.format"),
    (dict(experts=np.zeros((3, 3, 2), np.int16), meta=good_meta()), "experts"),  # 3 layers vs meta 2
    (dict(experts=np.full((3, 2, 2), 7, np.int16), meta=good_meta()), "experts"),  # ids >= num_experts
    (dict(experts=np.zeros((3, 2, 2), np.int16), meta=good_meta(), weights=np.zeros((3, 2, 1), np.float16)),
     "weights"),
    (dict(experts=np.zeros((3, 2, 2), np.int16), meta=good_meta(), request=np.zeros(4, np.int32)), "request"),
    (dict(experts=np.zeros((3, 2, 2), np.int16), meta=good_meta(), phase=np.array([0, 1, 2], np.uint8)), "phase"),
    (dict(experts=np.zeros((3, 2, 2), np.int16), meta=good_meta(), predicted=np.zeros((3, 1, 4), np.int16)),
     "predicted"),
    (dict(experts=np.zeros((3, 2, 2), np.int16), meta=good_meta(), step=np.array([1, 0, 2], np.int32)), "step"),
])
def test_malformed_files_give_one_line_errors_naming_file_and_field(tmp_path, arrays, field):
    path = write_raw(tmp_path / "bad.npz", **arrays)
    with pytest.raises(TraceError) as e:
        load_trace(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: {field}:"), msg


def test_not_an_npz_and_missing_file(tmp_path):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"hello")
    with pytest.raises(TraceError, match=r"junk.npz: not a readable .npz file"):
        load_trace(p)
    with pytest.raises(TraceError, match="no such file"):
        load_trace(tmp_path / "absent.npz")


@pytest.mark.parametrize("cmd", ["simulate", "analyze"])
def test_cli_reports_a_malformed_trace_in_one_line(tmp_path, cmd):
    path = write_raw(tmp_path / "bad.npz", experts=np.zeros((3, 2), np.int16), meta=good_meta())
    extra = ["--out", str(tmp_path / "out")] if cmd == "analyze" else []
    p = subprocess.run([sys.executable, "-m", "gpu_worker", cmd, str(path), *extra], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "experts" in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_infer_steps():
    # prefill blocks are one step each; a decode step has one row per request; a request coming back starts
    # the next step
    req = np.array([0, 0, 0, 1, 1, 0, 1, 0, 1, 1], np.int32)
    ph = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1], np.uint8)
    assert infer_steps(req, ph, 10).tolist() == [0, 0, 0, 0, 0, 1, 1, 2, 2, 3]
    assert infer_steps(None, None, 3).tolist() == [0, 1, 2]
    assert infer_steps(np.full(3, -1, np.int32), None, 3).tolist() == [0, 1, 2]


def test_concat_renumbers_steps(tmp_path):
    a = small_trace(4, step=np.array([0, 0, 1, 2], np.int32))
    b = small_trace(2, step=np.array([3, 4], np.int32))
    c = concat_traces([a, b])
    assert c.num_tokens == 6 and c.step.tolist() == [0, 0, 1, 2, 3, 4]


def _fake_forward(rec: TraceRecorder, rids, prefill, routing, predicted=None):
    """What the engine and model do around one forward: begin_step, on_routing per MoE layer, end_step."""
    rec.begin_step(rids, prefill)
    for layer, ids in routing.items():
        if predicted and layer in predicted:
            rec.on_prediction(layer, predicted[layer])
        t = torch.tensor(ids)
        rec.on_routing(layer, t, torch.full(t.shape, 0.5))
    rec.end_step()


def test_recorder_writes_rows_steps_positions_and_predictions(tmp_path):
    meta = make_meta("toy", 2, 4, 2, {"int4": 100}, layer_ids=[1, 3])
    rec = TraceRecorder(tmp_path, meta)
    rec.start_request(7)
    _fake_forward(rec, [7, 7, 7], [True] * 3, {1: [[0, 1], [1, 2], [0, 3]], 3: [[2, 3], [0, 2], [1, 2]]})
    rec.start_request(9)
    _fake_forward(rec, [7, 9, 9], [False, True, True], {1: [[0, 1], [2, 3], [1, 3]], 3: [[0, 1], [0, 2], [0, 3]]},
                  predicted={1: [[0, 1, 2], [3], [1, 3]]})
    rec.end_request(7)
    files = rec.close()
    assert len(files) == 1
    t = load_trace(files[0])
    assert t.num_tokens == 6 and t.layer_ids == [1, 3]
    assert t.request.tolist() == [7, 7, 7, 7, 9, 9]
    assert t.phase.tolist() == [0, 0, 0, 1, 0, 0]
    assert t.position.tolist() == [0, 1, 2, 3, 0, 1]
    assert t.step.tolist() == [0, 0, 0, 1, 1, 1]
    assert t.experts[3].tolist() == [[0, 1], [0, 1]]
    assert t.predicted.shape == (6, 2, 3)
    assert t.predicted[3:, 1].tolist() == [[0, 1, 2], [3, -1, -1], [1, 3, -1]]
    assert (t.predicted[:3] == -1).all() and (t.predicted[:, 0] == -1).all()
    assert t.weights.dtype == np.float16


def test_recorder_rotates_files_every_n_requests(tmp_path):
    rec = TraceRecorder(tmp_path, make_meta("toy", 1, 4, 1), every_requests=2)
    for rid in range(5):
        rec.start_request(rid)
        _fake_forward(rec, [rid], [True], {0: [[rid % 4]]})
        rec.end_request(rid)
    files = rec.close()
    assert len(files) == 3 and all(f.exists() for f in files)
    rows = [load_trace(f).request.tolist() for f in files]
    assert rows == [[0, 1], [2, 3], [4]]
    assert load_trace(files[1]).step.tolist() == [2, 3]  # step numbers continue across files


def test_recorder_without_step_hooks_detects_forwards(tmp_path):
    rec = TraceRecorder(tmp_path, make_meta("toy", 2, 4, 1))
    for _ in range(3):  # a bare model: routing at layer 0 again means a new forward
        rec.on_routing(0, torch.tensor([[1], [2]]), torch.ones(2, 1))
        rec.on_routing(1, torch.tensor([[3], [0]]), torch.ones(2, 1))
    t = load_trace(rec.close()[0])
    assert t.step.tolist() == [0, 0, 1, 1, 2, 2] and (t.request == -1).all()
