"""The committed stubs in proto/moe/v1 match the .proto files beside them, and the messages behave as the contract says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import importlib.util

_spec = importlib.util.spec_from_file_location("proto_generate", Path(__file__).resolve().parents[2] / "proto" / "generate.py")
gen_proto = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_proto)
from moe.v1 import store_pb2, store_pb2_grpc, worker_pb2, worker_pb2_grpc


def _require_pinned_generator() -> None:
    """Byte-identical output needs the grpcio-tools the stubs were made with; a different one is a setup error."""
    version = gen_proto.installed_grpc_tools_version()
    if version is None:
        pytest.fail("grpcio-tools is not installed: the test extra is missing (pip install -e '.[test]')")
    if version != gen_proto.GRPC_TOOLS_VERSION:
        pytest.fail(
            f"grpcio-tools {version} is installed; the stubs are generated with {gen_proto.GRPC_TOOLS_VERSION} "
            "(pinned in pyproject's test extra)"
        )


def test_regenerating_gives_identical_files(tmp_path: Path) -> None:
    _require_pinned_generator()
    written = gen_proto.generate(tmp_path)
    assert {p.name for p in written} == {
        "__init__.py",
        "store_pb2.py",
        "store_pb2.pyi",
        "store_pb2_grpc.py",
        "worker_pb2.py",
        "worker_pb2.pyi",
        "worker_pb2_grpc.py",
    }
    for rel in written:
        fresh = (tmp_path / rel).read_bytes()
        committed = (gen_proto.OUTPUT_DIR / rel).read_bytes()
        assert fresh == committed, f"proto/moe/v1/{rel} is stale: run python proto/generate.py"
    assert gen_proto.stale_files() == []


def test_check_mode_reports_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _require_pinned_generator()
    stale = tmp_path / "pb"
    gen_proto.generate(stale)
    (stale / "worker_pb2.py").write_text("# edited by hand\n")
    (stale / "leftover_pb2.py").write_text("")
    monkeypatch.setattr(gen_proto, "OUTPUT_DIR", stale)
    assert gen_proto.main(["--check"]) == 1
    assert gen_proto.stale_files(stale) == ["leftover_pb2.py (not generated: remove it)", "worker_pb2.py (differs)"]


def test_check_mode_cli_passes_on_the_committed_stubs() -> None:
    _require_pinned_generator()
    repo = gen_proto.REPO_ROOT
    proc = subprocess.run(
        [sys.executable, "proto/generate.py", "--check"], cwd=repo, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_grpc_stubs_import_their_pb2_relatively() -> None:
    for module in (store_pb2_grpc, worker_pb2_grpc):
        source = Path(module.__file__).read_text()
        assert "from moe.v1 import" not in source
        assert "from . import" in source
    assert hasattr(worker_pb2_grpc, "WorkerStub") and hasattr(store_pb2_grpc, "ExpertStoreStub")


def test_generate_request_and_stream_round_trip() -> None:
    req = worker_pb2.GenerateRequest(
        request_id="r-1",
        prompt="The expert store",
        max_new_tokens=16,
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        seed=1234,
        stop_strings=["\n\n"],
        stop_token_ids=[1],
    )
    back = worker_pb2.GenerateRequest.FromString(req.SerializeToString())
    assert back == req
    assert back.WhichOneof("input") == "prompt"
    assert back.HasField("seed") and back.seed == 1234
    assert list(back.stop_strings) == ["\n\n"] and list(back.stop_token_ids) == [1]

    by_ids = worker_pb2.GenerateRequest(token_ids=worker_pb2.TokenIds(ids=[0, 5, 9]))
    back = worker_pb2.GenerateRequest.FromString(by_ids.SerializeToString())
    assert back.WhichOneof("input") == "token_ids" and list(back.token_ids.ids) == [0, 5, 9]
    assert not back.HasField("seed")  # unset seed stays distinguishable from seed 0

    token = worker_pb2.GenerateResponse(token=worker_pb2.GeneratedToken(index=0, id=42, text=" hi"))
    final = worker_pb2.GenerateResponse(
        final=worker_pb2.GenerateFinal(
            request_id="r-1",
            finish_reason=worker_pb2.FINISH_REASON_LENGTH,
            usage=worker_pb2.GenerateUsage(prompt_tokens=4, completion_tokens=16),
            timings=worker_pb2.GenerateTimings(queue_ns=10, prefill_ns=2_000, decode_ns=30_000, time_to_first_token_ns=2_100),
            experts=worker_pb2.RequestExpertStats(hits=50, misses=14, prefetch_hits=20, bytes_fetched=1 << 20, fetch_wait_ns=5_000),
        )
    )
    events = [worker_pb2.GenerateResponse.FromString(m.SerializeToString()) for m in (token, final)]
    assert [e.WhichOneof("event") for e in events] == ["token", "final"]
    assert events[0].token.id == 42 and events[0].token.text == " hi"
    assert events[1] == final
    assert events[1].final.experts.bytes_fetched == 1 << 20


def test_store_messages_round_trip() -> None:
    key = store_pb2.ExpertKey(layer=3, expert=7, format=store_pb2.EXPERT_FORMAT_INT4)
    part = store_pb2.ExpertPart(
        index=0,
        key=key,
        total_bytes=8192,
        offset_bytes=4096,
        payload_offset_bytes=64,
        payload_bytes=16,
        compression=store_pb2.COMPRESSION_ZSTD,
        uncompressed_bytes=4096,
        last=True,
        tier=store_pb2.STORE_TIER_RAM,
    )
    reply = store_pb2.ExpertBlobs(index=store_pb2.ExpertBlobIndex(parts=[part]), payload=b"\x00" * 80)
    assert store_pb2.ExpertBlobs.FromString(reply.SerializeToString()) == reply
    desc = store_pb2.FetchExpertsShmResponse(
        descriptors=[store_pb2.ShmDescriptor(key=key, segment_name="fate-moe-ram", offset_bytes=0, length_bytes=8192, lease_id=9, generation=2)],
        unavailable_indices=[1],
    )
    assert store_pb2.FetchExpertsShmResponse.FromString(desc.SerializeToString()) == desc
