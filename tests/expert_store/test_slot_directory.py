"""The slot directory: rows follow the RAM tier, a reader copies with no RPC, a reused slot is never used."""

from __future__ import annotations

import pytest

from expert_store import shm
from expert_store.slot_directory import GEN, DirectoryReader, _at
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
    ram.lookup(KEYS[1])  # directory reads do not refresh the store's recency: lookups do
    _promote(ram, KEYS[2])  # evicts the least recently used (0)
    assert reader.copy(KEYS[2]) == bytes([2]) * 100
    assert reader.copy(KEYS[0]) is None


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
