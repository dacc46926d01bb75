"""Allocations: a cache budget in expert slots split into resident slots per MoE layer.

`make_allocation` is the one factory: "uniform", "shallow_favoring" (Fate's: every layer at least
its top-k, then as many shallow MoE layers whole as the rest of the budget buys, the remainder
split evenly) or "learned:PATH", a per-layer split learned offline from traces
(`python -m gpu_worker analyze`) and read from a file.

File format `fate-allocation/1` (JSON):
    {"format": "fate-allocation/1",
     "model": "tiny-mixtral", "num_experts": 16,
     "moe_layers": [0, 1, ...],            # decoder indices of the MoE layers, in order
     "total_slots": 32,                    # the budget (in experts) the slots were learned for
     "slots": {"0": 6, "1": 2, ...},       # decoder layer index -> resident slots; sum <= total_slots
     "policy": "lru", "budget": "25%", "source": [...], "expected_hit_rate": 0.71}   # informative
Only `format`, `slots` and `total_slots` are required. For the budget it was learned for,
`LearnedAllocation.slots` returns the file's slots; for another budget it scales them (largest
remainder, capped at num_experts, the rest going to the layers with the most slots), so one file
serves nearby budgets.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from .replacement import PolicyError

ALLOCATION_NAMES = ("uniform", "shallow_favoring")  # and learned:PATH


class Allocation(ABC):
    """Maps a budget in expert slots to resident slots per MoE layer (their sum <= total)."""

    name: ClassVar[str]

    @abstractmethod
    def slots(self, total_slots: int, moe_layers: Sequence[int], num_experts: int,
              top_k: int = 1) -> dict[int, int]:
        """Slots for every layer of moe_layers (0..num_experts each); top_k is the experts a token
        uses per layer (an allocation may keep every layer at least that many)."""


class UniformAllocation(Allocation):
    """The same share for every MoE layer; the remainder (fewer slots than layers) goes to
    the shallowest layers, one each."""

    name = "uniform"

    def slots(self, total_slots: int, moe_layers: Sequence[int], num_experts: int,
              top_k: int = 1) -> dict[int, int]:
        n = len(moe_layers)
        if n == 0:
            return {}
        per, extra = divmod(max(0, total_slots), n)
        return {l: min(num_experts, per + (1 if i < extra else 0)) for i, l in enumerate(moe_layers)}


class ShallowFavoringAllocation(Allocation):
    """Fate's allocation. Shallow layers are the least predictable by the cross-layer gate (the
    first cannot be predicted at all), so the budget buys most there; but a layer with fewer
    resident slots than its top-k refetches experts every step, which costs more bytes than the
    shallow layers save.

    With `full_layers` None (the default) every MoE layer first gets min(top_k, budget / layers)
    slots; what is left makes as many of the shallowest layers whole as it pays for, and the
    remainder is split evenly over the deeper layers (shallowest first). The number of whole
    layers follows from the budget, the layer count and the top-k.

    An explicit `full_layers` keeps that many shallowest layers whole before anything else and
    splits the rest evenly over the deeper layers (which may leave them under top-k, or empty)."""

    name = "shallow_favoring"

    def __init__(self, full_layers: int | None = None) -> None:
        if full_layers is not None and full_layers < 0:
            raise PolicyError(f"shallow_favoring: full_layers must be >= 0, got {full_layers}")
        self.full_layers = full_layers

    def whole_layers(self, total_slots: int, n_layers: int, num_experts: int, top_k: int = 1) -> int:
        """How many of the shallowest layers are kept whole for this budget."""
        if self.full_layers is not None:
            return min(n_layers, self.full_layers)
        if n_layers == 0 or num_experts <= 0:
            return 0
        floor = min(top_k, num_experts, max(0, total_slots) // n_layers)
        if floor == num_experts:
            return min(n_layers, max(0, total_slots) // num_experts)
        extra = max(0, total_slots) - floor * n_layers
        return min(n_layers, extra // (num_experts - floor))

    def slots(self, total_slots: int, moe_layers: Sequence[int], num_experts: int,
              top_k: int = 1) -> dict[int, int]:
        left = max(0, total_slots)
        n = len(moe_layers)
        whole = self.whole_layers(left, n, num_experts, top_k)
        out: dict[int, int] = {}
        for l in moe_layers[:whole]:
            out[l] = min(num_experts, left)
            left -= out[l]
        out |= UniformAllocation().slots(left, list(moe_layers[whole:]), num_experts)
        return out


ALLOCATION_FORMAT = "fate-allocation/1"


class AllocationFileError(PolicyError):
    """An allocation file that cannot be read (the message names the file and the field)."""


class LearnedAllocation(Allocation):
    """Slots per MoE layer from a fate-allocation/1 file (module docstring)."""

    name = "learned"

    def __init__(self, slots: Mapping[int, int], total_slots: int, meta: Mapping[str, Any] | None = None,
                 path: str = "<memory>"):
        if total_slots < 0 or any(v < 0 for v in slots.values()):
            raise AllocationFileError(f"{path}: slots: must be >= 0")
        if sum(slots.values()) > total_slots:
            raise AllocationFileError(f"{path}: slots: they sum to {sum(slots.values())}, more than total_slots "
                                      f"{total_slots}")
        self.learned = {int(k): int(v) for k, v in slots.items()}
        self.total_slots = int(total_slots)
        self.meta = dict(meta or {})
        self.path = path

    @classmethod
    def load(cls, path: str | Path) -> "LearnedAllocation":
        p = str(path)
        try:
            data = json.loads(Path(p).read_text())
        except FileNotFoundError:
            raise AllocationFileError(f"{p}: no such allocation file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AllocationFileError(f"{p}: not a JSON allocation file ({' '.join(str(e).split())})") from None
        if not isinstance(data, dict) or data.get("format") != ALLOCATION_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise AllocationFileError(f"{p}: format: {got!r}, expected {ALLOCATION_FORMAT!r}")
        slots = data.get("slots")
        if not isinstance(slots, dict) or not slots:
            raise AllocationFileError(f"{p}: slots: expected {{layer: slots}}")
        try:
            parsed = {int(k): int(v) for k, v in slots.items()}
        except (TypeError, ValueError):
            raise AllocationFileError(f"{p}: slots: keys and values must be integers") from None
        total = data.get("total_slots")
        if not isinstance(total, int) or isinstance(total, bool):
            raise AllocationFileError(f"{p}: total_slots: expected an integer, got {total!r}")
        return cls(parsed, total, data, p)

    def to_json(self) -> dict[str, Any]:
        out = dict(self.meta)
        out.update({"format": ALLOCATION_FORMAT, "total_slots": self.total_slots,
                    "slots": {str(k): v for k, v in sorted(self.learned.items())}})
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)
        return path

    def slots(self, total_slots: int, moe_layers: Sequence[int], num_experts: int,
              top_k: int = 1) -> dict[int, int]:
        missing = [layer for layer in moe_layers if layer not in self.learned]
        if missing:
            raise AllocationFileError(f"{self.path}: slots: no entry for MoE layer(s) {missing} (the file has "
                                      f"{sorted(self.learned)}): learned for another model?")
        want = {layer: min(num_experts, self.learned[layer]) for layer in moe_layers}
        total = max(0, total_slots)
        if total == self.total_slots and sum(want.values()) <= total:
            return want
        return _scale(want, self.total_slots, total, num_experts)


def _scale(want: dict[int, int], learned_total: int, total: int, num_experts: int) -> dict[int, int]:
    """Scale slots learned for `learned_total` to `total` (largest remainder, capped)."""
    base = sum(want.values()) or 1
    budget = min(total, num_experts * len(want))
    exact = {k: v * budget / base for k, v in want.items()}
    out = {k: min(num_experts, math.floor(x)) for k, x in exact.items()}
    left = budget - sum(out.values())
    # largest remainder first, then the layers the file favours, then shallow first
    order = sorted(want, key=lambda k: (-(exact[k] - math.floor(exact[k])), -want[k], k))
    while left > 0:
        progressed = False
        for k in order:
            if left and out[k] < num_experts:
                out[k] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return out


def make_allocation(spec: str, full_layers: int | None = None) -> Allocation:
    """An allocation by name: "uniform", "shallow_favoring" (`full_layers` None: derived from the
    budget, the layer count and the top-k) or "learned:PATH"."""
    if spec.startswith("learned:"):
        return LearnedAllocation.load(spec[len("learned:"):])
    if spec == "uniform":
        return UniformAllocation()
    if spec == "shallow_favoring":
        return ShallowFavoringAllocation(full_layers)
    raise PolicyError(f"unknown allocation {spec!r}; known: {', '.join(ALLOCATION_NAMES)}, learned:PATH")
