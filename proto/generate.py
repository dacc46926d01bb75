"""Generate the committed gRPC stubs in `proto/moe/v1/` (package `moe.v1`) from `proto/moe/v1/*.proto`.

    python proto/generate.py          # regenerate the stubs beside the .proto files
    python proto/generate.py --check  # exit 1 (listing files) if the stubs are stale

The stubs are committed so that the runtime needs no code generator; the
`--check` mode (and tests/client/test_proto_stubs.py) keeps them equal to the
.proto files. protoc writes `from moe.v1 import store_pb2` into the `_grpc`
modules; that import is rewritten to a relative one here so `moe.v1` works
however it is put on sys.path (the install maps `moe` to `proto/moe`).

The generated code embeds the generator's version (and checks the protobuf and
grpcio runtimes against it), so byte-identical regeneration needs the same
grpcio-tools as the one that made the committed stubs: GRPC_TOOLS_VERSION.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from importlib import metadata, resources
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_PACKAGE_DIR = Path("moe") / "v1"  # relative to PROTO_ROOT; also the import path protoc writes
OUTPUT_DIR = PROTO_ROOT / PROTO_PACKAGE_DIR  # stubs live beside their .proto files

# The grpcio-tools release that generated the committed stubs (pinned in pyproject's test extra).
GRPC_TOOLS_VERSION = "1.85.1"

INIT_TEXT = '''"""Generated protobuf and gRPC stubs for package moe.v1. DO NOT EDIT.

Regenerate with `python proto/generate.py` after changing proto/moe/v1/*.proto.
"""
'''

_ABSOLUTE_IMPORT = re.compile(r"^from moe\.v1 import (\w+_pb2) as ", re.MULTILINE)


class ProtoGenerationError(RuntimeError):
    """protoc failed, or the generator is missing or of the wrong version."""


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The .proto files to compile, relative to proto_root (sorted, so output order is stable)."""
    files = sorted(p.relative_to(proto_root) for p in (proto_root / PROTO_PACKAGE_DIR).glob("*.proto"))
    if not files:
        raise ProtoGenerationError(f"no .proto files under {proto_root / PROTO_PACKAGE_DIR}")
    return files


def _protoc() -> ModuleType:
    try:
        from grpc_tools import protoc
    except ImportError:
        raise ProtoGenerationError(
            "grpcio-tools is not installed: install the test extra (pip install -e '.[test]')"
        ) from None
    return protoc


def installed_grpc_tools_version() -> str | None:
    try:
        return metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:
        return None


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write every stub (and `__init__.py`) into out_dir; returns the file names written, relative to it."""
    protoc = _protoc()
    well_known = resources.files("grpc_tools") / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fate-moe-protoc-") as raw:
        # Paths relative to -I keep the embedded file names ("moe/v1/store.proto") independent of cwd.
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            *(str(p) for p in proto_files(proto_root)),
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise ProtoGenerationError(f"protoc exited with {rc} (arguments: {' '.join(args[1:])})")
        written = [Path("__init__.py")]
        (out_dir / "__init__.py").write_text(INIT_TEXT)
        for src in sorted((Path(raw) / PROTO_PACKAGE_DIR).iterdir()):
            text = src.read_text()
            if src.name.endswith("_pb2_grpc.py"):
                text = _ABSOLUTE_IMPORT.sub(r"from . import \1 as ", text)
            (out_dir / src.name).write_text(text)
            written.append(Path(src.name))
    return written


def _tree_files(root: Path) -> set[Path]:
    if not root.is_dir():
        return set()
    return {
        p.relative_to(root)
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".pyi")
    }


def stale_files(out_dir: Path = OUTPUT_DIR, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Files of out_dir that differ from a fresh generation, are missing, or should not be there."""
    with tempfile.TemporaryDirectory(prefix="fate-moe-pb-") as tmp:
        fresh = Path(tmp)
        generate(fresh, proto_root)
        expected, actual = _tree_files(fresh), _tree_files(out_dir)
        diffs = [f"{p} (missing)" for p in sorted(expected - actual)]
        diffs += [f"{p} (not generated: remove it)" for p in sorted(actual - expected)]
        diffs += [
            f"{p} (differs)"
            for p in sorted(expected & actual)
            if (fresh / p).read_bytes() != (out_dir / p).read_bytes()
        ]
    return diffs


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python proto/generate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="regenerate into a temp dir; exit 1 if the committed stubs differ")
    args = parser.parse_args(argv)
    version = installed_grpc_tools_version()
    try:
        if args.check:
            diffs = stale_files(OUTPUT_DIR, PROTO_ROOT)
            if diffs:
                print(f"the stubs in {_shown(OUTPUT_DIR)}/ are stale:", file=sys.stderr)
                for d in diffs:
                    print(f"  {d}", file=sys.stderr)
                if version != GRPC_TOOLS_VERSION:
                    print(
                        f"note: grpcio-tools {version} is installed but the stubs are made with "
                        f"{GRPC_TOOLS_VERSION}; install that version before regenerating",
                        file=sys.stderr,
                    )
                else:
                    print("run: python proto/generate.py", file=sys.stderr)
                return 1
            print(f"{_shown(OUTPUT_DIR)} is up to date ({len(_tree_files(OUTPUT_DIR))} files)")
            return 0
        if version != GRPC_TOOLS_VERSION:
            print(
                f"warning: grpcio-tools {version} differs from GRPC_TOOLS_VERSION {GRPC_TOOLS_VERSION}: "
                "the stubs will carry other version checks; update GRPC_TOOLS_VERSION and the pins together",
                file=sys.stderr,
            )
        # Generate aside first so that a protoc failure leaves the committed stubs alone.
        with tempfile.TemporaryDirectory(prefix="fate-moe-pb-") as tmp:
            names = generate(Path(tmp))
            for old in _tree_files(OUTPUT_DIR):  # the .proto files stay
                (OUTPUT_DIR / old).unlink()
            for name in names:
                shutil.copyfile(Path(tmp) / name, OUTPUT_DIR / name)
        for name in names:
            print(f"wrote {_shown(OUTPUT_DIR / name)}")
        return 0
    except ProtoGenerationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
