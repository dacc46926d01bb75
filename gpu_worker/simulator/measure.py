"""Measuring a `HardwareProfile` on this machine (torch, the only part of the simulator that needs it;
imported by `simulate --measure` only).

    profile = measure_profile(PACK)                       # experts read from the pack (mmap)
    profile = measure_profile(PACK, store="unix:/s.sock") # experts over the store's fetch path (shm/gRPC)

Link: the cache's own demand path (`ExpertCache.iter_experts` of n experts that all miss: one
batched fetch + building each compute form + bookkeeping), timed for n = 1 and n = 8; latency per
wave and time per expert from a line through the two medians. Compute: decode forwards with every
expert resident (the same cache at 100%, warm), medians at batch 1 and at `batch`; one expert's
compute on one row and the LM head timed alone; then
    step(T) = step_s + L * (layer_s + (T - 1) * layer_token_s) + expert_compute_s * sum_l distinct_l
solved for layer_s (batch 1) and layer_token_s (batch `batch`). Medians, because this machine is
shared and noisy.
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


def measure_link(cache, repeats: int = 15, sizes: tuple[int, int] = (1, 8)) -> tuple[float, float, int]:
    """(latency s per wave, s per expert incl. its build) of the cache's own demand path: `iter_experts` of n
    experts none of which is resident (the cache emptied first, so one wave), for two n; a line through
    the medians. Also returns one blob's bytes."""
    a = cache.args
    rng = np.random.default_rng(0)
    med = {}
    for n in sizes:
        times = []
        for r in range(repeats + 2):
            layer = a.moe_layers[r % len(a.moe_layers)]
            ids = rng.choice(a.num_experts, n, replace=False).tolist()
            cache.clear()
            t0 = time.perf_counter()
            for _ in cache.iter_experts(layer, ids):
                pass
            if r >= 2:  # the first calls warm connections, segments, page cache
                times.append(time.perf_counter() - t0)
        med[n] = statistics.median(times)
    n1, n2 = sizes
    per = max(1e-7, (med[n2] - med[n1]) / (n2 - n1))
    blob = cache.fetcher.fetch([(a.moe_layers[0], 0, cache.fmt)])[0]
    return max(0.0, med[n1] - n1 * per), per, blob.nbytes


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

    count = Count()
    rng = np.random.default_rng(0)
    med: dict[int, tuple[float, float]] = {}
    for T in (1, batch):
        seqs = [model.new_sequence(prompt_len + steps + 1) for _ in range(T)]
        prompts = [torch.tensor(rng.integers(2, a.vocab_size, prompt_len)) for _ in range(T)]
        logits = model.forward(seqs, prompts, observer=count)
        nxt = [torch.argmax(logits[j]).reshape(1) for j in range(T)]
        times, used = [], []
        for s in range(steps):
            distinct.clear()
            t0 = time.perf_counter()
            logits = model.forward(seqs, nxt, observer=count)
            nxt = [torch.argmax(logits[j]).reshape(1) for j in range(T)]
            if s >= 2:
                times.append(time.perf_counter() - t0)
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
                    batch: int = 8) -> HardwareProfile:
    """Measure on this machine: experts from `store` (its shm/gRPC path) or straight from the pack."""
    from expert_store.packfile import Pack

    from ..cache import ExpertCache, full_budget_bytes
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
            cache = ExpertCache(pack.args, fetcher, fmt, "auto", cpu, full_budget_bytes(pack.args, fmt, "auto", cpu))
            if client is not None:
                how += f" ({client.transport})"
            lat, per, nbytes = measure_link(cache)
            model = build_model(pack, cache, cpu)
            comp = measure_compute(model, cache, batch)
        finally:
            if client is not None:
                client.close()
    build = 0.0  # folded into `per` (the cache's demand path: fetch + build per expert)
    return HardwareProfile(
        name, f"measured: {pack_path} ({fmt}, {cache.form}), experts from {how}, torch threads 1",
        link_bandwidth_Bps=nbytes / per, link_latency_s=lat, expert_setup_s=build, layer_s=comp["layer_s"],
        layer_token_s=comp["layer_token_s"], expert_compute_s=comp["expert_compute_s"], step_s=comp["step_s"],
        expert_bytes=nbytes,
        measured=(f"demand wave {lat * 1e3:.3f} ms + {per * 1e3:.3f} ms/expert (fetch + build, {nbytes} B blobs); "
                  f"resident decode step {comp['batch1_step_s'] * 1e3:.2f} ms at batch 1, "
                  f"{comp[f'batch{batch}_step_s'] * 1e3:.2f} ms at batch {batch}; expert compute "
                  f"{comp['expert_compute_s'] * 1e6:.0f} us/row; engine overhead "
                  f"{comp['engine_extra_s'] * 1e3:.2f} ms/step"))
