"""bench/sim_validate.py --bench on a hand-made benchmark: runs matched to their traces by the cache they
recorded, each replayed with its own configuration, ratios to LRU computed per repeat and over repeats."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from gpu_worker.simulator import HardwareProfile
from gpu_worker.traces import Trace, make_meta

HAND = HardwareProfile("hand", "", link_bandwidth_Bps=1e6, link_latency_s=1e-3, expert_setup_s=0.0, layer_s=1e-3,
                       layer_token_s=1e-4, expert_compute_s=1e-4, step_s=1e-3, prefetch_expert_s=2e-4,
                       prefetch_compute_s=1e-4, hint_compute_s=5e-4)


def _trace(policy: str, predictor: str, slots: int, rng: np.random.Generator) -> Trace:
    """Request 0 (a warm-up) then requests 1-2 decoding 6 steps side by side, 2 MoE layers, top-1 of 6."""
    req, phase, step = [0, 0], [0, 1], [0, 1]
    for s in range(7):
        req += [1, 2]
        phase += [0 if s == 0 else 1] * 2
        step += [2 + s] * 2
    N = len(req)
    ex = rng.integers(0, 6, (N, 2, 1)).astype(np.int16)
    meta = make_meta("toy", 2, 6, 1, {"int4": 1000}, cache={
        "budget_bytes": slots * 1000, "expert_bytes": 1000, "total_slots": slots, "staging_slots": 0,
        "slots": {"0": slots // 2, "1": slots // 2}, "allocation": "uniform", "policy": policy,
        "predictor": predictor})
    pred = None
    if predictor != "none":
        pred = np.full((N, 2, 3), -1, np.int16)
        pred[:, 1, :] = rng.integers(0, 6, (N, 3))
    return Trace(ex, meta, request=np.array(req, np.int32), phase=np.array(phase, np.uint8),
                 step=np.array(step, np.int32), predicted=pred)


def _run(config: str, budget: str, repeat: int, slots: int, tok_s: float, hints: int) -> dict:
    sd = {"budget_bytes": slots * 1000, "requests_total": 2, "store_hints_sent": hints, "prefetches_issued": 0,
          "misses": 0}
    return {"config": config, "budget": budget, "repeat": repeat, "status": "ok", "workloads": {"decode-c2": {
        "figures": {"decode_tokens_per_s": tok_s, "fetch_wait_ms_per_token": 0.0}, "stats_delta": sd}}}


def test_bench_runs_are_matched_replayed_and_compared(tmp_path):
    import bench.sim_validate as sv

    rng = np.random.default_rng(0)
    bench, traces, out = tmp_path / "bench", tmp_path / "traces", tmp_path / "out"
    for d in (bench, traces, out):
        d.mkdir()
    runs = []
    for rep in range(2):
        for i, (config, policy, predictor, slots, tok_s, hints) in enumerate((
                ("all_resident", "lru", "none", 12, 100.0, 0), ("lru", "lru", "none", 4, 80.0, 0),
                ("fate", "arc", "cross_layer", 4, 60.0 + rep, 2))):
            _trace(policy, predictor, slots, rng).save(traces / f"trace-{rep}{i}.npz")
            runs.append(_run(config, "33%" if slots == 4 else "100%", rep, slots, tok_s, hints))
    (bench / "results.json").write_text(json.dumps({"runs": runs}))
    (tmp_path / "hand.json").write_text(json.dumps(dataclasses.asdict(HAND)))
    assert sv.validate_bench(bench, traces, out, str(tmp_path / "hand.json"), None) == 0
    got = json.loads((out / "bench_validation.json").read_text())
    assert [(r["config"], r["repeat"]) for r in got["runs"]] == [(c, rep) for rep in range(2)
                                                                 for c in ("all_resident", "lru", "fate")]
    fate = [r for r in got["runs"] if r["config"] == "fate"]
    assert all(r["prefetched"] > 0 and r["contention_ms_per_token"] > 0 for r in fate)
    assert all(r["hint_sends"] == 2 for r in fate)  # the run's own calls, charged
    assert all(r["window_tokens"] == 12 and r["window_steps"] == 6 for r in got["runs"])
    # the all-resident run defines the serving cost: its +serving prediction is its measurement
    ar = [r for r in got["runs"] if r["config"] == "all_resident"]
    assert all(abs(r["predicted_serving_tok_s"] - 100.0) < 0.2 for r in ar)
    (q0, q1), (s,) = got["ratios_to_lru"], got["summary"]
    assert q0["measured"] == round(60 / 80, 3) and q1["measured"] == round(61 / 80, 3)
    assert s["repeats"] == 2 and abs(s["error"] - (s["predicted"] / s["measured"] - 1)) < 2e-3
