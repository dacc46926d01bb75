"""Host-to-device expert builds on CUDA: pinned staging buffers and a side stream.

A fetched blob is copied (one CPU memcpy) into one of a few pinned host buffers, copied to the device
with `non_blocking=True` on the cache's side stream, and turned into its compute form there (the
device-side int4 conversion runs on the same stream). The calling thread then waits for that stream
only (`Event.synchronize`, which releases the GIL): the prefetch thread waits while the compute
stream goes on running the current layer's kernels, so the copy overlaps compute; a demand fetch on
the compute thread waits as it must. Every tensor of the result is marked as used by the compute
stream (`record_stream`), so the caching allocator does not hand its memory to the side stream again
while compute kernels queued before an eviction may still read it. A pinned buffer is reused only
after the copy out of it has completed.

Only used with device cuda; nothing here runs on a CPU-only host.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch


def _tensors(obj: Any, seen: set[int] | None = None) -> list[torch.Tensor]:
    """The tensors an expert's compute form holds (its attributes, one level of objects down)."""
    seen = set() if seen is None else seen
    out: list[torch.Tensor] = []
    for v in vars(obj).values() if hasattr(obj, "__dict__") else ():
        if isinstance(v, torch.Tensor):
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
        elif hasattr(v, "__dict__") and id(v) not in seen:
            seen.add(id(v))
            out += _tensors(v, seen)
    return out


class CudaStaging:
    """Pinned staging buffers + a side stream for one CUDA device (thread-safe)."""

    def __init__(self, device: torch.device, buffer_bytes: int, buffers: int = 4):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.compute_stream = torch.cuda.current_stream(device)
        self._buffers = [torch.empty(buffer_bytes, dtype=torch.uint8).pin_memory() for _ in range(buffers)]
        self._copied: list[torch.cuda.Event | None] = [None] * buffers  # the copy out of each buffer
        self._next = 0
        self._lock = threading.Lock()

    def build(self, blob, make: Callable[[torch.Tensor], Any]) -> Any:
        """make(the blob's bytes on the device) run on the side stream; returns once the result is complete."""
        src = blob if isinstance(blob, torch.Tensor) else torch.frombuffer(blob, dtype=torch.uint8)
        n = src.numel()
        with self._lock:
            i = self._next
            self._next = (i + 1) % len(self._buffers)
            if n > self._buffers[i].numel():  # a bigger blob than planned: a buffer of its own
                self._buffers[i] = torch.empty(n, dtype=torch.uint8).pin_memory()
                self._copied[i] = None
            if self._copied[i] is not None:
                self._copied[i].synchronize()  # the previous copy out of this buffer is done
            host = self._buffers[i][:n]
            host.copy_(src)
            with torch.cuda.stream(self.stream):
                dev = host.to(self.device, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.stream)
                self._copied[i] = copied
                compute = make(dev)
                done = torch.cuda.Event()
                done.record(self.stream)
        done.synchronize()
        for t in _tensors(compute) + [dev]:
            if t.is_cuda:
                t.record_stream(self.compute_stream)
        return compute
