"""The store server: real servers on unix sockets under tmp_path, in this process and as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest
import torch
import zstandard
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe.v1 import store_pb2 as pb
from moe.v1 import store_pb2_grpc
from expert_store.checksums import blob_checksum, blob_digest
from expert_store import shm
from expert_store.__main__ import main
from expert_store.config import ConfigError, StoreConfig, build_config, load_toml
from expert_store.errors import PackError
from expert_store.pack import align_up, write_pack
from expert_store.packfile import Pack
from expert_store.core import PRIORITY_DEMAND, PRIORITY_PREFETCH, Compression, IoScheduler, WireCompression, zstd_pays
from expert_store.edge import AioMetadataInterceptor
from expert_store.server import CLIENT_SECRET_HEADER, finish_start, start_store
from expert_store.tiers import BlobKey

from .test_tiers import corrupt_copy

REPO = Path(__file__).resolve().parents[2]
FMT = {"bf16": pb.EXPERT_FORMAT_BF16, "int8": pb.EXPERT_FORMAT_INT8, "int4": pb.EXPERT_FORMAT_INT4,
       "int2": pb.EXPERT_FORMAT_INT2}
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]
SECRET = [(CLIENT_SECRET_HEADER, "test-secret-0123456789")]  # leases belong to (client_id, secret)
RPC_TIMEOUT_S = 30


def key(layer: int, expert: int, fmt: str = "int4") -> pb.ExpertKey:
    return pb.ExpertKey(layer=layer, expert=expert, format=FMT[fmt])


def blob(pack: Pack, k: pb.ExpertKey) -> bytes:
    fmt = {v: f for f, v in FMT.items()}[k.format]
    return bytes(pack.expert_blob(k.layer, k.expert, fmt))


def int4_slot_bytes(pack_dir: Path) -> int:
    with Pack.open(pack_dir) as pack:
        return align_up(pack.expert_nbytes("int4"))


@contextlib.asynccontextmanager
async def running_store(pack: Path, tmp_path: Path, **kw) -> AsyncIterator[tuple]:
    """(RunningStore, ExpertStore stub, channel) of a store in this event loop."""
    store = await start_store(StoreConfig(pack=pack, listen=f"unix:{tmp_path}/store.sock", **kw))
    channel = grpc.aio.insecure_channel(store.address, options=CHANNEL_OPTIONS,
                                        interceptors=[AioMetadataInterceptor(SECRET)])
    try:
        yield store, store_pb2_grpc.ExpertStoreStub(channel), channel
    finally:
        await channel.close()
        await store.stop(0)


async def fetch(stub, keys, **kw) -> tuple[dict[int, bytes], list[pb.ExpertPart], list[pb.ExpertBlobs]]:
    """Blobs by request index (decoded, checked against their checksums), every part, and the reply messages."""
    blobs: dict[int, bytearray] = {}
    parts, messages = [], []
    async for m in stub.FetchExperts(pb.FetchExpertsRequest(experts=keys, **kw), timeout=RPC_TIMEOUT_S):
        messages.append(m)
        for p in m.index.parts:
            data = m.payload[p.payload_offset_bytes : p.payload_offset_bytes + p.payload_bytes]
            assert p.payload_offset_bytes % 64 == 0  # aligned for views
            if p.compression == pb.COMPRESSION_ZSTD:
                data = zstandard.ZstdDecompressor().decompress(data)
            assert len(data) == p.uncompressed_bytes
            buf = blobs.setdefault(p.index, bytearray())
            assert p.offset_bytes == len(buf)  # in order, consecutive
            buf.extend(data)
            if p.last:
                assert len(buf) == p.total_bytes and p.checksum == blob_checksum(blob_digest(buf))
            parts.append(p)
    return {i: bytes(b) for i, b in blobs.items()}, parts, messages


def tier_stats(stats: pb.StoreStats) -> dict[int, pb.StoreTierStats]:
    return {t.tier: t for t in stats.tiers}


# -- RPCs, in this process ---------------------------------------------------------------------


async def test_manifest_describes_the_pack(tiny_mixtral_pack: Path, tmp_path: Path):
    async with running_store(tiny_mixtral_pack, tmp_path, ram_bytes=4 << 20) as (store, stub, channel):
        m = await stub.GetManifest(pb.GetManifestRequest())
        with Pack.open(tiny_mixtral_pack) as pack:
            raw = (tiny_mixtral_pack / "manifest.json").read_bytes()
            assert m.pack_id == hashlib.sha256(raw).hexdigest() and m.manifest_json == raw
            assert m.pack_format_version == pack.manifest["format_version"] and m.family == "mixtral"
            assert json.loads(m.model_args_json) == pack.args.to_dict()
            assert (m.num_moe_layers, m.num_experts, m.top_k) == (8, 16, 2)
            want = {FMT[f]: pack.expert_nbytes(f) for f in pack.formats}
            assert {f.format: f.expert_bytes for f in m.formats} == want
            assert {f.format: f.group_size for f in m.formats}[FMT["int4"]] == 64
            assert m.dense_bytes == sum(t.numel() * t.element_size() for t in pack.dense_tensors().values())
            assert list(m.tokenizer_files) == pack.manifest["tokenizer_files"]
        assert m.shm_enabled and m.shm_host_id == shm.host_id()
        assert m.ram_tier_bytes == store.core.ram.capacity_bytes > 0 and m.max_chunk_bytes == 4 << 20
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "moe.v1.ExpertStore"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_fetch_returns_the_pack_bytes(tiny_mixtral_pack: Path, tmp_path: Path):
    async with running_store(tiny_mixtral_pack, tmp_path, ram_bytes=4 << 20) as (store, stub, _):
        keys = [key(0, 0), key(0, 1, "bf16"), key(7, 15, "int2"), key(3, 9, "int8"), key(0, 0), key(5, 2, "bf16")]
        blobs, parts, messages = await fetch(stub, keys)
        with Pack.open(tiny_mixtral_pack) as pack:
            assert sorted(blobs) == list(range(len(keys)))
            for i, k in enumerate(keys):
                assert blobs[i] == blob(pack, k), i
        assert len(messages) == 1 and all(p.offset_bytes == 0 and p.last for p in parts)  # one reply, all whole
        ram = [p.index for p in parts if p.tier == pb.STORE_TIER_RAM]
        assert ram and [p.index for p in parts][: len(ram)] == ram  # RAM-tier hits come first
        stats = await stub.GetStats(pb.GetStoreStatsRequest())
        assert stats.experts_served_grpc == len(keys) and stats.fetch_requests == 1
        assert stats.bytes_served_grpc == stats.bytes_sent_wire == sum(map(len, blobs.values()))


async def test_a_batch_larger_than_the_clients_limit_comes_in_several_messages(tiny_mixtral_pack: Path,
                                                                            tmp_path: Path):
    async with running_store(tiny_mixtral_pack, tmp_path, ram_bytes=4 << 20) as (store, stub, _):
        keys = [key(0, 0), key(0, 1, "bf16"), key(0, 2), key(0, 3), key(7, 15, "int2")]
        limit = 64 << 10
        blobs, parts, messages = await fetch(stub, keys, max_reply_bytes=limit)
        with Pack.open(tiny_mixtral_pack) as pack:
            assert all(blobs[i] == blob(pack, k) for i, k in enumerate(keys))
            int4, bf16 = pack.expert_nbytes("int4"), pack.expert_nbytes("bf16")
        assert all(m.ByteSize() <= limit for m in messages)
        assert len(messages) > 1 and any(not p.last for p in parts)  # experts larger than a message: in parts
        assert len([p for p in parts if p.index == 1]) >= -(-bf16 // limit) and int4 > limit
        whole = await fetch(stub, [key(0, 0), key(0, 2), key(0, 3)], max_reply_bytes=2 * int4 + 1024)
        assert len(whole[2]) == 2 and all(p.last and p.offset_bytes == 0 for p in whole[1])  # 2 + 1, whole
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await fetch(stub, keys, max_reply_bytes=1024)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at least" in e.value.details()


def test_reply_plan_keeps_experts_whole_and_messages_under_the_limit():
    from expert_store.grpc_fetch import InvalidFetch, max_payload_bytes, plan_messages

    limit = 64 << 10
    room = max_payload_bytes(limit)
    sizes = [30_000, 30_000, 30_000, 5_000, 3 * room + 7, 100]
    messages = plan_messages(sizes, limit)
    flat = [part for m in messages for part in m]
    assert [j for j, _, _ in flat] == sorted(j for j, _, _ in flat)  # experts in order, parts in order
    for j, n in enumerate(sizes):
        pieces = [(start, length) for k, start, length in flat if k == j]
        assert sum(length for _, length in pieces) == n and pieces[0][0] == 0
        assert all(a + la == b for (a, la), (b, _) in zip(pieces, pieces[1:]))  # consecutive
        assert len(pieces) == (1 if n <= room else -(-n // room))  # split only when larger than a message
    assert messages[0] == [(0, 0, 30_000), (1, 0, 30_000)]  # two fit, the third starts a message
    assert all(sum(length + 192 for _, _, length in m) + 256 <= limit for m in messages)
    with pytest.raises(InvalidFetch, match="at least"):
        plan_messages(sizes, 1024)


async def test_dense_and_tokenizer_files_stream_whole(tiny_mixtral_pack: Path, tmp_path: Path):
    async with running_store(tiny_mixtral_pack, tmp_path, ram_bytes=0) as (store, stub, _):
        got: dict[str, bytearray] = {}
        headers = {}
        async for c in stub.StreamDense(pb.StreamDenseRequest(chunk_bytes=256 << 10)):
            if c.HasField("header"):
                headers[c.name] = c.header
                got[c.name] = bytearray()
            assert c.chunk.offset_bytes == len(got[c.name])
            got[c.name].extend(c.chunk.data)
        with Pack.open(tiny_mixtral_pack) as pack:
            dense = pack.dense_tensors()
        assert set(got) == set(dense)
        for name, t in dense.items():
            raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            assert bytes(got[name]) == raw, name
            h = headers[name]
            assert list(h.shape) == list(t.shape) and h.total_bytes == len(raw)
            assert h.checksum == f"crc32:{zlib.crc32(raw):08x}"
        one = [c async for c in stub.StreamDense(pb.StreamDenseRequest(names=["model.norm.weight"]))]
        assert [c.name for c in one] == ["model.norm.weight"] and one[-1].last
        files: dict[str, bytearray] = {}
        async for c in stub.StreamFiles(pb.StreamFilesRequest(chunk_bytes=64 << 10)):
            files.setdefault(c.name, bytearray()).extend(c.chunk.data)
        assert set(files) == {"tokenizer.json", "tokenizer_config.json"}
        assert bytes(files["tokenizer.json"]) == (tiny_mixtral_pack / "tokenizer.json").read_bytes()
        stats = await stub.GetStats(pb.GetStoreStatsRequest())
        assert stats.dense_bytes_served == sum(len(v) for v in got.values()) + len(got["model.norm.weight"])


async def test_a_cancelled_stream_unpins_its_slots(tiny_mixtral_pack: Path, tmp_path: Path):
    async with running_store(tiny_mixtral_pack, tmp_path, ram_bytes=4 << 20, formats=("int4",)) as (
            store, stub, _):
        call = stub.FetchExperts(pb.FetchExpertsRequest(experts=[key(0, e) for e in range(8)],
                                                        max_reply_bytes=16 << 10))
        await call.read()
        call.cancel()
        deadline = time.monotonic() + 20
        while any(slot.pins for slot in store.core.ram.slots):
            assert time.monotonic() < deadline, "a cancelled stream left RAM slots pinned"
            await asyncio.sleep(0.02)
        blobs, _, _ = await fetch(stub, [key(0, 0)])
        assert len(blobs) == 1


async def test_demand_reads_outrank_queued_prefetches():
    io = IoScheduler(threads=1)
    gate, order = threading.Event(), []
    try:
        blocker = asyncio.ensure_future(io.run(PRIORITY_DEMAND, gate.wait))  # holds the only thread until set
        await asyncio.sleep(0)
        prefetch = asyncio.ensure_future(io.run(PRIORITY_PREFETCH, order.append, "prefetch"))
        demand = asyncio.ensure_future(io.run(PRIORITY_DEMAND, order.append, "demand"))
        await asyncio.sleep(0)
        gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, prefetch, demand), 20)
        assert order == ["demand", "prefetch"]
    finally:
        gate.set()
        await io.close()


# -- compression ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compressible_pack(tiny_mixtral_dir: Path, tmp_path_factory) -> Path:
    """tiny-mixtral with layer 0's experts all zero (compressible), other layers as trained (not)."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path_factory.mktemp("ckpt") / "zero-layer0"
    ckpt.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_mixtral_dir / name, ckpt / name)
    tensors = load_file(tiny_mixtral_dir / "model.safetensors")
    for name, t in tensors.items():
        if name.startswith("model.layers.0.") and ".experts." in name:
            tensors[name] = torch.zeros_like(t)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    return write_pack(ckpt, tmp_path_factory.mktemp("packs") / "zero-layer0", formats=("int4",), progress=False)


def test_zstd_pays_only_below_nine_tenths():
    assert zstd_pays(1000, 899) and not zstd_pays(1000, 900) and not zstd_pays(1000, 1200)
    assert zstd_pays(1000, 799, min_saving=0.2) and not zstd_pays(1000, 850, min_saving=0.2)
    wire = WireCompression(level=1, min_saving=0.1)
    data, compression = wire.encode(bytes(100_000))
    assert compression == Compression.ZSTD and zstandard.ZstdDecompressor().decompress(data) == bytes(100_000)
    noise = os.urandom(100_000)
    assert wire.encode(noise) == (noise, Compression.NONE)
    assert wire.should_try("blob")
    wire.record("blob", paid=False)
    assert not wire.should_try("blob")  # not retried
    assert not WireCompression(level=0, min_saving=0.1).should_try("other")


async def test_zstd_on_the_wire_when_it_pays(compressible_pack: Path, tmp_path: Path):
    async with running_store(compressible_pack, tmp_path, ram_bytes=0) as (store, stub, _):
        keys = [key(0, 0), key(0, 1), key(1, 0), key(1, 1)]
        blobs, parts, _ = await fetch(stub, keys, compression=pb.COMPRESSION_ZSTD, max_reply_bytes=32 << 10)
        with Pack.open(compressible_pack) as pack:
            assert all(blobs[i] == blob(pack, k) for i, k in enumerate(keys))
        by_layer = {layer: {p.compression for p in parts if p.key.layer == layer} for layer in (0, 1)}
        assert by_layer == {0: {pb.COMPRESSION_ZSTD}, 1: {pb.COMPRESSION_NONE}}
        assert not store.core.wire.should_try(BlobKey(1, 0, "int4"))  # incompressible: never tried again
        assert store.core.wire.should_try(BlobKey(0, 0, "int4"))
        stats = await stub.GetStats(pb.GetStoreStatsRequest())
        assert stats.bytes_sent_wire < stats.bytes_served_grpc - sum(len(blobs[i]) for i in (0, 1)) * 0.5
        # without asking for zstd nothing is compressed
        _, plain, _ = await fetch(stub, keys[:1])
        assert {p.compression for p in plain} == {pb.COMPRESSION_NONE}


# -- shared memory --------------------------------------------------------------------------------------


async def test_shm_descriptors_point_at_the_bytes(tiny_mixtral_pack: Path, tmp_path: Path):
    async with running_store(tiny_mixtral_pack, tmp_path, ram_bytes=8 << 20) as (store, stub, _):
        keys = [key(0, 0), key(6, 3), key(7, 9, "bf16"), key(2, 2, "int2")]
        reply = await stub.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=keys, client_id="w1"))
        assert not reply.unavailable_indices and [d.index for d in reply.descriptors] == [0, 1, 2, 3]
        tiers = [d.tier for d in reply.descriptors]
        assert tiers[0] == pb.STORE_TIER_RAM and tiers[1] == pb.STORE_TIER_NVME  # 0:0 int4 filled at start
        segment = shm.attach_segment(reply.descriptors[0].segment_name)
        try:
            with Pack.open(tiny_mixtral_pack) as pack:
                for d, k in zip(reply.descriptors, keys):
                    assert d.segment_bytes == segment.size and d.lease_ttl_ms == 30_000 and d.generation >= 1
                    got = bytes(segment.buf[d.offset_bytes : d.offset_bytes + d.length_bytes])
                    assert got == blob(pack, k) and d.checksum == blob_checksum(blob_digest(got))
        finally:
            segment.close()
        stats = await stub.GetStats(pb.GetStoreStatsRequest())
        assert stats.leases_active == 4 and stats.experts_served_shm == 4 and stats.promotions == 3
        released = await stub.ReleaseLeases(pb.ReleaseLeasesRequest(
            client_id="w1", lease_ids=[reply.descriptors[0].lease_id, 999_999]))
        assert (released.released_count, released.unknown_count) == (1, 1)
        released = await stub.ReleaseLeases(pb.ReleaseLeasesRequest(client_id="w1", all=True))
        assert released.released_count == 3
        assert (await stub.GetStats(pb.GetStoreStatsRequest())).leases_active == 0


async def test_leases_block_eviction_and_release_frees(tiny_mixtral_pack: Path, tmp_path: Path):
    slot = int4_slot_bytes(tiny_mixtral_pack)
    async with running_store(tiny_mixtral_pack, tmp_path, ram_bytes=2 * slot, formats=("int4",),
                             promote_on_grpc_miss=False) as (store, stub, _):
        first = await stub.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=[key(4, 5), key(4, 6)], client_id="w"))
        assert len(first.descriptors) == 2 and not first.unavailable_indices
        assert {d.generation for d in first.descriptors} == {2}  # each slot's second tenant (after the fill)
        third = await stub.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=[key(4, 7)], client_id="w"))
        assert list(third.unavailable_indices) == [0] and not third.descriptors
        again = await stub.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=[key(4, 5)], client_id="other"))
        assert again.descriptors[0].tier == pb.STORE_TIER_RAM  # resident: a second lease on the same slot
        blobs, _, _ = await fetch(stub, [key(4, 7)])  # the gRPC path still serves it, from NVMe
        assert len(blobs[0]) > 0
        await stub.ReleaseLeases(pb.ReleaseLeasesRequest(client_id="w", lease_ids=[first.descriptors[1].lease_id]))
        fourth = await stub.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=[key(4, 7)], client_id="w"))
        d = fourth.descriptors[0]
        assert not fourth.unavailable_indices and d.offset_bytes == first.descriptors[1].offset_bytes
        assert d.generation == 3  # the slot's new tenant
        stats = await stub.GetStats(pb.GetStoreStatsRequest())
        assert stats.evictions == 3 and stats.leases_active == 3 and stats.leases_granted == 4


async def test_concurrent_requests_share_promotions_and_leave_no_pins(tiny_mixtral_pack: Path, tmp_path: Path):
    slot = int4_slot_bytes(tiny_mixtral_pack)
    async with running_store(tiny_mixtral_pack, tmp_path, ram_bytes=6 * slot, formats=("int4",)) as (
            store, stub, _):
        same = await asyncio.gather(*(
            stub.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=[key(7, 7)], client_id=f"c{i}")) for i in range(6)))
        assert len({(r.descriptors[0].offset_bytes, r.descriptors[0].generation) for r in same}) == 1
        assert (await stub.GetStats(pb.GetStoreStatsRequest())).promotions == 1  # one copy for six requests
        for i in range(6):
            await stub.ReleaseLeases(pb.ReleaseLeasesRequest(client_id=f"c{i}", all=True))
        segment = shm.attach_segment(same[0].descriptors[0].segment_name)

        async def shm_client(i: int) -> None:
            for round_ in range(4):
                keys = [key((i + round_) % 8, (i * 3 + j) % 16) for j in range(2)]
                reply = await stub.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=keys, client_id=f"s{i}"))
                for d in reply.descriptors:  # while leased, the bytes are the expert's
                    got = segment.buf[d.offset_bytes : d.offset_bytes + d.length_bytes]
                    assert blob_checksum(blob_digest(got)) == d.checksum
                    del got
                await stub.ReleaseLeases(pb.ReleaseLeasesRequest(client_id=f"s{i}", all=True))

        async def grpc_client(i: int) -> None:
            await fetch(stub, [key(layer, i) for layer in range(8)], max_reply_bytes=16 << 10)
            await stub.Prefetch(pb.PrefetchRequest(experts=[key(i % 8, 15 - i)]))

        try:
            await asyncio.wait_for(asyncio.gather(*(shm_client(i) for i in range(4)),
                                                  *(grpc_client(i) for i in range(4))), 60)
        finally:
            segment.close()
        stats = await stub.GetStats(pb.GetStoreStatsRequest())
        assert stats.leases_active == 0 and stats.experts_served_grpc == 32
        deadline = time.monotonic() + 20
        while any(s.pins for s in store.core.ram.slots) or store.core._promotions:  # background promotions end
            assert time.monotonic() < deadline, "slots still pinned after every request ended"
            await asyncio.sleep(0.02)
        assert store.core.ram.resident_count <= 6


async def test_both_tiers_serve_at_a_quarter_of_the_experts(tiny_mixtral_pack: Path, tmp_path: Path):
    slot = int4_slot_bytes(tiny_mixtral_pack)
    n = 8 * 16
    async with running_store(tiny_mixtral_pack, tmp_path, ram_bytes=n // 4 * slot, formats=("int4",)) as (
            store, stub, _):
        keys = [key(layer, e) for layer in range(8) for e in range(16)]
        blobs, chunks, _ = await fetch(stub, keys)
        assert len(blobs) == n
        served = {pb.STORE_TIER_RAM: 0, pb.STORE_TIER_NVME: 0}
        for c in chunks:
            if c.last:
                served[c.tier] += 1
        assert served == {pb.STORE_TIER_RAM: n // 4, pb.STORE_TIER_NVME: n - n // 4}
        tiers = tier_stats(await stub.GetStats(pb.GetStoreStatsRequest()))
        assert tiers[pb.STORE_TIER_RAM].hits == n // 4 and tiers[pb.STORE_TIER_NVME].hits == n - n // 4
        assert tiers[pb.STORE_TIER_RAM].capacity_bytes == n // 4 * slot
        assert tiers[pb.STORE_TIER_NVME].bytes_read >= (n - n // 4) * len(blobs[0])


async def test_ram_zero_serves_from_nvme_only(tiny_mixtral_pack: Path, tmp_path: Path):
    async with running_store(tiny_mixtral_pack, tmp_path, ram_bytes=0) as (store, stub, _):
        m = await stub.GetManifest(pb.GetManifestRequest())
        assert not m.shm_enabled and m.ram_tier_bytes == 0
        reply = await stub.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=[key(0, 0), key(1, 1)], client_id="w"))
        assert list(reply.unavailable_indices) == [0, 1] and not reply.descriptors
        hint = await stub.Prefetch(pb.PrefetchRequest(experts=[key(0, 0)]))
        assert (hint.accepted_count, hint.dropped_count) == (0, 1)
        _, chunks, _ = await fetch(stub, [key(0, 0)])
        assert {c.tier for c in chunks} == {pb.STORE_TIER_NVME}
        assert shm.segments_of(os.getpid()) == []


async def test_prefetch_promotes_in_the_background(tiny_mixtral_pack: Path, tmp_path: Path):
    slot = int4_slot_bytes(tiny_mixtral_pack)
    async with running_store(tiny_mixtral_pack, tmp_path, ram_bytes=4 * slot, formats=("int4",)) as (
            store, stub, _):
        hint = await stub.Prefetch(pb.PrefetchRequest(experts=[key(6, 1), key(6, 2), key(0, 0)], client_id="w"))
        assert (hint.accepted_count, hint.already_resident_count, hint.dropped_count) == (2, 1, 0)
        deadline = time.monotonic() + 20
        while (await stub.GetStats(pb.GetStoreStatsRequest())).prefetch_promotions < 2:
            assert time.monotonic() < deadline, "prefetched experts never reached the RAM tier"
            await asyncio.sleep(0.02)
        reply = await stub.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=[key(6, 1), key(6, 2)], client_id="w"))
        assert [d.tier for d in reply.descriptors] == [pb.STORE_TIER_RAM] * 2
        stats = await stub.GetStats(pb.GetStoreStatsRequest())
        assert stats.prefetch_hints == 3 and stats.promotions == 2


# -- errors ------------------------------------------------------------------------------------------------


async def test_bad_input_is_invalid_argument_and_the_store_keeps_serving(tiny_mixtral_pack: Path, tmp_path: Path):
    async with running_store(tiny_mixtral_pack, tmp_path, ram_bytes=4 << 20, formats=("int4", "int2")) as (
            store, stub, _):
        bad_fetches = {
            "format EXPERT_FORMAT_UNSPECIFIED": [pb.ExpertKey(layer=0, expert=0)],
            "layer 8 is not an MoE layer": [key(0, 0), key(8, 0)],
            "expert 16 does not exist": [key(0, 16)],
            "format bf16 is not served": [key(0, 0, "bf16")],
            "no experts": [],
        }
        for why, keys in bad_fetches.items():
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await fetch(stub, keys)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in e.value.details(), why
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=keys, client_id="w"))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in e.value.details(), why
        calls = [
            stub.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=[key(0, 0)])),  # no client_id
            stub.ReleaseLeases(pb.ReleaseLeasesRequest(client_id="w")),  # nothing to release
            stub.Prefetch(pb.PrefetchRequest(experts=[key(99, 0)])),
            stub.StreamDense(pb.StreamDenseRequest(names=["no.such.tensor"])).read(),
            stub.StreamFiles(pb.StreamFilesRequest(names=["../manifest.json"])).read(),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        blobs, _, _ = await fetch(stub, [key(0, 0)])  # still serving
        assert len(blobs[0]) == store.core.blob_nbytes["int4"]


async def test_a_corrupt_blob_is_data_loss_never_bytes(tiny_mixtral_pack: Path, tmp_path: Path):
    bad = corrupt_copy(tiny_mixtral_pack, tmp_path / "bad", 5, 3, "int4")
    before = shm.segments_of(os.getpid())
    with pytest.raises(PackError, match="1 corrupt expert blob"):  # verified at start-up: refuses to start
        await start_store(StoreConfig(pack=bad, listen=f"unix:{tmp_path}/a.sock", ram_bytes=1 << 20))
    assert shm.segments_of(os.getpid()) == before
    async with running_store(bad, tmp_path, ram_bytes=1 << 20, verify_on_start=False, formats=("int4",)) as (
            store, stub, _):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await fetch(stub, [key(5, 3)])
        assert e.value.code() == grpc.StatusCode.DATA_LOSS and "layer 5 expert 3 int4" in e.value.details()
        assert str(tmp_path) not in e.value.details()  # no file paths to clients
        # shared memory: the good expert is leased, the corrupt one is left to gRPC (where it is DATA_LOSS)
        reply = await stub.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=[key(5, 4), key(5, 3)], client_id="w"))
        assert [d.index for d in reply.descriptors] == [0] and list(reply.unavailable_indices) == [1]
        stats = await stub.GetStats(pb.GetStoreStatsRequest())
        assert stats.checksum_failures == 2 and stats.leases_active == 1
        blobs, _, _ = await fetch(stub, [key(5, 4)])
        assert len(blobs) == 1


async def test_health_is_not_serving_until_started(tiny_mixtral_pack: Path, tmp_path: Path):
    store = await start_store(StoreConfig(pack=tiny_mixtral_pack, listen=f"unix:{tmp_path}/s.sock", ram_bytes=0),
                              wait_ready=False)
    channel = grpc.aio.insecure_channel(store.address)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="moe.v1.ExpertStore"))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await store_pb2_grpc.ExpertStoreStub(channel).GetManifest(pb.GetManifestRequest())
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        await finish_start(store)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await channel.close()
        await store.stop(0)


# -- configuration -------------------------------------------------------------------------------------------


def test_toml_fills_the_config_and_flags_override(tmp_path: Path):
    toml = tmp_path / "deploy.toml"
    toml.write_text(
        '[store]\npack = "packs/tm"\nlisten = "unix:/run/fate/store.sock"\nram_bytes = "64MiB"\n'
        'formats = ["int4", "int2"]\ncold = true\n\n[worker]\nbudget_bytes = 1\n'
    )
    cfg = build_config(toml, {"ram_bytes": 1 << 20})
    assert cfg.pack == tmp_path / "packs/tm"  # relative to the file
    assert cfg.listen == "unix:/run/fate/store.sock" and cfg.ram_bytes == 1 << 20 and cfg.formats == ("int4", "int2")
    assert cfg.cold and cfg.lease_ttl_ms == 30_000
    flat = tmp_path / "store.toml"
    flat.write_text('pack = "/p"\nram_bytes = 0\nram_byte = 1\nlisten2 = "x"\n')
    with pytest.raises(ConfigError, match="unknown key.*listen2, ram_byte"):
        load_toml(flat)
    flat.write_text('pack = "/p"\nram_bytes = "lots"\n')
    with pytest.raises(ConfigError, match="ram_bytes"):
        load_toml(flat)
    with pytest.raises(ConfigError, match="listen"):
        StoreConfig(pack=Path("/p"), listen="nowhere")


def test_serve_cli_reports_config_errors(tmp_path: Path, capsys):
    bad = tmp_path / "store.toml"
    bad.write_text('pack = "/nonexistent"\nram_gigs = 3\n')
    assert main(["serve", "--config", str(bad)]) == 2
    assert "unknown key(s) ram_gigs" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing-pack"), "--listen", f"unix:{tmp_path}/x.sock"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_sd_notify_reaches_path_and_abstract_sockets(tmp_path: Path, monkeypatch):
    from expert_store import sdnotify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.ready()  # not under systemd: a no-op
    for address, bind_to in ((str(tmp_path / "n.sock"), str(tmp_path / "n.sock")),
                             (f"@fate-moe-test-{os.getpid()}", f"\0fate-moe-test-{os.getpid()}")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(bind_to)
            sock.settimeout(10)
            monkeypatch.setenv("NOTIFY_SOCKET", address)
            assert sdnotify.ready("serving") and sdnotify.stopping()
            assert sock.recv(4096) == b"READY=1\nSTATUS=serving" and sock.recv(4096) == b"STOPPING=1"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not sdnotify.status("x")  # logged, never raised


def test_watchdog_pings_at_most_every_third_of_its_interval(tmp_path: Path, monkeypatch):
    from expert_store import sdnotify

    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert not sdnotify.Watchdog().enabled  # no WatchdogSec=: no pings
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert not sdnotify.Watchdog().enabled
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "n.sock"))
        sock.settimeout(0.5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n.sock"))
        dog = sdnotify.Watchdog()
        assert dog.enabled and dog.interval_s == 30.0
        for _ in range(100):  # a busy loop calls it every turn: one datagram per 10 s
            dog.ping()
        assert sock.recv(64) == b"WATCHDOG=1"
        with pytest.raises(TimeoutError):
            sock.recv(64)


# -- the process -----------------------------------------------------------------------------------------------


def _recv_until(sock: socket.socket, want: str, seen: list[str]) -> None:
    while not any(want in m.split("\n") for m in seen):
        seen.append(sock.recv(4096).decode())  # socket timeout bounds the wait


@pytest.mark.slow
def test_serve_process_lifecycle(tiny_mixtral_pack: Path, tmp_path: Path):
    """`python -m expert_store serve`: READY=1, SERVING, shm fetch; SIGTERM drains a stream, STOPPING=1, exit 0,
    no segment left."""
    notify_path = tmp_path / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(90)  # a cold start imports torch; a busy 2-core box is slow
    sock = tmp_path / "store.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(notify_path)}
    cmd = [sys.executable, "-m", "expert_store", "serve", str(tiny_mixtral_pack), "--listen", f"unix:{sock}",
           "--ram-bytes", "4MiB", "--formats", "int4,int2", "--grace-s", "20"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        _recv_until(notify, "READY=1", seen)
        channel = grpc.insecure_channel(f"unix:{sock}", options=CHANNEL_OPTIONS)
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="moe.v1.ExpertStore"),
                                                         timeout=RPC_TIMEOUT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = store_pb2_grpc.ExpertStoreStub(channel)
        keys = [key(layer, e) for layer in range(8) for e in range(16)]
        leased = stub.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=keys[:3], client_id="t"), timeout=RPC_TIMEOUT_S,
                                      metadata=SECRET)
        segment = shm.attach_segment(leased.descriptors[0].segment_name)
        with Pack.open(tiny_mixtral_pack) as pack:
            for d, k in zip(leased.descriptors, keys):
                assert bytes(segment.buf[d.offset_bytes : d.offset_bytes + d.length_bytes]) == blob(pack, k)
            segment.close()
            # a stream in flight when SIGTERM arrives finishes whole
            stream = stub.FetchExperts(pb.FetchExpertsRequest(experts=keys, max_reply_bytes=16 << 10),
                                       timeout=RPC_TIMEOUT_S)
            got: dict[int, bytearray] = {}

            def take(m: pb.ExpertBlobs) -> None:
                for p in m.index.parts:
                    got.setdefault(p.index, bytearray()).extend(
                        m.payload[p.payload_offset_bytes : p.payload_offset_bytes + p.payload_bytes])
            take(next(stream))
            proc.send_signal(signal.SIGTERM)
            for m in stream:
                take(m)
            assert all(bytes(got[i]) == blob(pack, k) for i, k in enumerate(keys))
        _recv_until(notify, "STOPPING=1", seen)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert "ready: listening on unix:" in out and "stopped" in out
    assert shm.segments_of(proc.pid) == [], "the store left its shared-memory segment behind"
    assert not sock.exists()


async def test_a_byte_flipped_on_disk_while_serving_is_caught_on_its_way_into_ram(tiny_mixtral_pack: Path,
                                                                                 tmp_path: Path, caplog):
    """Verified at start-up, then damaged: the next promotion from disk checks it again (counter + log),
    that expert alone is refused (shm: left to gRPC, which answers DATA_LOSS naming it), the rest served."""
    import shutil

    pack_dir = tmp_path / "pack"
    shutil.copytree(tiny_mixtral_pack, pack_dir)
    slot = int4_slot_bytes(pack_dir)
    async with running_store(pack_dir, tmp_path, ram_bytes=16 * slot, formats=("int4",)) as (store, stub, _):
        assert not store.core.ram.resident(BlobKey(6, 2, "int4"))  # layer 0 fills the 16 slots
        with Pack.open(pack_dir) as pack:
            ref = pack.blob_ref(6, 2, "int4")
        with open(pack_dir / "experts.bin", "r+b") as f:
            f.seek(ref.offset + 7)
            b = f.read(1)
            f.seek(ref.offset + 7)
            f.write(bytes([b[0] ^ 0x01]))
        reply = await stub.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=[key(6, 1), key(6, 2)], client_id="w"))
        assert [d.index for d in reply.descriptors] == [0] and list(reply.unavailable_indices) == [1]
        assert not store.core.ram.resident(BlobKey(6, 2, "int4"))
        call = stub.FetchExperts(pb.FetchExpertsRequest(experts=[key(6, 2)]), timeout=RPC_TIMEOUT_S)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in call:
                pass
        assert e.value.code() == grpc.StatusCode.DATA_LOSS and "layer 6 expert 2 int4" in e.value.details()
        assert dict(e.value.trailing_metadata())["x-fate-corrupt-expert"] == "6:2:int4"
        stats = await stub.GetStats(pb.GetStoreStatsRequest())
        assert stats.checksum_failures == 2
        assert caplog.text.count("corrupt blob in") == 2
        blobs, _, _ = await fetch(stub, [key(6, 1), key(6, 3)])  # the others are served
        assert len(blobs) == 2
