"""Gateway overhead: `python -m bench.gateway [--pack DIR] [--concurrency 8] [--rounds 3] [--out FILE]`.

Starts a store, one worker and the gateway (all on this machine; the worker and store on unix
sockets, the gateway on a loopback TCP port), then sends `concurrency` greedy requests at once,
`max_tokens` each (ignore_eos, so every request is the same length), two ways, rounds interleaved
(direct, gateway, direct, gateway, ...):
  - direct: the gRPC client library (client.api.AsyncWorkerClient) streaming Generate;
  - gateway: streamed POST /v1/completions over HTTP (httpx), the same prompts.
Prints, per way: requests/s (requests / wall time of the burst, median over rounds), time to first
token (client side: request sent -> first text, median and p90 over all requests) and tokens/s.
The processes share this machine's cores, so on a small box the figures include their contention.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_MIXTRAL = Path(os.environ.get("FATE_SHARED_DIR", REPO.parent / "shared")) / "models" / "tiny-mixtral"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO)


def _wait(cond, proc: subprocess.Popen, what: str, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)


def _serving(address: str) -> bool:
    from client.api import WorkerClient, WorkerError

    try:
        with WorkerClient(address) as w:
            return w.health() == "SERVING"
    except WorkerError:
        return False


def _http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


async def _direct(address: str, prompts: list[str], max_tokens: int) -> list[tuple[float, float, int]]:
    """(ttft_s, total_s, tokens) per request."""
    from client.api import AsyncWorkerClient

    async with AsyncWorkerClient(address) as w:
        async def one(p: str):
            t0 = time.perf_counter()
            ttft, n = None, 0
            async for tok in w.generate(p, max_new_tokens=max_tokens, ignore_eos=True):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                n += 1
            return ttft, time.perf_counter() - t0, n

        return await asyncio.gather(*(one(p) for p in prompts))


async def _gateway(url: str, model: str, prompts: list[str], max_tokens: int) -> list[tuple[float, float, int]]:
    import httpx

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as http:
        async def one(p: str):
            body = {"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            ttft, n = None, 0
            async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        n = chunk["usage"]["completion_tokens"]
                    if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                        ttft = time.perf_counter() - t0
            return ttft, time.perf_counter() - t0, n

        return await asyncio.gather(*(one(p) for p in prompts))


def _summary(rounds: list[tuple[float, list[tuple[float, float, int]]]]) -> dict:
    ttfts = sorted(t for _, rs in rounds for t, _, _ in rs)
    rps = [len(rs) / wall for wall, rs in rounds]
    tps = [sum(n for _, _, n in rs) / wall for wall, rs in rounds]
    return {"requests_per_s": statistics.median(rps), "ttft_ms_p50": 1e3 * statistics.median(ttfts),
            "ttft_ms_p90": 1e3 * ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
            "tokens_per_s": statistics.median(tps), "rounds": len(rounds)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pack", type=Path, default=None, help="pack directory (default: tiny-mixtral packed int4)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests sent at once (default 8)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    ap.add_argument("--rounds", type=int, default=3, help="bursts per way (default 3)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    a = ap.parse_args(argv)

    prompts_file = TINY_MIXTRAL / "prompts.jsonl"
    base = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()] if prompts_file.is_file() \
        else ["The command"]
    prompts = [base[i % len(base)] for i in range(a.concurrency)]
    tmp = Path(tempfile.mkdtemp(prefix="fm-bgw-"))
    procs: list[subprocess.Popen] = []
    try:
        pack = a.pack
        if pack is None:
            from expert_store.pack import write_pack

            pack = tmp / "pack"
            write_pack(TINY_MIXTRAL, pack, formats=("int4",), progress=False)
        store, worker, port = f"unix:{tmp}/store.sock", f"unix:{tmp}/worker.sock", _free_port()
        procs.append(_start([sys.executable, "-m", "expert_store", "serve", str(pack), "--listen", store,
                             "--ram-bytes", "256MiB", "--formats", "int4", "--log-level", "warning"], tmp / "store.log"))
        procs.append(_start([sys.executable, "-m", "gpu_worker", "serve", "--store", store, "--listen", worker,
                             "--format", "int4", "--budget-bytes", "100%", "--max-batch-size", str(a.concurrency),
                             "--log-level", "warning"], tmp / "worker.log"))
        _wait(lambda: _serving(worker), procs[1], "the worker", tmp / "worker.log")
        url = f"http://127.0.0.1:{port}"
        procs.append(_start([sys.executable, "-m", "client", "gateway", "--worker", worker, "--listen",
                             f"127.0.0.1:{port}", "--log-level", "warning"], tmp / "gateway.log"))
        _wait(lambda: _http_ok(f"{url}/health"), procs[2], "the gateway", tmp / "gateway.log")
        import httpx

        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        asyncio.run(_direct(worker, prompts[:2], 4))  # warm-up: first-use costs out of the figures
        asyncio.run(_gateway(url, model, prompts[:2], 4))
        results: dict[str, list] = {"direct": [], "gateway": []}
        for _ in range(a.rounds):
            for way in ("direct", "gateway"):
                t0 = time.perf_counter()
                rs = asyncio.run(_direct(worker, prompts, a.max_tokens) if way == "direct"
                                 else _gateway(url, model, prompts, a.max_tokens))
                results[way].append((time.perf_counter() - t0, rs))
                assert all(n == a.max_tokens for _, _, n in rs), f"{way}: a request was cut short"
        figures = {way: _summary(r) for way, r in results.items()}
        d, g = figures["direct"], figures["gateway"]
        print(f"{a.concurrency} concurrent greedy requests x {a.max_tokens} tokens, {a.rounds} rounds "
              f"({platform.machine()}, {os.cpu_count()} CPUs)")
        print(f"{'':10} {'req/s':>8} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'tokens/s':>9}")
        for way, f in figures.items():
            print(f"{way:10} {f['requests_per_s']:8.2f} {f['ttft_ms_p50']:12.1f} {f['ttft_ms_p90']:12.1f} "
                  f"{f['tokens_per_s']:9.1f}")
        print(f"gateway / direct: req/s x{g['requests_per_s'] / d['requests_per_s']:.3f}, "
              f"TTFT p50 {g['ttft_ms_p50'] - d['ttft_ms_p50']:+.1f} ms")
        if a.out:
            a.out.write_text(json.dumps({"concurrency": a.concurrency, "max_tokens": a.max_tokens, **figures},
                                        indent=2))
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        for p in sorted(tmp.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() else p.rmdir()
        tmp.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
