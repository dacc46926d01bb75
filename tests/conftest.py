"""Shared fixtures: ../shared (beside the repo) and packs built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FATE_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: CI runs with ../shared beside the repo (or set FATE_SHARED_DIR)")
    return SHARED


@pytest.fixture(scope="session")
def tiny_mixtral_dir(shared_dir) -> Path:
    return shared_dir / "models" / "tiny-mixtral"


@pytest.fixture(scope="session")
def tiny_mixtral_pack(tiny_mixtral_dir, tmp_path_factory) -> Path:
    """tiny-mixtral packed once with every format."""
    from expert_store.pack import write_pack

    out = tmp_path_factory.mktemp("packs") / "tiny-mixtral"
    write_pack(tiny_mixtral_dir, out, formats=("bf16", "int8", "int4", "int2"), progress=False)
    return out
