"""Security at both servers: TLS over TCP (optionally with client certificates), one bearer token
checked by the edge interceptor, leases bound to a per-client secret and capped, and unix sockets
that are never taken over or unlinked from under a live server."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import grpc
import pytest

from client.api import WorkerClient, WorkerError
from expert_store.config import StoreConfig
from expert_store.edge import AioMetadataInterceptor, CLIENT_SECRET_HEADER, ClientSecurity, ServerSecurity
from expert_store.errors import FateError
from expert_store.server import start_store
from gpu_worker.store_client import StoreClient
from moe.v1 import store_pb2 as pb
from moe.v1 import store_pb2_grpc

from .inproc import InProcessWorker

TIMEOUT_S = 30


def _key(layer: int, expert: int) -> pb.ExpertKey:
    return pb.ExpertKey(layer=layer, expert=expert, format=pb.EXPERT_FORMAT_INT4)


def _tls_creds(tls_files, client_cert: bool = False) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=tls_files["ca"].read_bytes(),
        private_key=tls_files["client_key"].read_bytes() if client_cert else None,
        certificate_chain=tls_files["client_cert"].read_bytes() if client_cert else None)


async def test_store_over_tls_refuses_missing_and_wrong_tokens(tiny_mixtral_pack: Path, tls_files, caplog):
    cfg = StoreConfig(pack=tiny_mixtral_pack, listen="127.0.0.1:0", ram_bytes=1 << 20, formats=("int4",),
                      tls_cert=tls_files["cert"], tls_key=tls_files["key"], auth_token_file=tls_files["token"])
    store = await start_store(cfg)
    try:
        port = int(store.address.rpartition(":")[2])
        async with grpc.aio.secure_channel(f"localhost:{port}", _tls_creds(tls_files)) as ch:
            stub = store_pb2_grpc.ExpertStoreStub(ch)
            for md in ((), (("authorization", "Bearer wrong-token"),), (("authorization", "s3cret-token-for-tests"),)):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.GetManifest(pb.GetManifestRequest(), metadata=md, timeout=TIMEOUT_S)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as e:  # streaming calls too
                async for _ in stub.FetchExperts(pb.FetchExpertsRequest(experts=[_key(0, 0)]), timeout=TIMEOUT_S):
                    pass
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = await stub.GetManifest(pb.GetManifestRequest(), timeout=TIMEOUT_S,
                                        metadata=(("authorization", "Bearer s3cret-token-for-tests"),))
            assert ok.pack_id == store.core.pack_id
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:  # no TLS: no connection at all
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await store_pb2_grpc.ExpertStoreStub(plain).GetManifest(pb.GetManifestRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # the worker's own client: TLS trusting the CA, the token from a file, experts verified
        sec = ClientSecurity.from_files(tls=True, ca=str(tls_files["ca"]), token_file=str(tls_files["token"]))
        client = StoreClient(f"localhost:{port}", transport="grpc", security=sec)
        try:
            blobs = await asyncio.to_thread(client.fetch, [(0, 0, "int4"), (3, 5, "int4")])
            assert [len(b.data) for b in blobs] == [store.core.blob_nbytes["int4"]] * 2
        finally:
            client.close()
    finally:
        await store.stop(0)


async def test_store_with_client_certificates(tiny_mixtral_pack: Path, tls_files):
    cfg = StoreConfig(pack=tiny_mixtral_pack, listen="127.0.0.1:0", ram_bytes=0, formats=("int4",),
                      tls_cert=tls_files["cert"], tls_key=tls_files["key"], tls_client_ca=tls_files["ca"])
    store = await start_store(cfg)
    try:
        port = int(store.address.rpartition(":")[2])
        async with grpc.aio.secure_channel(f"localhost:{port}", _tls_creds(tls_files)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await store_pb2_grpc.ExpertStoreStub(ch).GetManifest(pb.GetManifestRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails without a certificate
        async with grpc.aio.secure_channel(f"localhost:{port}", _tls_creds(tls_files, client_cert=True)) as ch:
            await store_pb2_grpc.ExpertStoreStub(ch).GetManifest(pb.GetManifestRequest(), timeout=TIMEOUT_S)
    finally:
        await store.stop(0)


def test_worker_over_tls_refuses_missing_and_wrong_tokens(tiny_mixtral_pack: Path, tls_files):
    sec = ServerSecurity.from_files(tls_files["cert"], tls_files["key"], None, tls_files["token"])
    worker = InProcessWorker(tiny_mixtral_pack, "127.0.0.1:0", sec, default_max_new_tokens=2)
    try:
        address = f"localhost:{worker.address.rpartition(':')[2]}"
        for token in (None, "wrong-token"):
            with WorkerClient(address, timeout_s=TIMEOUT_S, tls_ca=str(tls_files["ca"]), token=token) as w:
                with pytest.raises(WorkerError) as e:
                    w.generate_text("The command", max_new_tokens=2)
                assert e.value.code == "UNAUTHENTICATED"
                with pytest.raises(WorkerError) as e:
                    w.stats()
                assert e.value.code == "UNAUTHENTICATED"
                assert w.health() == "SERVING"  # health checks need no token
        with WorkerClient(address, timeout_s=TIMEOUT_S, tls_ca=str(tls_files["ca"]),
                          token="s3cret-token-for-tests") as w:
            assert len(w.generate_text("The command", max_new_tokens=2, ignore_eos=True).token_ids) == 2
    finally:
        worker.close()


async def test_tcp_without_tls_warns(tiny_mixtral_pack: Path, caplog):
    caplog.set_level(logging.WARNING, "expert_store.edge")
    store = await start_store(StoreConfig(pack=tiny_mixtral_pack, listen="127.0.0.1:0", ram_bytes=0,
                                          formats=("int4",)))
    await store.stop(0)
    assert "TCP without TLS" in caplog.text and "no auth_token_file" in caplog.text


async def test_leases_belong_to_the_client_secret_and_are_capped(tiny_mixtral_pack: Path, tmp_path: Path):
    store = await start_store(StoreConfig(pack=tiny_mixtral_pack, listen=f"unix:{tmp_path}/s.sock",
                                          ram_bytes=4 << 20, formats=("int4",), max_leases_per_client=3))
    mine = grpc.aio.insecure_channel(store.address,
                                     interceptors=[AioMetadataInterceptor([(CLIENT_SECRET_HEADER, "a" * 32)])])
    theirs = grpc.aio.insecure_channel(store.address,
                                       interceptors=[AioMetadataInterceptor([(CLIENT_SECRET_HEADER, "b" * 32)])])
    bare = grpc.aio.insecure_channel(store.address)
    try:
        me, other = store_pb2_grpc.ExpertStoreStub(mine), store_pb2_grpc.ExpertStoreStub(theirs)
        got = await me.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=[_key(0, 0), _key(0, 1)], client_id="w"))
        ids = [d.lease_id for d in got.descriptors]
        assert len(ids) == 2 and all(i > 2**20 for i in ids)  # random, not 1, 2, 3...
        # the same client id with another secret releases nothing
        r = await other.ReleaseLeases(pb.ReleaseLeasesRequest(client_id="w", all=True))
        assert r.released_count == 0
        r = await other.ReleaseLeases(pb.ReleaseLeasesRequest(client_id="w", lease_ids=ids))
        assert r.released_count == 0 and r.unknown_count == 2
        with pytest.raises(grpc.aio.AioRpcError) as e:  # no secret at all
            await store_pb2_grpc.ExpertStoreStub(bare).ReleaseLeases(pb.ReleaseLeasesRequest(client_id="w", all=True))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as e:  # the cap: 2 held + 2 asked > 3
            await me.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=[_key(0, 2), _key(0, 3)], client_id="w"))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert store.core.ram.leases_active == 2  # the refused request's grant was taken back
        r = await me.ReleaseLeases(pb.ReleaseLeasesRequest(client_id="w", all=True))
        assert r.released_count == 2 and store.core.ram.leases_active == 0
    finally:
        for ch in (mine, theirs, bare):
            await ch.close()
        await store.stop(0)


async def test_too_many_keys_are_refused_before_any_work(tiny_mixtral_pack: Path, tmp_path: Path):
    store = await start_store(StoreConfig(pack=tiny_mixtral_pack, listen=f"unix:{tmp_path}/s.sock", ram_bytes=0,
                                          formats=("int4",), max_keys_per_fetch=64))
    try:
        async with grpc.aio.insecure_channel(store.address) as ch:
            stub = store_pb2_grpc.ExpertStoreStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in stub.FetchExperts(pb.FetchExpertsRequest(experts=[_key(0, 0)] * 65), timeout=TIMEOUT_S):
                    pass
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_keys_per_fetch" in e.value.details()
            huge = pb.FetchExpertsRequest(experts=[_key(1, 1)] * 300_000)  # 2.4 MB: over max_request_bytes
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in stub.FetchExperts(huge, timeout=TIMEOUT_S):
                    pass
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            n = 0
            async for _ in stub.FetchExperts(pb.FetchExpertsRequest(experts=[_key(1, e) for e in range(16)] * 4),
                                             timeout=TIMEOUT_S):
                n += 1
            assert n > 0  # at the cap: served
    finally:
        await store.stop(0)


async def test_a_live_unix_socket_is_never_taken_over(tiny_mixtral_pack: Path, tmp_path: Path):
    path = tmp_path / "s.sock"
    cfg = StoreConfig(pack=tiny_mixtral_pack, listen=f"unix:{path}", ram_bytes=0, formats=("int4",))
    first = await start_store(cfg)
    try:
        with pytest.raises(FateError, match="another process is serving"):
            await start_store(cfg)
        async with grpc.aio.insecure_channel(first.address) as ch:  # the first still serves, its socket is there
            await store_pb2_grpc.ExpertStoreStub(ch).GetManifest(pb.GetManifestRequest(), timeout=TIMEOUT_S)
    finally:
        await first.stop(0)
    assert not path.exists()


async def test_a_stale_socket_is_replaced_and_other_files_are_left_alone(tiny_mixtral_pack: Path, tmp_path: Path):
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))  # bound, never listening, closed: what a killed server leaves
    s.close()
    store = await start_store(StoreConfig(pack=tiny_mixtral_pack, listen=f"unix:{stale}", ram_bytes=0,
                                          formats=("int4",)))
    await store.stop(0)
    regular = tmp_path / "not-a-socket"
    regular.write_text("keep me")
    with pytest.raises(FateError, match="not a socket"):
        await start_store(StoreConfig(pack=tiny_mixtral_pack, listen=f"unix:{regular}", ram_bytes=0,
                                      formats=("int4",)))
    assert regular.read_text() == "keep me"
    with pytest.raises(FateError, match="does not exist"):
        await start_store(StoreConfig(pack=tiny_mixtral_pack, listen=f"unix:{tmp_path}/no/such/dir.sock",
                                      ram_bytes=0, formats=("int4",)))
