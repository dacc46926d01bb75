"""The expert arena: the CPU expert cache's memory as one shared-memory segment of fixed-size slots.

Every resident expert of the run format lives in one slot, and each slot's compute form is built once
(`int4_in_place`: strided views of the slot's bytes), so filling a slot is one copy of the blob and no
build. The segment is shared so that the copy engine (`gpu_worker.copier`, another process) can fill
slots the worker names while the worker computes.

Layout: a header of HEADER_WORDS int64 words (MAGIC, slot count, slot stride, 5 reserved), one int64
status word per slot, then the slots, each `stride` bytes (the blob size rounded up to 64) from a
4 KiB-aligned start. A slot's status word is written only by the copier: the ticket of the request it
finished, negated when it could not fill the slot. The worker gives a slot to the copier with a new
ticket and does not reuse it until the status answers that ticket (`ExpertArena.settled`).

Slots are handed out by `alloc` and come back with `release` (the cache's ledger calls it when it
evicts the expert whose compute form a slot holds).
"""

from __future__ import annotations

import logging
import mmap
import os
import warnings
from multiprocessing.shared_memory import SharedMemory
from typing import Callable

import torch

from expert_store import shm

log = logging.getLogger(__name__)
# fill() reads read-only blobs (an mmap, received bytes) through torch.frombuffer and never writes them
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

MAGIC = 0x314E455241544146  # b"FATARENA" + version 1 in the top byte's place
HEADER_WORDS = 8
ALIGN = 64
PAGE = 4096


def _layout(n_slots: int, slot_bytes: int) -> tuple[int, int, int]:
    """(stride, data offset, total bytes)."""
    stride = -(-slot_bytes // ALIGN) * ALIGN
    head = 8 * (HEADER_WORDS + n_slots)
    data = -(-head // PAGE) * PAGE
    return stride, data, data + stride * n_slots


class ArenaView:
    """A mapped arena: its status words and its slots as memoryviews (the copier's side, and the base)."""

    def __init__(self, seg: SharedMemory | mmap.mmap, own: bool, name: str = ""):
        self.seg, self._own = seg, own
        self.name = name or getattr(seg, "name", "")
        self.buf = memoryview(seg) if isinstance(seg, mmap.mmap) else seg.buf
        self.size = len(self.buf)
        head = self.buf[: 8 * HEADER_WORDS].cast("q")
        ok = head[0] == MAGIC
        self.n_slots, self.stride = int(head[1]), int(head[2])
        head.release()
        if not ok:
            raise ValueError(f"shared memory {self.name!r} is not an expert arena")
        _, self.data_offset, total = _layout(self.n_slots, self.stride)
        if self.size < total:
            raise ValueError(f"expert arena {self.name!r} is {self.size} bytes, its header says {total}")
        self.status = self.buf[8 * HEADER_WORDS: 8 * (HEADER_WORDS + self.n_slots)].cast("q")
        self._slots = self.buf[self.data_offset: total]

    @classmethod
    def attach(cls, name: str, slot_bytes: int) -> "ArenaView":
        view = cls(shm.attach_segment(name), own=False)
        if view.stride < slot_bytes:
            view.close()
            raise ValueError(f"expert arena {name!r} has {view.stride}-byte slots, {slot_bytes} needed")
        return view

    def slot(self, i: int) -> memoryview:
        return self._slots[i * self.stride: (i + 1) * self.stride]

    def close(self) -> None:
        for mv in ("status", "_slots", "buf"):
            v = getattr(self, mv, None)
            if v is not None:
                try:
                    v.release()
                except BufferError:  # a tensor still views it: the mapping goes with the process
                    pass
                setattr(self, mv, None)
        try:
            self.seg.close()
        except BufferError:
            pass


class ExpertArena(ArenaView):
    """The worker's side: creates the segment, hands out slots, keeps each slot's compute form."""

    def __init__(self, n_slots: int, slot_bytes: int, blob_bytes: int,
                 build: Callable[[torch.Tensor], object | None]):
        """`build(uint8 tensor of blob_bytes)`: the slot's compute form (views of it), or None if it cannot."""
        stride, data, total = _layout(n_slots, slot_bytes)
        name = shm.new_segment_name()
        fd = os.open(shm.SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, total)
            mm = mmap.mmap(fd, total)
        finally:
            os.close(fd)
        head = memoryview(mm)[: 8 * HEADER_WORDS].cast("q")
        head[0], head[1], head[2] = MAGIC, n_slots, stride
        head.release()
        super().__init__(mm, own=True, name=name)
        self.blob_bytes = blob_bytes
        self._tensor = torch.frombuffer(mm, dtype=torch.uint8, count=stride * n_slots, offset=data)
        self._computes: list[object] = []
        self._slot_of: dict[int, int] = {}  # id(compute form) -> slot
        for i in range(n_slots):
            c = build(self.slot_tensor(i))
            if c is None:
                self.close()
                raise ValueError("this expert format cannot compute in place (an arena needs views)")
            self._computes.append(c)
            self._slot_of[id(c)] = i
        self._free = list(range(n_slots - 1, -1, -1))

    def slot_tensor(self, i: int) -> torch.Tensor:
        return self._tensor[i * self.stride: i * self.stride + self.blob_bytes]

    def compute(self, i: int) -> object:
        return self._computes[i]

    def slot_of(self, compute: object) -> int | None:
        return self._slot_of.get(id(compute))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, i: int) -> None:
        self._free.append(i)

    def release(self, compute: object) -> None:
        """The ledger evicted `compute`: its slot is free again (other payloads are ignored)."""
        i = self._slot_of.get(id(compute))
        if i is not None:
            self._free.append(i)

    def fill(self, i: int, blob) -> object:
        """Copy one blob into slot i (a single tensor copy, the GIL released); its compute form."""
        src = blob if isinstance(blob, torch.Tensor) else torch.frombuffer(blob, dtype=torch.uint8)
        if src.numel() != self.blob_bytes:
            raise ValueError(f"blob of {src.numel()} bytes for {self.blob_bytes}-byte arena slots")
        self.slot_tensor(i).copy_(src)
        return self._computes[i]

    def unlink(self) -> None:
        """Remove the segment's name (the memory stays mapped while this process uses it)."""
        if self._own:
            self._own = False
            try:
                os.unlink(shm.SHM_DIR / self.name)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self._computes, self._slot_of, self._tensor = [], {}, None
        self.unlink()
        super().close()
