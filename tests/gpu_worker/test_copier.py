"""The CPU copy engine over a real store's shared memory (tiny-mixtral int4; the store's RAM tier holds
half the experts, so copies both land and fail): an arena slot computes whatever blob it holds; the
copier fills slots with verified bytes and refuses what it cannot copy; prefetching through it never
changes the tokens (every predictor x allocation x policy at 25% and 100%); a dead copier is given up
and decoding goes on; the worker unlinks its arena."""

from __future__ import annotations

import os
import time

import pytest
import torch

from expert_store.slot_directory import FORMAT_CODES
from gpu_worker.arena import ExpertArena
from gpu_worker.copier import CopyEngine
from gpu_worker.expert_compute import int4_in_place, make_expert_compute
from gpu_worker.store_client import StoreClient

from .test_prefetch import CPU, FMT, Stack, all_prompts, pack, prompts, reference, run_matrix, tok  # noqa: F401

TIMEOUT_S = 30


@pytest.fixture(scope="module")
def store(running_store):
    sc = StoreClient(running_store, transport="shm")
    sc.wait_ready(60)
    yield sc
    sc.close()


def _arena(pack, n):
    a = pack.args
    nbytes = pack.expert_nbytes(FMT)
    return ExpertArena(n, nbytes, nbytes, lambda t: int4_in_place(t, a.hidden_size, a.expert_intermediate_size))


def _reference(pack, layer, expert):
    a = pack.args
    return make_expert_compute(FMT, pack.expert_blob(layer, expert, FMT), a.hidden_size,
                               a.expert_intermediate_size, "int4_fused", CPU)


def _wait(pred, timeout_s=TIMEOUT_S):
    end = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


def test_an_arena_slot_computes_the_blob_it_holds(pack):
    arena = _arena(pack, 2)
    try:
        x = torch.randn(3, pack.args.hidden_size)
        first, slot = arena.alloc(), arena.alloc()  # the second slot starts past the tensor's storage start
        arena.fill(first, pack.expert_blob(1, 2, FMT))
        c = arena.fill(slot, pack.expert_blob(0, 1, FMT))
        assert torch.equal(c(x), _reference(pack, 0, 1)(x))
        again = arena.fill(slot, pack.expert_blob(2, 5, FMT))  # the same object now computes the new expert
        assert again is c and torch.equal(c(x), _reference(pack, 2, 5)(x))
        assert torch.equal(arena.compute(first)(x), _reference(pack, 1, 2)(x))
        assert arena.slot_of(c) == slot and arena.free_slots == 0
        arena.release(c)
        assert arena.free_slots == 1
    finally:
        arena.close()
    assert not (os.path.exists(f"/dev/shm/{arena.name}"))


def test_the_copier_fills_slots_with_verified_bytes_and_refuses_what_it_cannot(pack, store):
    keys = [(layer, e, FMT) for layer in pack.args.moe_layers for e in range(pack.args.num_experts)]
    warm = [k for k, ok in zip(keys, store.in_memory(keys)) if ok]
    cold = [k for k, ok in zip(keys, store.in_memory(keys)) if not ok]
    assert warm and cold  # the store's RAM tier holds half
    directory, data = store.copy_source()
    arena = _arena(pack, 4)
    engine = CopyEngine(directory, data, arena.name, arena.stride)
    try:
        code = FORMAT_CODES[FMT]
        good, bad_digest, not_there = warm[0], warm[1], cold[0]
        reqs = [(good, store.blob_digest_of(good)), (bad_digest, store.blob_digest_of(bad_digest) ^ 1),
                (not_there, store.blob_digest_of(not_there))]
        tickets = []
        for slot, (key, digest) in enumerate(reqs):
            t = engine.next_ticket()
            arena.status[slot] = 0
            tickets.append(t)
            engine.submit([(t, key[0], key[1], code, slot, digest)])
        _wait(lambda: all(arena.status[s] in (t, -t) for s, t in enumerate(tickets)))
        assert [arena.status[s] for s in range(3)] == [tickets[0], -tickets[1], -tickets[2]]
        assert bytes(arena.slot(0)[:arena.blob_bytes]) == bytes(pack.expert_blob(*good))
    finally:
        engine.close()
        arena.close()
    assert engine.proc.returncode == 0  # the closed socket ends it


@pytest.mark.parametrize("share", [0.25, 1.0])
def test_tokens_identical_over_shm_through_the_copier(pack, tok, prompts, reference, store, share):  # noqa: F811
    """Every predictor x allocation x policy, over the store's shared memory with the copy engine on."""
    landed = 0
    for s, combo in run_matrix(pack, tok, prompts, reference, share, fetcher=store):
        engine = s.copy_engine
        assert (engine is not None) == (combo[0] != "none"), combo
        landed += s.cache.copies_landed
        if engine is not None:
            assert engine.proc.poll() is not None  # closed with the controller
            assert not os.path.exists(f"/dev/shm/{s.cache.arena.name}")
    assert landed > 0


def test_a_dead_copier_is_given_up_and_decoding_goes_on(pack, tok, prompts, reference, store):  # noqa: F811
    s = Stack(pack, tok, "cross_layer", "uniform", "lru", 0.25, fetcher=store)
    engine = s.cache.copy_engine
    engine.proc.kill()
    engine.proc.wait()
    got = [ids for ids, _ in s.run(prompts)]
    assert got == reference
    assert s.cache.copy_engine is None  # found dead at the first request it could not send, or while waiting


class _InstantCopier:
    """A copy engine that copies every request at once, from the pack (no process)."""

    def __init__(self, pack, arena):
        self.pack, self.arena, self._t = pack, arena, 0

    def next_ticket(self):
        self._t += 1
        return self._t

    def submit(self, records):
        fmts = {code: name for name, code in FORMAT_CODES.items()}
        for ticket, layer, expert, code, slot, _ in records:
            blob = self.pack.expert_blob(layer, expert, fmts[code])
            self.arena.slot(slot)[:len(blob)] = blob
            self.arena.status[slot] = ticket

    def alive(self):
        return True

    def close(self):
        pass


def test_copies_landed_for_a_later_layer_give_their_room_to_the_layer_that_needs_it(pack):
    """Copies for layer 1 take every free unit; layer 0 then needs room before the compute reaches layer 1:
    the landed copies become resident (and evictable) instead of holding their units until layer 1 runs."""
    import threading

    from gpu_worker.cache import ExpertCache
    from gpu_worker.store_client import PackFetcher

    a = pack.args
    eb = pack.expert_nbytes(FMT)
    cache = ExpertCache(a, PackFetcher(pack), FMT, "auto", CPU, 4 * eb, policy="lru", allocation="uniform")
    arena = _arena(pack, cache.total_slots)
    cache.attach_arena(arena)
    cache.attach_copy_engine(_InstantCopier(pack, arena), lambda key: None)
    l0, l1 = a.moe_layers[0], a.moe_layers[1]
    cache.begin_step()
    assert cache.issue_copies(l1, [0, 1, 2, 3], cache.step_seq, {0, 1, 2, 3}) == [0, 1, 2, 3]
    got: list = []
    t = threading.Thread(target=lambda: got.extend(e for e, _ in cache.iter_experts(l0, [5, 6])), daemon=True)
    t.start()
    t.join(TIMEOUT_S)
    assert got == [5, 6], "layer 0 waited for room that only layer 1's copies held"
    assert cache.copies_landed == 4 and cache.stats().high_water_bytes <= 4 * eb
    arena.close()


def test_budget_holds_under_16_concurrent_requests_through_the_copier(pack, tok, all_prompts, store):  # noqa: F811
    """16 requests decoding at once over shm, prefetching through the copy engine: the high-water mark stays
    within the budget, nothing is left reserved, and the tokens are the reference's."""
    from gpu_worker.experts import PackExpertSource
    from gpu_worker.generate import SamplingParams, generate
    from gpu_worker.runtime import build_model

    prompts = [ids[:n] for n in (20, 28) for ids in all_prompts][:16]
    assert len(prompts) == 16
    model = build_model(pack, PackExpertSource(pack, FMT, CPU), CPU)
    want = [list(generate(model, ids, SamplingParams(max_new_tokens=8, ignore_eos=True))) for ids in prompts]
    s = Stack(pack, tok, "cross_layer", "shallow_favoring", "arc", 0.25, fetcher=store, batch=16)
    assert s.cache.copy_engine is not None
    got = s.run(prompts, n=8, stagger_s=0.005)
    assert [ids for ids, _ in got] == want
    st = s.cache.stats()
    assert 0 < st.high_water_bytes <= st.budget_bytes
    assert st.used_bytes <= st.budget_bytes and st.reserved_bytes == 0
    assert s.cache.copies_landed > 0
