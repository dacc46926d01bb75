"""Read a pack written by `expert_store.pack`: the one reader the store and the tests use.

`experts.bin` is mmapped read-only, so `expert_blob` is a zero-copy memoryview
and a cold read is a real page fault on the file (the NVMe tier). Integrity:
each blob's xxh3_64 is checked the first time it is read in this process, and a
mismatch raises `ChecksumError` instead of returning the bytes; the dense file
(crc32) is checked before it is loaded. A pack of an older format version is
refused with the command that re-packs it.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from .model_args import ModelArgs

from . import codec
from .checksums import BLOB_CHECKSUM, blob_digest
from .errors import ChecksumError, PackError
from .int4_layout import Int4Layout, Int4LayoutError
from .pack import MANIFEST_FILE, PACK_FORMAT, PACK_FORMAT_VERSION, file_crc32

ExpertId = tuple[int, int]  # (decoder layer, expert)


@dataclass(frozen=True)
class BlobRef:
    """Where one expert's blob of one format lies in experts.bin."""

    offset: int  # bytes from the start of experts.bin, a multiple of the pack's alignment
    nbytes: int  # blob length, without the alignment padding after it
    xxh3_64: int  # xxh3_64 of the blob's bytes (expert_store.checksums.blob_digest)


class Pack:
    """An open pack directory. Build with `Pack.open(path)`; close it (or use `with`)."""

    def __init__(self, path: Path, manifest: dict[str, Any], refs: dict[tuple[int, int, str], BlobRef], args: ModelArgs):
        self.path = path
        self.manifest = manifest
        self.args = args
        self.formats: tuple[str, ...] = tuple(manifest["formats"])
        self.name: str = str(manifest["model"]["name"])
        self.expert_ids: tuple[ExpertId, ...] = tuple(dict.fromkeys((l, e) for l, e, _ in refs))
        self._refs = refs
        self._verified: set[tuple[int, int, str]] = set()
        self._dense_verified = False
        self._file = open(path / manifest["experts_file"], "rb")
        try:
            # mmap refuses an empty file; a pack with no experts has nothing to map.
            size = int(manifest["experts_nbytes"])
            self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except BaseException:
            self._file.close()
            raise
        self._view = memoryview(self._mmap) if self._mmap is not None else memoryview(b"")
        self._closed = False

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> "Pack":
        path = Path(path)
        if not path.is_dir():
            raise PackError(f"{path}: not a directory (expected a pack written by `python -m expert_store pack`)")
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise PackError(
                f"{path}: no {MANIFEST_FILE}: not a pack, or an interrupted pack (re-run `python -m expert_store pack`)"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise PackError(f"{manifest_path}: unreadable ({e}); re-pack the checkpoint") from None
        if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
            raise PackError(f"{manifest_path}: not a {PACK_FORMAT} manifest")
        version = manifest.get("format_version")
        layout = manifest.get("codec_layout_version")
        if version != PACK_FORMAT_VERSION or layout != codec.LAYOUT_VERSION:
            older = isinstance(version, int) and version < PACK_FORMAT_VERSION
            raise PackError(
                f"{manifest_path}: pack format_version {version!r} (expert blob layout {layout!r}) "
                f"{'is older than' if older else 'is not'} the one this fate-moe reads ({PACK_FORMAT_VERSION}, "
                f"layout {codec.LAYOUT_VERSION}: int4/int2 in the CPU kernel's layout, xxh3_64 checksums); "
                f"re-pack with `python -m expert_store pack CHECKPOINT_DIR {path} --force`"
            )
        try:
            for name in (manifest["experts_file"], manifest["dense"]["file"]):
                if not isinstance(name, str) or Path(name).name != name:  # a manifest names files inside the pack
                    raise ValueError(f"file name {name!r} is not a plain name inside the pack")
            refs, args = _parse(manifest)
        except (KeyError, TypeError, ValueError) as e:
            raise PackError(f"{manifest_path}: malformed manifest ({type(e).__name__}: {e}); re-pack the checkpoint") from None
        _check_refs(manifest_path, manifest, refs)
        _check_int4_layout(manifest_path, manifest)
        _check_size(path / manifest["experts_file"], int(manifest["experts_nbytes"]))
        _check_size(path / manifest["dense"]["file"], int(manifest["dense"]["nbytes"]))
        return cls(path, manifest, refs, args)

    # -- experts ----------------------------------------------------------------------------

    def blob_ref(self, layer: int, expert: int, fmt: str) -> BlobRef:
        try:
            return self._refs[(layer, expert, fmt)]
        except KeyError:
            if fmt not in self.formats:
                raise PackError(f"{self.path}: format {fmt!r} is not in this pack (it has {', '.join(self.formats)})") from None
            raise PackError(
                f"{self.path}: no expert {expert} at layer {layer} (MoE layers {list(self.args.moe_layers)}, "
                f"experts 0..{self.args.num_experts - 1})"
            ) from None

    def expert_blob(self, layer: int, expert: int, fmt: str, verify: bool = True) -> memoryview:
        """Zero-copy view of one blob (it keeps the mapping alive, even past `close()`).

        With verify, the xxh3_64 is checked on the first read of each blob in this
        process (then remembered), so a corrupt expert is refused, never served.
        """
        ref = self.blob_ref(layer, expert, fmt)
        self._require_open()
        view = self._view[ref.offset : ref.offset + ref.nbytes]
        key = (layer, expert, fmt)
        if verify and key not in self._verified:
            got = blob_digest(view)
            if got != ref.xxh3_64:
                raise ChecksumError(
                    f"{self.path}: layer {layer} expert {expert} {fmt}: checksum mismatch (xxh3_64 {got:016x}, "
                    f"manifest {ref.xxh3_64:016x}); the pack is corrupt, re-pack it",
                    layer, expert, fmt,
                )
            self._verified.add(key)
        return view

    def expert_nbytes(self, fmt: str) -> int:
        """Size of one expert blob in `fmt` (the same for every expert of the pack)."""
        if fmt not in self.formats:
            raise PackError(f"{self.path}: format {fmt!r} is not in this pack (it has {', '.join(self.formats)})")
        return int(self.manifest["formats"][fmt]["expert_nbytes"])

    # -- dense weights and tokenizer ---------------------------------------------------------

    def dense_tensors(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Every non-expert tensor under its Hugging Face name, in its checkpoint dtype."""
        dense = self.path / self.manifest["dense"]["file"]
        if not self._dense_verified:
            problem = self._check_dense()
            if problem:
                raise ChecksumError(problem)
            self._dense_verified = True
        return load_file(str(dense), device=str(device))

    @property
    def int4_layout(self) -> Int4Layout | None:
        """The int4 kernel layout of this pack's int4/int2 blobs (None when it has neither)."""
        record = self.manifest.get("int4_layout")
        return Int4Layout.from_record(record) if record else None

    @property
    def tokenizer_path(self) -> Path | None:
        """The pack's tokenizer.json (for the `tokenizers` library), or None when the checkpoint had none."""
        name = self.manifest.get("tokenizer")
        return self.path / name if name else None

    # -- integrity and description -------------------------------------------------------------

    def verify(self, progress: bool = False) -> list[str]:
        """Check every blob and the dense file; returns one line per problem (empty: the pack is sound)."""
        self._require_open()
        problems = []
        if dense_problem := self._check_dense():
            problems.append(dense_problem)
        refs = sorted(self._refs.items(), key=lambda kv: kv[1].offset)  # file order: sequential reads
        for (layer, expert, fmt), ref in tqdm(refs, unit="blob", desc="verifying", disable=None if progress else True):
            got = blob_digest(self._view[ref.offset : ref.offset + ref.nbytes])
            if got != ref.xxh3_64:
                problems.append(
                    f"layer {layer} expert {expert} {fmt}: checksum mismatch (xxh3_64 {got:016x}, manifest {ref.xxh3_64:016x})"
                )
            else:
                self._verified.add((layer, expert, fmt))
        return problems

    def _check_dense(self) -> str | None:
        info = self.manifest["dense"]
        got = file_crc32(self.path / info["file"])
        if got != int(info["crc32"]):
            return f"{info['file']}: checksum mismatch (crc32 {got:#010x}, manifest {int(info['crc32']):#010x})"
        return None

    def summary(self) -> str:
        """Human-readable description for `python -m expert_store inspect`."""
        a, m = self.args, self.manifest
        n = len(self.expert_ids)
        lines = [
            f"pack        {self.path}",
            f"model       {self.name} (family {a.family})",
            f"layers      {a.num_layers} decoder layers, {a.num_moe_layers} MoE: {list(a.moe_layers)}",
            f"experts     {a.num_experts} per MoE layer, top-{a.top_k}, {n} in all",
            f"shapes      hidden {a.hidden_size}, expert FFN {a.expert_intermediate_size}"
            + (f", shared expert FFN {a.shared_expert_intermediate_size}" if a.shared_expert_intermediate_size else ""),
            f"dense       {m['dense']['file']} {_size(int(m['dense']['nbytes']))}",
            f"experts.bin {_size(int(m['experts_nbytes']))}, {m['alignment']}-byte aligned blobs, {m['checksum']} each",
            *([f"int4 layout {m['int4_layout']['name']} (torch CPU int4 kernel, {m['int4_layout']['fingerprint']})"]
              if m.get("int4_layout") else []),
            "formats:",
        ]
        align = int(m["alignment"])
        for fmt in self.formats:
            spec = m["formats"][fmt]
            nbytes = int(spec["expert_nbytes"])
            group = f"group {spec['group_size']}" if spec["group_size"] else "not quantized"
            lines.append(
                f"  {fmt:<5} {spec['bits']:>2} bits, {group:<13} {_size(nbytes):>10} per expert, "
                f"{_size(n * ((nbytes + align - 1) // align * align)):>10} in all"
            )
        tok = ", ".join(m.get("tokenizer_files") or []) or "none (token ids only)"
        lines += [f"tokenizer   {tok}", f"created     {m.get('created')} by {m.get('tool')}"]
        return "\n".join(lines)

    # -- lifetime -----------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._closed:
            raise PackError(f"{self.path}: the pack is closed (open it again with Pack.open)")

    def close(self) -> None:
        """Unmap experts.bin; views handed out earlier stay valid and keep the mapping until they are dropped."""
        if self._closed:
            return
        self._closed = True
        self._view.release()
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # a caller still holds a view (e.g. a tensor over a blob): the map goes with the last one
            self._mmap = None
        self._file.close()

    def __enter__(self) -> "Pack":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Pack({str(self.path)!r}, family={self.args.family!r}, formats={self.formats})"


def _parse(manifest: dict[str, Any]) -> tuple[dict[tuple[int, int, str], BlobRef], ModelArgs]:
    args = ModelArgs.from_dict(manifest["model"]["args"])
    refs: dict[tuple[int, int, str], BlobRef] = {}
    for entry in manifest["experts"]:
        for fmt, blob in entry["blobs"].items():
            refs[(int(entry["layer"]), int(entry["expert"]), str(fmt))] = BlobRef(
                int(blob["offset"]), int(blob["nbytes"]), int(blob[BLOB_CHECKSUM])
            )
    return refs, args


def _check_refs(source: Path, manifest: dict[str, Any], refs: dict[tuple[int, int, str], BlobRef]) -> None:
    """Every blob inside the file, aligned, of its format's size: a manifest that says otherwise is not ours."""
    total, align = int(manifest["experts_nbytes"]), int(manifest["alignment"])
    for (layer, expert, fmt), ref in refs.items():
        want = manifest["formats"].get(fmt, {}).get("expert_nbytes")
        if ref.offset % align or ref.offset + ref.nbytes > total or ref.nbytes != want:
            raise PackError(
                f"{source}: layer {layer} expert {expert} {fmt}: blob at {ref.offset}+{ref.nbytes} does not fit "
                f"the pack ({total} bytes, {align}-aligned, {want} bytes per blob); re-pack the checkpoint"
            )


def _check_int4_layout(source: Path, manifest: dict[str, Any]) -> None:
    """int4/int2 blobs need a layout record we know (their bytes mean nothing without it)."""
    if not any(codec.FORMATS.get(f, codec.FORMATS["bf16"]).kernel_layout for f in manifest["formats"]):
        return
    record = manifest.get("int4_layout")
    try:
        if not isinstance(record, dict):
            raise Int4LayoutError("no int4_layout record")
        Int4Layout.from_record(record)
    except (Int4LayoutError, KeyError) as e:
        raise PackError(f"{source}: int4/int2 blobs with an unusable layout record ({e}); re-pack with "
                        f"`python -m expert_store pack CHECKPOINT_DIR {source.parent} --force`") from None


def _check_size(file: Path, expected: int) -> None:
    try:
        size = file.stat().st_size
    except OSError:
        raise PackError(f"{file}: missing; the pack is incomplete, re-pack the checkpoint") from None
    if size != expected:
        raise PackError(
            f"{file}: {size} bytes, the manifest says {expected}: truncated or replaced; re-pack the checkpoint"
        )


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.2f} {unit}"
