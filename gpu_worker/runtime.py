"""Building a model from a pack, in process: the path of `python -m gpu_worker generate`
and of the tests. The worker server builds the same model with its cache as the provider."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from expert_store.packfile import Pack

from .expert_compute import accept_pack_layout
from .experts import ExpertProvider, PackExpertSource
from .model import MoEModel, WeightsError
from .tokenizer import TextTokenizer

FORMAT_PREFERENCE = ("int4", "int8", "bf16", "int2")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_format(pack: Pack) -> str:
    return next(f for f in FORMAT_PREFERENCE + pack.formats if f in pack.formats)


def build_model(pack: Pack, experts: ExpertProvider, device: torch.device) -> MoEModel:
    """The dense part from dense.safetensors; every tensor in it must be used."""
    dense = pack.dense_tensors()
    model = MoEModel(pack.args, dense, experts, device=device)
    unused = set(dense) - model.loaded_names
    if unused:
        raise WeightsError(f"{pack.path}/dense.safetensors: tensors the runtime does not use: {sorted(unused)[:5]}")
    return model


@dataclass
class LocalRuntime:
    pack: Pack
    model: MoEModel
    source: PackExpertSource
    tokenizer: TextTokenizer | None


def load_local(
    pack_path: str | Path, fmt: str | None = None, device: str = "auto", form: str | None = None
) -> LocalRuntime:
    pack = Pack.open(pack_path)
    dev = pick_device(device)
    accept_pack_layout(pack.manifest, dev)
    source = PackExpertSource(pack, fmt or default_format(pack), dev, form)
    model = build_model(pack, source, dev)
    tok = TextTokenizer(pack.tokenizer_path) if pack.tokenizer_path else None
    return LocalRuntime(pack, model, source, tok)
