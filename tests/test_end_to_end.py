"""End to end with real subprocesses: expert store + worker + client on tiny-mixtral (int4).

- greedy tokens through client -> worker -> store equal the in-process runtime's, over shared
  memory and over gRPC, at cache budgets of 100% and 25% of the expert bytes, with 8 requests at
  once (batched decode) and the cache's high-water mark never above its budget;
- bad input gets the right status and the worker goes on serving; a full queue is
  RESOURCE_EXHAUSTED; a cancelled stream frees its sequence;
- SIGTERM on the worker or on the store: in-flight requests finish or end with UNAVAILABLE, both
  exit 0, and no shared-memory segment of the store remains.

Servers listen on unix sockets in a short temp dir; each call and wait is bounded; no timing
assertions. The main store and workers are shared by the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from client.api import WorkerClient, WorkerError
from tests.conftest import Processes, shm_segments_of

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 24
CALL_TIMEOUT_S = 120


def wait_until(cond, timeout_s: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts(tiny_mixtral_dir) -> list[str]:
    lines = (tiny_mixtral_dir / "prompts.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[:8]]


@pytest.fixture(scope="module")
def reference(tiny_mixtral_pack, prompts) -> list[list[int]]:
    """Greedy tokens of the in-process runtime (PackExpertSource, no cache, no servers)."""
    from gpu_worker.generate import SamplingParams, generate
    from gpu_worker.runtime import load_local

    rt = load_local(tiny_mixtral_pack, fmt="int4", device="cpu")
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return [list(generate(rt.model, rt.tokenizer.encode(p), params)) for p in prompts]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()
WORKERS = {  # name -> worker flags
    "shm-100": ("--transport", "shm", "--budget-bytes", "100%", "--metrics-port", str(METRICS_PORT)),
    "shm-25": ("--transport", "shm", "--budget-bytes", "25%"),
    "grpc-100": ("--transport", "grpc", "--budget-bytes", "100%"),
    "grpc-25": ("--transport", "grpc", "--budget-bytes", "25%"),
    # Fate: the store serves int4 only, so the INT2 prefill tail falls back to int4 (with a warning)
    "fate-shm-25": ("--transport", "shm", "--budget-bytes", "25%", "--predictor", "cross_layer", "--allocation",
                    "shallow_favoring", "--policy", "arc", "--lookahead", "2"),
    "eap-shm-25": ("--transport", "shm", "--budget-bytes", "25%", "--predictor", "eap", "--policy", "lfu_decay"),
}


@pytest.fixture(scope="module")
def cluster(module_processes, running_store, running_worker, sock_dir):
    """One store (RAM tier: half the int4 experts) and the workers of WORKERS, plus "small" (batch 1,
    queue 1, from a TOML file) for queue and cancellation tests. All exit 0 on SIGTERM at the end."""
    toml = sock_dir / "small.toml"
    toml.write_text(f'[worker]\nstore = "{running_store}"\nmax_batch_size = 1\nmax_queue = 1\n'
                    'budget_bytes = "50%"\ngrace_s = 1\n')
    for name, flags in {**WORKERS, "small": ("--config", str(toml))}.items():
        running_worker(name, *flags, wait=False)  # started together: their imports overlap
    module_processes.wait(*WORKERS, "small")
    return module_processes.services, module_processes.addresses


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("worker", list(WORKERS))
def test_greedy_tokens_equal_the_in_process_runtime(cluster, worker, prompts, reference):
    services, addresses = cluster
    with WorkerClient(addresses[worker], timeout_s=CALL_TIMEOUT_S) as w:
        alone = w.generate_text(prompts[3], max_new_tokens=NEW_TOKENS, ignore_eos=True)
        with ThreadPoolExecutor(8) as pool:  # 8 at once: batched decode steps
            batched = list(pool.map(lambda p: w.generate_text(p, max_new_tokens=NEW_TOKENS, ignore_eos=True),
                                    prompts))
        stats = w.stats(include_layers=True)
    assert list(alone.token_ids) == reference[3]
    assert [list(c.token_ids) for c in batched] == reference
    for c in batched:
        r = c.result
        assert r.finish_reason == "length" and r.usage.completion_tokens == NEW_TOKENS
        assert r.experts.lookups == r.experts.hits + r.experts.misses > 0
    assert stats.high_water_bytes <= stats.budget_bytes
    assert stats.requests_total == 9 and stats.active_requests == 0 and stats.requests_failed == 0
    assert stats.lookups == stats.hits + stats.misses
    transport = "grpc" if worker.startswith("grpc") else "shm"
    if transport == "shm":
        assert stats.bytes_fetched_shm > 0
    else:
        assert stats.bytes_fetched_grpc > 0 and stats.bytes_fetched_shm == 0
    if worker.endswith("-25"):
        assert stats.evictions > 0 and stats.resident_experts < 8 * 16
        assert 0.24 * 16 * 8 <= sum(l.slots for l in stats.layers) + stats.staging_slots <= 0.26 * 16 * 8
    if worker.startswith(("fate", "eap")):
        assert stats.staging_slots > 0 and stats.prefetches_issued > 0 and stats.predictions > 0
    else:
        assert stats.staging_slots == 0 and stats.prefetches_issued == 0 and stats.predictions == 0


def test_fate_worker_reports_predictions_prefetches_and_layers(cluster, prompts, reference):
    """GenerateFinal, GetStats, `client stats --layers` and /metrics carry the prediction and prefetch figures."""
    _, addresses = cluster
    with WorkerClient(addresses["fate-shm-25"], timeout_s=CALL_TIMEOUT_S) as w:
        with ThreadPoolExecutor(4) as pool:
            done = list(pool.map(lambda p: w.generate_text(p, max_new_tokens=NEW_TOKENS, ignore_eos=True),
                                 prompts[:4]))
        s = w.stats(include_layers=True)
    assert [list(c.token_ids) for c in done] == reference[:4]
    for c in done:
        e = c.result.experts
        assert e.predictions > 0 and 0 < e.predictions_exact <= e.predictions
        assert len(e.layers) == 8 and sum(l.lookups for l in e.layers) == e.lookups
        assert e.layers[0].predictions == 0 and all(l.predictions > 0 for l in e.layers[1:])  # the first: no gate
        d = e.decode
        assert d is not None and 0 < d.lookups < e.lookups and d.hits + d.misses == d.lookups
        assert d.predictions == (NEW_TOKENS - 1) * 7
    assert s.predictor == "cross_layer" and s.cache_policy == "arc" and s.allocation == "shallow_favoring"
    assert s.lookahead == 2 and s.prefetch_width >= s.top_k == 2 and s.int2_tail == 0.0
    assert s.layer_compute_ns > 0 and s.expert_fetch_ns > 0
    assert s.strict_topk_accuracy > 0.3 and s.prefetch_hits > 0 and 0 < s.prefetch_precision <= 1
    # the store counts the start-up width measurement (a few experts) too
    # the copy engine's copies are prefetches too (not in bytes_fetched_shm: no store call moved them)
    assert 0 < s.prefetch_bytes + s.demand_bytes <= s.bytes_fetched_shm + s.bytes_fetched_grpc + s.bytes_copied
    assert s.copies_landed > 0 and s.copies_landed + s.copies_failed <= s.copies_issued  # the copier ran
    assert sum(l.prefetches_issued for l in s.layers) == s.prefetches_issued
    assert sum(l.predictions for l in s.layers) == s.predictions
    slots = [l.slots for l in s.layers]  # shallow-favoring: no layer under top-k, shallow layers first
    assert min(slots) >= s.top_k and slots == sorted(slots, reverse=True)
    assert s.store_hints_sent > 0 and s.store_hint_errors == 0 and s.fetched_tier_ram + s.fetched_tier_nvme > 0
    demand = s.fetched_tier_ram_demand + s.fetched_tier_nvme_demand  # cache misses, prefetches apart
    assert 0 < demand < s.fetched_tier_ram + s.fetched_tier_nvme and s.fetched_tier_ram_demand <= s.fetched_tier_ram
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "client", "stats", "--address", addresses["fate-shm-25"], "--layers"],
                         capture_output=True, text=True, timeout=CALL_TIMEOUT_S, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "strict_topk_accuracy" in out.stdout and "prefetch_recall" in out.stdout and "strict%" in out.stdout


def test_bad_input_gets_the_right_status_and_the_worker_keeps_serving(cluster):
    _, addresses = cluster
    cases = [
        (dict(prompt=""), "INVALID_ARGUMENT"),
        (dict(token_ids=[]), "INVALID_ARGUMENT"),
        (dict(prompt="hi", temperature=-1.0), "INVALID_ARGUMENT"),
        (dict(prompt="hi", temperature=float("nan")), "INVALID_ARGUMENT"),
        (dict(prompt="hi", top_p=1.5), "INVALID_ARGUMENT"),
        (dict(prompt="hi", top_p=-0.1), "INVALID_ARGUMENT"),
        (dict(token_ids=[1, 4096]), "INVALID_ARGUMENT"),
        (dict(prompt="hi", stop=[""]), "INVALID_ARGUMENT"),
        (dict(prompt="hi", max_new_tokens=5000), "OUT_OF_RANGE"),
    ]
    with WorkerClient(addresses["shm-100"], timeout_s=CALL_TIMEOUT_S) as w:
        for kw, code in cases:
            with pytest.raises(WorkerError) as err:
                w.generate_text(**kw)
            assert err.value.code == code, kw
        ok = w.generate_text("The command", max_new_tokens=4)
        assert len(ok.token_ids) == 4 or ok.result.finish_reason == "eos"


def test_full_queue_is_resource_exhausted_and_cancel_frees_the_sequence(cluster, prompts):
    _, addresses = cluster
    with WorkerClient(addresses["small"], timeout_s=CALL_TIMEOUT_S) as w:
        before = w.stats()
        long_gen = w.generate(prompts[0], max_new_tokens=900, ignore_eos=True)
        it = iter(long_gen)
        next(it), next(it)  # it is decoding: the batch (size 1) is full
        queued = w.generate(prompts[1], max_new_tokens=900, ignore_eos=True)
        wait_until(lambda: w.stats().queued_requests == 1, what="the second request to queue")
        with pytest.raises(WorkerError) as err:
            w.generate_text(prompts[2], max_new_tokens=4)
        assert err.value.code == "RESOURCE_EXHAUSTED"
        long_gen.cancel()
        queued.cancel()
        wait_until(lambda: (s := w.stats()).active_requests == 0 and s.queued_requests == 0,
                   what="the cancelled requests to leave the batch")
        after = w.stats()
        assert after.requests_cancelled - before.requests_cancelled == 2
        assert after.requests_failed == before.requests_failed
        # and it still serves
        assert len(w.generate_text(prompts[2], max_new_tokens=3, ignore_eos=True).token_ids) == 3


def test_sigterm_on_the_worker_finishes_or_fails_in_flight_requests(sock_dir, tiny_mixtral_pack, int4_expert_bytes,
                                                                    prompts):
    procs = Processes(sock_dir)
    store_addr = procs.start_store(tiny_mixtral_pack, "store-w", "--ram-bytes", str(int4_expert_bytes // 4))
    try:
        procs.wait("store-w")
        addr = procs.start_worker(store_addr, "worker-w", "--budget-bytes", "25%", "--grace-s", "1")
        procs.wait("worker-w")
        outcomes: dict[str, str] = {}
        started = threading.Barrier(4)

        def run(name: str, n: int) -> None:
            with WorkerClient(addr, timeout_s=CALL_TIMEOUT_S) as w:
                gen = w.generate(prompts[0], max_new_tokens=n, ignore_eos=True)
                try:
                    it = iter(gen)
                    next(it)
                    started.wait(CALL_TIMEOUT_S)
                    for _ in it:
                        pass
                    outcomes[name] = gen.result.finish_reason
                except WorkerError as e:
                    outcomes[name] = e.code

        threads = [threading.Thread(target=run, args=(f"long{i}", 900)) for i in range(2)]
        threads.append(threading.Thread(target=run, args=("short", 40)))
        for t in threads:
            t.start()
        started.wait(CALL_TIMEOUT_S)  # every request has its first token
        assert procs.stop("worker-w") == 0, procs.output("worker-w")
        for t in threads:
            t.join(CALL_TIMEOUT_S)
        assert set(outcomes) == {"long0", "long1", "short"}
        assert set(outcomes.values()) <= {"length", "UNAVAILABLE"}, outcomes
        assert outcomes["long0"] == outcomes["long1"] == "UNAVAILABLE"  # 900 tokens do not fit 1 s of grace
    finally:
        rcs = procs.stop_all()
    assert rcs["store-w"] == 0, procs.output("store-w")
    assert shm_segments_of(procs.services["store-w"].pid) == []


def test_sigterm_on_the_store_fails_requests_with_unavailable(sock_dir, tiny_mixtral_pack, int4_expert_bytes,
                                                              prompts):
    procs = Processes(sock_dir)
    store_addr = procs.start_store(tiny_mixtral_pack, "store-s", "--ram-bytes", str(int4_expert_bytes // 4))
    try:
        procs.wait("store-s")
        addr = procs.start_worker(store_addr, "worker-s", "--budget-bytes", "25%")
        procs.wait("worker-s")
        with WorkerClient(addr, timeout_s=CALL_TIMEOUT_S) as w:
            gen = w.generate(prompts[0], max_new_tokens=900, ignore_eos=True)
            it = iter(gen)
            next(it)
            assert procs.stop("store-s") == 0, procs.output("store-s")
            with pytest.raises(WorkerError) as err:  # 25% of the experts: a miss soon needs the store
                for _ in it:
                    pass
            assert err.value.code == "UNAVAILABLE"
            stats = w.stats()
            assert stats.store_connected is False and stats.active_requests == 0
            with pytest.raises(WorkerError) as err:
                w.generate_text(prompts[1], max_new_tokens=4)
            assert err.value.code == "UNAVAILABLE"
            assert w.health() == "NOT_SERVING"
        assert procs.stop("worker-s") == 0, procs.output("worker-s")
    finally:
        procs.stop_all()
    assert shm_segments_of(procs.services["store-s"].pid) == []


def test_metrics_endpoint_and_cli(cluster):
    import urllib.request

    _, addresses = cluster
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "client", "generate", "The command", "--address", addresses["shm-100"],
         "--max-new-tokens", "5", "--ignore-eos", "--json"],
        capture_output=True, text=True, timeout=CALL_TIMEOUT_S, env=env, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert len(doc["token_ids"]) == 5 and doc["result"]["finish_reason"] == "length"
    assert doc["result"]["experts"]["lookups"] > 0
    assert "layer" not in doc["result"]["experts"]["decode"]  # the decode totals are no layer
    out = subprocess.run([sys.executable, "-m", "client", "stats", "--address", addresses["shm-100"], "--json"],
                         capture_output=True, text=True, timeout=CALL_TIMEOUT_S, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["generated_tokens_total"] >= 5
    assert json.loads(out.stdout)["strict_topk_accuracy"] is None  # no predictor: n/a, not 0
    out = subprocess.run([sys.executable, "-m", "client", "stats", "--address", addresses["shm-100"], "--layers"],
                         capture_output=True, text=True, timeout=CALL_TIMEOUT_S, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    figures = dict(line.split(None, 1) for line in out.stdout.splitlines()[:80] if len(line.split()) == 2)
    assert figures["strict_topk_accuracy"] == "n/a" and figures["prefetch_precision"] == "n/a"
    assert "." not in figures["layer_compute_ns"] and len(figures["int2_tail"]) <= 8, figures
    out = subprocess.run([sys.executable, "-m", "client", "generate", "", "--address", addresses["shm-100"]],
                         capture_output=True, text=True, timeout=CALL_TIMEOUT_S, env=env, cwd=REPO)
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr

    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
    for name in ("fate_worker_request_duration_seconds_count", "fate_worker_tokens_total{kind=\"generated\"}",
                 "fate_worker_cache_hits_total", "fate_worker_cache_budget_bytes", "fate_worker_cache_used_bytes",
                 "fate_worker_fetch_bytes_total{transport=\"shm\"}", "fate_worker_active_requests",
                 "fate_worker_layer_lookups_total{layer=\"0\"}", "fate_worker_prefetch_width",
                 "fate_worker_predictions_total{layer=\"1\"}", "fate_worker_prefetch_wasted_bytes_total"):
        assert name in text, name


def test_budget_below_the_minimum_is_a_one_line_start_up_error(cluster, sock_dir):
    _, addresses = cluster
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "gpu_worker", "serve", "--store", addresses["store"], "--listen",
         f"unix:{sock_dir}/tiny.sock", "--budget-bytes", "1000", "--log-level", "warning"],
        capture_output=True, text=True, timeout=CALL_TIMEOUT_S, env=env, cwd=REPO,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "minimum" in lines[0], out.stderr


async def test_async_client_streams_the_same_tokens(cluster, prompts, reference):
    from client.api import AsyncWorkerClient

    _, addresses = cluster
    async with AsyncWorkerClient(addresses["grpc-25"], timeout_s=CALL_TIMEOUT_S) as w:
        await w.wait_ready(10)
        gen = w.generate(prompts[5], max_new_tokens=NEW_TOKENS, ignore_eos=True)
        ids = [tok.id async for tok in gen]
        stats = await w.stats()
        with pytest.raises(WorkerError) as err:
            await w.generate_text(prompts[5], top_p=2.0)
    assert ids == reference[5] and gen.result.finish_reason == "length"
    assert stats.generated_tokens_total >= NEW_TOKENS
    assert err.value.code == "INVALID_ARGUMENT"
