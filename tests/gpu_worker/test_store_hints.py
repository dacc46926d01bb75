"""Store hints: the hint thread never blocks its caller, batches what queues while a call is in flight,
counts failures; and with real processes (store RAM tier 10% of the experts, cross_layer), a worker
sends hints the store counts, with the same tokens as a worker that sends none."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from gpu_worker.store_hints import StoreHinter


def test_submit_never_waits_for_the_store_and_merges_what_queues_meanwhile():
    release, entered = threading.Event(), threading.Event()
    calls: list[list] = []

    def send(keys):
        calls.append(list(keys))
        entered.set()
        release.wait(10)

    h = StoreHinter(send)
    try:
        h.submit([(0, 1, "int4")])
        assert entered.wait(10)  # the first call is in flight and blocked in the "store"
        h.submit([(1, 2, "int4"), (1, 3, "int4")])  # returns although the store has not answered
        h.submit([(1, 3, "int4"), (2, 4, "int4")])
        assert h.stats.merged == 1
        release.set()
        assert h.drain(10)
    finally:
        h.close()
    assert calls == [[(0, 1, "int4")], [(1, 2, "int4"), (1, 3, "int4"), (2, 4, "int4")]]
    assert (h.stats.sends, h.stats.experts, h.stats.errors) == (2, 4, 0)


def test_a_failed_hint_is_counted_not_raised_and_the_backlog_is_bounded():
    def send(keys):
        raise RuntimeError("store down")

    h = StoreHinter(send, max_pending=3, start_thread=False)
    h.submit([(0, e, "int4") for e in range(5)])
    assert h.stats.dropped == 2
    assert h.send_pending() is True and h.send_pending() is False
    assert (h.stats.sends, h.stats.errors) == (0, 1)


class _Cache:
    fmt = "int4"

    def __init__(self, resident):
        self._resident = resident
        self.tail_fmt = None
        self.step_seq = 0
        self.step_fetch_wait_ns = 0

    def resident(self, layer):
        return self._resident.get(layer, [])


class _Pred:
    name = "fixed"
    needs_gate_input = False

    def __init__(self):
        self.asked = []

    def predict(self, moe_layer, rids, width, gate_input=None):
        self.asked.append(moe_layer)
        return [[moe_layer, moe_layer + 1] for _ in rids]

    def observe(self, *a):
        pass


def test_controller_hints_the_next_layers_not_resident_once_per_step(tiny_mixtral_dir):
    import torch

    from expert_store.model_args import ModelArgs
    from gpu_worker.prefetch import PrefetchController

    args = ModelArgs.from_checkpoint_dir(tiny_mixtral_dir)
    sent: list[list] = []
    h = StoreHinter(sent.append, start_thread=False)
    layers = list(args.moe_layers)
    cache = _Cache({layers[2]: [3]})  # layer 2's expert 3 is resident here: not hinted
    c = PrefetchController(args, cache, _Pred(), width=2, lookahead=1, start_thread=False, store_hints=h,
                           store_lookahead=2)
    c.begin_step([7], [False])
    x = torch.zeros(1, args.hidden_size)
    c.on_gate_input(layers[0], x)
    h.send_pending()
    c.on_gate_input(layers[1], x)
    h.send_pending()
    assert sent[0] == [(layers[1], 1, "int4"), (layers[1], 2, "int4"), (layers[2], 2, "int4")]
    assert sent[1] == [(layers[3], 3, "int4"), (layers[3], 4, "int4")]  # layer 2's were hinted already


@pytest.mark.slow
def test_real_processes_hints_reach_the_store_and_tokens_stay_the_same(sock_dir, tiny_mixtral_pack, tiny_mixtral_dir,
                                                                      int4_expert_bytes):
    import json

    from client.api import WorkerClient
    from gpu_worker.store_client import StoreClient
    from tests.conftest import Processes

    prompts = [json.loads(line)["prompt"] for line in (tiny_mixtral_dir / "prompts.jsonl").read_text().splitlines()[:4]]
    procs = Processes(sock_dir)
    try:
        store = procs.start_store(tiny_mixtral_pack, "store-h", "--ram-bytes", str(int4_expert_bytes // 10))
        procs.wait("store-h")
        flags = ("--transport", "shm", "--budget-bytes", "25%", "--predictor", "cross_layer", "--lookahead", "2")
        procs.start_worker(store, "nohint", *flags, "--store-hint-lookahead", "0")
        procs.start_worker(store, "hint", *flags)  # the default: 2 layers ahead
        procs.wait("nohint", "hint")
        sc = StoreClient(store)

        def run(name):
            before = sc.store_stats().prefetch_hints
            with WorkerClient(procs.addresses[name], timeout_s=120) as w:
                with ThreadPoolExecutor(4) as pool:
                    out = list(pool.map(lambda p: list(w.generate_text(p, max_new_tokens=16,
                                                                       ignore_eos=True).token_ids), prompts))
                stats = w.stats()
            return out, stats, sc.store_stats().prefetch_hints - before

        tokens0, stats0, hinted0 = run("nohint")
        tokens1, stats1, hinted1 = run("hint")
        sc.close()
    finally:
        rcs = procs.stop_all()
    assert rcs == {name: 0 for name in rcs}
    assert tokens1 == tokens0
    assert hinted0 == 0 and stats0.store_hints_sent == 0
    assert stats1.store_hints_sent > 0 and stats1.store_hint_errors == 0
    assert hinted1 > 0 and hinted1 <= stats1.store_hint_experts  # the store counts what reached it
    assert stats1.fetched_tier_ram + stats1.fetched_tier_nvme > 0
