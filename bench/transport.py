"""Store -> client transport benchmark: `python -m bench transport [--pack DIR] [--out DIR]`.

Starts `python -m expert_store serve` in a subprocess on a unix socket and moves
every expert of the pack to this process, batch by batch, into preallocated
buffers (what a worker does before it builds tensors), four ways:
  - memcpy: an in-process copy of the same bytes (the ceiling);
  - shm: FetchExpertsShm, copy out of the attached segment, ReleaseLeases
    (two RPCs per batch plus the copy); shm-bg: the same with ReleaseLeases
    sent without waiting for it (off the critical path, as a worker should);
  - grpc ram: FetchExperts (one reply message per batch) from a store whose RAM tier
    holds every blob;
  - grpc nvme: FetchExperts from a store with --ram-bytes 0 (experts.bin in the
    page cache: the read is a pread, not a disk read).
Throughput is bytes of expert blobs per second, median over rounds (a round is
every expert once). Store and client share this machine's cores: on a small
box the numbers include their contention.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc

from client.processes import Service, ServiceError, module_command
from expert_store.edge import CLIENT_SECRET_HEADER, AioMetadataInterceptor
from expert_store.pack import write_pack
from expert_store.packfile import Pack
from expert_store.settings import FORMAT_NAMES
from expert_store.shm import attach_segment
from moe.v1 import store_pb2 as pb
from moe.v1 import store_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
TINY_MIXTRAL = REPO.parent / "shared" / "models" / "tiny-mixtral"
FMT = {f: pb.ExpertFormat.Value(f"EXPERT_FORMAT_{f.upper()}") for f in FORMAT_NAMES}  # the enum spells the names
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


def start_store(pack: Path, sock: Path, ram_bytes: str, formats: str) -> Service:
    cmd = module_command("expert_store", "serve", pack, "--listen", f"unix:{sock}", "--ram-bytes", ram_bytes,
                         "--formats", formats, "--log-level", "warning")
    store = Service("store", cmd, sock.with_suffix(".log"))
    try:
        store.wait_serving(f"unix:{sock}", 120)
    except ServiceError as e:
        store.stop()
        raise SystemExit(f"{e}\n{store.tail()}") from None
    return store


async def rounds(fn: Callable[[], Awaitable[int]], min_rounds: int, seconds: float) -> list[float]:
    """Seconds per round, after one warm-up round."""
    await fn()
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while len(times) < min_rounds or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t0)
    return times


async def bench_format(sock: Path, pack: Pack, fmt: str, batch: int, path: str,
                       args: argparse.Namespace) -> tuple[float, float]:
    """(median GB/s, ms per batch) of moving every `fmt` expert of the pack by `path`."""
    ids = list(pack.expert_ids)
    nbytes = pack.expert_nbytes(fmt)
    total = nbytes * len(ids)
    dest = [memoryview(bytearray(nbytes)) for _ in range(batch)]
    batches = [[pb.ExpertKey(layer=l, expert=e, format=FMT[fmt]) for l, e in ids[i : i + batch]]
               for i in range(0, len(ids), batch)]

    if path == "memcpy":
        src = [bytes(pack.expert_blob(l, e, fmt)) for l, e in ids]

        async def one_round() -> int:
            for i, blob in enumerate(src):
                dest[i % batch][:] = blob
            return total
        times = await rounds(one_round, args.min_rounds, args.seconds)
        return total / statistics.median(times) / 1e9, statistics.median(times) / len(batches) * 1e3

    secret = [(CLIENT_SECRET_HEADER, os.urandom(16).hex())]  # the store's leases are owned by (client id, secret)
    channel = grpc.aio.insecure_channel(f"unix:{sock}", options=CHANNEL_OPTIONS,
                                        interceptors=[AioMetadataInterceptor(secret)])
    stub = store_pb2_grpc.ExpertStoreStub(channel)
    segments: dict[str, Any] = {}
    try:
        if path in ("shm", "shm-bg"):
            async def one_round() -> int:
                releases = []
                for keys in batches:
                    reply = await stub.FetchExpertsShm(pb.FetchExpertsShmRequest(experts=keys, client_id="bench"))
                    if reply.unavailable_indices:
                        raise SystemExit("RAM tier too small for a batch: raise --ram-bytes")
                    for d in reply.descriptors:
                        seg = segments.get(d.segment_name) or segments.setdefault(
                            d.segment_name, attach_segment(d.segment_name))
                        dest[d.index][:] = seg.buf[d.offset_bytes : d.offset_bytes + d.length_bytes]
                    release = stub.ReleaseLeases(pb.ReleaseLeasesRequest(
                        client_id="bench", lease_ids=[d.lease_id for d in reply.descriptors]))
                    if path == "shm":
                        await release
                    else:  # off the critical path: the next fetch does not wait for it
                        releases.append(asyncio.ensure_future(release))
                await asyncio.gather(*releases)
                return total
        else:
            async def one_round() -> int:
                for keys in batches:
                    request = pb.FetchExpertsRequest(experts=keys, max_reply_bytes=args.max_reply_bytes)
                    async for m in stub.FetchExperts(request):
                        payload = memoryview(m.payload)
                        for p in m.index.parts:
                            a, n = p.payload_offset_bytes, p.payload_bytes
                            dest[p.index][p.offset_bytes : p.offset_bytes + n] = payload[a : a + n]
                return total
        times = await rounds(one_round, args.min_rounds, args.seconds)
        return total / statistics.median(times) / 1e9, statistics.median(times) / len(batches) * 1e3
    finally:
        for seg in segments.values():
            seg.close()
        await channel.close()


async def run(args: argparse.Namespace, pack_dir: Path, tmp: Path) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    formats = [f for f in args.formats.split(",") if f]
    with Pack.open(pack_dir) as pack:
        for ram_label, ram_bytes in (("ram", "1GiB"), ("nvme", "0")):
            sock = tmp / f"store-{ram_label}.sock"
            proc = start_store(pack_dir, sock, ram_bytes, ",".join(formats))
            try:
                for fmt in formats:
                    for batch in args.batches:
                        paths = ["memcpy", "shm", "shm-bg", "grpc ram"] if ram_label == "ram" else ["grpc nvme"]
                        for path in paths:
                            gbps, ms = await bench_format(sock, pack, fmt, batch, path.split()[0], args)
                            row = {"format": fmt, "expert_bytes": pack.expert_nbytes(fmt), "batch": batch,
                                   "path": path, "GBps": round(gbps, 3), "ms_per_batch": round(ms, 3)}
                            results.append(row)
                            print(f"{fmt:5} {row['expert_bytes']:>8} B/expert  batch {batch:3}  {path:10} "
                                  f"{gbps:7.2f} GB/s  {ms:7.3f} ms/batch", flush=True)
            finally:
                proc.stop()
    return results


def main(argv: list[str] | None = None, prog: str = "python -m bench transport") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--pack", type=Path, default=None,
                   help="pack to serve (default: tiny-mixtral, packed to a temp dir)")
    p.add_argument("--formats", default="int4,bf16", help="comma-separated expert formats (default: %(default)s)")
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[2, 16],
                   help="experts per fetch, comma-separated (default: 2,16)")
    p.add_argument("--max-reply-bytes", type=int, default=CHANNEL_OPTIONS[0][1],
                   help="largest FetchExperts reply message (default: this client's receive limit, %(default)s)")
    p.add_argument("--seconds", type=float, default=2.0, help="time per measurement (at least --min-rounds rounds)")
    p.add_argument("--min-rounds", type=int, default=5, help="rounds per measurement at least (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="directory for transport.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fate-bench-") as tmp:
        pack_dir = args.pack
        if pack_dir is None:
            pack_dir = write_pack(TINY_MIXTRAL, Path(tmp) / "tiny-mixtral", formats=args.formats.split(","),
                                  progress=False)
        try:  # the worker's front runs on uvloop too
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            loop_factory = None
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            results = runner.run(run(args, pack_dir, Path(tmp)))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                "grpc": grpc.__version__}
        (args.out / "transport.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        print(f"wrote {args.out / 'transport.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
