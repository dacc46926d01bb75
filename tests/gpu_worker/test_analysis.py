"""Trace analysis: statistics on hand-made traces, and the report command's plots and learned allocation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gpu_worker.analysis import (
    learn_allocation, popularity, prediction_accuracy, rare_experts, reuse_distances, router_entropy, transitions,
)
from gpu_worker.policy import LearnedAllocation
from gpu_worker.simulator import Replay, SimConfig, simulate
from gpu_worker.traces import Trace, load_trace, make_meta, save_trace


def test_popularity_reuse_transitions_entropy_by_hand():
    # one layer, top-1: 0 1 0 2 1
    t = Trace(np.array([[[0]], [[1]], [[0]], [[2]], [[1]]], np.int16), make_meta("toy", 1, 4, 1))
    assert popularity(t).tolist() == [[2, 2, 1, 0]]
    d = reuse_distances(t)[0]
    assert [x if math.isfinite(x) else -1 for x in d] == [-1, -1, 1, -1, 2]
    ent = router_entropy(t)["usage"][0]
    p = np.array([0.4, 0.4, 0.2])
    assert ent == pytest.approx(-(p * np.log(p)).sum() / math.log(4))
    assert rare_experts(popularity(t)) == [(0, 3, 0.0)]
    # two layers: transitions count (expert at l, expert at l+1) per token
    t2 = Trace(np.array([[[0], [1]], [[0], [1]], [[2], [3]]], np.int16), make_meta("toy", 2, 4, 1))
    tr = transitions(t2)
    assert tr.shape == (1, 4, 4) and tr[0, 0, 1] == 2 and tr[0, 2, 3] == 1 and tr.sum() == 3


def test_weight_entropy_from_router_weights():
    ex = np.array([[[0, 1]], [[2, 3]]], np.int16)
    w = np.array([[[0.5, 0.5]], [[1.0, 0.0]]], np.float32)
    ent = router_entropy(Trace(ex, make_meta("toy", 1, 4, 2), weights=w))
    assert ent["weights"][0] == pytest.approx(0.5)  # one token split evenly (1), one on a single expert (0)


def test_prev_token_accuracy_is_perfect_on_a_repeating_request():
    rows = [[[0, 1], [2, 3]]] * 5  # every token routes the same
    t = Trace(np.array(rows, np.int16), make_meta("toy", 2, 4, 2), request=np.zeros(5, np.int32),
              phase=np.array([0, 1, 1, 1, 1], np.uint8))
    accs, notes = prediction_accuracy(t, ("prev_token",))
    (a,) = accs
    assert math.isnan(a.recall[0])  # the first MoE layer is never predicted
    assert a.recall[1] == 1.0 and a.strict[1] == 1.0 and a.rows[1] == 4


def test_learned_allocation_beats_or_matches_the_fixed_ones(shared_dir):
    rp = Replay(load_trace(shared_dir / "traces" / "tiny-mixtral-8req-sequential.npz"))
    res = learn_allocation(rp, 32, "lru", budget_label="25%")
    c = res.compared
    assert c["learned"] >= max(c["uniform"], c["shallow_favoring"])
    slots = res.allocation.slots(32, rp.trace.layer_ids, 16)
    assert sum(slots.values()) <= 32
    replayed = simulate(rp, SimConfig("lru", 32, slots_override=tuple(enumerate(slots[l] for l in rp.trace.layer_ids))))
    assert replayed.hit_rate == pytest.approx(c["learned"])


def test_analyze_command_writes_report_plots_and_allocation(shared_dir, tmp_path, capsys):
    from gpu_worker.__main__ import main

    full = load_trace(shared_dir / "traces" / "tiny-mixtral-8req-interleaved.npz")
    n = 300  # a small trace: the first rows, with router weights and predictions added
    rng = np.random.default_rng(0)
    small = Trace(full.experts[:n].copy(), dict(full.meta), weights=rng.random((n, 8, 2)).astype(np.float16),
                  request=full.request[:n].copy(), phase=full.phase[:n].copy(),
                  predicted=np.roll(full.experts[:n], 1, axis=0))
    path = save_trace(small, tmp_path / "small.npz")
    out = tmp_path / "report"
    assert main(["analyze", str(path), "--out", str(out), "--budget", "25%"]) == 0
    names = {p.name for p in out.iterdir()}
    for kind in ("hit_rate_vs_budget", "popularity", "reuse_distance", "prediction_accuracy", "transitions", "entropy"):
        png = out / f"small.{kind}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", kind
    report = (out / "report.md").read_text()
    for heading in ("Hit rate vs budget", "Expert popularity", "Reuse distance", "Prediction accuracy",
                    "transitions", "Router entropy", "Rarely used experts", "Learned allocation"):
        assert heading in report, heading
    assert "recorded recall" in report and "belady" in report
    alloc = LearnedAllocation.load(out / "small.allocation-25pct.json")
    assert alloc.total_slots == 32 and sum(alloc.slots(32, list(range(8)), 16).values()) <= 32
    assert "small.allocation-25pct.json" in names
    summary = json.loads((out / "summary.json").read_text())
    assert summary[0]["learned"]["format"] == "fate-allocation/1"


def test_learned_allocation_minimizes_projected_time_not_misses(shared_dir):
    """On the interleaved trace the allocation with the most hits is slower (its misses come in more demand
    waves): the learned one must be at least as fast, on the cost model, as every fixed allocation."""
    from gpu_worker.simulator import PROFILES, estimate_cost, layer_slots

    rp = Replay(load_trace(shared_dir / "traces" / "tiny-mixtral-8req-interleaved.npz"))
    res = learn_allocation(rp, 32, "lru", budget_label="25%", max_evals=40)
    prof = PROFILES["this-machine"]

    def seconds(slots):
        r = simulate(rp, SimConfig("lru", 32, slots_override=tuple(enumerate(slots))))
        c = estimate_cost(r, prof, prof.expert_bytes)
        return c.decode_s + c.prefill_s

    learned = seconds([res.allocation.learned[l] for l in rp.trace.layer_ids])
    for name in ("uniform", "shallow_favoring"):
        assert learned <= seconds(layer_slots(rp, SimConfig("lru", 32, allocation=name))) + 1e-9, name
    assert res.compared_s["learned"] == pytest.approx(learned)


def test_hit_rate_plot_legend_names_the_learned_allocation(shared_dir):
    from gpu_worker.analysis import budget_grid, hit_rate_curves, hit_rate_figure

    rp = Replay(load_trace(shared_dir / "traces" / "tiny-mixtral-8req-sequential.npz"))
    res = learn_allocation(rp, 32, "lru", max_evals=4)
    budgets = budget_grid(rp.trace)[:2]
    allocations = ("uniform", "shallow_favoring")
    fig = hit_rate_figure(rp.trace, budgets, hit_rate_curves(rp, ("lru",), allocations, budgets), allocations, res)
    texts = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert "lru" in texts and any(t.startswith("learned allocation") for t in texts), texts
