"""The cost model's prefetch terms (prefetch thread, the compute time prefetching costs, the controller,
store hints), worked by hand; the calibration that measures them, on tiny-mixtral; the CLI showing them."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from gpu_worker.simulator import HardwareProfile, SimConfig, SimulationError, estimate_cost, load_profile, simulate
from gpu_worker.simulator.validate import predict_run, window_steps
from gpu_worker.traces import Trace, make_meta

# step_s 1, dense 1 per layer, expert compute 0.1; a demand wave 0.5 + 0.5 per expert (250 B at 1000 B/s +
# 0.25 set-up); a prefetch job 0.2 + 0.3 per expert; 0.05 of compute lost per prefetched expert, 0.02 per
# hinted layer; the controller 0.01 per layer
HAND = HardwareProfile("hand", "", link_bandwidth_Bps=1000.0, link_latency_s=0.5, expert_setup_s=0.25, layer_s=1.0,
                       layer_token_s=0.0, expert_compute_s=0.1, step_s=1.0, prefetch_expert_s=0.3,
                       prefetch_call_s=0.2, prefetch_compute_s=0.05, hint_compute_s=0.02, predict_s=0.01)


def two_layers(rows: list[tuple[int, int]], predicted: list[list[int]], E: int = 6) -> Trace:
    """Decode rows of one request, top-1: (layer 0's expert, layer 1's); `predicted`: per row, what the
    predictor proposed for layer 1 (-1 padded)."""
    N = len(rows)
    ex = np.array([[[a], [b]] for a, b in rows], np.int16)
    W = max(len(p) for p in predicted)
    pr = np.full((N, 2, W), -1, np.int16)
    for n, p in enumerate(predicted):
        pr[n, 1, :len(p)] = p
    return Trace(ex, make_meta("toy", 2, E, 1), request=np.zeros(N, np.int32), phase=np.ones(N, np.uint8),
                 step=np.arange(N, dtype=np.int32), predicted=pr)


def test_prefetch_is_charged_by_hand():
    r = simulate(two_layers([(0, 1)], [[1, 2]]), SimConfig("lru", 8, predictor="recorded"))
    assert r.step_prefetched[0].tolist() == [0, 2] and r.step_prefetch_hits[0].tolist() == [0, 1]
    c = estimate_cost(r, HAND, 250)
    # step 1; layer 0: dense + controller 1.01, the job for layer 1 (2 experts: 0.2 + 0.6, from 2.01 to 2.81)
    # costs the compute 2 x 0.05 + 0.02 (hints), then layer 0's miss: 1.0 stalled + 0.1; layer 1: 1.01, its
    # job long done, one prefetched expert computed 0.1
    assert c.decode_s == pytest.approx(1 + 1.01 + 0.12 + 1.0 + 0.1 + 1.01 + 0.1)
    assert c.decode_stall_s == pytest.approx(1.0)
    assert c.decode_contention_s == pytest.approx(0.12) and c.decode_hint_s == pytest.approx(0.02)
    assert c.decode_prefetch_work_s == pytest.approx(0.8)
    no_hints = estimate_cost(r, HAND, 250, store_hints=False)
    assert c.decode_s - no_hints.decode_s == pytest.approx(0.02)
    # a prefetch thread ten times slower: layer 1 waits for its job (ends 2.01 + 0.2 + 2 x 3 = 8.21)
    slow = estimate_cost(r, dataclasses.replace(HAND, prefetch_expert_s=3.0), 250)
    assert slow.decode_s == pytest.approx(8.21 + 0.1)
    assert slow.decode_stall_s == pytest.approx(1.0 + 8.21 - (1 + 1.01 + 0.12 + 1.1 + 1.01))


def test_a_job_not_started_when_its_layer_comes_is_fetched_on_demand():
    # step 0's job (4 experts, none used) keeps a slow prefetch thread busy past step 1's layer 1: step 1's
    # own job has not started when its layer comes, so its prefetch hit is fetched on demand
    t = two_layers([(0, 1), (0, 3)], [[2, 4, 5, 0], [3]])
    r = simulate(t, SimConfig("lru", 12, predictor="recorded"))
    assert r.step_prefetch_hits[:, 1].tolist() == [0, 1]
    slow = estimate_cost(r, dataclasses.replace(HAND, prefetch_expert_s=10.0), 250)
    fast = estimate_cost(r, HAND, 250)
    assert slow.prefetch_jobs_dropped == 1 and fast.prefetch_jobs_dropped == 0
    # the dropped hit costs a demand wave (0.5 + 0.5) instead of its compute alone; the prefetch thread's
    # speed changes nothing else (no layer waited for it)
    assert slow.decode_stall_s - fast.decode_stall_s == pytest.approx(1.0)
    assert slow.decode_s - fast.decode_s == pytest.approx(1.0)


def test_more_prefetched_bytes_cost_more_time_all_else_equal():
    rows = [(e % 3, (e * 2) % 5) for e in range(12)]
    r = simulate(two_layers(rows, [[b] for _, b in rows]), SimConfig("lru", 12, predictor="recorded"))
    more = dataclasses.replace(r, step_prefetched=r.step_prefetched + np.array([0, 3], np.int32))
    # every job lands before its layer; no store hints (more prefetched layers would also name more hints)
    quick = dataclasses.replace(HAND, prefetch_expert_s=0.01, hint_compute_s=0.0)
    base, wide = estimate_cost(r, quick, 250), estimate_cost(more, quick, 250)
    extra = 3 * len(rows)  # prefetched experts added
    assert wide.decode_s - base.decode_s == pytest.approx(extra * HAND.prefetch_compute_s)
    assert wide.decode_contention_s - base.decode_contention_s == pytest.approx(extra * HAND.prefetch_compute_s)
    assert wide.decode_prefetch_work_s > base.decode_prefetch_work_s + extra * 0.01 - 1e-9
    # the slowdown is the profile's: with prefetching free for the compute thread, the extra bytes cost nothing
    gratis = dataclasses.replace(quick, prefetch_compute_s=0.0)
    assert estimate_cost(more, gratis, 250).decode_s == pytest.approx(estimate_cost(r, gratis, 250).decode_s)


def test_old_profiles_load_with_free_prefetching(tmp_path):
    old = {k: v for k, v in dataclasses.asdict(HAND).items()
           if k not in ("prefetch_expert_s", "prefetch_call_s", "prefetch_compute_s", "hint_compute_s", "predict_s")}
    (tmp_path / "p.json").write_text(json.dumps(old))
    p = load_profile(str(tmp_path / "p.json"))
    assert p.prefetch_compute_s == 0.0 and p.hint_compute_s == 0.0 and p.prefetch_expert_s == 0.0


def test_the_window_is_the_last_requests_from_their_first_token():
    # request 0 (warm-up) alone in steps 0-1; requests 1 and 2 prefill in step 2, decode in steps 3-4
    req = [0, 0, 1, 1, 2, 1, 2, 1, 2]
    phase = [0, 1, 0, 0, 0, 1, 1, 1, 1]
    step = [0, 1, 2, 2, 2, 3, 3, 4, 4]
    t = Trace(np.zeros((9, 1, 1), np.int16), make_meta("toy", 1, 4, 1), request=np.array(req, np.int32),
              phase=np.array(phase, np.uint8), step=np.array(step, np.int32))
    assert window_steps(t, 2).tolist() == [False, False, False, True, True]
    t.meta["cache"] = {"budget_bytes": 4, "expert_bytes": 1, "total_slots": 4, "staging_slots": 0,
                       "slots": {"0": 4}, "allocation": "uniform", "policy": "lru"}
    p = predict_run(t, HAND, 2)
    assert p.window_tokens == 4 and p.window_steps == 2
    assert p.window_s == pytest.approx(2 * (1 + 1 + 0.1))  # every expert resident after step 0


# -- the calibration on tiny-mixtral ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_mixtral_pack):
    from expert_store.packfile import Pack
    from gpu_worker.cache import ExpertCache, full_budget_bytes
    from gpu_worker.runtime import build_model
    from gpu_worker.store_client import PackFetcher

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    with Pack.open(tiny_mixtral_pack) as pack:
        full = full_budget_bytes(pack.args, "int4", "auto", cpu)
        cache = ExpertCache(pack.args, PackFetcher(pack), "int4", "auto", cpu, full)
        pf_cache = ExpertCache(pack.args, PackFetcher(pack), "int4", "auto", cpu, full)
        model = build_model(pack, cache, cpu)
        for layer in pack.args.moe_layers:  # every expert resident: forwards never stall
            for _ in cache.iter_experts(layer, list(range(pack.args.num_experts))):
                pass
        yield model, cache, pf_cache


def test_the_sharing_calibration_runs_the_worker_prefetch_path(tiny, tiny_mixtral_pack):
    from expert_store.packfile import Pack
    from gpu_worker.simulator.measure import measure_sharing, room_cache_for
    from gpu_worker.store_client import PackFetcher

    model, cache, pf_cache = tiny
    with Pack.open(tiny_mixtral_pack) as pack:
        fetcher = PackFetcher(pack)
        room = room_cache_for(cache, fetcher, "int4")
        assert room.used_bytes == room.budget_bytes and room.cond is cache.cond
        m = measure_sharing(model, pack, fetcher, "int4", batch=2, steps=2, per_job=3, room_cache=room)
    # the worker's own composition fetched and built experts beside the forwards: up to 3 per MoE layer but
    # the first (a job its layer's lookup passed before it ran is dropped, as in the worker)
    assert 0 < m["prefetched_per_step"] <= 3 * (len(pack.args.moe_layers) - 1)
    assert m["prefetch_expert_shared_s"] > 0
    assert all(m[k] >= 0 for k in ("prefetch_compute_s", "room_wait_compute_s", "compute_alone_s"))
    assert m["hint_sends_per_step"] == 0  # a pack has no store to hint
    assert cache.used_bytes == cache.budget_bytes  # the forwards' cache was never touched


def test_the_prefetch_and_controller_calibrations(tiny):
    from gpu_worker.simulator.measure import measure_predictor, measure_prefetch

    model, cache, pf_cache = tiny
    call, per = measure_prefetch(pf_cache, repeats=1, sizes=(1, 3))
    assert call >= 0 and per > 0
    one, row = measure_predictor(model, cache, batch=2, steps=1)
    assert one > 0 and row >= 0


def test_the_cli_shows_the_prefetch_terms(tmp_path, capsys):
    from gpu_worker.__main__ import main

    rows = [(e % 3, (e * 2) % 5) for e in range(12)]
    t = two_layers(rows, [[b, (b + 1) % 6] for _, b in rows])
    path = t.save(tmp_path / "t.npz")
    (tmp_path / "hand.json").write_text(json.dumps(dataclasses.asdict(HAND)))
    out = tmp_path / "sim.json"
    assert main(["simulate", str(path), "--policies", "lru", "--allocations", "uniform", "--budgets", "50%",
                 "--predictors", "none,recorded", "--hardware", str(tmp_path / "hand.json"), "--expert-bytes",
                 "250", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "50000 us/expert lost by the compute thread" in text and "compute lost to prefetching" in text
    res = {r["predictor"]: r["cost"] for r in json.loads(out.read_text())["results"]}
    assert res["none"]["contention_ms_per_decode_token"] == 0
    assert res["recorded"]["contention_ms_per_decode_token"] > 0


def test_store_hint_calls_merge_while_one_is_in_flight():
    rows = [(e % 3, (e * 2) % 5) for e in range(12)]
    r = simulate(two_layers(rows, [[b, (b + 1) % 6] for _, b in rows]), SimConfig("lru", 4, predictor="recorded"))
    named = int((r.step_prefetched[:, 1] > 0).sum())  # steps whose layer 0 names a batch
    assert named > 2
    quick = estimate_cost(r, dataclasses.replace(HAND, hint_s=0.0), 250)
    assert quick.hint_sends == named
    # a call outlasting two steps: batches named meanwhile go out together, fewer calls, less compute lost
    slow = estimate_cost(r, dataclasses.replace(HAND, hint_s=12.0), 250)
    assert 0 < slow.hint_sends < named
    assert slow.decode_hint_s == pytest.approx(slow.hint_sends * HAND.hint_compute_s)


def test_the_demand_calibration_counts_steady_state_misses(tiny, tiny_mixtral_pack):
    from expert_store.packfile import Pack
    from gpu_worker.cache import ExpertCache, min_budget_bytes
    from gpu_worker.runtime import build_model
    from gpu_worker.simulator.measure import measure_demand
    from gpu_worker.store_client import PackFetcher

    model, cache, _ = tiny
    cpu = torch.device("cpu")
    with Pack.open(tiny_mixtral_pack) as pack:
        small = ExpertCache(pack.args, PackFetcher(pack), "int4", "auto", cpu,
                            min_budget_bytes(pack.args, "int4", "auto", cpu), policy="lru")
        per = measure_demand(model, build_model(pack, small, cpu), small, batch=2, steps=2)
        assert per >= 0 and small.stats().total.misses > 0 and small.stats().total.evictions > 0


def test_prefetches_without_room_wait_for_the_layers_trim():
    # one slot per layer: in step 1, when layer 0's gate input queues [3, 4] for layer 1, nothing is free and
    # layer 1 holds one expert outside the list (1): room for one of two; one lands (3), counted as waiting
    t = two_layers([(0, 1), (0, 3)], [[1, 2], [3, 4]])
    r = simulate(t, SimConfig("lru", 2, predictor="recorded"))
    assert r.step_prefetched[1, 1] == 1 and r.step_prefetch_waiting[1, 1] == 1 and r.step_prefetch_hits[1, 1] == 1
    assert r.step_prefetch_waiting[0].sum() == 0
    room = dataclasses.replace(HAND, room_wait_compute_s=0.07)
    # step 1: 1 + 1.01; the job's compute cost 0.05 + 0.02 (hint) + 0.07 (waiting for room); layer 0's hit 0.1,
    # its call ends at 2.25: the job runs 0.2 + 0.3 from there (to 2.75); layer 1 at 3.26, its hit 0.1
    c = estimate_cost(r, room, 250)
    assert c.step_times[1] == pytest.approx(3.36)
    assert c.step_times[1] - estimate_cost(r, HAND, 250).step_times[1] == pytest.approx(0.07)
    slow = estimate_cost(r, dataclasses.replace(room, prefetch_expert_s=3.0), 250)
    assert slow.step_times[1] == pytest.approx(2.25 + 0.2 + 3.0 + 0.1)  # layer 1 waits for the late job


def test_a_copy_engine_takes_room_when_proposed_or_not_at_all():
    # the same trace as above: at layer 0's gate input of step 1 there is room for one of [3, 4] (evicting 1)
    t = two_layers([(0, 1), (0, 3)], [[1, 2], [3, 4]])
    wait = simulate(t, SimConfig("lru", 2, predictor="recorded"))
    gate = simulate(t, SimConfig("lru", 2, predictor="recorded", prefetch_room="gate"))
    assert gate.step_prefetch_waiting.sum() == 0  # nothing waits: it had room then or is not prefetched
    assert gate.step_prefetched[1, 1] == 1 and gate.step_prefetch_hits[1, 1] == 1
    # step 0: at layer 0's gate input both units are free: 1 and 2 land before layer 0's own miss, which then
    # evicts one of them (no free unit left); waiting for the trim keeps layer 0's miss out of their way
    assert gate.step_prefetched[0, 1] == 2 and wait.step_prefetched[0, 1] == 1
    with pytest.raises(SimulationError, match="unknown prefetch room"):
        simulate(t, SimConfig("lru", 2, predictor="recorded", prefetch_room="never"))
