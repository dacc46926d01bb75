"""Replacement policies on small hand-worked access sequences; ARC against the paper's pseudocode;
allocations of a budget across layers."""

from __future__ import annotations

import random

import pytest

from gpu_worker.policy import (
    ARCPolicy, LFUDecayPolicy, LFUPolicy, LRUPolicy, PolicyError, ShallowFavoringAllocation,
    UniformAllocation, make_allocation, make_policy_factory,
)
from gpu_worker.policy.ledger import CacheLedger


def replay_layer(policy, capacity: int, accesses, step_every: int = 1) -> int:
    """Hits of one layer with `capacity` slots over a sequence of expert ids: each access one demand call
    of the cache ledger (what the cache and the simulator drive), on_step after every `step_every`."""
    ledger = CacheLedger([0], {0: capacity}, lambda slots: policy, capacity)
    L = ledger.layers[0]
    for i, e in enumerate(accesses):
        ledger.replay_demand(L, [e])
        if (i + 1) % step_every == 0:
            ledger.end_step()
    return L.stats.hits


def resident_after(policy, capacity, seq):
    """Replay and return the resident set (the driver keeps it; rebuild it the same way)."""
    resident: set[int] = set()
    for e in seq:
        if e in resident:
            policy.on_hit(e)
        else:
            policy.on_miss(e)
            if len(resident) >= capacity:
                v = policy.victim(resident)
                resident.remove(v)
                policy.on_evict(v)
            resident.add(e)
            policy.on_insert(e)
        policy.on_step()
    return resident


def test_lru_worked_example():
    # cap 2: 1m [1]; 2m [1,2]; 1h [2,1]; 3m evicts 2 [1,3]; 2m evicts 1 [3,2]; 1m evicts 3 [2,1]
    assert replay_layer(LRUPolicy(), 2, [1, 2, 1, 3, 2, 1]) == 1
    assert resident_after(LRUPolicy(), 2, [1, 2, 1, 3, 2, 1]) == {1, 2}


def test_lfu_counts_survive_eviction_and_ties_go_to_lru():
    # cap 2: 1m(c=1) 1h(2) 2m(1) | 3m: evict 2 (1 < 2) | 2m: counts 1:2, 3:1 -> evict 3; 2 now 2
    # 4m: 1 and 2 both 2 -> the less recently used, 1 (last used at access 2) goes
    seq = [1, 1, 2, 3, 2, 4]
    assert replay_layer(LFUPolicy(), 2, seq) == 1
    assert resident_after(LFUPolicy(), 2, seq) == {2, 4}


def test_lfu_decay_forgets_old_popularity_and_plain_lfu_does_not():
    # 1 used three times long ago, 2 once just now. Decay 0.5 per step: 1 ~ 1/16+1/8+1/4, 2 ~ 1/2.
    seq = [1, 1, 1, 2, 3]
    assert resident_after(LFUDecayPolicy(0.5), 2, seq) == {2, 3}
    assert resident_after(LFUPolicy(), 2, seq) == {1, 3}
    p = LFUDecayPolicy(0.5)
    for e in [1, 1, 1, 2]:
        (p.on_hit if e in p._recency else p.on_insert)(e)
        p.on_step()
    assert p.count(1) == pytest.approx((1 + 2 + 4) / 16) and p.count(2) == pytest.approx(8 / 16)


def test_lfu_decay_rescales_without_changing_ranks():
    p = LFUDecayPolicy(0.5)
    p.on_insert(7)
    for _ in range(400):  # 2**400 would overflow a float without the rescale
        p.on_step()
    p.on_insert(8)
    assert p.victim({7, 8}) == 7 and p.count(8) == pytest.approx(1.0)


def test_arc_keeps_a_frequent_expert_through_a_scan_where_lru_does_not():
    seq = [1, 1, 2, 3, 1]
    assert replay_layer(LRUPolicy(), 2, seq) == 1
    assert replay_layer(ARCPolicy(2), 2, seq) == 2  # 1 sits in T2; the scan 2, 3 churns T1


def arc_reference(c: int, seq: list[int]) -> tuple[int, list[float]]:
    """ARC as printed in Megiddo & Modha, "ARC: A Self-Tuning, Low Overhead Replacement Cache",
    FAST 2003, Fig. 4, transcribed literally (lists are LRU-first). Returns hits and p over time."""
    T1: list[int] = []
    T2: list[int] = []
    B1: list[int] = []
    B2: list[int] = []
    p = 0.0
    hits = 0
    ps = []

    def replace(x: int) -> None:
        if T1 and ((x in B2 and len(T1) == p) or len(T1) > p):
            B1.append(T1.pop(0))
        else:
            B2.append(T2.pop(0))

    for x in seq:
        if x in T1 or x in T2:  # Case I
            hits += 1
            (T1 if x in T1 else T2).remove(x)
            T2.append(x)
        elif x in B1:  # Case II
            p = min(c, p + max(len(B2) / len(B1), 1))
            replace(x)
            B1.remove(x)
            T2.append(x)
        elif x in B2:  # Case III
            p = max(0, p - max(len(B1) / len(B2), 1))
            replace(x)
            B2.remove(x)
            T2.append(x)
        else:  # Case IV
            L1, total = len(T1) + len(B1), len(T1) + len(T2) + len(B1) + len(B2)
            if L1 == c:
                if len(T1) < c:
                    B1.pop(0)
                    replace(x)
                else:
                    T1.pop(0)
            elif L1 < c and total >= c:
                if total == 2 * c:
                    B2.pop(0)
                replace(x)
            T1.append(x)
        ps.append(p)
    return hits, ps


@pytest.mark.parametrize("capacity", [1, 2, 3, 5, 8])
def test_arc_matches_the_published_definition_on_random_sequences(capacity):
    rng = random.Random(capacity)
    for trial in range(30):
        n_ids = rng.choice([capacity + 1, 2 * capacity + 2, 4 * capacity + 3])
        # skewed and phase-shifting accesses, so both ghost lists and p move
        weights = [rng.random() ** 3 for _ in range(n_ids)]
        seq = [rng.choices(range(n_ids), weights)[0] for _ in range(300)]
        seq += [(i % n_ids) for i in range(60)]  # a scan
        ours = ARCPolicy(capacity)
        hits = 0
        ref_hits, ref_ps = arc_reference(capacity, seq)
        resident: set[int] = set()
        for i, e in enumerate(seq):
            if e in resident:
                hits += 1
                ours.on_hit(e)
            else:
                ours.on_miss(e)
                if len(resident) >= capacity:
                    v = ours.victim(resident)
                    resident.remove(v)
                    ours.on_evict(v)
                resident.add(e)
                ours.on_insert(e)
            assert ours.p == ref_ps[i], (trial, i)
            assert set(ours.t1) | set(ours.t2) == resident
        assert hits == ref_hits


def test_arc_skips_pinned_experts_within_the_chosen_list():
    arc = ARCPolicy(3)
    for e in (1, 2, 3):
        arc.on_miss(e)
        arc.on_insert(e)
    arc.on_miss(4)
    assert arc.victim({1, 2, 3}) == 1  # T1's LRU
    assert arc.victim({2, 3}) == 2  # 1 pinned: next in T1


def test_every_policy_stays_within_its_candidates():
    rng = random.Random(0)
    for name in ("lru", "lfu", "lfu_decay", "arc"):
        pol = make_policy_factory(name)(4)
        hits = replay_layer(pol, 4, [rng.randrange(10) for _ in range(500)])
        assert 0 < hits < 500
    with pytest.raises(PolicyError, match="unknown replacement policy 'mru'"):
        make_policy_factory("mru")


def test_uniform_allocation():
    assert UniformAllocation().slots(10, [0, 1, 2, 3], 16) == {0: 3, 1: 3, 2: 2, 3: 2}
    assert UniformAllocation().slots(100, [0, 1], 16) == {0: 16, 1: 16}
    assert UniformAllocation().slots(2, [0, 1, 2, 3], 16) == {0: 1, 1: 1, 2: 0, 3: 0}


def test_shallow_favoring_allocation():
    a = ShallowFavoringAllocation(full_layers=4)
    layers = list(range(8))
    # 8 layers x 16 experts; 25% = 32 slots: only 2 whole layers fit -> fill from the shallowest
    assert a.slots(32, layers, 16) == {0: 16, 1: 16, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0, 7: 0}
    # 50% = 64 slots: the first 4 layers whole, nothing left for the rest
    assert a.slots(64, layers, 16) == {0: 16, 1: 16, 2: 16, 3: 16, 4: 0, 5: 0, 6: 0, 7: 0}
    # 75% = 96: first 4 whole, 32 split evenly over 4 deeper layers
    assert a.slots(96, layers, 16) == {0: 16, 1: 16, 2: 16, 3: 16, 4: 8, 5: 8, 6: 8, 7: 8}
    # non-consecutive MoE layers (qwen2_moe with mlp_only_layers): by position, not index
    assert ShallowFavoringAllocation(1).slots(10, [1, 3, 5], 4) == {1: 4, 3: 3, 5: 3}
    assert make_allocation("shallow_favoring", 2).slots(6, [0, 1, 2], 4) == {0: 4, 1: 2, 2: 0}
    with pytest.raises(PolicyError):
        make_allocation("deep_favoring")


@pytest.mark.parametrize("layers,experts,top_k", [(8, 16, 2), (4, 8, 2), (24, 60, 4), (6, 64, 8)])
def test_shallow_favoring_never_leaves_a_layer_under_top_k(layers, experts, top_k):
    a = make_allocation("shallow_favoring")  # full_layers derived
    ids = list(range(layers))
    for total in range(top_k * layers, experts * layers + 1):
        s = a.slots(total, ids, experts, top_k)
        assert set(s) == set(ids) and sum(s.values()) <= total
        assert min(s.values()) >= top_k, (total, s)
        assert all(s[ids[i]] >= s[ids[i + 1]] for i in range(layers - 1)), (total, s)  # shallow first
        if top_k * layers + experts - top_k <= total < experts * layers:  # a whole layer fits above the floor
            assert s[ids[0]] > s[ids[-1]], (total, s)


def test_shallow_favoring_whole_layers_follow_budget_and_layer_count():
    a = ShallowFavoringAllocation()
    # tiny-mixtral: 8 layers x 16 experts, top-2. 25% = 32 slots: 16 above the floor buy one whole layer
    assert a.slots(32, list(range(8)), 16, 2) == {0: 16, 1: 3, 2: 3, 3: 2, 4: 2, 5: 2, 6: 2, 7: 2}
    assert a.slots(64, list(range(8)), 16, 2) == {0: 16, 1: 16, 2: 16, 3: 4, 4: 3, 5: 3, 6: 3, 7: 3}
    assert [a.whole_layers(t, 8, 16, 2) for t in (16, 32, 64, 96, 128)] == [0, 1, 3, 5, 8]
    # the same budget share over more layers keeps the same share of them whole, not a constant
    assert a.whole_layers(64 * 2, 16, 16, 2) == 2 * a.whole_layers(64, 8, 16, 2)
    # below top-k everywhere: an even split, shallowest first (no layer starved for another's whole residency)
    assert a.slots(12, list(range(8)), 16, 2) == {0: 2, 1: 2, 2: 2, 3: 2, 4: 1, 5: 1, 6: 1, 7: 1}
    # an explicit count keeps the old behavior
    assert ShallowFavoringAllocation(4).whole_layers(32, 8, 16, 2) == 4
