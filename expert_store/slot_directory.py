"""The RAM tier's slot directory: a small shared-memory segment a co-located worker reads with no RPC.

The store writes, per served blob (layer, expert, format), where the blob sits in the RAM
tier's segment and a generation counter; a worker maps the directory and the data segment
once and copies a resident blob straight out of the data segment.

Layout (native-order int64 throughout, so every field is one aligned 8-byte word):

    header   8 words: MAGIC, VERSION, entry count, words per entry, 4 reserved
    entries  one row of ENTRY_WORDS words per blob, in the store's key order:
             generation, layer, expert, format code, offset, nbytes, reads, demand reads

The keys of the rows never change after creation (the reader builds its key -> row map once
at attach). `generation` is a per-row seqlock: odd while the store rewrites the row, even when
the row is stable; every change adds 2. A row whose blob is not resident has nbytes 0.

`reads` and `demand reads` are the readers' words, the only ones a reader writes: after a copy
that passed its generation check the reader adds 1 to `reads` (and to `demand reads` when a
cache miss asked for it, rather than a prefetch). One plain load and store each: no lock, no
RPC; two readers adding at the same instant may lose one count, which only makes the figures
slightly low. The store never writes them; it remembers the `reads` it last saw per row
(`SlotDirectory.read_since`) so its RAM tier's replacement sees the experts workers copy
(a read since the store last looked gives the slot a second chance before eviction), and it
sums them for its statistics (`SlotDirectory.read_counts`).

Writer (the store, on its event loop): `withdraw(key)` before the blob's slot is given to
anyone else (eviction), `publish(key, offset, nbytes)` after a slot's bytes are complete
(commit). Both make the row odd, write it, make it even. A slot is only ever overwritten
after the row of its previous tenant was withdrawn, so a reader's copy that overlaps a reuse
sees that row's generation change.

Reader (`DirectoryReader.copy`): read generation g1 (odd or nbytes 0: not resident), read the
offset and length, copy the bytes, read the generation again; unequal means the slot may have
been reused during the copy and the copy is thrown away (retried, then left to the lease
path). Why this is safe enough from Python: each field is one aligned 8-byte word, read and
written as one machine load/store through a memoryview cast to "q" (no torn word); on x86-64 (TSO) stores
become visible in program order and loads are not reordered with other loads, so the second
generation load cannot be satisfied before the copy's loads. On weaker memory models this
argument does not hold, which is why the worker ALSO verifies every blob's xxh3_64 against
the pack manifest after the copy: the seqlock makes a reuse cheap to notice, the checksum
makes a wrong blob impossible to use.
"""

from __future__ import annotations

from multiprocessing.shared_memory import SharedMemory
from typing import Callable, Iterable, NamedTuple

from . import shm

MAGIC = 0x3152494454414646  # b"FFATDIR1" little-endian
VERSION = 2
HEADER_WORDS = 8
ENTRY_WORDS = 8
GEN, LAYER, EXPERT, FMT, OFFSET, NBYTES, READS, DEMAND_READS = range(8)
FORMAT_CODES = {"bf16": 1, "int8": 2, "int4": 3, "int2": 4}
_CODE_FORMATS = {v: k for k, v in FORMAT_CODES.items()}


class DirKey(NamedTuple):
    layer: int
    expert: int
    fmt: str


def directory_bytes(num_keys: int) -> int:
    return 8 * (HEADER_WORDS + ENTRY_WORDS * num_keys)


def _words(buf: memoryview, num_keys: int) -> memoryview:
    """The directory as int64 words (native order: writer and reader share the machine)."""
    return buf[: directory_bytes(num_keys)].cast("q")


def _at(row: int, field: int) -> int:
    return HEADER_WORDS + row * ENTRY_WORDS + field


class SlotDirectory:
    """The store's side: creates the segment, writes rows (event loop only), unlinks it at close."""

    def __init__(self, keys: Iterable[tuple[int, int, str]]):
        keys = [DirKey(*k) for k in keys]
        self.segment: SharedMemory | None = SharedMemory(
            name=shm.new_segment_name(), create=True, size=max(directory_bytes(len(keys)), 64))
        self.name = self.segment.name
        self._rows = {k: i for i, k in enumerate(keys)}
        self._t: memoryview | None = _words(self.segment.buf, len(keys))
        self._t[:HEADER_WORDS] = memoryview(bytes(8 * HEADER_WORDS)).cast("q")
        for i, v in enumerate((MAGIC, VERSION, len(keys), ENTRY_WORDS)):
            self._t[i] = v
        for i, k in enumerate(keys):
            for f, v in ((LAYER, k.layer), (EXPERT, k.expert), (FMT, FORMAT_CODES[k.fmt])):
                self._t[_at(i, f)] = v
        self._seen = [0] * len(keys)  # per row: its `reads` word when the store last looked
        self.writes = 0

    def publish(self, key: tuple[int, int, str], offset: int, nbytes: int) -> None:
        """The blob's bytes are complete at `offset` in the data segment."""
        self._write(key, offset, nbytes)
        i = self._rows.get(DirKey(*key))
        if i is not None and self._t is not None:  # reads of an earlier tenancy do not count for this one
            self._seen[i] = self._t[_at(i, READS)]

    def read_since(self, key: tuple[int, int, str]) -> bool:
        """Whether a reader copied the blob since the last call for it (or its publish); marks it seen."""
        i = self._rows.get(DirKey(*key))
        if i is None or self._t is None:
            return False
        now = self._t[_at(i, READS)]
        if now == self._seen[i]:
            return False
        self._seen[i] = now
        return True

    def read_counts(self) -> tuple[int, int]:
        """(reads, demand reads) readers reported over every row since the directory was created."""
        t = self._t
        if t is None:
            return 0, 0
        n = len(self._seen)
        return (sum(t[_at(i, READS)] for i in range(n)), sum(t[_at(i, DEMAND_READS)] for i in range(n)))

    def withdraw(self, key: tuple[int, int, str]) -> None:
        """The blob's slot is about to get other contents (call before any byte of it changes)."""
        self._write(key, 0, 0)

    def _write(self, key: tuple[int, int, str], offset: int, nbytes: int) -> None:
        i = self._rows.get(DirKey(*key))
        if i is None or self._t is None:
            return
        t, g = self._t, _at(i, GEN)
        t[g] += 1  # odd: readers of this row stand back
        t[_at(i, OFFSET)] = offset
        t[_at(i, NBYTES)] = nbytes
        t[g] += 1  # even: stable
        self.writes += 1

    def close(self) -> None:
        """Unmap and unlink (idempotent)."""
        segment, self.segment = self.segment, None
        if segment is None:
            return
        t, self._t = self._t, None
        if t is not None:
            t.release()
        try:
            segment.close()
        finally:
            try:
                segment.unlink()
            except FileNotFoundError:
                pass


class DirectoryReader:
    """The worker's side: the directory and the data segment, mapped once; copies with no RPC."""

    def __init__(self, directory: str | SharedMemory, data: SharedMemory, max_tries: int = 2):
        """`directory`: the directory segment's name (attached here), or the segment itself (tests)."""
        self._own = isinstance(directory, str)
        self._dir = shm.attach_segment(directory) if isinstance(directory, str) else directory
        directory_name = self._dir.name
        self._t: memoryview | None = None
        self._data: memoryview | None = None
        head = self._dir.buf[: 8 * HEADER_WORDS].cast("q") if self._dir.size >= 8 * HEADER_WORDS else None
        ok = head is not None and head[0] == MAGIC and head[1] == VERSION and head[3] == ENTRY_WORDS
        n = head[2] if ok else 0
        if head is not None:
            head.release()
        if not ok or self._dir.size < directory_bytes(n):
            self.close()
            raise ValueError(f"shared memory {directory_name!r} is not a slot directory of version {VERSION}")
        self._t = t = _words(self._dir.buf, n)
        self._rows = {DirKey(t[_at(i, LAYER)], t[_at(i, EXPERT)], _CODE_FORMATS[t[_at(i, FMT)]]): i
                      for i in range(n)}
        self._data = data.buf
        self.max_tries = max_tries
        self.after_copy: Callable[[tuple[int, int, str]], None] | None = None  # tests: a hook between copy and check
        self.retries = 0  # copies thrown away because the generation moved
        self.misses = 0  # lookups of blobs that were not resident

    def copy(self, key: tuple[int, int, str], demand: bool = True) -> bytes | None:
        """The blob's bytes if resident and stable across the copy; None: take the slower path.

        A good copy is reported in the row's reader words (`demand`: a cache miss asked for it,
        not a prefetch), so the store's replacement and statistics see it."""
        return self._copy(key, None, demand)  # type: ignore[return-value]

    def copy_into(self, key: tuple[int, int, str], dst: memoryview, demand: bool = False) -> int | None:
        """As `copy`, into `dst` (at least the blob's length): the bytes copied, or None."""
        return self._copy(key, dst, demand)  # type: ignore[return-value]

    def _copy(self, key: tuple[int, int, str], dst: memoryview | None, demand: bool) -> bytes | int | None:
        i = self._rows.get(DirKey(*key))
        if i is None or self._t is None:
            return None
        t, g = self._t, _at(i, GEN)
        for _ in range(self.max_tries):
            g1 = t[g]
            off, n = t[g + OFFSET], t[g + NBYTES]
            if g1 & 1 or n <= 0:
                if not g1 & 1:
                    self.misses += 1
                    return None
                continue
            if dst is None:
                got: bytes | int = bytes(self._data[off : off + n])
            elif n > len(dst):
                return None
            else:
                dst[:n] = self._data[off : off + n]
                got = n
            if self.after_copy is not None:
                self.after_copy(key)
            if t[g] == g1:
                t[g + READS] += 1  # the readers' words only: never the generation
                if demand:
                    t[g + DEMAND_READS] += 1
                return got
            self.retries += 1
        return None

    def is_resident(self, key: tuple[int, int, str]) -> bool:
        """Does the directory show the blob resident now (a peek: `copy` may still find it gone)?"""
        i = self._rows.get(DirKey(*key))
        if i is None or self._t is None:
            return False
        g = _at(i, GEN)
        return not self._t[g] & 1 and self._t[g + NBYTES] > 0

    def close(self) -> None:
        t, self._t, self._data = self._t, None, None
        if t is not None:
            t.release()
        if self._own:
            try:
                self._dir.close()
            except BufferError:
                pass


__all__ = ["DirectoryReader", "SlotDirectory", "directory_bytes", "FORMAT_CODES"]
