"""Predictors by hand: prev_token's most-recently-used lists, EAP's matrices, library and cosine match,
cross_layer's router on a hidden state, the factory, and the prefetch helpers (merge, INT2 tail,
width and throttle)."""

from __future__ import annotations

import math

import pytest
import torch

from gpu_worker.policy.predictors import EAPPredictor, PredictorError, PrevTokenPredictor, int2_tail, merge_ranked
from gpu_worker.predictors import PREDICTOR_NAMES, CrossLayerPredictor, make_predictor
from gpu_worker.prefetch import WidthController


# -- prev_token -------------------------------------------------------------------------------


def test_prev_token_by_hand():
    p = PrevTokenPredictor()
    p.start_request(1)
    p.start_request(2)
    assert p.predict(0, [1, 2], 2) == [[], []]  # no history: nothing (a prefill)
    # a prefill step: request 1 has three rows at MoE layer 0, request 2 one row
    p.observe(0, [1, 1, 1, 2], [[3, 5], [5, 7], [0, 3], [9, 8]])
    # request 1's list at layer 0, most recent first: [0, 3] then [5, 7] then (3, 5: 3 moved up) -> 0 3 5 7
    assert p.predict(0, [1, 2], 2) == [[0, 3], [9, 8]]
    assert p.predict(0, [1], 4) == [[0, 3, 5, 7]]
    assert p.predict(0, [2], 4) == [[9, 8]]
    assert p.predict(1, [1], 2) == [[]]  # another layer: its own list
    # a decode step: one row each; rows of a batch keep their request
    p.observe(0, [2, 1], [[8, 1], [7, 0]])
    assert p.predict(0, [1, 2, 1], 3) == [[7, 0, 3], [8, 1, 9], [7, 0, 3]]
    p.end_request(1)
    assert p.predict(0, [1], 2) == [[]]
    assert p.predict(0, [2], 1) == [[8]]
    assert p.predict(0, [2], 0) == [[]]


# -- EAP --------------------------------------------------------------------------------------


def test_eap_by_hand():
    p = EAPPredictor(num_moe_layers=3, num_experts=4, library_size=2)
    # empty library, nothing observed: nothing to say
    p.start_request(1)
    assert p.predict(1, [1], 2) == [[]]
    # request 1: layer 0 -> {0, 1}, layer 1 -> {2, 2}, layer 2 -> {3, 0} over two tokens
    p.observe(0, [1, 1], [[0, 1], [0, 1]])
    p.observe(1, [1, 1], [[2, 3], [2, 1]])
    p.observe(2, [1, 1], [[3, 0], [3, 2]])
    assert p.matrix(1).tolist() == [[2, 2, 0, 0], [0, 1, 2, 1], [1, 0, 1, 2]]
    # global popularity alone while the library is empty: layer 1 counts 0,1,2,1 -> 2, then 1 (tie 1/3: lower id)
    assert p.predict(1, [1], 3) == [[2, 1, 3]]
    p.end_request(1)  # recorded: library = [M1]
    # request 2: its layer 0 looks like request 3's will (below), not like request 1's
    p.start_request(2)
    p.observe(0, [2], [[2, 3]])
    p.observe(1, [2], [[0, 1]])
    p.observe(2, [2], [[1, 2]])
    p.end_request(2)  # library = [M1, M2]
    p.start_request(3)
    p.observe(0, [3], [[3, 2]])
    # layers seen so far for layer 1: row 0 only. cos(M3[0], M1[0]) = 0, cos(M3[0], M2[0]) = 1 -> M2,
    # whose layer 1 row is {0: 1, 1: 1}: 0, 1 (ties: lower id); width 3 fills from popularity (2)
    assert p.best_match(3, 1) == 1
    assert p.predict(1, [3], 2) == [[0, 1]]
    assert p.predict(1, [3], 3) == [[0, 1, 2]]
    # for layer 2, rows 0..1: M3 has nothing at layer 1 yet, still M2 -> its layer 2: 1, 2
    assert p.predict(2, [3], 2) == [[1, 2]]
    # a request that matches request 1 on layer 0 gets request 1's deeper rows
    p.start_request(4)
    p.observe(0, [4], [[1, 0]])
    assert p.best_match(4, 2) == 0
    assert p.predict(2, [4], 2) == [[3, 0]]  # M1 layer 2: 3 (2), then 0 vs 2 (1 each): lower id
    # rows of several requests in one call: each gets its own
    assert p.predict(1, [4, 3, 4], 1) == [[2], [0], [2]]
    # a bounded library: a third recording pushes out the oldest (M1); then nothing in the library shares
    # request 4's layer 0 experts (similarity 0): global popularity at layer 2 (0:1 1:1 2:2 3:2 -> 2, 3)
    p.end_request(3)
    assert len(p._library) == 2
    assert p.best_match(4, 2) is None
    assert p.predict(2, [4], 2) == [[2, 3]]


def test_eap_layer_zero_uses_earlier_tokens_and_ties_go_to_the_newest():
    p = EAPPredictor(num_moe_layers=2, num_experts=3, library_size=4)
    for rid, (l0, l1) in enumerate([([0, 1], [2, 0]), ([0, 1], [1, 2])]):
        p.start_request(rid)
        p.observe(0, [rid], [l0])
        p.observe(1, [rid], [l1])
        p.end_request(rid)
    p.start_request(9)
    p.observe(0, [9], [[1, 0]])
    assert p.best_match(9, 1) == 1  # equal similarity: the most recently recorded
    assert p.predict(1, [9], 2) == [[1, 2]]
    # layer 0 of the next token: compared over every row (the request's earlier tokens)
    p.observe(1, [9], [[2, 0]])
    assert p.best_match(9, 0) == 0  # M9 = [[1,1,0],[1,0,1]] is request 0's exactly
    with pytest.raises(PredictorError):
        p.predict(2, [9], 1)


# -- cross_layer ---------------------------------------------------------------------------------


def test_cross_layer_applies_the_target_layers_router():
    # layer 1's router: expert e scores (e + 1) * h0 - e * h1; layer 0's would rank the other way round
    routers = [-torch.tensor([[1.0, 0.0], [2.0, -1.0], [3.0, -2.0], [4.0, -3.0]]),
               torch.tensor([[1.0, 0.0], [2.0, -1.0], [3.0, -2.0], [4.0, -3.0]])]
    p = CrossLayerPredictor(routers)
    h = torch.tensor([[1.0, 0.0], [1.0, 2.0], [1.0, 0.9]])  # [T, H]
    # row 0: 1, 2, 3, 4 -> 3, 2; row 1: 1, 0, -1, -2 -> 0, 1; row 2: 1, 1.1, 1.2, 1.3 -> 3, 2
    assert p.predict(1, [0, 0, 1], 2, gate_input=h) == [[3, 2], [0, 1], [3, 2]]
    assert p.predict(0, [0], 2, gate_input=h[:1]) == [[0, 1]]
    assert p.predict(1, [0], 9, gate_input=h[:1]) == [[3, 2, 1, 0]]  # width capped at E
    with pytest.raises(PredictorError, match="gate_input"):
        p.predict(1, [0], 2)
    assert CrossLayerPredictor.needs_gate_input and not PrevTokenPredictor.needs_gate_input


def test_factory():
    assert PREDICTOR_NAMES == ("none", "cross_layer", "eap", "prev_token")
    common = dict(routers=[torch.zeros(3, 2)], num_moe_layers=1, num_experts=3, seed=1)
    for name in PREDICTOR_NAMES + ("random",):
        p = make_predictor(name, **common)
        assert p.name == name
        assert len(p.predict(0, [0, 1], 2, gate_input=torch.zeros(2, 2))) == 2
    assert make_predictor("none").predict(3, [1, 2], 4) == [[], []]
    r = make_predictor("random", num_experts=16, seed=3).predict(0, [0] * 50, 2)
    assert all(len(set(x)) == 2 and all(0 <= e < 16 for e in x) for x in r)
    with pytest.raises(PredictorError, match="unknown predictor"):
        make_predictor("oracle")
    with pytest.raises(PredictorError, match="routers"):
        make_predictor("cross_layer")
    with pytest.raises(PredictorError, match="num_moe_layers"):
        make_predictor("eap", num_experts=3)


# -- the controller's helpers ----------------------------------------------------------------------


def test_merge_ranked_by_hand():
    # top_k 2: e.g. 5 is in two rows' top 2, 1 in one top 2 and one deeper list, 7 in one top 2 ...
    rows = [[5, 1, 9], [7, 5, 1], [2, 3, 4]]
    # 5: two rows' top 2; 1: one top 2 + one list; 2 and 7: one top 2 at rank 0 (ties: lower id); 3: one top 2
    # at rank 1; 4 and 9: one list at rank 2
    assert merge_ranked(rows, 2) == [5, 1, 2, 7, 3, 4, 9]
    assert merge_ranked([], 2) == []


def test_int2_tail_by_hand():
    rows = [[0, 1], [0, 1], [0, 2], [0, 3], [4, 1]]  # prefill rows; 10 assignments: 0:4 1:3 2:1 3:1 4:1
    pre = [True] * 5
    assert int2_tail(rows, pre, 0.3) == [4, 3, 2]  # 1 + 1 + 1 = 3 <= 3; adding 1 (3) would pass 30%
    assert int2_tail(rows, pre, 0.25) == [4, 3]
    assert int2_tail(rows, pre, 0.0) == []
    # an expert a decode row also uses is never INT2; decode rows' assignments are not counted
    assert int2_tail(rows + [[3, 2]], pre + [False], 0.3) == [4]
    assert int2_tail([[1, 2]], [False], 0.5) == []


def test_width_measured_fixed_and_throttled():
    w = WidthController(top_k=2, num_experts=16)
    assert w.width == 2  # nothing measured yet
    w.observe_layer_ns(1000.0)
    w.observe_expert_ns(180.0)
    assert w.measured == 5 and w.width == 5  # floor(1000 / 180)
    w.observe_expert_ns(1180.0)  # EWMA: 180 + 0.1 * 1000 = 280 -> floor(1000 / 280) = 3
    assert math.isclose(w.expert_ns, 280.0) and w.width == 3
    w.observe_expert_ns(10_000.0)
    assert w.width == 2  # never below top_k
    assert WidthController(2, 16, fixed=6).width == 6
    assert WidthController(2, 4, fixed=6).width == 4  # capped at the experts
    # throttle: unused prefetches narrow the width by one every 8 steps, good ones widen it back
    t = WidthController(top_k=2, num_experts=16)
    t.observe_layer_ns(600.0)
    t.observe_expert_ns(100.0)
    assert t.width == 6
    for _ in range(8):
        t.on_step(landed=10, used=1, queued=10, dropped=0)
    assert t.width == 5
    for _ in range(16):
        t.on_step(landed=10, used=1, queued=10, dropped=0)
    assert t.width == 3
    for _ in range(8):
        t.on_step(landed=10, used=10, queued=10, dropped=0)
    assert t.width < 6  # the EWMA remembers the bad steps a while
    for _ in range(80):
        t.on_step(landed=10, used=10, queued=10, dropped=0)
    assert t.width == 6
    for _ in range(40):  # a backed-up queue narrows too
        t.on_step(landed=10, used=10, queued=10, dropped=9)
    assert t.width == 2
    fixed = WidthController(2, 16, fixed=5)
    for _ in range(40):
        fixed.on_step(landed=10, used=0, queued=10, dropped=10)
    assert fixed.width == 5  # a fixed width is not throttled
