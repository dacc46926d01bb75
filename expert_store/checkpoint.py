"""Read tensors from a Hugging Face checkpoint directory, one at a time.

Real checkpoints are tens of GB, so nothing here loads a whole file: each
safetensors file is opened once (safetensors mmaps it) and `get` copies out a
single tensor. Three layouts are accepted:

- one `model.safetensors`;
- shards listed by `model.safetensors.index.json` (its `weight_map`);
- several `*.safetensors` without an index (each file's header is the map).

Every failure (missing file, truncated or corrupt file, missing tensor) is a
`PackError` naming the directory or file and the tensor, never a raw
safetensors exception.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .errors import PackError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# What safetensors raises for a damaged file (its own error, or I/O and header parsing errors).
_READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError)


class CheckpointReader:
    """Name -> tensor access over the safetensors files of one checkpoint directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise PackError(f"{self.path}: not a directory (expected a Hugging Face checkpoint directory)")
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}  # tensor name -> file holding it
        try:
            self._index()
        except BaseException:
            self.close()
            raise

    # -- building the name map ------------------------------------------------------------

    def _index(self) -> None:
        index = self.path / INDEX_FILE
        if index.is_file():
            self._index_from_json(index)
            return
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise PackError(
                f"{self.path}: no *.safetensors files (convert the checkpoint to safetensors first; "
                ".bin/.pt checkpoints are not read)"
            )
        single = self.path / SINGLE_FILE
        if single in files:
            files = [single]  # a stray extra *.safetensors next to model.safetensors is not part of it
        for file in files:
            for name in self._open(file).keys():
                if name in self._where:
                    raise PackError(
                        f"{self.path}: tensor {name!r} is in both {self._where[name].name} and {file.name}; "
                        f"add a {INDEX_FILE} or remove the duplicate file"
                    )
                self._where[name] = file

    def _index_from_json(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PackError(f"{index}: not a valid safetensors index ({e}); re-download it") from None
        for name, file_name in weight_map.items():
            file = self.path / str(file_name)
            if file not in self._handles:
                if not file.is_file():
                    raise PackError(f"{index}: lists shard {file_name!r}, which is missing from {self.path}")
                self._open(file)
            if name not in self._handles[file].keys():
                raise PackError(f"{file}: tensor {name!r} listed in {INDEX_FILE} is not in this shard")
            self._where[name] = file

    def _open(self, file: Path) -> Any:
        try:
            handle = safe_open(str(file), framework="pt")
        except _READ_ERRORS as e:
            raise PackError(f"{file}: unreadable safetensors file ({e}); it is truncated or corrupt, re-download it") from None
        self._handles[file] = handle
        return handle

    # -- access -----------------------------------------------------------------------------

    def names(self) -> set[str]:
        """Every tensor name in the checkpoint."""
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        self._require(name)
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the header, without reading the data."""
        file = self.file_of(name)
        try:
            return tuple(self._handles[file].get_slice(name).get_shape())
        except _READ_ERRORS as e:
            raise PackError(f"{file}: cannot read the header of tensor {name!r} ({e}); the file is corrupt") from None

    def dtype(self, name: str) -> str:
        """The stored dtype as the safetensors header spells it ("BF16", "F8_E4M3", "U8", ...)."""
        file = self.file_of(name)
        try:
            return str(self._handles[file].get_slice(name).get_dtype())
        except _READ_ERRORS as e:
            raise PackError(f"{file}: cannot read the header of tensor {name!r} ({e}); the file is corrupt") from None

    def get_index(self, name: str, index: int) -> torch.Tensor:
        """tensor[index] along dim 0, read without the rest (one expert of a fused [E, ...] tensor)."""
        file = self.file_of(name)
        try:
            return self._handles[file].get_slice(name)[index]
        except _READ_ERRORS as e:
            raise PackError(f"{file}: cannot read tensor {name!r} ({e}); the file is truncated or corrupt") from None

    def get(self, name: str) -> torch.Tensor:
        """One tensor, copied out of the mmap in its stored dtype."""
        file = self.file_of(name)
        try:
            return self._handles[file].get_tensor(name)
        except _READ_ERRORS as e:
            raise PackError(f"{file}: cannot read tensor {name!r} ({e}); the file is truncated or corrupt") from None

    def _require(self, name: str) -> None:
        if name not in self._where:
            raise PackError(f"{self.path}: tensor {name!r} is missing from the checkpoint")

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the file handles (safetensors unmaps a file when its handle is collected)."""
        self._handles.clear()
        self._where.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
