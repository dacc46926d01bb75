"""Fate in the worker, in process on tiny-mixtral (int4, PackFetcher): prefetching never changes the
tokens (every predictor x allocation x policy at 25% and 100%), cross_layer predicts far better than
chance, the budget holds under concurrent requests with prefetching on, the prefetch thread's rules
(stale jobs dropped, demand first, never another layer's or a pinned expert), the INT2 prefill tail,
and the cache's documented demand path replayed without torch."""

from __future__ import annotations

import itertools
import json
import threading
import time

import pytest
import torch

from expert_store.packfile import Pack
from gpu_worker.cache import ExpertCache, expert_compute_nbytes, full_budget_bytes
from gpu_worker.config import resolve_staging
from gpu_worker.engine import ErrorEvent, FinalEvent, GenerationRequest, TokenEvent
from gpu_worker.experts import PackExpertSource
from gpu_worker.generate import SamplingParams, generate
from gpu_worker.policy import ALLOCATION_NAMES, POLICY_NAMES, CacheLedger, make_allocation, make_policy_factory
from gpu_worker.predictors import PREDICTOR_NAMES
from gpu_worker.prefetch import Prefetcher
from gpu_worker.runtime import build_model
from gpu_worker.store_client import PackFetcher
from gpu_worker.tokenizer import TextTokenizer
from gpu_worker.wiring import WorkerSpec, build_worker

FMT = "int4"
CPU = torch.device("cpu")
NEW_TOKENS = 10
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def pack(tiny_mixtral_pack):
    with Pack.open(tiny_mixtral_pack) as p:
        yield p


@pytest.fixture(scope="module")
def eb(pack) -> int:
    return expert_compute_nbytes(pack.args, FMT, "auto", CPU)


@pytest.fixture(scope="module")
def tok(pack) -> TextTokenizer:
    return TextTokenizer(pack.tokenizer_path)


@pytest.fixture(scope="module")
def all_prompts(tok, tiny_mixtral_dir) -> list[list[int]]:
    lines = (tiny_mixtral_dir / "prompts.jsonl").read_text().splitlines()
    return [tok.encode(json.loads(line)["prompt"]) for line in lines]


@pytest.fixture(scope="module")
def prompts(all_prompts) -> list[list[int]]:
    return [ids[:24] for ids in all_prompts[:3]]


@pytest.fixture(scope="module")
def reference(pack, prompts) -> list[list[int]]:
    model = build_model(pack, PackExpertSource(pack, FMT, CPU), CPU)
    return [list(generate(model, ids, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))) for ids in prompts]


class Stack:
    """Cache + model + predictor + controller + engine, as the server wires them."""

    def __init__(self, pack, tok, predictor="cross_layer", allocation="shallow_favoring", policy="arc",
                 share=0.25, staging="auto", width=0, lookahead=1, fetcher=None, int2_tail=0.0, budget=None,
                 batch=8):
        a = pack.args
        budget = budget or int(full_budget_bytes(a, FMT, "auto", CPU) * share)
        total = budget // expert_compute_nbytes(a, FMT, "auto", CPU)
        spec = WorkerSpec(fmt=FMT, budget_bytes=budget, policy=policy, allocation=allocation,
                          staging_slots=resolve_staging(staging, predictor, total, a.num_experts),
                          tail_fmt="int2" if int2_tail else None, predictor=predictor, predictor_seed=0,
                          prefetch_width=width, lookahead=lookahead, int2_tail_share=int2_tail, measure_width=False,
                          max_batch_size=batch, threads=1)
        w = build_worker(a, pack.dense_tensors(), fetcher or PackFetcher(pack), tok, spec, CPU)
        self.cache, self.model, self.controller, self.engine = w.cache, w.model, w.controller, w.engine
        self.copy_engine = w.cache.copy_engine  # as built (closing the controller stops it)

    def run(self, prompts, n=NEW_TOKENS, stagger_s=0.0) -> list[tuple[list[int], FinalEvent]]:
        out: list[tuple[list[int], FinalEvent | None]] = []
        events = []
        with self.engine:
            for ids in prompts:
                got: list = [[], None]
                ev = threading.Event()

                def sink(e, got=got, ev=ev):
                    if isinstance(e, TokenEvent):
                        got[0].append(e.id)
                    elif isinstance(e, (FinalEvent, ErrorEvent)):
                        got[1] = e
                        ev.set()

                self.engine.submit(GenerationRequest(tuple(ids), SamplingParams(max_new_tokens=n, ignore_eos=True)),
                                   sink)
                out.append(got)
                events.append(ev)
                if stagger_s:
                    time.sleep(stagger_s)
            for ev in events:
                assert ev.wait(TIMEOUT_S), "a request did not finish"
        self.controller.close()
        for _, final in out:
            if isinstance(final, ErrorEvent):
                raise final.error
        return [(ids, final) for ids, final in out]


# -- transparency ------------------------------------------------------------------------------------


MATRIX = list(itertools.product(PREDICTOR_NAMES, ALLOCATION_NAMES, POLICY_NAMES))


def run_matrix(pack, tok, prompts, reference, share, fetcher=None):
    """Every predictor x allocation x policy (lookahead 2 for half of them): yields each finished Stack with
    its (predictor, allocation, policy), having checked the budget and the lookup counts; the caller checks
    the rest. Raises at the end if any combination's tokens differ from `reference`."""
    bad = []
    for i, combo in enumerate(MATRIX):
        s = Stack(pack, tok, *combo, share, lookahead=1 + i % 2, fetcher=fetcher)
        got = [ids for ids, _ in s.run(prompts)]
        stats = s.cache.stats()
        if got != reference:
            bad.append(combo)
        assert stats.high_water_bytes <= stats.budget_bytes
        t = stats.total
        assert t.lookups == t.hits + t.prefetch_hits + t.misses
        yield s, combo
    assert not bad, f"tokens changed for {bad}"


@pytest.mark.parametrize("share", [0.25, 1.0])
def test_tokens_identical_for_every_predictor_allocation_and_policy(pack, tok, prompts, reference, share):
    """int4, INT2 tail off: a prefetch is an insert like any other, so the tokens never change. Three
    requests at once (a shared prefill step, then batched decode); lookahead 2 for half of them."""
    for s, (predictor, allocation, policy) in run_matrix(pack, tok, prompts, reference, share):
        t = s.cache.stats().total
        if predictor != "none" and share < 1:
            assert t.prefetched > 0, (predictor, allocation, policy)
        if predictor == "none":
            assert t.prefetched == 0


# -- prediction quality ------------------------------------------------------------------------------


@pytest.mark.slow
def test_cross_layer_strict_accuracy_far_above_random(pack, tok, all_prompts):
    """The 8 prompts (first 48 tokens each) at once, 16 new tokens, width top_k: cross_layer's strict
    top-k accuracy against a uniformly random predictor's (1 / C(16, 2) = 0.8% expected)."""
    acc = {}
    for name in ("cross_layer", "random", "prev_token", "eap"):
        s = Stack(pack, tok, name, "uniform", "lru", 1.0, width=pack.args.top_k)
        finals = [f for _, f in s.run([ids[:48] for ids in all_prompts], n=16)]
        preds = sum(f.experts.predictions for f in finals)
        exact = sum(f.experts.predictions_exact for f in finals)
        layers = s.controller.stats().layers
        assert preds == sum(v.predictions for v in layers.values()) > 0
        # every MoE layer after the first is predicted, for every token row
        rows = sum(len(ids[:48]) + 15 for ids in all_prompts)
        assert preds == rows * (pack.args.num_moe_layers - 1)
        acc[name] = exact / preds
    print("strict top-2 accuracy (prefill + decode rows):", {k: round(v, 4) for k, v in acc.items()})
    assert acc["random"] < 0.03
    assert acc["cross_layer"] > 0.4
    assert acc["cross_layer"] > 15 * max(acc["random"], 1 / 120)


# -- the budget under concurrency -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("budget_units,staging", [(6, 4), ("25%", "auto")])
def test_budget_never_exceeded_with_prefetch_under_concurrent_requests(pack, tok, all_prompts, eb, budget_units,
                                                                       staging):
    """8 requests arriving while others decode, a wide prefetch two layers ahead (many jobs, many
    replaced and dropped, prefetches racing demand fetches for room): the high-water mark stays within
    the budget and the tokens are the reference's."""
    prompts = [ids[:32] for ids in all_prompts]
    model = build_model(pack, PackExpertSource(pack, FMT, CPU), CPU)
    want = [list(generate(model, ids, SamplingParams(max_new_tokens=12, ignore_eos=True))) for ids in prompts]
    budget = budget_units * eb if isinstance(budget_units, int) else None
    s = Stack(pack, tok, "cross_layer", "uniform", "lfu_decay", 0.25, staging=staging, width=6, lookahead=2,
              budget=budget)
    got = s.run(prompts, n=12, stagger_s=0.01)
    assert [ids for ids, _ in got] == want
    st = s.cache.stats()
    assert 0 < st.high_water_bytes <= st.budget_bytes
    assert st.used_bytes <= st.budget_bytes and st.reserved_bytes == 0
    assert st.total.prefetched > 0
    p = s.controller.stats().prefetcher
    assert p.jobs > 0 and p.errors == 0


# -- the prefetch thread's rules -------------------------------------------------------------------


class GatedFetcher(PackFetcher):
    """Records (keys, priority); demand fetches can be held at a gate."""

    def __init__(self, pack):
        super().__init__(pack)
        self.calls: list[tuple[list, str]] = []
        self.demand_gate = threading.Event()
        self.demand_gate.set()
        self.in_demand = threading.Event()

    def fetch(self, keys, priority="demand"):
        self.calls.append((list(keys), priority))
        if priority == "demand":
            self.in_demand.set()
            assert self.demand_gate.wait(10)
        return super().fetch(keys, priority)


def _cache(pack, budget, fetcher, **kw) -> ExpertCache:
    return ExpertCache(pack.args, fetcher, FMT, "auto", CPU, budget, **kw)


def _wait(cond, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_stale_prefetches_are_dropped(pack, eb):
    fetcher = GatedFetcher(pack)
    cache = _cache(pack, 8 * 4 * eb, fetcher)
    pf = Prefetcher(cache)
    try:
        cache.begin_step()
        step = cache.step_seq
        for _ in cache.iter_experts(1, [0, 1]):  # layer 1 ran in this step
            pass
        pf.submit(step, 0, 1, [5, 6])  # a job for it now is stale
        pf.submit(step - 1, 1, 2, [5])  # and so is one of an older step
        _wait(lambda: pf.idle())
        assert pf.stats.jobs_stale == 2
        assert [p for _, p in fetcher.calls] == ["demand"]
        assert cache.resident(1) == [0, 1] and cache.resident(2) == []
        assert cache.stats().layers[1].prefetch_dropped == 2
        pf.submit(step, 2, 2, [5, 6])  # layer 2 is still ahead: fetched
        _wait(lambda: cache.resident(2) == [5, 6])
        assert fetcher.calls[-1] == ([(2, 5, FMT), (2, 6, FMT)], "prefetch")
        # a newer job for the same layer replaces a queued one (the thread held back by a demand fetch)
        with cache.cond:
            cache._demand_fetching += 1
        pf.submit(step, 3, 3, [1])
        pf.submit(step, 3, 3, [2])
        with cache.cond:
            cache._demand_fetching -= 1
            cache.prefetch_cond.notify_all()
        _wait(lambda: pf.idle())
        assert pf.stats.jobs_replaced == 1 and cache.resident(3) == [2]
    finally:
        pf.close()


def test_demand_fetches_outrank_prefetches(pack, eb):
    """While a demand fetch is in flight, the prefetch thread starts none; it goes on after."""
    fetcher = GatedFetcher(pack)
    cache = _cache(pack, 8 * 4 * eb, fetcher)
    pf = Prefetcher(cache)
    try:
        cache.begin_step()
        fetcher.demand_gate.clear()
        t = threading.Thread(target=lambda: [None for _ in cache.iter_experts(1, [0])])
        t.start()
        assert fetcher.in_demand.wait(10)
        pf.submit(cache.step_seq, 2, 2, [7])
        time.sleep(0.2)
        assert [p for _, p in fetcher.calls] == ["demand"]  # the prefetch waits
        fetcher.demand_gate.set()
        t.join(10)
        _wait(lambda: cache.resident(2) == [7])
        assert [p for _, p in fetcher.calls] == ["demand", "prefetch"]
    finally:
        pf.close()


def test_prefetch_evicts_only_its_own_layers_unpinned_unpredicted_experts(pack, eb):
    cache = _cache(pack, 8 * 2 * eb, PackFetcher(pack))  # 2 slots per layer, no free unit once full
    for layer in pack.args.moe_layers:
        for _ in cache.iter_experts(layer, [0, 1]):
            pass
    assert cache.used_bytes == cache.budget_bytes
    # layer 3: 0 and 1 resident; predicted [1, 5, 6]: 1 is kept (predicted), 0 makes room for 5, 6 finds none
    r = cache.prefetch(3, [1, 5, 6])
    assert r.inserted == [5] and r.no_room == [6]
    assert cache.resident(3) == [1, 5]
    assert all(cache.resident(layer) == [0, 1] for layer in pack.args.moe_layers if layer != 3)
    # a pinned expert is never evicted: hold 1 and 5 of layer 3 in use
    it = cache.iter_experts(3, [1, 5])
    next(it)
    assert cache.prefetch(3, [7]).inserted == []  # 1 in use, 5 fetched-and-pinned... nothing evictable
    list(it)
    assert cache.high_water_bytes <= cache.budget_bytes


# -- INT2 prefill tail --------------------------------------------------------------------------------


def test_int2_tail_experts_are_fetched_as_int2_and_never_cached(pack, eb):
    fetcher = GatedFetcher(pack)
    cache = _cache(pack, 8 * 4 * eb, fetcher, tail_fmt="int2")
    assert cache.tail_units == 2  # int2 group 32 takes more bytes than int4 in the fused form
    cache.begin_step()
    cache.set_int2_tail(1, [3, 9])
    seen = {}
    for e, compute in cache.iter_experts(1, [2, 3, 4, 9]):
        seen[e] = compute(torch.ones(1, pack.args.hidden_size))
        assert cache.used_bytes <= cache.budget_bytes
    step = cache.end_step()
    assert fetcher.calls == [([(1, 2, FMT), (1, 4, FMT)], "demand"), ([(1, 3, "int2"), (1, 9, "int2")], "demand")]
    assert cache.resident(1) == [2, 4]  # the INT2 copies are gone
    s = cache.stats()
    assert s.layers[1].misses == 4 and s.layers[1].int2_misses == 2 and step.int2_misses == 2
    assert s.reserved_bytes == 0 and s.used_bytes == 2 * eb
    # an INT2 expert computes (roughly) what the INT4 one does
    ref = dict((e, c(torch.ones(1, pack.args.hidden_size))) for e, c in cache.iter_experts(1, [3]))
    cos = torch.nn.functional.cosine_similarity(seen[3], ref[3]).item()
    assert 0.7 < cos < 1.0, cos
    # a tail expert already resident is used as it is (INT4, a hit); the tail is for one step only
    cache.begin_step()
    cache.set_int2_tail(1, [3])
    assert [e for e, _ in cache.iter_experts(1, [3])] == [3]
    assert fetcher.calls[-1] == ([(1, 3, FMT)], "demand")
    assert cache.stats().layers[1].int2_misses == 2


def test_int2_tail_changes_only_prefill_numerics(pack, tok, prompts, reference):
    """With the tail on, prompts run partly on INT2 experts: the first tokens may differ from the INT4
    reference, but decode never reads an INT2 copy (they are not cached) and the run completes."""
    s = Stack(pack, tok, "cross_layer", "shallow_favoring", "arc", 0.25, int2_tail=0.3)
    got = s.run(prompts)
    t = s.cache.stats().total
    assert t.int2_misses > 0 and t.int2_bytes > 0
    assert sum(f.experts.int2_misses for _, f in got) > 0
    assert s.cache.stats().high_water_bytes <= s.cache.budget_bytes
    assert all(len(ids) == NEW_TOKENS for ids, _ in got)


# -- the documented demand path, replayed without torch --------------------------------------------------


class _Steps:
    """RoutingObserver recording each step's (layer -> routed ids [T, K]) in order."""

    def __init__(self):
        self.steps: list[list[tuple[int, list[list[int]]]]] = []

    def on_gate_input(self, layer, gate_input):
        pass

    def on_routing(self, layer, expert_ids, weights):
        self.steps[-1].append((layer, expert_ids.tolist()))


def _replay(steps, slots: dict[int, int], total_units: int, new_policy) -> dict[int, tuple[int, int, int]]:
    """cache.py's module docstring, 1-5, for load on demand, through the torch-free ledger's replay (what the
    simulator runs): per layer (hits, misses, evictions)."""
    ledger = CacheLedger(list(slots), slots, new_policy, total_units)
    for step in steps:
        for layer, rows in step:
            c: dict[int, int] = {}
            for row in rows:
                for e in row:
                    c[e] = c.get(e, 0) + 1
            ids = sorted(c, key=lambda e: (-c[e], e))  # popularity order, ties: lower id
            ledger.replay_demand(ledger.layers[layer], ids)
        ledger.end_step()
    return {l: (L.stats.hits, L.stats.misses, L.stats.evictions) for l, L in ledger.layers.items()}


@pytest.mark.parametrize("allocation,policy,units,staging", [
    ("uniform", "lru", 32, 0), ("shallow_favoring", "arc", 32, 0), ("uniform", "lfu_decay", 20, 4),
    ("shallow_favoring", "lfu", 24, 8), ("uniform", "arc", 2, 0),
])
def test_demand_path_replays_exactly_from_the_docstring(pack, tok, all_prompts, eb, allocation, policy, units,
                                                        staging):
    """Load on demand: a torch-free replay of cache.py's documented semantics (steps 1-5) gets the cache's
    hits, misses and evictions per layer exactly, for batched steps (a shared prefill, then decode)."""
    a = pack.args
    cache = ExpertCache(a, PackFetcher(pack), FMT, "auto", CPU, units * eb, policy=make_policy_factory(policy),
                        allocation=make_allocation(allocation), staging_slots=staging)
    model = build_model(pack, cache, CPU)
    rec = _Steps()
    prompts = [ids[:20] for ids in all_prompts[:4]]
    seqs = [model.new_sequence() for _ in prompts]
    cache.begin_step()
    rec.steps.append([])
    nxt = model.forward(seqs, [torch.tensor(ids) for ids in prompts], observer=rec).argmax(-1)
    cache.end_step()
    for _ in range(8):
        cache.begin_step()
        rec.steps.append([])
        nxt = model.forward(seqs, [t.reshape(1) for t in nxt], observer=rec).argmax(-1)
        cache.end_step()
    got = {l: (s.hits, s.misses, s.evictions) for l, s in cache.stats().layers.items()}
    assert got == _replay(rec.steps, cache.slots(), units, make_policy_factory(policy))
    assert sum(m for _, m, _ in got.values()) > 0 and sum(e for _, _, e in got.values()) > 0
    assert units == 2 or sum(h for h, _, _ in got.values()) > 0  # at the minimum nothing stays for a hit
