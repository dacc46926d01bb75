"""The RAM tier's start-up fill order: a popularity profile, or shallow MoE layers first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from .errors import FateError
from .model_args import ModelArgs
from .tiers import BlobKey, ExpertId

PREFERRED_FORMAT = "int4"


class PopularityError(FateError):
    """A popularity profile that cannot be read or names experts the model does not have."""


def load_popularity(path: str | Path, args: ModelArgs) -> list[ExpertId]:
    """Experts hottest first, from a JSON profile in one of two forms:

    - counts: {"layer:expert": count, ...}, e.g. {"0:3": 120, "1:7": 95}, sorted by count, highest
      first (ties: shallower layer, then lower expert id first);
    - an ordered list: [[layer, expert], ...], hottest first (duplicates after the first are ignored).

    Layers are decoder layer indices. An entry that is not an MoE layer's expert is an error.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise PopularityError(f"{path}: cannot read the popularity profile ({e.strerror})") from None
    except ValueError as e:
        raise PopularityError(f"{path}: not JSON ({e})") from None
    ids: list[ExpertId] = []
    try:
        if isinstance(data, dict):
            counted = []
            for name, count in data.items():
                layer, expert = (int(p) for p in str(name).split(":"))
                if isinstance(count, bool) or not isinstance(count, (int, float)):
                    raise ValueError(f"count {count!r} of {name!r} is not a number")
                counted.append((-count, layer, expert))
            ids = [(l, e) for _, l, e in sorted(counted)]
        elif isinstance(data, list):
            for item in data:
                if not isinstance(item, list) or len(item) != 2 or not all(isinstance(v, int) for v in item):
                    raise ValueError(f"entry {item!r} is not [layer, expert]")
                ids.append((item[0], item[1]))
        else:
            raise ValueError("expected an object {\"layer:expert\": count} or a list [[layer, expert], ...]")
    except ValueError as e:
        raise PopularityError(f"{path}: {e}") from None
    moe = set(args.moe_layers)
    for layer, expert in ids:
        if layer not in moe or not 0 <= expert < args.num_experts:
            raise PopularityError(
                f"{path}: layer {layer} expert {expert} is not in this model (MoE layers {list(args.moe_layers)}, "
                f"experts 0..{args.num_experts - 1}): a profile of another model?"
            )
    return list(dict.fromkeys(ids))


def shallow_first(args: ModelArgs) -> list[ExpertId]:
    """Every expert, shallowest MoE layer first (a token meets those first, and they are reused most)."""
    return [(layer, e) for layer in args.moe_layers for e in range(args.num_experts)]


def preferred_format(formats: Iterable[str], blob_nbytes: dict[str, int], wanted: str | None = None) -> str:
    """`wanted` if given, else int4 when served, else the smallest served format."""
    formats = tuple(formats)
    if wanted is not None:
        if wanted not in formats:
            raise FateError(f"preferred format {wanted!r} is not served (serving: {', '.join(formats)})")
        return wanted
    if PREFERRED_FORMAT in formats:
        return PREFERRED_FORMAT
    return min(formats, key=lambda f: (blob_nbytes[f], f))


def fill_order(args: ModelArgs, formats: Iterable[str], blob_nbytes: dict[str, int], preferred: str,
               popularity: list[ExpertId] | None = None) -> list[BlobKey]:
    """Start-up fill order: the preferred format, hottest expert first (profile order, then shallow
    layers first for the experts the profile does not name); then the other formats, smallest first."""
    hot = list(dict.fromkeys((popularity or []) + shallow_first(args)))
    others = sorted((f for f in formats if f != preferred), key=lambda f: (blob_nbytes[f], f))
    return [BlobKey(l, e, f) for f in (preferred, *others) for l, e in hot]



__all__ = ["PREFERRED_FORMAT", "PopularityError", "fill_order", "load_popularity", "preferred_format", "shallow_first"]
