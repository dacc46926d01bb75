"""The worker's store client: reply parsing, reassembly and checksums (pure functions), retries and errors
against a scripted in-process store, and the real store subprocess over gRPC and shared memory."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zlib
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch
import zstandard
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from moe.v1 import store_pb2 as pb
from moe.v1 import store_pb2_grpc as pb_grpc
from expert_store.checksums import blob_checksum, blob_digest
from expert_store.errors import ChecksumError
from expert_store.packfile import Pack
from gpu_worker.store_client import PackFetcher, StoreClient
from expert_store.tiers import BlobKey as BlobKeyOf
from gpu_worker.store_protocol import (
    BlobsMessage, ExpertBlobAssembler, PackChangedError, StoreError, StoreManifest, StoreUnavailableError,
    assemble_dense, parse_expert_blobs, verify_checksum,
)

REPO = Path(__file__).resolve().parents[2]
FMT = "int4"
_PB_FMT = {"bf16": pb.EXPERT_FORMAT_BF16, "int8": pb.EXPERT_FORMAT_INT8, "int4": pb.EXPERT_FORMAT_INT4,
           "int2": pb.EXPERT_FORMAT_INT2}


@pytest.fixture(scope="module")
def pack(tiny_mixtral_pack):
    with Pack.open(tiny_mixtral_pack) as p:
        yield p


def _crc(data) -> str:
    return f"crc32:{zlib.crc32(data):08x}"


def _xxh(data) -> str:  # expert blobs; dense tensors keep crc32
    return blob_checksum(blob_digest(data))


def _expert_parts(index, key, blob, pieces=3, zstd_piece=None, corrupt_piece=None, checksum=None):
    """(ExpertPart, data) pairs of one expert in `pieces` parts (payload placement left to `_message`)."""
    step = -(-len(blob) // pieces)
    out = []
    for n, off in enumerate(range(0, len(blob), step)):
        data = bytes(blob[off:off + step])
        raw_len = len(data)
        if corrupt_piece == n:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        compression = pb.COMPRESSION_NONE
        if zstd_piece == n:
            data, compression = zstandard.ZstdCompressor().compress(data), pb.COMPRESSION_ZSTD
        last = off + step >= len(blob)
        out.append((pb.ExpertPart(
            index=index, key=pb.ExpertKey(layer=key[0], expert=key[1], format=_PB_FMT[key[2]]),
            total_bytes=len(blob), offset_bytes=off, compression=compression, uncompressed_bytes=raw_len,
            last=last, tier=pb.STORE_TIER_RAM, checksum=(checksum or _xxh(blob)) if last else ""), data))
    return out


def _message(parts) -> pb.ExpertBlobs:
    """One reply message (serialized by protobuf, not the store's framing) carrying `parts` in its payload."""
    payload, index = bytearray(), pb.ExpertBlobIndex()
    for part, data in parts:
        p = index.parts.add()
        p.CopyFrom(part)
        p.payload_offset_bytes, p.payload_bytes = len(payload), len(data)
        payload += data
    return pb.ExpertBlobs(index=index, payload=bytes(payload))


def _received(parts) -> BlobsMessage:
    return parse_expert_blobs(_message(parts).SerializeToString())


# -- pure functions ---------------------------------------------------------------------------------


def test_verify_checksum():
    data = b"expert bytes" * 100
    assert verify_checksum(data, _crc(data), "x") == zlib.crc32(data)
    assert verify_checksum(data, _xxh(data), "x") == blob_digest(data)
    with pytest.raises(ChecksumError, match="mismatch"):
        verify_checksum(data[:-1] + b"?", _xxh(data), "x")
    with pytest.raises(ChecksumError, match="mismatch"):
        verify_checksum(data[:-1] + b"?", _crc(data), "x")
    for bad in ("sha1:00", "crc32:", "crc32:zz", ""):
        with pytest.raises(ChecksumError):
            verify_checksum(data, bad, "x")


def test_expert_parts_reassemble_and_verify(pack):
    keys = [(1, 3, FMT), (2, 5, FMT), (4, 4, FMT)]
    blobs = [pack.expert_blob(*k) for k in keys]
    crcs = [pack.blob_ref(*k).xxh3_64 for k in keys]
    asm = ExpertBlobAssembler(keys, crcs)
    # experts may arrive in any order, in parts across messages; one part zstd-compressed
    first = _expert_parts(1, keys[1], blobs[1]) + _expert_parts(0, keys[0], blobs[0], zstd_piece=1)
    asm.add(_received(first[:4]))
    asm.add(_received(first[4:] + _expert_parts(2, keys[2], blobs[2], pieces=1)))
    assert asm.messages == 2
    assert asm.done[0] == (bytes(blobs[0]), "ram") and bytes(asm.done[1][0]) == bytes(blobs[1])
    whole = asm.done[2][0]  # whole and uncompressed: a view of the received message, not a copy
    assert isinstance(whole, memoryview) and isinstance(whole.obj, bytes) and bytes(whole) == bytes(blobs[2])
    copied = ExpertBlobAssembler(keys[2:], crcs[2:], zero_copy=False)
    copied.add(_received(_expert_parts(0, keys[2], blobs[2], pieces=1)))
    assert type(copied.done[0][0]) is bytes and copied.done[0][0] == bytes(blobs[2])


def test_the_stores_framing_parses_to_views_of_the_message(pack):
    """A message as the store frames it: the payload is found without parsing it, aligned, and each expert
    is a view of the received bytes."""
    from expert_store.server import encode_blobs
    from expert_store.grpc_fetch import BlobPart
    from expert_store.tiers import Tier
    from expert_store.wire import PAYLOAD_ALIGN, Compression
    from gpu_worker.expert_compute import make_expert_compute

    keys = [(0, 1, FMT), (3, 2, FMT), (7, 15, "bf16")]
    blobs = [bytes(pack.expert_blob(*k)) for k in keys]
    parts = [BlobPart(i, BlobKeyOf(*k), len(b), 0, memoryview(b), Compression.NONE, len(b), True, Tier.RAM,
                      _xxh(b)) for i, (k, b) in enumerate(zip(keys, blobs))]
    message = encode_blobs(parts)
    received = parse_expert_blobs(message)
    assert received.payload.obj is message  # a view, nothing copied
    assert (len(message) - len(received.payload)) % PAYLOAD_ALIGN == 0
    assert pb.ExpertBlobs.FromString(message).payload == bytes(received.payload)  # plain protobuf too
    asm = ExpertBlobAssembler(keys, [pack.blob_ref(*k).xxh3_64 for k in keys])
    asm.add(received)
    base = torch.frombuffer(message, dtype=torch.uint8).data_ptr()  # after expert_compute spent torch's warning
    starts = {p.index: len(message) - len(received.payload) + p.payload_offset_bytes for p in received.parts}
    a = pack.args
    for i, b in enumerate(blobs):
        view = asm.done[i][0]
        assert view.obj is message and bytes(view) == b and starts[i] % PAYLOAD_ALIGN == 0
        if keys[i][2] == "int4":  # the CPU int4 build views the received bytes: no copy after the socket
            expert = make_expert_compute("int4", view, a.hidden_size, a.expert_intermediate_size, "int4_fused")
            assert expert.blob.data_ptr() == base + starts[i]


@pytest.mark.parametrize("case", ["corrupt_part", "corrupt_whole", "store_checksum_of_bad_bytes", "wrong_expert",
                                  "past_the_payload"])
def test_damaged_expert_is_refused(pack, case):
    key = (1, 3, FMT)
    blob = bytes(pack.expert_blob(*key))
    asm = ExpertBlobAssembler([key], [pack.blob_ref(*key).xxh3_64])
    if case == "corrupt_part":
        parts = _expert_parts(0, key, blob, corrupt_piece=1)
    elif case == "corrupt_whole":
        parts = _expert_parts(0, key, blob, pieces=1, corrupt_piece=0)
    elif case == "store_checksum_of_bad_bytes":  # consistent with itself, not with the manifest
        bad = bytes([blob[0] ^ 1]) + blob[1:]
        parts = _expert_parts(0, key, bad)
    elif case == "wrong_expert":
        parts = _expert_parts(0, (1, 4, FMT), blob)
    else:
        parts = _expert_parts(0, key, blob, pieces=1)
    message = _message(parts)
    if case == "past_the_payload":
        message.index.parts[0].payload_offset_bytes = 64
    with pytest.raises((ChecksumError, StoreError)):
        asm.add(parse_expert_blobs(message.SerializeToString()))
    assert 0 not in asm.done


def _dense_chunks(pack, corrupt: str | None = None, chunk_bytes=4096):
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    for name, t in pack.dense_tensors().items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header = pb.TensorHeader(name=name, dtype=names[t.dtype], shape=list(t.shape), total_bytes=len(raw),
                                 checksum=_crc(raw))
        if name == corrupt:
            raw = bytes([raw[0] ^ 1]) + raw[1:]
        for off in range(0, max(1, len(raw)), chunk_bytes):
            data = raw[off:off + chunk_bytes]
            yield pb.DenseChunk(name=name, header=header if off == 0 else None, last=off + chunk_bytes >= len(raw),
                                chunk=pb.DataChunk(offset_bytes=off, data=data, uncompressed_bytes=len(data)))


def test_dense_reassembly(pack):
    want = pack.dense_tensors()
    got = assemble_dense(_dense_chunks(pack))
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    victim = next(iter(want))
    with pytest.raises(ChecksumError, match=victim):
        assemble_dense(_dense_chunks(pack, corrupt=victim))


def test_pack_fetcher(pack):
    keys = [(0, 1, FMT), (7, 15, "bf16")]
    blobs = PackFetcher(pack).fetch(keys)
    assert [b.key for b in blobs] == keys
    assert [bytes(b.data) for b in blobs] == [bytes(pack.expert_blob(*k)) for k in keys]
    assert blobs[0].nbytes == pack.expert_nbytes(FMT) and blobs[0].transport == "local"


# -- a scripted in-process store: retries and wire corruption -------------------------------------------


class _ScriptedStore(pb_grpc.ExpertStoreServicer):
    """Serves a pack over FetchExperts; fails the first `fail_first` fetches with UNAVAILABLE."""

    def __init__(self, pack: Pack, fail_first: int = 0, corrupt: bool = False):
        self.pack, self.fail_first, self.corrupt, self.fetches = pack, fail_first, corrupt, 0
        self.extra: dict = {}  # added to the manifest: "another pack"

    def GetManifest(self, request, context):
        m = {**self.pack.manifest, **self.extra}
        return pb.GetManifestResponse(
            pack_id=hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16],
            model_args_json=json.dumps(self.pack.args.to_dict()), family=self.pack.args.family,
            formats=[pb.ExpertFormatInfo(format=_PB_FMT[f], expert_bytes=self.pack.expert_nbytes(f))
                     for f in self.pack.formats],
            manifest_json=json.dumps(m).encode(), tokenizer_files=m["tokenizer_files"])

    def FetchExperts(self, request, context):
        self.fetches += 1
        if self.fetches <= self.fail_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "scripted outage")
        fmts = {v: k for k, v in _PB_FMT.items()}
        parts = []
        for i, k in enumerate(request.experts):
            key = (k.layer, k.expert, fmts[k.format])
            parts += _expert_parts(i, key, bytes(self.pack.expert_blob(*key)), corrupt_piece=0 if self.corrupt else None)
        yield _message(parts)


@pytest.fixture
def scripted(pack, tmp_path):
    servers = []

    def start(window: float = 0.0, **kw):
        store = _ScriptedStore(pack, **kw)
        server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_ExpertStoreServicer_to_server(store, server)
        hs = health.HealthServicer()
        hs.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        addr = f"unix:{tmp_path}/scripted-{len(servers)}.sock"
        server.add_insecure_port(addr)
        server.start()
        servers.append(server)
        return store, StoreClient(addr, transport="auto", retry_backoff_s=0.01,
                                  retry_window_s=window)

    yield start
    for s in servers:
        s.stop(0)


def test_transient_unavailable_is_retried(pack, scripted):
    store, client = scripted(fail_first=2)
    client.wait_ready(5)
    assert client.transport == "grpc"  # the store offers no shared memory
    keys = [(3, 4, FMT), (3, 9, FMT)]
    blobs = client.fetch(keys)
    assert [bytes(b.data) for b in blobs] == [bytes(pack.expert_blob(*k)) for k in keys]
    assert client.counters.retries == 2 and store.fetches == 3
    assert client.counters.bytes_fetched_grpc == 2 * pack.expert_nbytes(FMT)
    client.close()


def test_persistent_unavailable_raises_after_bounded_retries(scripted):
    store, client = scripted(fail_first=100)
    with pytest.raises(StoreUnavailableError, match="unavailable"):
        client.fetch([(3, 4, FMT)])
    assert store.fetches == client.max_retries + 1
    client.close()


def test_a_retry_window_waits_out_an_outage_and_checks_the_pack(pack, scripted):
    store, client = scripted(fail_first=8, window=30.0)
    client.manifest()
    blobs = client.fetch([(3, 4, FMT)])  # 8 failures: far more than max_retries, well inside the window
    assert bytes(blobs[0].data) == bytes(pack.expert_blob(3, 4, FMT))
    assert client.counters.retries == 8 and not client.pack_changed
    store.fetches, store.fail_first = 0, 1
    store.extra = {"repacked": True}  # the store comes back with another manifest
    with pytest.raises(PackChangedError, match="another pack"):
        client.fetch([(3, 5, FMT)])
    assert client.pack_changed
    with pytest.raises(PackChangedError):  # and stays refused: the worker must restart
        client.fetch([(3, 4, FMT)])
    client.close()


def test_a_retry_window_ends(scripted):
    _, client = scripted(fail_first=10_000, window=1.0)
    with pytest.raises(StoreUnavailableError, match="retried for 1 s"):
        client.fetch([(3, 4, FMT)])
    client.close()


def test_corruption_on_the_wire_is_a_checksum_error(scripted):
    _, client = scripted(corrupt=True)
    with pytest.raises(ChecksumError):
        client.fetch([(3, 4, FMT)])
    client.close()


def test_store_down_is_unavailable_quickly(tmp_path):
    addr = f"unix:{tmp_path}/nobody.sock"
    client = StoreClient(addr, retry_backoff_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=str(tmp_path)):
        client.wait_ready(0.5)
    with pytest.raises(StoreUnavailableError, match=str(tmp_path)):
        client.fetch([(0, 0, FMT)])
    assert time.monotonic() - t0 < 5
    client.close()


# -- the real store ------------------------------------------------------------------------------------


def _serve(pack, tmp, ram: int, *flags: str):
    """`python -m expert_store serve` of the pack on a unix socket in `tmp` (a generator fixture's body):
    yields its address once it answers, terminates it after."""
    addr = f"unix:{tmp}/s.sock"
    stderr = open(tmp / "stderr", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "expert_store", "serve", str(pack.path), "--listen", addr,
                             "--ram-bytes", str(ram), *flags], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=stderr)
    client = StoreClient(addr)
    try:
        client.wait_ready(30)
    except StoreUnavailableError:
        proc.kill()
        pytest.fail(f"store did not start: {(tmp / 'stderr').read_text()[-2000:]}")
    client.close()
    yield addr
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    stderr.close()


@pytest.fixture(scope="module")
def store(pack, tmp_path_factory):
    """`python -m expert_store serve` on a unix socket, its RAM tier at 25% of the int4 experts."""
    yield from _serve(pack, tmp_path_factory.mktemp("store"), len(pack.expert_ids) * pack.expert_nbytes(FMT) // 4)


@pytest.mark.slow
def test_real_store_manifest_dense_files(pack, store):
    with StoreClient(store) as client:
        m = client.manifest()
        assert isinstance(m, StoreManifest)
        assert m.shm_enabled and client.transport == "shm"  # "auto", co-located
        assert m.args == pack.args and m.pack_manifest == pack.manifest
        assert m.expert_bytes(FMT) == pack.expert_nbytes(FMT)
        assert set(m.formats) == set(pack.formats)
        dense = client.dense_tensors()
        want = pack.dense_tensors()
        assert set(dense) == set(want)
        assert all(dense[n].dtype == want[n].dtype and torch.equal(dense[n], want[n]) for n in want)
        files = client.files(list(m.tokenizer_files))
        assert set(files) == set(pack.manifest["tokenizer_files"])
        assert all(files[n] == (pack.path / n).read_bytes() for n in files)


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_real_store_fetch(pack, store, transport):
    keys = [(layer, e, FMT) for layer in (0, 5) for e in range(16)] + [(2, 3, "bf16"), (2, 3, "int2")]
    with StoreClient(store, transport=transport) as client:
        assert client.transport == transport
        blobs = client.fetch(keys)
        blobs += client.fetch(keys[:4], priority="prefetch")
        assert [b.key for b in blobs] == keys + keys[:4]
        assert all(bytes(b.data) == bytes(pack.expert_blob(*b.key)) for b in blobs)
        c = client.counters
        total = sum(b.nbytes for b in blobs)
        assert c.bytes_fetched_shm + c.bytes_fetched_grpc == total
        if transport == "shm":
            assert c.bytes_fetched_shm > 0 and c.fetch_ns_shm > 0
            assert c.shm_unavailable > 0  # 34 experts, 9 RAM slots: the rest came over gRPC
            assert {b.transport for b in blobs} <= {"shm", "grpc"}
        else:
            assert c.bytes_fetched_shm == 0 and {b.transport for b in blobs} == {"grpc"}
        assert {b.tier for b in blobs} <= {"ram", "nvme"}
        deadline = time.monotonic() + 5  # leases are released without waiting for the answer
        while client.store_stats().leases_active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.store_stats().leases_active == 0


@pytest.mark.slow
def test_real_store_sends_a_batch_as_one_reply_the_blobs_view(pack, store):
    keys = [(layer, e, FMT) for layer in (0, 6) for e in range(8)]
    with StoreClient(store, transport="grpc") as client:
        blobs = client.fetch(keys)
        assert client.counters.messages_grpc == 1  # 16 experts, one reply message
        assert all(isinstance(b.data, memoryview) for b in blobs)
        assert len({id(b.data.obj) for b in blobs}) == 1  # all views of that one received message
        assert all(bytes(b.data) == bytes(pack.expert_blob(*b.key)) for b in blobs)
        from gpu_worker.expert_compute import make_expert_compute  # (spends torch's read-only warning)

        message = blobs[0].data.obj
        base = torch.frombuffer(message, dtype=torch.uint8).data_ptr()
        for b in blobs[:3]:  # the CPU int4 build views the received bytes: nothing copied after grpc's receive
            at = torch.frombuffer(b.data, dtype=torch.uint8).data_ptr()
            assert base <= at < base + len(message)
            expert = make_expert_compute(FMT, b.data, pack.args.hidden_size, pack.args.expert_intermediate_size,
                                         "int4_fused")
            assert expert.blob.data_ptr() == at
    with StoreClient(store, transport="grpc", zero_copy=False) as client:
        blobs = client.fetch(keys)
        assert all(type(b.data) is bytes and b.data == bytes(pack.expert_blob(*b.key)) for b in blobs)


@pytest.fixture(scope="module")
def int4_store(pack, tmp_path_factory):
    """A store serving int4 only (so slots are int4-sized), its RAM tier at half the int4 experts."""
    yield from _serve(pack, tmp_path_factory.mktemp("store4"), len(pack.expert_ids) * pack.expert_nbytes(FMT) // 2,
                      "--formats", FMT)


@pytest.mark.slow
def test_resident_experts_need_no_rpc_and_misses_one_batched_request(pack, int4_store):
    layers = sorted({layer for layer, _ in pack.expert_ids})
    deep = [(layers[-1], e, FMT) for e in range(8)]  # the fill is shallow layers first: these are on NVMe
    with StoreClient(int4_store, transport="shm") as client:
        m = client.manifest()
        assert m.shm_segment_name and m.shm_directory_name
        requests = lambda: client.store_stats().fetch_requests  # noqa: E731  # FetchExperts + FetchExpertsShm
        before = requests()
        blobs = client.fetch(deep)  # not resident: one FetchExpertsShm promotes all eight
        assert requests() == before + 1
        assert client.counters.shm_directory_hits == 0 and {b.tier for b in blobs} == {"nvme"}
        before = requests()
        again = client.fetch(deep) + client.fetch(deep[:3], priority="prefetch")  # now resident
        assert requests() == before  # no RPC at all
        assert client.counters.shm_directory_hits == len(again)
        assert all(bytes(b.data) == bytes(pack.expert_blob(*b.key)) for b in blobs + again)
        assert {b.transport for b in again} == {"shm"} and {b.tier for b in again} == {"ram"}


@pytest.mark.slow
def test_shared_memory_blobs_reach_the_build_in_one_copy(pack, int4_store):
    """Out of the store's segment (leased, then through the slot directory) the blob is copied once, into
    immutable bytes, and the CPU int4 build views those bytes rather than copying them again."""
    from gpu_worker.expert_compute import make_expert_compute

    layers = sorted({layer for layer, _ in pack.expert_ids})
    keys = [(layers[-2], e, FMT) for e in range(4)]
    a = pack.args
    with StoreClient(int4_store, transport="shm") as client:
        leased = client.fetch(keys)
        direct = client.fetch(keys)
        assert client.counters.shm_directory_hits == len(keys)
        for b in leased + direct:
            assert b.transport == "shm" and type(b.data) is bytes and b.data == bytes(pack.expert_blob(*b.key))
            expert = make_expert_compute(FMT, b.data, a.hidden_size, a.expert_intermediate_size, "int4_fused")
            assert expert.blob.data_ptr() == torch.frombuffer(b.data, dtype=torch.uint8).data_ptr()


@pytest.mark.slow
def test_a_blob_corrupted_on_disk_is_data_loss_over_grpc_and_the_rest_is_served(pack, tmp_path):
    """The store reads the damaged blob for a batch, refuses it (DATA_LOSS naming it); the client raises
    ChecksumError with that expert's key and never returns its bytes; other batches are served."""
    import shutil

    copy = tmp_path / "pack"
    shutil.copytree(pack.path, copy)
    addr = f"unix:{tmp_path}/s.sock"
    stderr = open(tmp_path / "stderr", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "expert_store", "serve", str(copy), "--listen", addr,
                             "--ram-bytes", "0", "--formats", FMT], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=stderr)
    try:
        with StoreClient(addr, transport="grpc") as client:
            client.wait_ready(30)
            ref = pack.blob_ref(4, 9, FMT)
            with open(copy / "experts.bin", "r+b") as f:  # one byte flipped while the store runs
                f.seek(ref.offset + 333)
                b = f.read(1)
                f.seek(ref.offset + 333)
                f.write(bytes([b[0] ^ 0x21]))
            batch = [(4, e, FMT) for e in range(8, 12)]
            with pytest.raises(ChecksumError, match="layer 4 expert 9") as e:
                client.fetch(batch)
            assert (e.value.layer, e.value.expert, e.value.fmt) == (4, 9, FMT)
            good = [k for k in batch if k[1] != 9]
            assert [bytes(b.data) for b in client.fetch(good)] == [bytes(pack.expert_blob(*k)) for k in good]
            assert client.store_stats().checksum_failures >= 1
    finally:
        proc.terminate()
        proc.wait(10)
        stderr.close()
