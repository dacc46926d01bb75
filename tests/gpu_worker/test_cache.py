"""The expert cache: transparency (same tokens as the uncached source at any budget), the budget
is never exceeded, LRU by hand, batched and waved fetches, pins, prefetch, step outcomes."""

from __future__ import annotations

import json
import random
import threading

import pytest
import torch

from expert_store.packfile import Pack
from gpu_worker.cache import (
    CacheBudgetError,
    ExpertCache,
    expert_compute_nbytes,
    full_budget_bytes,
    min_budget_bytes,
)
from gpu_worker.experts import PackExpertSource
from gpu_worker.generate import SamplingParams, generate
from gpu_worker.runtime import build_model
from gpu_worker.store_client import PackFetcher, StoreUnavailableError
from gpu_worker.tokenizer import TextTokenizer

FMT = "int4"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pack(tiny_mixtral_pack):
    with Pack.open(tiny_mixtral_pack) as p:
        yield p


@pytest.fixture(scope="module")
def eb(pack) -> int:
    return expert_compute_nbytes(pack.args, FMT, "auto", CPU)


@pytest.fixture(scope="module")
def prompt_ids(pack, tiny_mixtral_dir) -> list[list[int]]:
    tok = TextTokenizer(pack.tokenizer_path)
    lines = (tiny_mixtral_dir / "prompts.jsonl").read_text().splitlines()
    return [tok.encode(json.loads(line)["prompt"])[:24] for line in lines[:3]]


@pytest.fixture(scope="module")
def reference(pack, prompt_ids) -> list[list[int]]:
    model = build_model(pack, PackExpertSource(pack, FMT, CPU), CPU)
    return [_greedy(model, ids) for ids in prompt_ids]


def _greedy(model, ids, n=16) -> list[int]:
    return list(generate(model, ids, SamplingParams(max_new_tokens=n, ignore_eos=True)))


class RecordingFetcher:
    """PackFetcher that records every fetch call's keys (and can fail on demand)."""

    def __init__(self, pack):
        self.inner = PackFetcher(pack)
        self.calls: list[tuple[list[tuple[int, int, str]], str]] = []
        self.fail: BaseException | None = None

    def fetch(self, keys, priority="demand"):
        self.calls.append((list(keys), priority))
        if self.fail is not None:
            raise self.fail
        return self.inner.fetch(keys, priority)


def _cache(pack, budget, fetcher=None, **kw) -> ExpertCache:
    return ExpertCache(pack.args, fetcher or PackFetcher(pack), FMT, "auto", CPU, budget, **kw)


# -- transparency --------------------------------------------------------------------------------


@pytest.mark.parametrize("share", [1.0, 0.25, "min"])
def test_tokens_identical_to_uncached_source(pack, prompt_ids, reference, share):
    full = full_budget_bytes(pack.args, FMT, "auto", CPU)
    budget = min_budget_bytes(pack.args, FMT, "auto", CPU) if share == "min" else int(full * share)
    cache = _cache(pack, budget)
    model = build_model(pack, cache, CPU)
    for ids, want in zip(prompt_ids, reference):
        assert _greedy(model, ids) == want
    s = cache.stats()
    assert s.high_water_bytes <= budget
    assert s.total.lookups == s.total.hits + s.total.misses > 0
    if share == 1.0:
        assert s.total.evictions == 0
        assert s.total.misses <= pack.args.num_moe_layers * pack.args.num_experts
    else:
        assert s.total.evictions > 0


class _Routings:
    """RoutingObserver keeping the last forward's routed experts per layer."""

    def __init__(self):
        self.experts: dict[int, set[int]] = {}

    def on_gate_input(self, layer, gate_input):
        pass

    def on_routing(self, layer, expert_ids, weights):
        self.experts[layer] = set(expert_ids.flatten().tolist())


@pytest.mark.parametrize("allocation", ["uniform", "shallow_favoring"])
@pytest.mark.parametrize("policy", ["lru", "lfu", "lfu_decay", "arc"])
def test_every_policy_and_allocation_is_transparent(pack, prompt_ids, reference, eb, policy, allocation):
    budget = full_budget_bytes(pack.args, FMT, "auto", CPU) // 4
    cache = _cache(pack, budget, policy=policy, allocation=allocation)
    model = build_model(pack, cache, CPU)
    assert _greedy(model, prompt_ids[0]) == reference[0]
    s = cache.stats()
    assert s.high_water_bytes <= budget and s.total.evictions > 0
    assert sum(cache.slots().values()) == budget // eb


def test_budget_never_exceeded_in_a_batched_forward(pack, prompt_ids, eb):
    """Several sequences in one forward (prefill together, then decode together) at a tight budget:
    the union of their experts per layer is more than the budget holds, so it fetches in waves."""
    budget = 3 * eb  # 1.5x the minimum: 0 slots per layer, 3 experts of scratch
    ref_model = build_model(pack, PackExpertSource(pack, FMT, CPU), CPU)
    fetcher = RecordingFetcher(pack)
    cache = _cache(pack, budget, fetcher)
    model = build_model(pack, cache, CPU)
    routings = _Routings()

    def run(m, track):
        seqs = [m.new_sequence() for _ in prompt_ids]
        logits = m.forward(seqs, [torch.tensor(ids) for ids in prompt_ids], observer=routings)
        out = [logits.argmax(-1)]
        for _ in range(4):
            if track:
                cache.begin_step()
            logits = m.forward(seqs, [t.reshape(1) for t in out[-1]], observer=routings)
            if track:
                step = cache.end_step()
                for layer in pack.args.moe_layers:  # every routed expert once: a hit or a miss
                    hits, misses = step.hits.get(layer, []), step.misses.get(layer, [])
                    assert sorted(hits + misses) == sorted(routings.experts[layer])
                assert step.bytes_fetched == step.count("misses") * pack.expert_nbytes(FMT)
                assert step.fetch_wait_ns > 0
            out.append(logits.argmax(-1))
        return torch.stack(out)

    assert torch.equal(run(model, True), run(ref_model, False))
    assert cache.high_water_bytes == budget  # it needed all of it, and never more
    assert max(len(keys) for keys, _ in fetcher.calls) == 3


def test_budget_below_minimum_is_a_startup_error(pack, eb):
    minimum = min_budget_bytes(pack.args, FMT, "auto", CPU)
    assert minimum == pack.args.top_k * eb
    with pytest.raises(CacheBudgetError) as err:
        _cache(pack, minimum - 1)
    assert str(minimum) in str(err.value) and "MiB" in str(err.value)
    _cache(pack, minimum)  # the minimum itself works


def test_compute_bytes_are_what_the_cache_counts(pack):
    """fp32 copies of an int4 expert cost ~7x its blob: the budget counts the compute form."""
    int4 = expert_compute_nbytes(pack.args, FMT, "int4_fused", CPU)
    fp32 = expert_compute_nbytes(pack.args, FMT, "fp32", CPU)
    a = pack.args
    assert fp32 == 3 * a.hidden_size * a.expert_intermediate_size * 4
    assert fp32 > 6 * int4
    cache = ExpertCache(a, PackFetcher(pack), FMT, "fp32", CPU, 2 * fp32)
    _, compute = next(iter(cache.iter_experts(a.moe_layers[0], [0])))
    assert compute.nbytes == fp32 == cache.expert_bytes


# -- LRU and the mechanics, by hand (the policies alone: test_policies.py) ----------------------------------------------------------------


def _access(cache, layer, experts):
    for _ in cache.iter_experts(layer, experts):
        pass


def test_lru_hits_misses_evictions_by_hand(pack, eb):
    layers = pack.args.moe_layers
    cache = _cache(pack, 3 * len(layers) * eb)  # 3 slots per layer, no scratch beyond the layers' share
    assert set(cache.slots().values()) == {3}
    L = layers[0]
    expected = [  # (access, resident after, (hits, misses, evictions) so far)
        ([0, 1], [0, 1], (0, 2, 0)),
        ([2], [0, 1, 2], (0, 3, 0)),
        ([0], [0, 1, 2], (1, 3, 0)),  # LRU order: 1 2 0
        ([3], [0, 2, 3], (1, 4, 1)),  # evicts 1
        ([1], [0, 1, 3], (1, 5, 2)),  # evicts 2 (order was 2 0 3)
        ([0, 2], [0, 1, 2], (2, 6, 3)),  # 0 hits (order 3 1 0), 2 misses: evicts 3
        ([4, 5, 6, 7], [5, 6, 7], (2, 10, 7)),  # more than the slots (free scratch), trimmed to 3
    ]
    for access, resident, counts in expected:
        _access(cache, L, access)
        s = cache.stats().layers[L]
        assert cache.resident(L) == resident, access
        assert (s.hits, s.misses, s.evictions) == counts, access
        assert s.lookups == s.hits + s.misses
    assert cache.resident(layers[1]) == []
    assert cache.high_water_bytes <= cache.budget_bytes


def test_misses_are_one_batched_fetch_when_they_fit(pack, eb):
    fetcher = RecordingFetcher(pack)
    cache = _cache(pack, full_budget_bytes(pack.args, FMT, "auto", CPU), fetcher)
    got = [e for e, _ in cache.iter_experts(0, [3, 1, 2, 1])]
    assert sorted(got) == [1, 2, 3]  # each id once
    assert fetcher.calls == [([(0, 3, FMT), (0, 1, FMT), (0, 2, FMT)], "demand")]
    got = [e for e, _ in cache.iter_experts(0, [5, 2, 3])]
    assert got[:2] == [2, 3] and got[2] == 5  # hits first, then the miss
    assert fetcher.calls[-1] == ([(0, 5, FMT)], "demand")


def test_waves_when_misses_do_not_fit(pack, eb):
    fetcher = RecordingFetcher(pack)
    cache = _cache(pack, 2 * eb, fetcher)  # the minimum: 2 slots in all, so most layers have none
    L = pack.args.moe_layers[-1]
    assert cache.slots()[L] == 0
    got = []
    for e, compute in cache.iter_experts(L, [0, 1, 2, 3, 4]):
        got.append(e)
        assert cache.used_bytes <= 2 * eb
        compute(torch.zeros(1, pack.args.hidden_size))  # still valid while we hold it
    assert got == [0, 1, 2, 3, 4]
    assert [len(k) for k, _ in fetcher.calls] == [2, 2, 1]
    assert cache.resident(L) == []  # trimmed back to its 0 slots
    assert cache.high_water_bytes == 2 * eb


def test_pinned_experts_are_never_evicted(pack, eb):
    cache = _cache(pack, 2 * eb)  # the minimum
    L, other = pack.args.moe_layers[-1], pack.args.moe_layers[-2]
    it = cache.iter_experts(L, [0, 1])
    e, compute = next(it)  # 0 is in use; 1 is fetched with it and waits its turn
    assert cache.prefetch(L, [5, 6]).inserted == []  # no room: both residents are pinned
    assert cache.prefetch(other, [5]).inserted == []
    assert sorted(cache.resident(L)) == [0, 1]
    assert [x for x, _ in it] == [1]
    assert cache.resident(L) == [] and cache.used_bytes == 0  # trimmed to its 0 slots


def test_a_failed_fetch_releases_its_reservation(pack, eb):
    fetcher = RecordingFetcher(pack)
    cache = _cache(pack, 8 * 2 * eb, fetcher)  # 2 slots per layer
    _access(cache, 0, [0, 1])
    fetcher.fail = StoreUnavailableError("store down")
    with pytest.raises(StoreUnavailableError):
        _access(cache, 0, [0, 2, 3])
    assert cache.used_bytes == 2 * eb and cache.stats().reserved_bytes == 0
    fetcher.fail = None
    _access(cache, 0, [2, 3])  # the cache still works, and nothing stayed pinned
    assert cache.resident(0) == [2, 3]


# -- prefetch and concurrency ---------------------- ------------------------------------


def test_prefetch_then_use_counts_a_prefetch_hit(pack, eb):
    fetcher = RecordingFetcher(pack)
    cache = _cache(pack, 8 * 4 * eb, fetcher)
    assert cache.prefetch(2, [7, 8]).inserted == [7, 8]
    assert fetcher.calls[-1] == ([(2, 7, FMT), (2, 8, FMT)], "prefetch")
    cache.begin_step()
    _access(cache, 2, [7, 9])
    step = cache.end_step()
    assert step.prefetch_hits == {2: [7]} and step.misses == {2: [9]} and step.hits == {}
    _access(cache, 2, [7])  # second use is a plain hit
    s = cache.stats().layers[2]
    assert (s.prefetch_hits, s.hits, s.misses, s.prefetched) == (1, 1, 1, 2)


def test_demand_waits_for_an_expert_a_prefetch_is_fetching(pack, eb):
    """No double fetch: the compute thread waits for the in-flight prefetch and counts a (late) prefetch hit."""
    started, gate = threading.Event(), threading.Event()

    class SlowPrefetches(RecordingFetcher):
        def fetch(self, keys, priority="demand"):
            if priority == "prefetch":
                started.set()
                gate.wait(5)
            else:  # the demand fetch of the other expert: let the prefetch land 50 ms later
                threading.Timer(0.05, gate.set).start()
            return super().fetch(keys, priority)

    fetcher = SlowPrefetches(pack)
    cache = _cache(pack, 8 * 4 * eb, fetcher)
    t = threading.Thread(target=cache.prefetch, args=(1, [3]))
    t.start()
    assert started.wait(5)
    cache.begin_step()
    assert [e for e, _ in cache.iter_experts(1, [3, 4])] == [4, 3]
    step = cache.end_step()
    t.join(5)
    assert step.prefetch_hits == {1: [3]} and step.misses == {1: [4]}
    assert step.layer_fetch_wait_ns[1] >= 10_000_000  # it stalled on the late prefetch
    assert sorted(k for keys, _ in fetcher.calls for k in keys) == [(1, 3, FMT), (1, 4, FMT)]


@pytest.mark.slow
def test_concurrent_prefetch_keeps_tokens_and_budget(pack, prompt_ids, reference, eb):
    """A thread prefetching random experts while the model runs: same tokens, budget held."""
    budget = full_budget_bytes(pack.args, FMT, "auto", CPU) // 4
    cache = _cache(pack, budget)
    model = build_model(pack, cache, CPU)
    stop = threading.Event()
    errors: list[BaseException] = []

    def prefetcher():
        rng = random.Random(0)
        try:
            while not stop.is_set():
                cache.prefetch(rng.choice(pack.args.moe_layers), rng.sample(range(pack.args.num_experts), 3))
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    t = threading.Thread(target=prefetcher, daemon=True)
    t.start()
    try:
        for ids, want in zip(prompt_ids, reference):
            assert _greedy(model, ids) == want
    finally:
        stop.set()
        t.join(10)
    assert not errors
    s = cache.stats()
    assert s.high_water_bytes <= budget
    assert s.total.prefetched > 0
    assert s.total.lookups == s.total.hits + s.total.prefetch_hits + s.total.misses
