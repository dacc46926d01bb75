"""How the store's RAM tier sees its readers: hits by purpose (demand, prefetch), the slot directory's
copies among them, replacement that spares the experts workers copy with no RPC, and store hints that
never evict each other's unread promotions."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from moe.v1 import store_pb2 as pb
from expert_store import shm
from expert_store.io_scheduler import PRIORITY_DEMAND, PRIORITY_HINT, PRIORITY_PREFETCH, IoScheduler
from expert_store.packfile import Pack
from expert_store.slot_directory import DirectoryReader
from expert_store.tiers import BlobKey, RamTier

from .test_server import blob, int4_slot_bytes, key, running_store


def _tiers(reply: pb.FetchExpertsShmResponse) -> list[int]:
    return [d.tier for d in sorted(reply.descriptors, key=lambda d: d.index)]


async def test_hits_by_purpose_count_directory_reads_and_spare_what_workers_read(tiny_mixtral_pack: Path,
                                                                                 tmp_path: Path):
    slot = int4_slot_bytes(tiny_mixtral_pack)
    # 4 slots, filled with layer 0's experts 0-3 (0 most recently used); every NVMe read bypasses the page cache
    async with running_store(tiny_mixtral_pack, tmp_path, ram_bytes=4 * slot, formats=("int4",),
                             nvme_uncached=True) as (store, stub, _):
        async def shm_fetch(keys, priority=pb.FETCH_PRIORITY_DEMAND):
            reply = await stub.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=keys, priority=priority,
                                                                         client_id="w"))
            await stub.ReleaseLeases(pb.ReleaseLeasesRequest(client_id="w", all=True))
            return _tiers(reply)

        assert await shm_fetch([key(0, 0), key(5, 5)]) == [pb.STORE_TIER_RAM, pb.STORE_TIER_NVME]
        assert await shm_fetch([key(0, 1), key(5, 6)], pb.FETCH_PRIORITY_PREFETCH) == [
            pb.STORE_TIER_RAM, pb.STORE_TIER_NVME]
        async for m in stub.FetchExperts(pb.FetchExpertsRequest(experts=[key(0, 0)])):
            assert [part.tier for part in m.index.parts] == [pb.STORE_TIER_RAM]
        # store-side recency now, least recent first: (5,5) (0,1) (5,6) (0,0)
        m = await stub.GetManifest(pb.GetManifestRequest())
        data = shm.attach_segment(m.shm_segment_name)
        reader = DirectoryReader(m.shm_directory_name, data)
        try:
            with Pack.open(tiny_mixtral_pack) as pack:
                assert reader.copy((5, 5, "int4")) == blob(pack, key(5, 5))  # a cache miss, no RPC
                assert reader.copy((0, 1, "int4"), demand=False) == blob(pack, key(0, 1))  # a prefetch
        finally:
            reader.close()
            data.close()
        s = await stub.GetStats(pb.GetStoreStatsRequest())
        assert (s.demand_ram_hits, s.demand_ram_misses) == (3, 1)  # (0,0) shm, (0,0) gRPC, (5,5) directory
        assert (s.prefetch_ram_hits, s.prefetch_ram_misses) == (2, 1)
        assert (s.directory_reads, s.directory_demand_reads, s.directory_refreshes) == (2, 1, 0)

        # (5,5) and (0,1) were read through the directory: the next promotion evicts (5,6) instead
        assert await shm_fetch([key(6, 0)]) == [pb.STORE_TIER_NVME]
        assert await shm_fetch([key(5, 5), key(0, 1), key(0, 0)]) == [pb.STORE_TIER_RAM] * 3
        assert await shm_fetch([key(5, 6)]) == [pb.STORE_TIER_NVME]
        assert (await stub.GetStats(pb.GetStoreStatsRequest())).directory_refreshes == 2


async def test_a_hinted_expert_counts_as_used_only_when_a_worker_reads_it(tiny_mixtral_pack: Path, tmp_path: Path):
    slot = int4_slot_bytes(tiny_mixtral_pack)
    async with running_store(tiny_mixtral_pack, tmp_path, ram_bytes=4 * slot, formats=("int4",)) as (store, stub, _):
        await stub.Prefetch(pb.PrefetchRequest(experts=[key(6, 1), key(6, 2)], client_id="w"))
        deadline = time.monotonic() + 20
        while (s := await stub.GetStats(pb.GetStoreStatsRequest())).prefetch_promotions < 2:
            assert time.monotonic() < deadline, "hinted experts never reached the RAM tier"
            await asyncio.sleep(0.02)
        assert s.hints_used == 0  # the hint's own promotion is not a read
        reply = await stub.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=[key(6, 1)], client_id="w"))
        assert _tiers(reply) == [pb.STORE_TIER_RAM]
        s = await stub.GetStats(pb.GetStoreStatsRequest())
        assert (s.hints_used, s.demand_ram_hits) == (1, 1)


async def _until(what: str, cond, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def test_a_hint_with_no_slot_waits_for_the_worker_to_read_the_earlier_ones(tiny_mixtral_pack: Path,
                                                                               tmp_path: Path):
    slot = int4_slot_bytes(tiny_mixtral_pack)
    async with running_store(tiny_mixtral_pack, tmp_path, ram_bytes=2 * slot, formats=("int4",),
                             hint_wait_ms=300) as (store, stub, _):
        async def stats():
            return await stub.GetStats(pb.GetStoreStatsRequest())

        await stub.Prefetch(pb.PrefetchRequest(experts=[key(6, 1), key(6, 2)], client_id="w"))
        await _until("the first hints were not promoted", lambda: _ge(stats(), "prefetch_promotions", 2))
        await stub.Prefetch(pb.PrefetchRequest(experts=[key(6, 3)], client_id="w"))
        await _until("the third hint did not wait", lambda: _true(store.core.promotions.waiting == 1))
        assert (await stats()).prefetch_promotions == 2  # it may not evict 6:1 or 6:2: no one read them
        m = await stub.GetManifest(pb.GetManifestRequest())
        data = shm.attach_segment(m.shm_segment_name)
        reader = DirectoryReader(m.shm_directory_name, data)
        try:
            assert reader.copy((6, 1, "int4"), demand=False) is not None  # the worker reaches layer 6's first
        finally:
            reader.close()
            data.close()
        await _until("the waiting hint was not promoted", lambda: _ge(stats(), "prefetch_promotions", 3))
        reply = await stub.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=[key(6, 2), key(6, 3)], client_id="w"))
        assert _tiers(reply) == [pb.STORE_TIER_RAM] * 2  # 6:1 (read) made room, 6:2 (unread) stayed
        await stub.ReleaseLeases(pb.ReleaseLeasesRequest(client_id="w", all=True))
        for n, e in ((4, 4), (5, 5)):  # 6:2 and 6:3 were read: these two take their slots
            await stub.Prefetch(pb.PrefetchRequest(experts=[key(6, e)], client_id="w"))
            await _until("a hint with room was not promoted", lambda: _ge(stats(), "prefetch_promotions", n))
        await stub.Prefetch(pb.PrefetchRequest(experts=[key(6, 6)], client_id="w"))  # 6:4, 6:5 are never read
        await _until("a hint past hint_wait_ms was not dropped", lambda: _ge(stats(), "hints_refused", 1))
        assert (await stats()).prefetch_promotions == 5 and store.core.promotions.waiting == 0


async def _ge(stats, field: str, n: int) -> bool:
    return getattr(await stats, field) >= n


async def _true(value: bool) -> bool:
    return value


# -- store hints in the RAM tier ---------------------------------------------------------------------------

SLOT = 4096


def _load(key: BlobKey, dest: memoryview) -> int:
    dest[:100] = bytes([key.expert]) * 100
    return 100


def _promote(ram: RamTier, key: BlobKey, hint: bool = False) -> bool:
    slot = ram.reserve(key, hint=hint)
    if slot is None:
        return False
    slot.nbytes = _load(key, ram.fill_view(slot))
    ram.commit(slot, hinted=hint)
    return True


def test_a_hint_never_evicts_an_unread_hinted_expert_and_wrong_guesses_age_out():
    k = [BlobKey(1, i, "int4") for i in range(7)]
    ram = RamTier.create(2 * SLOT, SLOT, max_slots=10)
    try:
        ram.fill(k[:2], _load)  # 0 most recently used
        ram.open_directory(k)
        reader = DirectoryReader(ram.directory.segment, ram.segment)
        assert _promote(ram, k[2], hint=True) and _promote(ram, k[3], hint=True)  # 1 then 0 make room
        assert not _promote(ram, k[4], hint=True)  # only unread hinted slots are left: no slot for this hint
        assert ram.resident(k[2]) and ram.resident(k[3])
        assert reader.copy(k[2]) is not None  # the worker used 2: its protection ends (one second chance)
        assert _promote(ram, k[4], hint=True)
        assert not ram.resident(k[2]) and ram.resident(k[3]) and ram.resident(k[4])
        assert ram.counters.hints_used == 1  # 2's read, seen by the walk
        assert _promote(ram, k[5])  # a fetch may evict unread hinted slots: 3 and 4 get one chance, 3 goes
        assert not ram.resident(k[3]) and ram.resident(k[4])
        assert _promote(ram, k[6], hint=True)  # 4 was passed over once: no longer protected
        assert not ram.resident(k[4]) and ram.resident(k[5]) and ram.resident(k[6])
        reader.close()
    finally:
        ram.close()


async def test_a_queued_job_a_more_urgent_caller_waits_for_is_boosted_and_runs_once():
    io = IoScheduler(threads=1)
    gate, order = threading.Event(), []
    try:
        blocker = asyncio.ensure_future(io.run(PRIORITY_DEMAND, gate.wait))  # holds the only thread until set
        await asyncio.sleep(0)
        hint = io.submit(PRIORITY_HINT, order.append, "hint")
        prefetch = io.submit(PRIORITY_PREFETCH, order.append, "prefetch")
        io.boost(hint, PRIORITY_DEMAND)
        io.boost(prefetch, PRIORITY_HINT)  # a less urgent waiter changes nothing
        gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, hint.future, prefetch.future), 20)
        assert order == ["hint", "prefetch"]
    finally:
        gate.set()
        await io.close()


async def test_hints_are_admitted_as_often_as_recent_ones_were_used():
    from types import SimpleNamespace

    from expert_store.promotions import ADMIT_WINDOW, PromotionQueue

    ram = SimpleNamespace(counters=SimpleNamespace(hints_used=0, hints_wasted=0), resident=lambda key: False,
                          unpin=lambda slot: None)
    counters = SimpleNamespace(prefetch_promotions=0, hints_refused=0, hints_skipped=0)
    promoted: list[BlobKey] = []

    async def acquire(key, priority):
        assert priority == PRIORITY_HINT
        promoted.append(key)
        return object(), True

    q = PromotionQueue(acquire, ram, counters, capacity=100, hint_wait_s=0.0)
    tasks = q.start(1)

    async def hint(n: int) -> int:
        before = len(promoted)
        for i in range(n):
            assert q.put(BlobKey(3, len(promoted) + counters.hints_skipped + i, "int4"), background=False)
        await _until("hints were not taken", lambda: _true(not q._queue), 5)
        await asyncio.sleep(0)
        return len(promoted) - before

    try:
        assert await hint(8) == 8 and q.admit == 1.0  # no outcome measured yet: every hint
        ram.counters.hints_used, ram.counters.hints_wasted = 1, ADMIT_WINDOW - 1  # 1 in 16 was read
        assert await hint(8) == 4 and counters.hints_skipped == 4  # admit (1 + 1/16) / 2: every other one
        ram.counters.hints_wasted += 3 * ADMIT_WINDOW  # none read, three windows seen at once
        assert await hint(20) == 5  # (0.53 + 0) / 2: one in four
        ram.counters.hints_used += ADMIT_WINDOW  # all read again: it climbs back
        await hint(1)
        assert q.admit > 0.6 and counters.prefetch_promotions == len(promoted)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
