"""Faults with real processes (store + worker + client, unix sockets under a short temp dir):

- the store killed with -9 and restarted while 16 streams run: every stream finishes, whole, with the
  tokens it would have had anyway (in-flight requests keep their KV state and wait for the store);
- a blob corrupted on disk while the store runs: the store counts and logs it, the request routed to
  that expert ends DATA_LOSS, the stream beside it goes on, and the worker keeps serving;
- the store restarted with another pack: FAILED_PRECONDITION (never DATA_LOSS forever), a log line,
  NOT_SERVING, and the worker exits 3 so its supervisor restarts it on the new pack.

Bounded: a fixed number of requests of a few dozen tokens, every call and wait with a deadline. Times
are recorded in the log (-s) for the report, never asserted.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import pytest

from client.api import WorkerClient, WorkerError
from moe.v1 import store_pb2 as spb
from moe.v1 import store_pb2_grpc

from .conftest import Proc, store_cmd, worker_cmd

pytestmark = pytest.mark.slow

CALL_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def prompts(tiny_mixtral_dir) -> list[str]:
    lines = (tiny_mixtral_dir / "prompts.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[:8]]


@pytest.fixture(scope="module")
def int4_bytes(tiny_mixtral_pack) -> tuple[int, int]:
    """(one int4 expert's bytes, all int4 experts' bytes)."""
    from expert_store.packfile import Pack

    with Pack.open(tiny_mixtral_pack) as p:
        return p.expert_nbytes("int4"), p.expert_nbytes("int4") * len(p.expert_ids)


class Streams:
    """Streams run in threads; per stream the token ids, arrival times and the error, if any."""

    def __init__(self, address: str, prompts: list[str], max_new_tokens: int):
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.times: list[list[float]] = [[] for _ in prompts]
        self.errors: list[WorkerError | None] = [None] * len(prompts)
        self._client = WorkerClient(address, timeout_s=CALL_TIMEOUT_S)
        self._threads = [threading.Thread(target=self._run, args=(i, p, max_new_tokens)) for i, p in enumerate(prompts)]
        for t in self._threads:
            t.start()

    def _run(self, i: int, prompt: str, n: int) -> None:
        try:
            for tok in self._client.generate(prompt, max_new_tokens=n, ignore_eos=True):
                self.tokens[i].append(tok.id)
                self.times[i].append(time.monotonic())
        except WorkerError as e:
            self.errors[i] = e

    def wait_tokens(self, at_least: int, timeout_s: float = CALL_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while any(len(t) < at_least for t in self.tokens) and time.monotonic() < deadline:
            if not any(t.is_alive() for t in self._threads):
                break
            time.sleep(0.02)

    def join(self) -> None:
        for t in self._threads:
            t.join(CALL_TIMEOUT_S)
        self._client.close()


def _store_stats(address: str) -> spb.StoreStats:
    with grpc.insecure_channel(address) as ch:
        return store_pb2_grpc.ExpertStoreStub(ch).GetStats(spb.GetStoreStatsRequest(), timeout=30)


def test_store_kill9_and_restart_under_16_streams_loses_nothing(sock_dir, tiny_mixtral_pack, prompts, int4_bytes):
    _, total = int4_bytes
    store_addr, worker_addr = f"unix:{sock_dir}/store.sock", f"unix:{sock_dir}/worker.sock"
    store = Proc("store", store_cmd(tiny_mixtral_pack, store_addr, "--ram-bytes", str(total // 4)),
                 sock_dir / "store.log")
    worker = None
    try:
        store.wait_serving(store_addr)
        worker = Proc("worker", worker_cmd(store_addr, worker_addr, "--budget-bytes", "25%", "--transport", "shm",
                                           "--max-batch-size", "16", "--store-retry-s", "90"), sock_dir / "worker.log")
        worker.wait_serving(worker_addr)
        streams = Streams(worker_addr, prompts * 2, 32)  # 16 streams, each prompt twice
        streams.wait_tokens(4)
        assert all(e is None for e in streams.errors), streams.errors
        t_kill = time.monotonic()
        store.kill9()
        time.sleep(1.0)  # down for a while: fetches fail with UNAVAILABLE meanwhile
        store = Proc("store", store_cmd(tiny_mixtral_pack, store_addr, "--ram-bytes", str(total // 4)),
                     sock_dir / "store.log")  # on the dead store's (stale) socket
        store.wait_serving(store_addr)
        t_up = time.monotonic()
        streams.join()
        failed = [(i, e) for i, e in enumerate(streams.errors) if e is not None]
        assert failed == [], f"{len(failed)} of 16 streams failed: {failed[:3]}\n{worker.output()[-3000:]}"
        assert all(len(t) == 32 for t in streams.tokens)
        assert streams.tokens[:8] == streams.tokens[8:]  # the same prompt, the same greedy tokens
        resumed = [min((x for x in ts if x > t_kill), default=t_kill) for ts in streams.times]
        print(f"\nstore restart: down {t_up - t_kill:.2f} s (kill -9 to SERVING), last stream resumed "
              f"{max(resumed) - t_kill:.2f} s after the kill, 0 of 16 streams lost")
        with WorkerClient(worker_addr, timeout_s=CALL_TIMEOUT_S) as w:
            again = w.generate_text(prompts[0], max_new_tokens=32, ignore_eos=True)
            assert list(again.token_ids) == streams.tokens[0]  # nothing was lost or repeated in the middle
            assert w.health() == "SERVING"
        log = worker.output()
        assert "in-flight requests wait for it" in log and "is back after" in log
    finally:
        rcs = [p.stop() for p in (worker, store) if p is not None]
    assert rcs[0] == 0


def _routed(pack: Path, prompt: str, n_tokens: int) -> dict[int, set[int]]:
    """{decoder layer: experts} a greedy run of `prompt` routes to (the in-process runtime)."""
    from gpu_worker.generate import SamplingParams, generate
    from gpu_worker.runtime import load_local

    rt = load_local(pack, "int4", "cpu")
    seen: dict[int, set[int]] = {}

    class Observer:
        def on_gate_input(self, layer, h):
            pass

        def on_routing(self, layer, ids, weights):
            seen.setdefault(layer, set()).update(ids.reshape(-1).tolist())

    rt.model.observer = Observer()
    list(generate(rt.model, rt.tokenizer.encode(prompt), SamplingParams(max_new_tokens=n_tokens, ignore_eos=True)))
    rt.pack.close()
    return seen


def test_a_blob_corrupted_while_the_store_runs_fails_only_its_request(sock_dir, tiny_mixtral_pack, prompts,
                                                                       int4_bytes, tmp_path):
    import shutil

    from expert_store.packfile import Pack

    one, _ = int4_bytes
    pack = tmp_path / "pack"
    shutil.copytree(tiny_mixtral_pack, pack)
    victim_prompt, bystander_prompt = prompts[0], prompts[1]
    a, b = _routed(pack, victim_prompt, 4), _routed(pack, bystander_prompt, 40)
    layer, expert = next((layer, e) for layer in sorted(a, reverse=True) for e in sorted(a[layer] - b.get(layer, set())))
    store_addr, worker_addr = f"unix:{sock_dir}/store.sock", f"unix:{sock_dir}/worker.sock"
    # a RAM tier of 16 slots (layer 0 only): the victim's expert enters it from disk when asked for
    store = Proc("store", store_cmd(pack, store_addr, "--ram-bytes", str(16 * ((one + 4095) // 4096 * 4096))),
                 sock_dir / "store.log")
    worker = None
    try:
        store.wait_serving(store_addr)
        worker = Proc("worker", worker_cmd(store_addr, worker_addr, "--budget-bytes", "25%", "--transport", "shm"),
                      sock_dir / "worker.log")
        worker.wait_serving(worker_addr)
        with Pack.open(pack) as p:
            ref = p.blob_ref(layer, expert, "int4")
        with open(pack / "experts.bin", "r+b") as f:  # one byte flipped on disk, the store running
            f.seek(ref.offset + 100)
            byte = f.read(1)
            f.seek(ref.offset + 100)
            f.write(bytes([byte[0] ^ 0x5A]))
        bystander = Streams(worker_addr, [bystander_prompt], 40)
        bystander.wait_tokens(3)
        with WorkerClient(worker_addr, timeout_s=CALL_TIMEOUT_S) as w:
            with pytest.raises(WorkerError) as e:
                w.generate_text(victim_prompt, max_new_tokens=4, ignore_eos=True)
            assert e.value.code == "DATA_LOSS" and f"layer {layer} expert {expert}" in e.value.details
            assert str(pack) not in e.value.details  # the store's paths stay in its log
            bystander.join()
            assert bystander.errors == [None] and len(bystander.tokens[0]) == 40
            assert len(w.generate_text(bystander_prompt, max_new_tokens=4).token_ids) >= 1  # still serving
            assert w.health() == "SERVING"
        stats = _store_stats(store_addr)
        assert stats.checksum_failures >= 1
        assert "corrupt blob in" in store.output() and f"layer {layer} expert {expert} int4" in store.output()
        print(f"\ncorrupt blob (layer {layer} expert {expert}): victim DATA_LOSS, bystander 40/40 tokens, "
              f"store checksum_failures {stats.checksum_failures}")
    finally:
        for p in (worker, store):
            if p is not None:
                p.stop()


@pytest.fixture(scope="module")
def other_pack(hf_tiny_mixtral_dir, tmp_path_factory) -> Path:
    from expert_store.pack import write_pack

    out = tmp_path_factory.mktemp("other") / "pack"
    write_pack(hf_tiny_mixtral_dir, out, formats=("int4",), progress=False)
    return out


def test_a_store_restarted_with_another_pack_is_failed_precondition(sock_dir, tiny_mixtral_pack, other_pack,
                                                                    prompts):
    store_addr, worker_addr = f"unix:{sock_dir}/store.sock", f"unix:{sock_dir}/worker.sock"
    store = Proc("store", store_cmd(tiny_mixtral_pack, store_addr, "--ram-bytes", "0"), sock_dir / "store.log")
    worker = None
    try:
        store.wait_serving(store_addr)
        worker = Proc("worker", worker_cmd(store_addr, worker_addr, "--budget-bytes", "25%", "--store-retry-s", "60",
                                           "--grace-s", "5"), sock_dir / "worker.log")
        worker.wait_serving(worker_addr)
        stream = Streams(worker_addr, [prompts[2]], 400)
        stream.wait_tokens(3)
        store.kill9()
        t_kill = time.monotonic()
        store = Proc("store", store_cmd(other_pack, store_addr, "--ram-bytes", "0"), sock_dir / "store.log")
        stream.join()
        assert stream.errors[0] is not None and stream.errors[0].code == "FAILED_PRECONDITION", stream.errors
        assert "another pack" in stream.errors[0].details
        rc = worker.proc.wait(60)  # NOT_SERVING, then exit 3: the supervisor restarts it on the new pack
        print(f"\nstore with another pack: FAILED_PRECONDITION {time.monotonic() - t_kill:.2f} s after the kill; "
              f"worker exit {rc}")
        assert rc == 3
        log = worker.output()
        assert "now serves another pack" in log and "NOT_SERVING" in log and "DATA_LOSS" not in log
    finally:
        for p in (worker, store):
            if p is not None:
                p.stop()


def test_an_idle_worker_notices_another_pack(sock_dir, tiny_mixtral_pack, other_pack):
    """No request running: the worker's periodic pack-id check finds the new pack and exits 3."""
    store_addr, worker_addr = f"unix:{sock_dir}/store.sock", f"unix:{sock_dir}/worker.sock"
    store = Proc("store", store_cmd(tiny_mixtral_pack, store_addr, "--ram-bytes", "0"), sock_dir / "store.log")
    worker = None
    try:
        store.wait_serving(store_addr)
        worker = Proc("worker", worker_cmd(store_addr, worker_addr, "--budget-bytes", "25%"), sock_dir / "worker.log")
        worker.wait_serving(worker_addr)
        store.stop()
        store = Proc("store", store_cmd(other_pack, store_addr, "--ram-bytes", "0"), sock_dir / "store.log")
        assert worker.proc.wait(90) == 3, worker.output()[-3000:]
        assert "now serves another pack" in worker.output()
    finally:
        for p in (worker, store):
            if p is not None:
                p.stop()
