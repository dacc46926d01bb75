"""The slot directory: rows follow the RAM tier, a reader copies with no RPC, a reused slot is never used."""

from __future__ import annotations

import pytest

from expert_store import shm
from expert_store.slot_directory import DEMAND_READS, GEN, READS, DirectoryReader, _at
from expert_store.tiers import BlobKey, RamTier

SLOT = 4096
KEYS = [BlobKey(0, i, "int4") for i in range(6)]


def _load(key: BlobKey, dest: memoryview) -> int:
    """A blob of 100 bytes, every byte = expert id."""
    dest[:100] = bytes([key.expert]) * 100
    return 100


def _promote(ram: RamTier, key: BlobKey):
    slot = ram.reserve(key)
    assert slot is not None
    slot.nbytes = _load(key, ram.fill_view(slot))
    ram.commit(slot)
    return slot


@pytest.fixture
def tier():
    ram = RamTier.create(2 * SLOT, SLOT, max_slots=10)  # two slots: the third blob evicts
    ram.fill(KEYS[:2], _load)
    ram.open_directory(KEYS)
    reader = DirectoryReader(ram.directory.segment, ram.segment)
    try:
        yield ram, reader
    finally:
        reader.close()
        ram.close()


def test_resident_blobs_are_found_and_others_are_not(tier):
    ram, reader = tier
    assert reader.copy(KEYS[0]) == bytes([0]) * 100  # filled before the directory opened: published then
    assert reader.copy(KEYS[1]) == bytes([1]) * 100
    assert reader.copy(KEYS[2]) is None and reader.misses == 1
    assert reader.copy(BlobKey(9, 9, "int4")) is None  # not a served blob
    ram.lookup(KEYS[0])  # both were read through the directory since; 0 was also looked up last
    _promote(ram, KEYS[2])  # every slot was read: the least recently used of them (1) goes
    assert reader.copy(KEYS[2]) == bytes([2]) * 100
    assert reader.copy(KEYS[1]) is None
    assert reader.copy(KEYS[0]) == bytes([0]) * 100


def test_an_expert_read_through_the_directory_survives_eviction_over_a_colder_one(tier):
    ram, reader = tier
    ram.lookup(KEYS[0])  # store-side recency: 1 least recently used, then 0
    assert reader.copy(KEYS[1]) == bytes([1]) * 100  # a worker copies 1 with no RPC: only the row's words say so
    _promote(ram, KEYS[2])
    assert ram.resident(KEYS[1]) and not ram.resident(KEYS[0])  # without the read, 1 would have gone
    assert ram.counters.directory_refreshes == 1
    assert reader.copy(KEYS[1]) == bytes([1]) * 100 and reader.copy(KEYS[0]) is None
    _promote(ram, KEYS[3])  # 1 was read again, 2 never: 2 goes
    assert ram.resident(KEYS[1]) and not ram.resident(KEYS[2])
    _promote(ram, KEYS[4])  # no read since 1's second chance: plain LRU again, 1 goes now
    assert not ram.resident(KEYS[1]) and ram.resident(KEYS[3]) and ram.resident(KEYS[4])


def test_reads_of_a_former_tenant_do_not_spare_the_new_one(tier):
    ram, reader = tier
    ram.lookup(KEYS[0])
    assert reader.copy(KEYS[1]) == bytes([1]) * 100
    ram._evict(ram.lookup(KEYS[1]))  # 1 leaves (its read unseen by the store), then comes back into a slot
    ram._free.append(ram.slots[0] if ram.slots[0].key is None else ram.slots[1])
    _promote(ram, KEYS[1])
    ram.lookup(KEYS[0])  # 1 is the least recently used again; its earlier tenancy's read must not count
    _promote(ram, KEYS[2])
    assert not ram.resident(KEYS[1]) and ram.resident(KEYS[0])


def test_reads_are_counted_by_purpose_and_the_reader_never_writes_the_generation(tier):
    ram, reader = tier
    row = ram.directory._rows[KEYS[0]]
    gen_before = ram.directory._t[_at(row, GEN)]
    assert reader.copy(KEYS[0]) is not None  # a cache miss (the default)
    assert reader.copy(KEYS[0], demand=False) is not None  # a prefetch
    assert reader.copy(KEYS[1], demand=False) is not None
    assert reader.copy(KEYS[2]) is None  # not resident: no read reported
    t = ram.directory._t
    assert (t[_at(row, READS)], t[_at(row, DEMAND_READS)]) == (2, 1)
    assert ram.directory.read_counts() == (3, 1)
    assert t[_at(row, GEN)] == gen_before  # readers write only their own words
    reader.after_copy = lambda key: _promote(ram, KEYS[3])  # the copied slot is reused before the check
    ram.lookup(KEYS[1])
    assert reader.copy(KEYS[0]) is None
    assert ram.directory.read_counts() == (3, 1)  # a copy thrown away is not a read


def test_a_slot_reused_during_the_copy_is_detected_and_never_used(tier):
    ram, reader = tier
    slot0 = ram.lookup(KEYS[0])
    ram.lookup(KEYS[1])  # 0 is now least recently used: the next promotion reuses its slot
    reused = []

    def reuse(key):  # between the copy and the generation check, the store gives the slot to another blob
        if not reused:
            reused.append(_promote(ram, KEYS[3]))

    reader.after_copy = reuse
    assert reader.copy(KEYS[0]) is None  # copied bytes were 0s, yet the copy is thrown away
    assert reused[0] is slot0 and ram.view(slot0) == bytes([3]) * 100
    assert reader.retries == 1  # the retry saw the row withdrawn: not resident, the slower path takes it
    reader.after_copy = None
    assert reader.copy(KEYS[3]) == bytes([3]) * 100


def test_a_reuse_then_a_new_home_is_retried_and_right(tier):
    ram, reader = tier
    ram.lookup(KEYS[1])
    done = []

    def reuse_then_promote_again(key):
        if not done:
            done.append(_promote(ram, KEYS[3]))  # 0's slot goes to 3
            done.append(_promote(ram, KEYS[0]))  # 0 comes back, into 1's slot

    reader.after_copy = reuse_then_promote_again
    assert reader.copy(KEYS[0]) == bytes([0]) * 100
    assert reader.retries == 1


def test_a_row_being_written_is_not_read(tier):
    ram, reader = tier
    gen = _at(ram.directory._rows[KEYS[1]], GEN)
    ram.directory._t[gen] += 1  # odd: as if the store were mid-write
    assert reader.copy(KEYS[1]) is None
    ram.directory._t[gen] += 1
    assert reader.copy(KEYS[1]) == bytes([1]) * 100


def test_the_directory_segment_goes_with_the_tier():
    import os
    ram = RamTier.create(SLOT, SLOT, max_slots=1)
    name = ram.open_directory(KEYS)
    assert name and name in shm.segments_of(os.getpid())
    ram.close()
    assert shm.segments_of(os.getpid()) == []
