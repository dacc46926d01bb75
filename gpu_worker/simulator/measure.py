"""Measuring a `HardwareProfile` on this machine (torch, the only part of the simulator that needs it;
imported by `simulate --measure` only).

    profile = measure_profile(PACK)                       # experts read from the pack (mmap)
    profile = measure_profile(PACK, store="unix:/s.sock") # experts over the store's fetch path (shm/gRPC)

Link: the cache's own demand path (`ExpertCache.iter_experts` of n experts that all miss: one
batched fetch + building each compute form + bookkeeping), timed for n = 1 and n = 8; latency per
wave and time per expert from a line through the two medians; then the time per expert is replaced by what
a miss costs in steady state (`measure_demand`: decode forwards over a 25% LRU cache against the same
tokens over a full one: evictions, fresh compute forms and all). Compute: decode forwards with every
expert resident (the same cache at 100%, warm), medians at batch 1 and at `batch`; one expert's
compute on one row and the LM head timed alone; then
    step(T) = step_s + L * (layer_s + (T - 1) * layer_token_s) + expert_compute_s * sum_l distinct_l
solved for layer_s (batch 1) and layer_token_s (batch `batch`). Prefetch: the cache's own prefetch path
(`ExpertCache.prefetch` of n experts none resident: one batched fetch at prefetch priority, verify, build,
insert), a line through n = 1 and n = 8 as for the link; with a store, one store-hint call of a layer's
experts (`StoreClient.prefetch_hint`). Sharing: decode forwards at `batch` (every expert resident) and a
the worker's own prefetch thread fed one job per MoE layer (and, with a store, the store-hint thread one
batch), as the controller feeds them: what the compute thread loses per prefetched expert and per
store-hint call, and the threads' own times meanwhile (`measure_sharing`). Medians, because this machine
is shared and noisy.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .cost import HardwareProfile


def _median_s(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _line_through(cache, sizes: tuple[int, int], repeats: int, seed: int, call) -> tuple[float, float]:
    """(s at 0 experts, s per expert): `call(layer, ids)` for n experts none of which is resident (the cache
    emptied first), for both n of `sizes`, `repeats` times after two warm-ups; a line through the medians."""
    a = cache.args
    rng = np.random.default_rng(seed)
    med = {}
    for n in sizes:
        times = []
        for r in range(repeats + 2):
            layer = a.moe_layers[r % len(a.moe_layers)]
            ids = rng.choice(a.num_experts, n, replace=False).tolist()
            cache.clear()
            t0 = time.perf_counter()
            call(layer, ids)
            if r >= 2:  # the first calls warm connections, segments, page cache
                times.append(time.perf_counter() - t0)
        med[n] = statistics.median(times)
    n1, n2 = sizes
    per = max(1e-7, (med[n2] - med[n1]) / (n2 - n1))
    return max(0.0, med[n1] - n1 * per), per


def measure_link(cache, repeats: int = 15, sizes: tuple[int, int] = (1, 8)) -> tuple[float, float, int]:
    """(latency s per wave, s per expert incl. its build) of the cache's own demand path: `iter_experts` of n
    experts none of which is resident (the cache emptied first, so one wave), for two n; a line through
    the medians. Also returns one blob's bytes."""
    def demand(layer, ids):
        for _ in cache.iter_experts(layer, ids):
            pass

    lat, per = _line_through(cache, sizes, repeats, 0, demand)
    blob = cache.fetcher.fetch([(cache.args.moe_layers[0], 0, cache.fmt)])[0]
    return lat, per, blob.nbytes


def measure_demand(model, small_model, small_cache, batch: int = 8, steps: int = 12, lat: float = 0.0) -> float:
    """Seconds one demand miss costs the compute thread in steady state: decode forwards at `batch` over
    `model` (every expert resident) and over `small_model` (the same weights, `small_cache` a small LRU
    budget: misses, evictions, fresh compute forms), the same tokens, steps interleaved; the median
    per-step difference, less `lat` per layer with misses, per miss. Returns 0 if nothing missed."""
    full = _Decoder(model, batch, steps + 3, seed=4)
    small = _Decoder(small_model, batch, steps + 3, seed=4)
    layers = [small_cache.ledger.layer(layer) for layer in model.args.moe_layers]
    for _ in range(2):
        full.step()
        small.step()
    per: list[float] = []
    for _ in range(steps):
        before = [L.stats.misses for L in layers]
        dt_small = small.step()
        dt_full = full.step()
        missed = [L.stats.misses - b for L, b in zip(layers, before)]
        n = sum(missed)
        if n:
            per.append((dt_small - dt_full - lat * sum(1 for m in missed if m)) / n)
    return max(0.0, statistics.median(per)) if per else 0.0


def measure_prefetch(cache, repeats: int = 9, sizes: tuple[int, int] = (1, 8)) -> tuple[float, float]:
    """(s per job, s per expert) of the cache's own prefetch path, alone: `prefetch` of n experts none of
    which is resident (the cache emptied first), for two n; a line through the medians."""
    return _line_through(cache, sizes, repeats, 1, cache.prefetch)


def measure_hint(client, args, repeats: int = 15) -> float:
    """Median wall time of one store-hint call naming one layer's experts (what the hint thread sends per
    MoE layer), over the real store."""
    keys = [(args.moe_layers[-1], e, "int4") for e in range(args.num_experts)]
    client.prefetch_hint(keys)
    return _median_s(lambda: client.prefetch_hint(keys), repeats)


class _Decoder:
    """Decode forwards at batch T over `model` (whatever its cache holds), one `step()` each."""

    def __init__(self, model, T: int, steps: int, prompt_len: int = 16, seed: int = 0, observer=None):
        a = model.args
        rng = np.random.default_rng(seed)
        self.model, self.observer = model, observer
        self.seqs = [model.new_sequence(prompt_len + steps + 1) for _ in range(T)]
        prompts = [torch.tensor(rng.integers(2, a.vocab_size, prompt_len)) for _ in range(T)]
        logits = model.forward(self.seqs, prompts, observer=observer)
        self.nxt = [torch.argmax(logits[j]).reshape(1) for j in range(T)]

    def step(self) -> float:
        t0 = time.perf_counter()
        logits = self.model.forward(self.seqs, self.nxt, observer=self.observer)
        self.nxt = [torch.argmax(logits[j]).reshape(1) for j in range(len(self.seqs))]
        return time.perf_counter() - t0


def room_cache_for(cache, fetcher, fmt: str):
    """A cache whose prefetches find no room, sharing `cache`'s lock and condition (as the worker's one
    cache shares it with its prefetch thread): half the experts' budget, filled by the first half of the
    layers, so a prefetch for a later layer has neither a free unit nor an expert of its own to evict."""
    from ..cache import ExpertCache
    from ..policy import make_allocation

    a = cache.args
    half = a.moe_layers[:len(a.moe_layers) // 2]
    room = ExpertCache(a, fetcher, fmt, cache.form, cache.device, len(half) * a.num_experts * cache.expert_bytes,
                       policy="lru", allocation=make_allocation("shallow_favoring", len(half)))
    for layer in half:
        for _ in room.iter_experts(layer, list(range(a.num_experts))):
            pass
    room.cond = cache.cond
    if hasattr(cache, "prefetch_cond"):  # the condition the prefetch thread waits on, on the same lock
        room.prefetch_cond = cache.prefetch_cond
    return room


def _prefetch_side(pack, fetcher, fmt: str, budget_bytes: int, width: int, hints: bool):
    """The worker's own composition (`build_worker`: cache, controller, prefetch thread or whatever path
    the worker uses, store hints) with a random predictor of fixed `width`: what the calibration feeds."""
    from ..wiring import WorkerSpec, build_worker

    spec = WorkerSpec(fmt=fmt, budget_bytes=budget_bytes, predictor="random", prefetch_width=width, throttle=False,
                      measure_width=False, store_hint_lookahead=2 if hints else 0, threads=1)
    return build_worker(pack.args, pack.dense_tensors(), fetcher, None, spec, "cpu")


def measure_sharing(model, pack, fetcher, fmt: str = "int4", batch: int = 8, steps: int = 16, per_job: int = 8,
                    hints: bool = False, room_cache=None) -> dict[str, float]:
    """What prefetching costs the compute thread: decode forwards at `batch` (the model's cache holding
    every expert, so no stalls) while the worker's own prefetch machinery (`build_worker`'s controller,
    prefetch thread or copy engine and store hints, over a cache of its own emptied each step) is fed, at
    every MoE layer's gate input, a prediction of `per_job` random experts of the next layer, so each is
    fetched, verified and built the way the worker does it, and at each layer's routing that cache's
    lookup takes in what landed (an empty demand call, on the compute thread as in the worker). With
    `hints`, a second composition also sends store hints. With `room_cache` (`room_cache_for`), a prefetch
    thread whose jobs find no room waits for it on the compute cache's lock. Forwards timed alone and in each
    mode, the modes interleaved step by step (medians): compute-thread seconds lost per prefetched expert,
    per store-hint call and per layer a prefetch waits for room; the prefetch path's time per expert and
    a hint call's wall time while the compute runs."""
    from ..cache import full_budget_bytes
    from ..prefetch import Prefetcher

    a = model.args
    layers = list(a.moe_layers)
    n = min(per_job, a.num_experts)
    full = full_budget_bytes(a, fmt, "auto", "cpu")
    sides = {"jobs": _prefetch_side(pack, fetcher, fmt, full, n, False)}
    copy_engine = getattr(sides["jobs"].cache, "copy_engine", None) is not None
    if hints:
        sides["hints"] = _prefetch_side(pack, fetcher, fmt, full, n, True)
    jobs: list[tuple[float, int]] = []  # (wall s, experts) of each prefetch call that inserted experts
    sends: list[float] = []  # wall s of each store-hint call of the hints mode
    for name, w in sides.items():
        inner = w.cache.prefetch

        def timed_prefetch(layer, experts, step=None, _inner=inner, **kw):
            t0 = time.perf_counter()
            res = _inner(layer, experts, step=step, **kw)
            if res.inserted:
                jobs.append((time.perf_counter() - t0, len(res.inserted)))
            return res

        w.cache.prefetch = timed_prefetch  # the instance's: the worker's paths call it
        hinter = w.controller.store_hints
        send = getattr(hinter, "_send", None)
        if send is not None:  # time the hint thread's calls

            def timed_send(keys, _send=send):
                t0 = time.perf_counter()
                try:
                    return _send(keys)
                finally:
                    sends.append(time.perf_counter() - t0)

            hinter._send = timed_send  # type: ignore[union-attr]
    waiter = Prefetcher(room_cache) if room_cache is not None else None
    rng = np.random.default_rng(3)
    mode = "alone"

    class Feed:
        """Gives the mode's controller the first row of each layer's gate input and routing."""

        def on_gate_input(self, layer, h):
            w = sides.get(mode)
            if w is not None:
                w.controller.on_gate_input(layer, h[:1])
            m = layers.index(layer)
            if mode == "room" and m + 1 < len(layers):
                target = layers[len(layers) // 2 + m % (len(layers) - len(layers) // 2)]
                waiter.submit(room_cache.step_seq, layers.index(target), target,
                              rng.choice(a.num_experts, n, replace=False).tolist())

        def on_routing(self, layer, ids, weights):
            w = sides.get(mode)
            if w is not None:
                w.controller.on_routing(layer, ids[:1], weights[:1])
                for _ in w.cache.iter_experts(layer, []):  # the layer's lookup: what landed is taken in
                    pass

    modes = ["alone", *sides] + (["room"] if waiter is not None else [])
    times: dict[str, list[float]] = {m: [] for m in modes}
    experts: dict[str, int] = {m: 0 for m in modes}
    dec = _Decoder(model, batch, len(modes) * steps + 4, observer=Feed())

    def landed(w) -> int:
        return w.cache.stats().total.prefetched

    def one_step(m: str) -> float:
        nonlocal mode
        w = sides.get(m)
        if w is not None:
            w.cache.clear()
            w.cache.begin_step()
            w.controller.begin_step([0], [False])
            before = landed(w)
        mode = m
        dt = dec.step()
        mode = "alone"
        if w is not None:
            w.controller.end_step(w.cache.end_step())
            deadline = time.perf_counter() + 1.0
            while w.controller.prefetcher is not None and not w.controller.prefetcher.idle() \
                    and time.perf_counter() < deadline:
                time.sleep(0.0005)  # steps measured one at a time
            if w.controller.store_hints is not None:
                w.controller.store_hints.drain(1.0)
            experts[m] += landed(w) - before
        if m == "room":
            room_cache.begin_step()  # the waiting jobs are stale now: the thread drops them
            deadline = time.perf_counter() + 1.0
            while not waiter.idle() and time.perf_counter() < deadline:
                time.sleep(0.0005)
        return dt

    try:
        for _ in range(2):
            dec.step()
        for _ in range(steps):  # the modes interleaved step by step: the machine's load drifts
            for m in modes:
                times[m].append(one_step(m))
    finally:
        for w in sides.values():
            w.controller.close()
            del w.cache.prefetch
        if waiter is not None:
            waiter.close()
    med = {m: statistics.median(v) for m, v in times.items()}
    alone = med["alone"]
    per_expert = max(1e-9, experts["jobs"] / steps)  # experts prefetched per step
    hint_sends = len(sends) / steps
    return {"compute_alone_s": alone, "compute_with_prefetch_s": med["jobs"],
            "compute_with_hints_s": med.get("hints", med["jobs"]),
            "compute_with_room_wait_s": med.get("room", alone),
            "prefetch_compute_s": max(0.0, (med["jobs"] - alone) / per_expert),
            "hint_compute_s": max(0.0, (med["hints"] - med["jobs"]) / hint_sends) if hint_sends else 0.0,
            "room_wait_compute_s": max(0.0, (med["room"] - alone) / (len(layers) - 1)) if waiter else 0.0,
            "hint_shared_s": statistics.median(sends) if sends else 0.0, "hint_sends_per_step": hint_sends,
            "prefetch_expert_shared_s": sum(d for d, _ in jobs) / sum(k for _, k in jobs) if jobs else 0.0,
            "prefetched_per_step": experts["jobs"] / steps, "per_job": float(n),
            "copy_engine": float(copy_engine)}


def measure_predictor(model, cache, batch: int = 8, steps: int = 12, predictor: str = "cross_layer",
                      store_lookahead: int = 2) -> tuple[float, float]:
    """(s per MoE layer step at one row, s per extra row) the prefetch controller spends on the compute
    thread: predicting the next layer, ranking, recording the scores, naming store hints (queued, not
    sent), timed inside its hooks over decode forwards at batch 1 and `batch` (no prefetch thread)."""
    from ..predictors import make_predictor
    from ..prefetch import PrefetchController
    from ..store_hints import StoreHinter

    a = model.args
    pred = make_predictor(predictor, routers=[model.layers[i].router for i in a.moe_layers],
                          num_moe_layers=a.num_moe_layers, num_experts=a.num_experts)
    hints = StoreHinter(lambda keys: None, start_thread=False)
    ctl = PrefetchController(a, cache, pred, start_thread=False, store_hints=hints, store_lookahead=store_lookahead)
    spent = [0]

    class Timed:
        def on_gate_input(self, layer, h):
            t0 = time.perf_counter_ns()
            ctl.on_gate_input(layer, h)
            spent[0] += time.perf_counter_ns() - t0
            hints.send_pending()  # the queue is the thread's: emptied outside the timing

        def on_routing(self, layer, ids, w):
            t0 = time.perf_counter_ns()
            ctl.on_routing(layer, ids, w)
            spent[0] += time.perf_counter_ns() - t0

    per_layer: dict[int, float] = {}
    for T in (1, batch):
        rids = list(range(100 * T, 101 * T))
        for r in rids:
            ctl.start_request(r)
        ctl.begin_step(rids, [True] * T)
        dec = _Decoder(model, T, steps + 2, observer=Timed(), seed=2)
        out = []
        for s in range(steps + 2):
            ctl.begin_step(rids, [False] * T)
            spent[0] = 0
            dec.step()
            ctl.end_step(None)
            if s >= 2:
                out.append(spent[0] / 1e9 / len(a.moe_layers))
        per_layer[T] = statistics.median(out)
        for r in rids:
            ctl.end_request(r)
    ctl.close()
    row = max(0.0, (per_layer[batch] - per_layer[1]) / (batch - 1)) if batch > 1 else 0.0
    return per_layer[1], row


def measure_compute(model, cache, batch: int = 8, steps: int = 30, prompt_len: int = 16) -> dict[str, float]:
    """Compute terms from decode forwards with every expert resident (the cache at 100%, warm): medians of
    the step time at batch 1 and at `batch`, and of one expert's compute on one row."""
    a = model.args
    for layer in a.moe_layers:  # every expert resident
        for _ in cache.iter_experts(layer, list(range(a.num_experts))):
            pass
    distinct: list[int] = []

    class Count:
        def on_gate_input(self, layer, h):
            pass

        def on_routing(self, layer, ids, w):
            distinct.append(int(torch.unique(ids).numel()))

    med: dict[int, tuple[float, float]] = {}
    for T in (1, batch):
        dec = _Decoder(model, T, steps, prompt_len, observer=Count())
        times, used = [], []
        for s in range(steps):
            distinct.clear()
            dt = dec.step()
            if s >= 2:
                times.append(dt)
                used.append(sum(distinct))
        med[T] = (statistics.median(times), statistics.median(used))
    L = len(a.moe_layers)
    (_, compute), = list(cache.iter_experts(a.moe_layers[0], [0]))
    h = torch.randn(1, a.hidden_size)
    ec = _median_s(lambda: compute(h), 50)
    step_s = _median_s(lambda: torch.argmax(torch.nn.functional.linear(h, model.lm_head)), 20)
    s1, d1 = med[1]
    sb, db = med[batch]
    engine_extra = max(0.0, engine_step_s(model, prompt_len, steps) - s1)  # sampling, bookkeeping, emission
    layer_s = max(1e-6, (s1 - step_s - d1 * ec) / L)
    lts = max(0.0, (sb - step_s - L * layer_s - db * ec) / (L * (batch - 1))) if batch > 1 else 0.0
    return {"layer_s": float(layer_s), "layer_token_s": float(lts), "expert_compute_s": float(ec),
            "step_s": float(step_s + engine_extra), "batch1_step_s": float(s1), f"batch{batch}_step_s": float(sb),
            "engine_extra_s": float(engine_extra)}


def engine_step_s(model, prompt_len: int = 16, steps: int = 30) -> float:
    """Median wall time of one decode step through the Engine (batch 1): the forward plus what the engine
    does around it (sampling, statistics, emitting the token)."""
    import threading

    from ..engine import Engine, FinalEvent, GenerationRequest
    from ..generate import SamplingParams

    times: list[float] = []
    engine = Engine(model, None, max_batch_size=1, num_threads=1, on_step=lambda t: times.append(t.wall_ns / 1e9))
    done = threading.Event()
    rng = np.random.default_rng(1)
    with engine:
        engine.submit(GenerationRequest(tuple(int(x) for x in rng.integers(2, model.args.vocab_size, prompt_len)),
                                        SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)),
                      lambda ev: done.set() if isinstance(ev, FinalEvent) else None)
        done.wait(300)
    return statistics.median(times[3:]) if len(times) > 4 else 0.0


def measure_profile(pack_path: str | Path, fmt: str = "int4", store: str | None = None, name: str = "this-machine",
                    batch: int = 8, sharing: bool = True) -> HardwareProfile:
    """Measure on this machine: experts from `store` (its shm/gRPC path) or straight from the pack."""
    from expert_store.packfile import Pack

    from ..cache import ExpertCache, full_budget_bytes, min_budget_bytes
    from ..runtime import build_model
    from ..store_client import PackFetcher

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    with Pack.open(pack_path) as pack:
        client = None
        if store:
            from ..store_client import StoreClient

            client = StoreClient(store)
            client.wait_ready(30)
            fetcher, how = client, f"store {store}"
        else:
            fetcher, how = PackFetcher(pack), f"pack {pack_path} (mmap)"
        try:
            full = full_budget_bytes(pack.args, fmt, "auto", cpu)
            cache = ExpertCache(pack.args, fetcher, fmt, "auto", cpu, full)
            if client is not None:
                how += f" ({client.transport})"
            lat, per, nbytes = measure_link(cache)
            link_per = per
            pf_cache = ExpertCache(pack.args, fetcher, fmt, "auto", cpu, full)
            pcall, pexp = measure_prefetch(pf_cache)
            hint = measure_hint(client, pack.args) if client is not None else 0.0
            model = build_model(pack, cache, cpu)
            comp = measure_compute(model, cache, batch)
            small_cache = ExpertCache(pack.args, fetcher, fmt, "auto", cpu, max(full // 4, min_budget_bytes(
                pack.args, fmt, "auto", cpu)), policy="lru")
            miss = measure_demand(model, build_model(pack, small_cache, cpu), small_cache, batch, lat=lat)
            if miss > 0:  # the steady state's miss (eviction, fresh forms) over the emptied cache's
                per = miss
            pred1, pred_row = measure_predictor(model, cache, batch)
            share = measure_sharing(model, pack, fetcher, fmt, batch, hints=client is not None,
                                    room_cache=room_cache_for(cache, fetcher, fmt)) if sharing else None
        finally:
            if client is not None:
                client.close()
    build = 0.0  # folded into `per` (the cache's demand path: fetch + build per expert)
    shared = (f"; forwards at batch {batch} take {share['compute_alone_s'] * 1e3:.2f} ms alone, "
              f"{share['compute_with_prefetch_s'] * 1e3:.2f} ms with the worker's prefetch path bringing "
              f"{share['prefetched_per_step']:.0f} experts per step, "
              f"{share['compute_with_hints_s'] * 1e3:.2f} ms with store hints too: "
              f"{share['prefetch_compute_s'] * 1e6:.0f} us of compute lost per prefetched expert, "
              f"{share['hint_compute_s'] * 1e6:.0f} us per store-hint call ({share['hint_sends_per_step']:.1f} "
              f"calls per step, {share['hint_shared_s'] * 1e3:.2f} ms each), "
              f"{share['room_wait_compute_s'] * 1e6:.0f} us per layer a prefetch waits for room "
              f"({share['compute_with_room_wait_s'] * 1e3:.2f} ms per forward); the prefetch thread takes "
              f"{share['prefetch_expert_shared_s'] * 1e6:.0f} us per expert meanwhile"
              f"{'; a copy engine (room taken when proposed)' if share['copy_engine'] else ''}") if share else \
        "; sharing not measured (prefetching free for the compute thread)"
    return HardwareProfile(
        name, f"measured: {pack_path} ({fmt}, {cache.form}), experts from {how}, torch threads 1",
        link_bandwidth_Bps=nbytes / per, link_latency_s=lat, expert_setup_s=build, layer_s=comp["layer_s"],
        layer_token_s=comp["layer_token_s"], expert_compute_s=comp["expert_compute_s"], step_s=comp["step_s"],
        expert_bytes=nbytes, prefetch_expert_s=pexp, prefetch_call_s=pcall,
        hint_s=share["hint_shared_s"] if share and share["hint_shared_s"] else hint, predict_s=pred1,
        predict_row_s=pred_row,
        prefetch_shared_s=share["prefetch_expert_shared_s"] if share else 0.0,
        prefetch_compute_s=share["prefetch_compute_s"] if share else 0.0,
        hint_compute_s=share["hint_compute_s"] if share else 0.0,
        room_wait_compute_s=share["room_wait_compute_s"] if share else 0.0,
        prefetch_room="gate" if share and share["copy_engine"] else "wait",
        measured=(f"demand wave {lat * 1e3:.3f} ms + {per * 1e3:.3f} ms/expert (fetch + build, {nbytes} B blobs; "
                  f"{link_per * 1e3:.3f} ms into an emptied cache, {miss * 1e3:.3f} ms per miss in decode at 25%); "
                  f"prefetch job {pcall * 1e3:.3f} ms + {pexp * 1e3:.3f} ms/expert; store hint call "
                  f"{hint * 1e3:.3f} ms alone; prediction (cross_layer, controller) {pred1 * 1e3:.3f} ms/layer + "
                  f"{pred_row * 1e3:.3f} ms/extra row; resident decode step "
                  f"{comp['batch1_step_s'] * 1e3:.2f} ms at batch 1, "
                  f"{comp[f'batch{batch}_step_s'] * 1e3:.2f} ms at batch {batch}; expert compute "
                  f"{comp['expert_compute_s'] * 1e6:.0f} us/row; engine overhead "
                  f"{comp['engine_extra_s'] * 1e3:.2f} ms/step" + shared))
