"""RAM tier rules (slots, LRU eviction, leases, generations), fill order, NVMe tier reads and checksums."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from expert_store import shm
from expert_store.errors import ChecksumError
from expert_store.packfile import Pack
from expert_store.fill_order import PopularityError, fill_order, load_popularity, preferred_format, shallow_first
from expert_store.tiers import BlobKey, NvmeTier, RamTier, SlotState, slot_bytes_for

SLOT = 4096


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _key(i: int) -> BlobKey:
    return BlobKey(0, i, "int4")


def _load(key: BlobKey, dest: memoryview) -> int:
    """A blob of 100 bytes, every byte = expert id."""
    dest[:100] = bytes([key.expert]) * 100
    return 100


@pytest.fixture
def tier():
    clock = FakeClock()
    ram = RamTier.create(3 * SLOT, SLOT, max_slots=100, clock=clock)
    ram.clock = clock  # type: ignore[attr-defined]  # for the tests
    try:
        yield ram
    finally:
        ram.close()


def _promote(ram: RamTier, key: BlobKey):
    slot = ram.reserve(key)
    if slot is not None:
        slot.nbytes = _load(key, ram.fill_view(slot))
        ram.commit(slot)
    return slot


def test_slot_size_is_the_largest_blob_rounded_to_4k():
    assert slot_bytes_for([100, 5000, 4096]) == 8192
    assert slot_bytes_for([4096]) == 4096


def test_segment_is_created_sized_and_unlinked_on_close():
    ram = RamTier.create(10 * SLOT + 17, SLOT, max_slots=4)  # capped at 4 slots: no more than can be used
    name = ram.segment_name
    assert name.startswith(f"fate-moe-{os.getpid()}-")
    assert ram.num_slots == 4 and ram.capacity_bytes == 4 * SLOT
    assert (shm.SHM_DIR / name).exists()
    ram.close()
    ram.close()  # idempotent
    assert not (shm.SHM_DIR / name).exists()


def test_ram_bytes_below_one_slot_disables_the_tier():
    ram = RamTier.create(SLOT - 1, SLOT, max_slots=10)
    assert not ram.enabled and ram.segment is None and ram.reserve(_key(0)) is None
    ram.close()


def test_fill_keeps_the_hottest_most_recently_used(tier: RamTier):
    assert tier.fill([_key(i) for i in range(5)], _load) == 3  # 3 slots
    assert [tier.resident(_key(i)) for i in range(5)] == [True, True, True, False, False]
    assert bytes(tier.view(tier.lookup(_key(1)))) == bytes([1]) * 100
    assert tier.counters.promotions == 0  # start-up fill is not counted as promotion
    # from least recently used: 2, 1, 0 after the fill (key 0 hottest), then 2, 0, 1 after the lookup
    slot = _promote(tier, _key(7))
    assert not tier.resident(_key(2)) and tier.resident(_key(0)) and tier.resident(_key(7))
    assert tier.counters.evictions == 1 and tier.counters.promotions == 1
    assert slot.generation == 2  # second tenant of that slot


def test_generation_increments_with_every_new_tenant(tier: RamTier):
    tier.fill([_key(0)], _load)
    tier.fill([_key(1), _key(2)], _load)
    slot0 = tier.lookup(_key(0))
    gens = [slot0.generation]
    for k in (10, 11, 12, 13, 14, 15):  # cycle new keys through all slots
        _promote(tier, _key(k))
    gens.append(slot0.generation)
    assert gens[1] > gens[0] and slot0.key != _key(0)


def test_leased_slots_are_never_evicted(tier: RamTier):
    tier.fill([_key(i) for i in range(3)], _load)
    leases = [tier.lease(tier.lookup(_key(i)), "w", 30_000) for i in range(3)]
    assert tier.reserve(_key(9)) is None  # every slot held
    released, unknown = tier.release("w", [leases[1].lease_id])
    assert (released, unknown) == (1, 0)
    slot = tier.reserve(_key(9))
    assert slot is leases[1].slot and slot.state is SlotState.FILLING
    assert not tier.resident(_key(1)) and tier.lookup(_key(9)) is None  # invisible until committed
    tier.abort(slot)
    assert tier.reserve(_key(9)) is slot  # aborted: free again


def test_pins_protect_in_flight_reads(tier: RamTier):
    tier.fill([_key(i) for i in range(3)], _load)
    for i in range(3):
        tier.pin(tier.lookup(_key(i)))
    assert tier.reserve(_key(9)) is None
    tier.unpin(tier.slots[0])
    assert tier.reserve(_key(9)) is tier.slots[0]


def test_two_leases_on_one_slot_both_must_end(tier: RamTier):
    tier.fill([_key(0)], _load)
    tier.fill([_key(1), _key(2)], _load)
    for i in (1, 2):
        tier.lease(tier.lookup(_key(i)), "w", 30_000)
    a = tier.lease(tier.lookup(_key(0)), "a", 30_000)
    b = tier.lease(tier.lookup(_key(0)), "b", 30_000)
    assert a.slot is b.slot and a.slot.pins == 2
    tier.release("a", [a.lease_id])
    assert tier.reserve(_key(9)) is None
    tier.release("b", [], release_all=True)
    assert tier.reserve(_key(9)) is a.slot


def test_release_counts_unknown_and_other_clients_ids(tier: RamTier):
    tier.fill([_key(0)], _load)
    lease = tier.lease(tier.lookup(_key(0)), "a", 30_000)
    assert tier.release("b", [lease.lease_id]) == (0, 1)  # not b's lease
    assert tier.release("a", [lease.lease_id, 12345]) == (1, 1)
    assert tier.release("a", [lease.lease_id]) == (0, 1)  # already released
    assert tier.leases_active == 0 and tier.slots[0].pins == 0


def test_leases_expire_after_their_ttl(tier: RamTier):
    tier.fill([_key(i) for i in range(3)], _load)
    for i in range(3):
        tier.lease(tier.lookup(_key(i)), "w", 1000 * (i + 1))  # 1 s, 2 s, 3 s
    assert tier.reserve(_key(9)) is None
    tier.clock.now += 1.5
    slot = tier.reserve(_key(9))  # reserve expires leases first: key 0's slot is free to take
    assert slot is not None and tier.counters.leases_expired == 1 and tier.leases_active == 2
    tier.clock.now += 10
    assert tier.expire_leases() == 2 and tier.leases_active == 0
    assert tier.release("w", [], release_all=True) == (0, 0)


def test_lookup_refreshes_recency(tier: RamTier):
    tier.fill([_key(i) for i in range(3)], _load)  # LRU order: 2, 1, 0
    tier.lookup(_key(2))  # now 1, 0, 2
    _promote(tier, _key(8))
    assert not tier.resident(_key(1)) and tier.resident(_key(2))


# -- fill order ----------------------------------------------------------------------------------


def test_fill_order_shallow_first_preferred_format_first(tiny_mixtral_pack: Path):
    with Pack.open(tiny_mixtral_pack) as pack:
        sizes = {f: pack.expert_nbytes(f) for f in pack.formats}
        pref = preferred_format(pack.formats, sizes)
        assert pref == "int4"
        assert preferred_format(("bf16", "int8"), sizes) == "int8"  # no int4: the smallest
        order = fill_order(pack.args, pack.formats, sizes, pref)
        n = len(pack.expert_ids)
        assert order[:3] == [BlobKey(0, 0, "int4"), BlobKey(0, 1, "int4"), BlobKey(0, 2, "int4")]
        assert [k.fmt for k in order[n : n + 1] + order[2 * n : 2 * n + 1] + order[3 * n :][:1]] == [
            "int2", "int8", "bf16"]
        assert len(order) == n * len(pack.formats) and len(set(order)) == len(order)


def test_popularity_profile_orders_the_fill(tiny_mixtral_pack: Path, tmp_path: Path):
    with Pack.open(tiny_mixtral_pack) as pack:
        args = pack.args
    counts = tmp_path / "counts.json"
    counts.write_text(json.dumps({"3:5": 10, "7:1": 50, "0:2": 10}))
    assert load_popularity(counts, args) == [(7, 1), (0, 2), (3, 5)]  # by count, ties shallow first
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([[5, 5], [1, 1], [5, 5]]))
    ids = load_popularity(listed, args)
    assert ids == [(5, 5), (1, 1)]
    order = fill_order(args, ("int4",), {"int4": 1}, "int4", ids)
    assert [(k.layer, k.expert) for k in order[:3]] == [(5, 5), (1, 1), (0, 0)]  # then shallow-first
    assert len(order) == len(shallow_first(args))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[99, 0]]))
    with pytest.raises(PopularityError, match="layer 99 expert 0 is not in this model"):
        load_popularity(bad, args)
    bad.write_text("{nope")
    with pytest.raises(PopularityError, match="not JSON"):
        load_popularity(bad, args)


# -- NVMe tier -------------------------------------------------------------------------------------


def test_nvme_reads_match_the_pack_and_verify(tiny_mixtral_pack: Path):
    with Pack.open(tiny_mixtral_pack) as pack:
        nvme = NvmeTier(pack, ("int4", "bf16"))
        try:
            assert nvme.blob_count == 2 * len(pack.expert_ids)
            assert nvme.verify_all() == []
            for key in (BlobKey(0, 0, "int4"), BlobKey(7, 15, "bf16")):
                want = bytes(pack.expert_blob(*key))
                buf = bytearray(len(want) + 10)
                nvme.read_into(key, memoryview(buf))
                assert bytes(buf[: len(want)]) == want
                assert nvme.read_range(key, 100, 5000) == want[100:5100]
                assert nvme.checksum(key) == f"xxh3_64:{pack.blob_ref(*key).xxh3_64:016x}"
            nvme.drop_page_cache()  # must not break later reads
            assert nvme.read_range(BlobKey(1, 1, "int4"), 0, 16) == bytes(pack.expert_blob(1, 1, "int4"))[:16]
        finally:
            nvme.close()


def corrupt_copy(pack_dir: Path, out: Path, layer: int, expert: int, fmt: str) -> Path:
    """A copy of the pack with one byte of one blob flipped."""
    shutil.copytree(pack_dir, out)
    with Pack.open(out) as pack:
        ref = pack.blob_ref(layer, expert, fmt)
    with open(out / "experts.bin", "r+b") as f:
        f.seek(ref.offset + 10)
        b = f.read(1)
        f.seek(ref.offset + 10)
        f.write(bytes([b[0] ^ 0xFF]))
    return out


def test_nvme_refuses_a_corrupt_blob(tiny_mixtral_pack: Path, tmp_path: Path):
    bad = corrupt_copy(tiny_mixtral_pack, tmp_path / "bad", 2, 3, "int4")
    with Pack.open(bad) as pack:
        nvme = NvmeTier(pack, ("int4",))
        try:
            problems = nvme.verify_all()
            assert len(problems) == 1 and "layer 2 expert 3 int4" in problems[0]
            with pytest.raises(ChecksumError):
                nvme.read_into(BlobKey(2, 3, "int4"), memoryview(bytearray(1 << 20)))
            with pytest.raises(ChecksumError):
                nvme.verify_blob(BlobKey(2, 3, "int4"))
            nvme.verify_blob(BlobKey(2, 4, "int4"))  # its neighbours are fine
        finally:
            nvme.close()


# -- shared memory helpers ---------------------------------------------------------------------------


def test_attach_does_not_unlink_the_segment_at_exit(tmp_path: Path):
    """A worker that attaches and exits must leave the store's segment alone (resource_tracker trap)."""
    ram = RamTier.create(2 * SLOT, SLOT, max_slots=2)
    try:
        ram.fill([_key(5)], _load)
        code = (
            "import sys; from expert_store.shm import attach_segment\n"
            f"s = attach_segment({ram.segment_name!r}); sys.stdout.write(str(s.buf[0])); s.close()\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             cwd=Path(__file__).resolve().parents[2])
        assert out.returncode == 0, out.stderr
        assert out.stdout == "5" and "leaked" not in out.stderr
        assert (shm.SHM_DIR / ram.segment_name).exists()
    finally:
        ram.close()


def test_stale_segments_of_dead_stores_are_removed():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    name = f"fate-moe-{dead}-{shm._pid_namespace()}-deadbeef"
    (shm.SHM_DIR / name).write_bytes(b"x")
    foreign = shm.SHM_DIR / f"fate-moe-{dead}-1-deadbeef"  # another pid namespace: not ours to judge
    foreign.write_bytes(b"x")
    try:
        assert name in shm.remove_stale_segments()
        assert not (shm.SHM_DIR / name).exists() and foreign.exists()
    finally:
        foreign.unlink(missing_ok=True)
        (shm.SHM_DIR / name).unlink(missing_ok=True)


def test_host_id_is_stable():
    assert shm.host_id() == shm.host_id() and ":" in shm.host_id()
