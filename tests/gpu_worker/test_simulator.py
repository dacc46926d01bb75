"""The offline simulator: hand-worked replays, Belady as the bound, the published reference numbers,
exact fidelity to the worker's own cache counters, the cost model, the CLI, learned allocations."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from gpu_worker.policy import AllocationFileError, LearnedAllocation
from gpu_worker.simulator import (
    PROFILES, SIM_POLICIES, HardwareProfile, Replay, SimConfig, SimulationError, estimate_cost, parse_budget,
    simulate, worker_config_of,
)
from gpu_worker.traces import Trace, load_trace, make_meta


def one_layer(seq: list[list[int]], E: int = 8, requests: list[int] | None = None) -> Trace:
    """A one-layer trace, a row per entry of `seq` (rows padded with -1 to the longest)."""
    K = max(len(r) for r in seq)
    ex = np.full((len(seq), 1, K), -1, np.int16)
    for n, r in enumerate(seq):
        ex[n, 0, :len(r)] = r
    req = np.array(requests, np.int32) if requests is not None else None
    phase = np.ones(len(seq), np.uint8) if requests is not None else None
    return Trace(ex, make_meta("toy", 1, E, K), request=req, phase=phase)


def flat(policy: str, seq: list[int], cap: int, pin: str = "none") -> int:
    r = simulate(one_layer([[e] for e in seq]), SimConfig(policy, cap, semantics="flat", pin=pin))
    return int(r.hits.sum())


# -- hand-worked answers ----------------------------------------------------------------------------


def test_flat_replays_match_worked_values():
    # LRU cap 2: 1m 2m 1h 3m(evicts 2) 2m(evicts 1) 1m(evicts 3) -> 1 hit
    assert flat("lru", [1, 2, 1, 3, 2, 1], 2) == 1
    # Belady cap 2 on the same: 3 evicts 1 (next use at 5, after 2's at 4): 2 hits (2 at 4... 1 at 2)
    assert flat("belady", [1, 2, 1, 3, 2, 1], 2) == 2
    # LFU cap 2: 1m 1h 2m | 3m evicts 2 (count 1 < 2) | 2m evicts 3 | 4m: 1 and 2 both count 2, 1 older -> 1 hit
    assert flat("lfu", [1, 1, 2, 3, 2, 4], 2) == 1
    # ARC keeps the twice-used 1 in T2 through the scan 2, 3; LRU does not
    assert flat("arc", [1, 1, 2, 3, 1], 2) == 2 and flat("lru", [1, 1, 2, 3, 1], 2) == 1
    # 1 used three times, then 2, 3, 2. LFU (and LFU decay 0.9: 1 ~ 3.3 vs 2 ~ 1.4) evicts 2 for 3, then 3
    # for 2: 2 hits. Decay 0.5 per row: 1 ~ 1+2+4 = 7 < 2's 8 at step 3, so 3 evicts 1 and the last 2 hits.
    seq = [1, 1, 1, 2, 3, 2]
    assert flat("lfu", seq, 2) == 2 and flat("lfu_decay", seq, 2) == 2
    r = simulate(one_layer([[e] for e in seq]), SimConfig("lfu_decay", 2, semantics="flat", lfu_decay=0.5))
    assert int(r.hits.sum()) == 3


def test_flat_pinning_protects_the_current_token():
    # rows [1,2] then [3,1]: unpinned LRU evicts 1 for 3 (1 is LRU) and misses 1 again; pinned keeps 1
    t = one_layer([[1, 2], [3, 1]])
    assert int(simulate(t, SimConfig("lru", 2, semantics="flat", pin="none")).hits.sum()) == 0
    assert int(simulate(t, SimConfig("lru", 2, semantics="flat", pin="all")).hits.sum()) == 1


def test_worker_replay_matches_a_hand_worked_cache():
    # one layer, 2 slots; steps [0,1] [0,2] [1,2] [0,1]. LRU: hits first (0; then 2; then 1), each miss
    # evicts the LRU resident the step did not just use: 1, then 0, then 2 -> 3 hits of 8 lookups.
    t = one_layer([[0, 1], [0, 2], [1, 2], [0, 1]], E=4)
    r = simulate(t, SimConfig("lru", 2))
    assert (int(r.lookups.sum()), int(r.hits.sum()), int(r.misses.sum()), int(r.evictions.sum())) == (8, 3, 5, 3)
    # Belady: step 1's miss evicts 0 (next use step 3) rather than 1 (step 2): 4 hits
    assert int(simulate(t, SimConfig("belady", 2)).hits.sum()) == 4


def test_worker_replay_batches_rows_into_steps_and_asks_in_popularity_order():
    # two requests decoding together: each step looks an expert up once
    t = one_layer([[0, 1], [1, 2], [0, 1], [1, 2]], E=4, requests=[0, 1, 0, 1])
    rp = Replay(t)
    assert rp.S == 2 and rp.uniq[0] == [(1, 0, 2), (1, 0, 2)]  # 1 routed twice: asked first
    r = simulate(rp, SimConfig("lru", 3))
    assert (int(r.lookups.sum()), int(r.hits.sum())) == (6, 3)


def test_a_layer_without_slots_borrows_from_the_fullest_layer():
    # 2 layers x 4 experts, top-1, budget 2 slots, shallow_favoring(1): slots {0: 2, 1: 0}.
    # step 0: L0 fetches 0 (free unit); L1 fetches 0 (free unit), trims to 0 slots.
    # step 1: L0 fetches 1 (free unit) -> {0, 1}; L1 has no slot and no free unit: it evicts L0's LRU (0).
    # step 2: L0 asks for 0 again: a miss that a per-layer model would count as a hit.
    ex = np.array([[[0], [0]], [[1], [1]], [[0], [2]]], np.int16)
    t = Trace(ex, make_meta("toy", 2, 4, 1))
    r = simulate(t, SimConfig("lru", 2, allocation="shallow_favoring", full_layers=1))
    assert r.slots == [2, 0]
    assert r.hits.tolist() == [0, 0] and r.misses.tolist() == [3, 3]
    assert int(r.evictions.sum()) == 5  # L1's three trims + L0's two experts taken by L1


def test_only_experts_and_meta_replay_in_both_semantics():
    t = Trace(np.array([[[0, 1]], [[1, 2]], [[0, -1]]], np.int16), make_meta("toy", 1, 4, 2))
    assert simulate(t, SimConfig("lru", 2)).lookups.sum() == 5
    assert simulate(t, SimConfig("belady", 2, semantics="flat")).lookups.sum() == 5


# -- Belady is the bound -------------------------------------------------------------------------------


def random_trace(seed: int, batch: int = 1) -> Trace:
    rng = np.random.default_rng(seed)
    L, E, K, N = int(rng.integers(1, 4)), int(rng.integers(3, 9)), 0, int(rng.integers(20, 120))
    K = int(rng.integers(1, min(3, E) + 1))
    w = rng.random(E) ** 3 + 0.01
    w /= w.sum()
    ex = np.array([[rng.choice(E, K, replace=False, p=w) for _ in range(L)] for _ in range(N)], np.int16)
    req = (np.arange(N) % batch).astype(np.int32)
    return Trace(ex, make_meta("rand", L, E, K), request=req, phase=np.ones(N, np.uint8))


def test_belady_is_never_beaten_on_random_traces():
    """Flat semantics: MIN is optimal among demand caches (any allocation, any budget). Worker semantics:
    with one row per step and every layer holding at least top-k slots, too. (With batched steps that need
    more experts than a layer holds, the worker's waves constrain evictions and a policy can beat
    farthest-next-use by a hit or two; the simulator does not claim a bound there.)"""
    for seed in range(60):
        rp = Replay(random_trace(seed, batch=1 + seed % 3))
        t = rp.trace
        L, E, K = t.num_layers, t.num_experts, t.top_k
        for Q in range(1, L * E + 1, max(1, L * E // 5)):
            for al in ("uniform", "shallow_favoring"):
                res = {p: simulate(rp, SimConfig(p, Q, allocation=al, semantics="flat", full_layers=1))
                       for p in SIM_POLICIES}
                bound = res["belady"].hits.sum()
                assert all(r.hits.sum() <= bound for r in res.values()), (seed, Q, al)
        if seed % 3 == 0:  # one row per step
            for c in range(K, E + 1):
                res = {p: simulate(rp, SimConfig(p, c * L)) for p in SIM_POLICIES}
                bound = res["belady"].hits.sum()
                assert all(r.hits.sum() <= bound for r in res.values()), (seed, c)


# -- the published reference numbers ---------------------------------------------------------------------

REFERENCE = {  # ../shared/traces/README.md: slots per layer -> (LRU, LFU, LFU decay 0.9, Belady)
    "mixtral-8x7b-humaneval0": {2: (0.320, 0.377, 0.377, 0.465), 4: (0.608, 0.622, 0.645, 0.768),
                                6: (0.827, 0.832, 0.843, 0.912)},
    "qwen1.5-moe-gsm8k-5layers": {15: (0.303, 0.329, 0.340, 0.601), 30: (0.565, 0.582, 0.591, 0.816),
                                  45: (0.810, 0.809, 0.819, 0.935)},
}
TINY_REFERENCE = {2: (0.34, 0.39, 0.47), 4: (0.59, 0.67, 0.74), 8: (0.87, 0.90, 0.93), 12: (0.97, 0.97, 0.99)}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_shared_traces_reproduce_the_reference_hit_rates(shared_dir, name):
    """The README's convention: (token, expert) accesses, equal slots per layer, LFU-family evicting only
    experts the current token does not need (pin="reference")."""
    rp = Replay(load_trace(shared_dir / "traces" / f"{name}.npz"))
    for slots, want in REFERENCE[name].items():
        got = [simulate(rp, SimConfig(p, slots * rp.L, semantics="flat")).hit_rate
               for p in ("lru", "lfu", "lfu_decay", "belady")]
        assert got == pytest.approx(want, abs=0.005), (slots, got)


def test_tiny_mixtral_trace_reproduces_its_readme(shared_dir):
    rp = Replay(load_trace(shared_dir / "traces" / "tiny-mixtral-8req-interleaved.npz"))
    for slots, want in TINY_REFERENCE.items():  # two-digit values: within rounding + 0.005
        got = [simulate(rp, SimConfig(p, slots * rp.L, semantics="flat")).hit_rate for p in ("lru", "lfu", "belady")]
        assert got == pytest.approx(want, abs=0.0101), (slots, got)


# -- fidelity: the worker's own counters --------------------------------------------------------------------


def _serve_and_record(pack, prompts, tmp_path, policy, allocation, pct, predictor=None, new_tokens=10):
    from gpu_worker.cache import full_budget_bytes
    from gpu_worker.engine import ErrorEvent, FinalEvent, GenerationRequest
    from gpu_worker.generate import SamplingParams
    from gpu_worker.store_client import PackFetcher
    from gpu_worker.wiring import WorkerSpec, build_worker

    cpu = torch.device("cpu")
    budget = int(pct * full_budget_bytes(pack.args, "int4", "auto", cpu))
    spec = WorkerSpec(fmt="int4", budget_bytes=budget, policy=policy, allocation=allocation,
                      staging_slots=2 if predictor else 0, predictor=predictor or "none", prefetch_width=3,
                      throttle=False, trace_dir=tmp_path / f"{policy}-{allocation}-{pct}", model_name="tiny-mixtral",
                      max_batch_size=4)
    w = build_worker(pack.args, pack.dense_tensors(), PackFetcher(pack), None, spec, cpu)
    cache, engine, controller, recorder = w.cache, w.engine, w.controller, w.recorder
    done = [threading.Event() for _ in prompts]
    errors = []

    def sink(i):
        def f(ev):
            if isinstance(ev, ErrorEvent):
                errors.append(ev.error)
            if isinstance(ev, (FinalEvent, ErrorEvent)):
                done[i].set()
        return f

    with engine:
        for i, ids in enumerate(prompts):  # 6 requests, 4 at a time: prefills join running decodes
            engine.submit(GenerationRequest(tuple(ids), SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)),
                          sink(i))
        assert all(d.wait(120) for d in done)
    controller.close()
    assert not errors
    files = recorder.close()
    assert len(files) == 1
    return load_trace(files[0]), cache.stats()


@pytest.fixture(scope="module")
def pack(tiny_mixtral_pack):
    from expert_store.packfile import Pack

    with Pack.open(tiny_mixtral_pack) as p:
        yield p


@pytest.fixture(scope="module")
def prompts(pack, tiny_mixtral_dir):
    from gpu_worker.tokenizer import TextTokenizer

    tok = TextTokenizer(pack.tokenizer_path)
    lines = (tiny_mixtral_dir / "prompts.jsonl").read_text().splitlines()
    return [tok.encode(json.loads(line)["prompt"]) for line in lines[:6]]  # full prompts: prefills need most experts


@pytest.mark.slow
@pytest.mark.parametrize("policy, allocation, pct", [
    ("lru", "uniform", 0.25), ("lfu_decay", "shallow_favoring", 0.5), ("arc", "uniform", 0.1),
    ("lfu", "shallow_favoring", 0.1),
])
def test_replaying_a_recorded_trace_gives_the_worker_hit_counts_exactly(pack, prompts, tmp_path, policy,
                                                                         allocation, pct):
    trace, stats = _serve_and_record(pack, prompts, tmp_path, policy, allocation, pct)
    cfg = worker_config_of(trace)
    assert cfg is not None and cfg.policy == policy and cfg.allocation == allocation
    assert trace.step is not None and trace.request is not None and trace.position is not None
    r = simulate(trace, cfg)
    layers = trace.layer_ids
    worker = [(stats.layers[l].lookups, stats.layers[l].hits, stats.layers[l].misses, stats.layers[l].evictions)
              for l in layers]
    sim = [(int(r.lookups[c]), int(r.hits[c]), int(r.misses[c]), int(r.evictions[c])) for c in range(len(layers))]
    assert sim == worker
    assert int(r.hits.sum()) == stats.total.hits and stats.total.misses > 0


@pytest.mark.slow
def test_recorded_predictions_replay(pack, prompts, tmp_path):
    trace, stats = _serve_and_record(pack, prompts[:4], tmp_path, "lru", "shallow_favoring", 0.25,
                                     predictor="prev_token")
    assert trace.predicted is not None and trace.predicted.shape[:2] == trace.experts.shape[:2]
    assert (trace.predicted[:, 0] == -1).all()  # the first MoE layer is never predicted
    decode = trace.phase == 1
    assert (trace.predicted[decode, 1:, 0] >= 0).mean() > 0.9
    cfg = worker_config_of(trace)
    r = simulate(trace, SimConfig(cfg.policy, cfg.total_slots, staging_slots=cfg.staging_slots,
                                  allocation=cfg.allocation, slots_override=cfg.slots_override, predictor="recorded"))
    assert r.prefetched.sum() > 0 and r.prefetch_hits.sum() > 0
    assert r.hit_rate > simulate(trace, cfg).hit_rate  # prefetching the previous token's experts helps here


# -- cost model -----------------------------------------------------------------------------------------------


def test_cost_model_load_on_demand_by_hand():
    t = one_layer([[0, 1], [0, 2], [1, 2], [0, 1]], E=4)
    r = simulate(t, SimConfig("lru", 2))
    hw = HardwareProfile("hand", "", link_bandwidth_Bps=1000.0, link_latency_s=0.5, expert_setup_s=0.25,
                         layer_s=1.0, layer_token_s=0.0, expert_compute_s=0.1, step_s=2.0)
    c = estimate_cost(r, hw, expert_bytes=250)
    # per step: 2 + 1 + 2 x 0.1 = 3.2 of compute; misses 2, 1, 1, 1 in one wave each: 0.5 + n x (0.25 + 0.25)
    stall = (0.5 + 2 * 0.5) + 3 * (0.5 + 0.5)
    assert c.decode_stall_s == pytest.approx(stall)
    assert c.decode_s == pytest.approx(4 * 3.2 + stall)
    assert c.decode_tokens == 4 and c.decode_tokens_per_s == pytest.approx(4 / (4 * 3.2 + stall))


def test_prefetch_hides_transfers_behind_compute(shared_dir):
    t = load_trace(shared_dir / "traces" / "tiny-mixtral-8req-sequential.npz")
    q = parse_budget("25%", t.num_layers, t.num_experts)
    # four whole layers leave the deep ones no slots: what they hit, the prefetches brought in time
    demand = simulate(t, SimConfig("lru", q, allocation="shallow_favoring", full_layers=4))
    pre = simulate(t, SimConfig("lru", q, allocation="shallow_favoring", full_layers=4, predictor="prev_token"))
    assert pre.hit_rate > demand.hit_rate + 0.2
    hw = PROFILES["pcie3-desktop"]
    assert estimate_cost(pre, hw, 2_000_000).decode_tokens_per_s > estimate_cost(demand, hw, 2_000_000).decode_tokens_per_s


def test_unknown_names_and_budgets_are_errors():
    t = one_layer([[0, 1]], E=4)
    with pytest.raises(SimulationError, match="unknown policy"):
        simulate(t, SimConfig("mru", 2))
    with pytest.raises(SimulationError, match="below one layer's top-2"):
        simulate(t, SimConfig("lru", 1))
    with pytest.raises(SimulationError, match="unknown allocation"):
        simulate(t, SimConfig("lru", 2, allocation="deep"))
    with pytest.raises(SimulationError):
        parse_budget("150%", 8, 16)
    assert parse_budget("25%", 8, 16) == 32 and parse_budget("10%", 8, 16) == 12 and parse_budget("40", 8, 16) == 40
    r = simulate(t, SimConfig("lru", 2, predictor="cross_layer"))
    assert any("hidden states" in n for n in r.notes)


# -- learned allocations ------------------------------------------------------------------------------------------


def test_learned_allocation_file_round_trip_and_scaling(tmp_path):
    a = LearnedAllocation({0: 6, 1: 2, 2: 0, 3: 4}, 12, {"model": "toy"})
    path = a.save(tmp_path / "a.json")
    b = LearnedAllocation.load(path)
    assert b.slots(12, [0, 1, 2, 3], 8) == {0: 6, 1: 2, 2: 0, 3: 4}
    scaled = b.slots(24, [0, 1, 2, 3], 8)
    assert sum(scaled.values()) == 24 and max(scaled.values()) <= 8 and scaled[0] >= scaled[3] >= scaled[1]
    assert sum(b.slots(6, [0, 1, 2, 3], 8).values()) == 6
    with pytest.raises(AllocationFileError, match="no entry for MoE layer"):
        b.slots(12, [0, 1, 2, 3, 4], 8)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "fate-allocation/1", "slots": {"0": 1}}))
    with pytest.raises(AllocationFileError, match="total_slots"):
        LearnedAllocation.load(tmp_path / "bad.json")
    t = Trace(np.array([[[0], [1], [2], [3]]] * 3, np.int16), make_meta("toy", 4, 8, 1))
    r = simulate(t, SimConfig("lru", 12, allocation=f"learned:{path}"))
    assert r.slots == [6, 2, 0, 4]


def test_simulate_cli_prints_tables_and_writes_json(shared_dir, tmp_path, capsys):
    from gpu_worker.__main__ import main

    out = tmp_path / "sim.json"
    rc = main(["simulate", str(shared_dir / "traces" / "mixtral-8x7b-humaneval0.npz"), "--policies", "lru,belady",
               "--budgets", "25%,50%", "--predictors", "none,prev_token", "--expert-bytes", "100000000",
               "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "hit rate" in text and "belady" in text and "projected decode tokens/s" in text
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 2 * 2 * 2 * 2  # budgets x allocations x policies x predictors
    assert all(0 <= r["hit_rate"] <= 1 and r["cost"]["decode_tokens_per_s"] > 0 for r in rows)


def test_the_worker_cache_takes_a_learned_allocation(pack, tmp_path):
    from gpu_worker.cache import ExpertCache, expert_compute_nbytes
    from gpu_worker.store_client import PackFetcher

    cpu = torch.device("cpu")
    eb = expert_compute_nbytes(pack.args, "int4", "auto", cpu)
    want = {layer: (6 if layer < 2 else 2) for layer in pack.args.moe_layers}
    path = LearnedAllocation(want, sum(want.values()), {"model": "tiny-mixtral"}).save(tmp_path / "alloc.json")
    cache = ExpertCache(pack.args, PackFetcher(pack), "int4", "auto", cpu, sum(want.values()) * eb,
                        allocation=LearnedAllocation.load(path))
    assert cache.slots() == want


def test_the_worker_config_selects_a_learned_allocation_file(tmp_path):
    from gpu_worker.config import ConfigError, WorkerConfig
    from gpu_worker.policy import make_allocation as make_worker_allocation
    from gpu_worker.policy import ShallowFavoringAllocation

    path = LearnedAllocation({0: 6, 1: 2, 2: 0, 3: 4}, 12).save(tmp_path / "alloc.json")
    cfg = WorkerConfig(store="unix:/tmp/s.sock", allocation=f"learned:{path}")
    alloc = make_worker_allocation(cfg.allocation, cfg.full_layers)
    assert alloc.slots(12, [0, 1, 2, 3], 8) == {0: 6, 1: 2, 2: 0, 3: 4}
    assert isinstance(make_worker_allocation("shallow_favoring", 2), ShallowFavoringAllocation)
    with pytest.raises(ConfigError, match="learned:PATH"):
        WorkerConfig(store="unix:/tmp/s.sock", allocation="deep_favoring")
    with pytest.raises(AllocationFileError):
        make_worker_allocation(f"learned:{tmp_path / 'missing.json'}")


# -- the cost model takes the trace's expert size; the CLI survives a closed pipe ---------------------------


def test_simulate_uses_the_traces_expert_bytes_then_the_recording_cache(tmp_path):
    from gpu_worker.__main__ import main
    from gpu_worker.simulator import resolve_expert_bytes
    from gpu_worker.traces import save_trace

    seq = [[0, 1], [2, 3], [0, 2], [1, 3]] * 4
    big = one_layer(seq)
    big.meta["expert_bytes"] = {"int4": 88_080_384}  # a Mixtral-8x7B int4 expert, not this machine's 124,416
    path = save_trace(big, tmp_path / "big.npz")
    out = tmp_path / "big.json"
    assert main(["simulate", str(path), "--policies", "lru", "--allocations", "uniform", "--budgets", "4",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert rows and all(r["cost"]["expert_bytes"] == 88_080_384 for r in rows)
    empty = one_layer(seq)
    empty.meta["expert_bytes"] = {}
    empty.meta["cache"] = {"expert_bytes": 4242}
    assert resolve_expert_bytes(PROFILES["this-machine"], empty, "int4") == 4242
    empty.meta.pop("cache")
    assert resolve_expert_bytes(PROFILES["this-machine"], empty, "int4") == PROFILES["this-machine"].expert_bytes


def test_simulate_into_a_closed_pipe_still_writes_its_json(shared_dir, tmp_path):
    import os
    import subprocess
    import sys

    traces = [str(shared_dir / "traces" / f"tiny-mixtral-8req-{k}.npz") for k in ("interleaved", "sequential")]
    out = tmp_path / "x.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # each line reaches the pipe as it is printed
    p = subprocess.Popen([sys.executable, "-m", "gpu_worker", "simulate", *traces, "--policies", "lru",
                          "--allocations", "uniform", "--budgets", "25%", "--json", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    head = [p.stdout.readline() for _ in range(2)]  # `| head -2`
    p.stdout.close()
    _, err = p.communicate(timeout=120)
    assert len(head) == 2 and p.returncode == 0, err.decode()
    results = json.loads(out.read_text())["results"]
    assert {r["trace"] for r in results} == {"tiny-mixtral-8req-interleaved", "tiny-mixtral-8req-sequential"}
