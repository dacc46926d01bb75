"""Turn a Hugging Face checkpoint directory into a pack (see DESIGN.md, "Expert store").

A pack directory holds `manifest.json`, `dense.safetensors`, `experts.bin`, the
checkpoint's config.json (so transformers can load the pack directory's config)
and its tokenizer files.

`experts.bin` is format-major: for each stored format, for each MoE layer, for
each expert, one blob from `codec.encode_expert`, each starting at a 4 KiB
boundary, so fetching an expert is one aligned read and one copy. Every blob's
offset is known before anything is written, so each expert is read from the
checkpoint once, encoded in every format and written at its offsets: memory
stays at one expert whatever the checkpoint size. dense.safetensors is written
the same way, one tensor at a time.

FP8 block-scaled and MXFP4 checkpoints are decoded as they are read
(`checkpoint_formats`): experts are quantized from the fp32 decode, FP8 dense
tensors are stored as bf16, every other dense tensor in its checkpoint dtype.

The pack is built in a temp sibling `.{name}.tmp-<pid>` and renamed into place
after `manifest.json` (written last, fsynced) exists: a crash leaves no
directory that `Pack.open` accepts, and the next pack of the same out_dir
removes what a dead process left behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from tqdm import tqdm

from . import hf_names
from .model_args import ModelArgs, read_hf_config

from . import codec
from .checkpoint import CheckpointReader
from .checkpoint_formats import DecodedCheckpoint, checkpoint_quantization
from .checksums import BLOB_CHECKSUM, blob_digest
from .errors import PackError
from .int4_layout import Int4Layout, Int4LayoutError, require_native_layout

logger = logging.getLogger(__name__)

PACK_FORMAT = "fate-moe-pack"
# 2: int4/int2 blobs in the CPU int4 kernel's layout (codec LAYOUT_VERSION 2, manifest "int4_layout"),
#    blob checksums xxh3_64 (expert_store/checksums.py); 1 (row-major codes, crc32) is refused with a re-pack hint.
PACK_FORMAT_VERSION = 2
ALIGNMENT = 4096
MANIFEST_FILE = "manifest.json"
DENSE_FILE = "dense.safetensors"
EXPERTS_FILE = "experts.bin"
DEFAULT_FORMATS: tuple[str, ...] = ("int4", "int2")
# Copied when present; tokenizer.json is what the runtime loads (with the `tokenizers` library).
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
CONFIG_FILES: tuple[str, ...] = ("config.json", "generation_config.json")
_CHUNK = 16 << 20  # bytes per read when checksumming a file
# Below this many weights per matrix, torch's intra-op threads cost more than they give: on a busy
# 2-core box packing tiny-mixtral took 10-34 s with 2 threads and 0.5 s with 1 (threads spin-waiting).
_SMALL_MATRIX = 1 << 20


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def file_crc32(path: Path) -> int:
    """crc32 of a whole file, read in chunks (dense files can be GBs)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def tool_version() -> str:
    try:
        return f"fate-moe {metadata.version('fate-moe')}"
    except metadata.PackageNotFoundError:
        return "fate-moe (source tree)"


@contextmanager
def _encode_threads(hidden: int, inter: int) -> Iterator[None]:
    """One torch thread while encoding small experts (process-wide: packing is an offline job)."""
    if hidden * inter >= _SMALL_MATRIX:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_pack(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    formats: Iterable[str] = DEFAULT_FORMATS,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Pack `checkpoint_dir` into `out_dir`; returns out_dir.

    Everything that can be checked before writing is checked first (config,
    formats, out_dir, every expected tensor present with the expected shape),
    so bad input fails fast and leaves nothing behind.
    """
    t0 = time.perf_counter()
    src, out = Path(checkpoint_dir), Path(out_dir)
    fmts = _check_formats(formats)
    cfg, cfg_source = read_hf_config(src)
    args = ModelArgs.from_hf_config(cfg, cfg_source)
    quant = checkpoint_quantization(cfg, cfg_source)
    _check_out_dir(out, force)

    with CheckpointReader(src) as reader:
        ckpt = DecodedCheckpoint(reader, quant)
        _check_tensors(args, ckpt)
        _remove_stale(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            manifest = _write_contents(args, ckpt, src, tmp, fmts, progress)
            _write_json_synced(tmp / MANIFEST_FILE, manifest)  # last: its presence marks a complete pack
            _fsync_dir(tmp)
            _install(tmp, out, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info(_summary_line(manifest, out, time.perf_counter() - t0))
    return out


# -- checks before writing ------------------------------------------------------------------


def _check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    fmts = tuple(dict.fromkeys(f.strip() for f in formats if f.strip()))
    if not fmts:
        raise PackError(f"no formats given (choose from {', '.join(codec.FORMATS)})")
    for f in fmts:
        codec.format_spec(f)  # CodecError naming the known formats
    return fmts


def _is_pack_dir(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST_FILE).read_text()).get("format") == PACK_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out_dir(out: Path, force: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise PackError(f"{out}: already exists (pass --force to replace it, or choose another output directory)")
    # --force deletes the old directory: only ever a pack or an empty directory, never a user's data.
    if out.is_symlink() or not out.is_dir() or (any(out.iterdir()) and not _is_pack_dir(out)):
        raise PackError(f"{out}: exists and is not a pack; refusing to replace it even with --force (remove it yourself)")


def _check_tensors(args: ModelArgs, ckpt: DecodedCheckpoint) -> None:
    """Every expected tensor present; every present tensor expected (else a warning, never a silent drop)."""
    expected = hf_names.dense_tensor_names(args) + hf_names.expert_tensor_names(args)
    present = ckpt.names()
    missing = [n for n in expected if n not in present]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise PackError(
            f"{ckpt.path}: {len(missing)} tensor(s) missing from the checkpoint: "
            f"{', '.join(missing[:5])}{more} (is config.json the one for these weights?)"
        )
    unexpected = sorted(present - set(expected))
    if unexpected:  # e.g. DeepSeek-V3's multi-token-prediction layer
        more = f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""
        logger.warning(
            "%s: %d tensor(s) are neither dense nor expert tensors and are NOT packed: %s%s",
            ckpt.path, len(unexpected), ", ".join(unexpected[:10]), more,
        )
    hidden, inter, E = args.hidden_size, args.expert_intermediate_size, args.num_experts
    want = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter),
            "gate_up": (E, hidden, 2 * inter), "down_fused": (E, inter, hidden)}
    checks = []
    for layer in args.moe_layers:
        fused = hf_names.fused_experts(args, layer)
        if fused:
            checks += [(fused["gate_up"], want["gate_up"]), (fused["down"], want["down_fused"])]
            continue
        for e in range(E):
            checks += [(name, want[role]) for role, name in hf_names.expert(args, layer, e).items()]
    for name, shape_wanted in checks:
        if (shape := ckpt.shape(name)) != shape_wanted:
            raise PackError(
                f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(shape)}, config.json implies "
                f"{list(shape_wanted)} (is config.json the one for these weights?)"
            )
    for name in hf_names.dense_tensor_names(args):
        ckpt.dtype(name)  # an unscaled FP8 or an unstorable dtype fails here, before anything is written


def read_expert(args: ModelArgs, ckpt: DecodedCheckpoint, layer: int, e: int) -> dict[str, torch.Tensor]:
    """One expert's gate, up [I, H] and down [H, I], decoded (fp32 where the checkpoint is quantized)."""
    fused = hf_names.fused_experts(args, layer)
    if not fused:
        return {role: ckpt.get_float(name) for role, name in hf_names.expert(args, layer, e).items()}
    gate_up = ckpt.get_expert(fused["gate_up"], e)  # [H, 2I]: gate even columns, up odd
    return {"gate": gate_up[:, 0::2].T.contiguous(), "up": gate_up[:, 1::2].T.contiguous(),
            "down": ckpt.get_expert(fused["down"], e).T.contiguous()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Delete temp/old siblings of `out` left by packs whose process is gone."""
    if not out.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for stale in out.parent.glob(f".{out.name}.{kind}-*"):
            pid_text = stale.name.rsplit("-", 1)[-1]
            pid = int(pid_text) if pid_text.isdigit() else -1
            if pid != os.getpid() and pid > 0 and _pid_alive(pid):
                logger.warning("%s: left alone, process %d may still be packing (delete it if not)", stale, pid)
                continue
            logger.info("removing %s, left by an interrupted pack", stale)
            shutil.rmtree(stale, ignore_errors=True)


# -- writing --------------------------------------------------------------------------------


def _write_contents(
    args: ModelArgs, ckpt: DecodedCheckpoint, src: Path, tmp: Path, fmts: tuple[str, ...], progress: bool
) -> dict[str, Any]:
    """Write every file but the manifest into `tmp`; returns the manifest."""
    hidden, inter = args.hidden_size, args.expert_intermediate_size
    nbytes = {f: codec.expert_nbytes(f, hidden, inter) for f in fmts}
    layout = _int4_layout(fmts)
    ids = [(layer, e) for layer in args.moe_layers for e in range(args.num_experts)]
    base: dict[str, int] = {}
    total = 0
    for f in fmts:  # format-major regions, every blob at a 4 KiB boundary
        base[f] = total
        total += len(ids) * align_up(nbytes[f])

    entries: list[dict[str, Any]] = []
    fd = os.open(tmp / EXPERTS_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, total)  # holes for the padding; every blob then lands at its final offset
        bar = tqdm(total=len(ids), unit="expert", desc=f"packing {src.name}", disable=None if progress else True)
        with bar, _encode_threads(hidden, inter):
            for i, (layer, e) in enumerate(ids):
                w = read_expert(args, ckpt, layer, e)
                blobs: dict[str, dict[str, int]] = {}
                for f in fmts:
                    blob = codec.encode_expert(f, w["gate"], w["up"], w["down"], layout)
                    if len(blob) != nbytes[f]:
                        raise PackError(
                            f"codec produced {len(blob)} bytes for layer {layer} expert {e} {f}, "
                            f"expected {nbytes[f]} (a codec bug: report it)"
                        )
                    offset = base[f] + i * align_up(nbytes[f])
                    _pwrite_all(fd, blob, offset)
                    blobs[f] = {"offset": offset, "nbytes": len(blob), BLOB_CHECKSUM: blob_digest(blob)}
                entries.append({"layer": layer, "expert": e, "blobs": blobs})
                bar.update(1)
        os.fsync(fd)
    finally:
        os.close(fd)

    write_dense(ckpt, hf_names.dense_tensor_names(args), tmp / DENSE_FILE, progress)
    shutil.copymode(tmp / EXPERTS_FILE, tmp / DENSE_FILE)  # the same mode as the rest
    _fsync_file(tmp / DENSE_FILE)

    for name in CONFIG_FILES:
        if (src / name).is_file():
            _copy_synced(src / name, tmp / name)
    tokenizer_files = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in tokenizer_files:
        _copy_synced(src / name, tmp / name)
    if "tokenizer.json" not in tokenizer_files:
        logger.warning("%s: no tokenizer.json; the pack will serve token ids only", src)

    return {
        "format": PACK_FORMAT,
        "format_version": PACK_FORMAT_VERSION,
        "model": {"name": src.resolve().name, "family": args.family, "args": args.to_dict()},
        "checksum": BLOB_CHECKSUM,
        "alignment": ALIGNMENT,
        "codec_layout_version": codec.LAYOUT_VERSION,
        "int4_layout": layout.record() if layout else None,
        "formats": {
            f: {"bits": codec.format_spec(f).bits, "group_size": codec.format_spec(f).group_size,
                "expert_nbytes": nbytes[f]}
            for f in fmts
        },
        "dense": {"file": DENSE_FILE, "nbytes": (tmp / DENSE_FILE).stat().st_size,
                  "crc32": file_crc32(tmp / DENSE_FILE)},
        "experts_file": EXPERTS_FILE,
        "experts_nbytes": total,
        "experts": entries,
        "tokenizer": "tokenizer.json" if "tokenizer.json" in tokenizer_files else None,
        "tokenizer_files": tokenizer_files,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool": tool_version(),
    }


_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


def write_dense(ckpt: DecodedCheckpoint, names: list[str], path: Path, progress: bool) -> None:
    """dense.safetensors written one tensor at a time (the layout safetensors reads; header first, since
    every decoded shape and dtype is known from the checkpoint's headers): memory stays at one tensor."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        dtype, shape = ckpt.dtype(name), ckpt.shape(name)
        if dtype not in _DTYPE_NAMES:
            raise PackError(f"{ckpt.file_of(name)}: tensor {name!r} has dtype {dtype}, which a pack cannot store")
        n = dtype.itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors pads the header to 8 bytes
    bar = tqdm(total=len(names), unit="tensor", desc="dense tensors", disable=None if progress else True)
    with open(path, "wb") as f, bar:
        f.write(len(head).to_bytes(8, "little") + head)
        for name in names:
            t = ckpt.get(name).contiguous()
            if t.dtype != ckpt.dtype(name) or list(t.shape) != header[name]["shape"]:
                raise PackError(f"{ckpt.file_of(name)}: tensor {name!r} decoded to {t.dtype} {list(t.shape)}, its "
                                f"header says {ckpt.dtype(name)} {header[name]['shape']} (the file is corrupt)")
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            bar.update(1)


def _int4_layout(fmts: tuple[str, ...]) -> Int4Layout | None:
    """The int4 kernel layout this machine's torch uses (int4/int2 blobs are written in it), or None."""
    if not any(codec.format_spec(f).kernel_layout for f in fmts):
        return None
    try:
        return require_native_layout()
    except Int4LayoutError as e:
        raise PackError(str(e)) from None


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_synced(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    _fsync_file(dst)


def _write_json_synced(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _install(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished pack into place; with force, the old pack is moved aside first, then deleted."""
    old: Path | None = None
    if out.exists() or out.is_symlink():
        _check_out_dir(out, force)  # re-check: something may have appeared while we packed
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)  # put the old pack back rather than leave nothing
        raise
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _summary_line(manifest: dict[str, Any], out: Path, seconds: float) -> str:
    n = len(manifest["experts"])
    sizes = ", ".join(
        f"{f} {_mib(n * align_up(spec['expert_nbytes']))}" for f, spec in manifest["formats"].items()
    )
    args = manifest["model"]["args"]
    return (
        f"packed {manifest['model']['name']} ({manifest['model']['family']}, {len(args['moe_layers'])} MoE layers"
        f" x {args['num_experts']} experts) into {out}: {sizes}, dense {_mib(manifest['dense']['nbytes'])}"
        f" in {seconds:.1f} s"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
