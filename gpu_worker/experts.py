"""Where the model gets an expert's weights: by (layer, expert), through one interface.

`ExpertProvider` is all the model knows. The in-process `PackExpertSource` reads
blobs straight from a pack's memory map (tests, `python -m gpu_worker generate`);
the budgeted cache with the store's shared-memory and gRPC sources sits behind
the same interface.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Protocol, Sequence

import torch

from expert_store.errors import PackError

from .expert_compute import ExpertCompute, default_compute_form, make_expert_compute


class ExpertId(NamedTuple):
    layer: int  # decoder layer index
    expert: int


class ExpertProvider(Protocol):
    def iter_experts(self, layer: int, experts: Sequence[int]) -> Iterator[tuple[int, ExpertCompute]]:
        """Yield (expert id, compute-ready expert) once for every id asked for, in any order.

        An expert yielded stays valid until the next item is requested: a budgeted cache
        can evict it after that, so a layer never needs all its experts resident at once.
        """


class PackExpertSource:
    """Every expert read from the pack on first use and kept (no budget): the debugging path."""

    def __init__(self, pack, fmt: str, device: torch.device | str = "cpu", form: str | None = None):
        if fmt not in pack.formats:
            raise PackError(f"pack {pack.path} has no {fmt!r} experts (it has: {', '.join(pack.formats)})")
        self.pack = pack
        self.fmt = fmt
        self.device = torch.device(device)
        self.form = form or default_compute_form(fmt, self.device)
        self._experts: dict[ExpertId, ExpertCompute] = {}
        self.loads = 0

    def load(self, layer: int, expert: int) -> ExpertCompute:
        a = self.pack.args
        blob = self.pack.expert_blob(layer, expert, self.fmt)  # checksum-verified
        self.loads += 1
        return make_expert_compute(
            self.fmt, blob, a.hidden_size, a.expert_intermediate_size, self.form, self.device
        )

    def iter_experts(self, layer: int, experts: Sequence[int]) -> Iterator[tuple[int, ExpertCompute]]:
        for e in experts:
            key = ExpertId(layer, e)
            if key not in self._experts:
                self._experts[key] = self.load(layer, e)
            yield e, self._experts[key]
