"""The cost model: a replay's per-step counts turned into seconds on a hardware profile."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..traces import Trace
from .config import SimResult, SimulationError


@dataclass(frozen=True)
class HardwareProfile:
    """Times that turn a replay's counts into seconds. Per forward step s with T rows and per MoE layer:
    the layer's dense part (attention, norms, router) takes `layer_s + (T - 1) * layer_token_s`, each
    distinct expert it uses `expert_compute_s` (extra rows routed to it are folded into layer_token_s);
    a demand wave of n experts takes `link_latency_s + n * (bytes / link_bandwidth_Bps +
    expert_setup_s)` on the compute thread (the stall). With a predictor, the compute thread also spends
    `predict_s + (T - 1) * predict_row_s` per layer on it. Prefetches are work of a second thread: one job
    per (step, layer) of `prefetch_call_s + n * prefetch_shared_s` (when the experts land), costing the
    compute thread `n * prefetch_compute_s` (and `room_wait_compute_s` while it waits for room); store
    hints, `hint_s` per call of the hint thread and `hint_compute_s` of the compute thread's time per call
    (see `estimate_cost`)."""

    name: str
    description: str
    link_bandwidth_Bps: float  # host (store) -> device, for expert blobs
    link_latency_s: float  # per fetch call (one batched wave)
    expert_setup_s: float  # per expert on arrival: building its compute form (dequantize, copy, register)
    layer_s: float  # one MoE layer's dense part for one token row, experts excluded
    layer_token_s: float  # per extra row in the step, per layer (batched decode / prefill)
    expert_compute_s: float  # one resident expert used in a layer step (T = 1)
    step_s: float  # per forward: embedding, LM head, sampling, scheduling
    expert_bytes: int = 0  # bytes per expert transfer where the trace does not say (its meta.expert_bytes wins)
    measured: str = ""  # how the numbers were obtained
    prefetch_expert_s: float = 0.0
    """Prefetch thread time per prefetched expert, alone (fetch + verify + build + insert, the cache's
    own prefetch path); 0: the link's per-expert time (bytes / link_bandwidth_Bps + expert_setup_s)."""
    prefetch_call_s: float = 0.0
    """Prefetch thread time per job (one batched fetch call, the queue's bookkeeping); with
    prefetch_expert_s 0: link_latency_s."""
    hint_s: float = 0.0
    """Wall time of one store-hint call (the hint thread's, one call in flight: batches named meanwhile
    merge into the next call)."""
    predict_s: float = 0.0
    """Compute-thread time per MoE layer step with a predictor, one token row: the prefetch controller
    predicting the next layer, ranking the proposals, queueing the job and the store hints."""
    predict_row_s: float = 0.0
    """Of that, per extra token row in the step."""
    prefetch_shared_s: float = 0.0
    """Prefetch thread time per expert while the compute thread runs (when its jobs land); 0: as alone."""
    prefetch_compute_s: float = 0.0
    """Compute-thread time lost per prefetched expert: the slowdown prefetch work causes (the GIL, shared
    cores, memory bandwidth), measured as forwards with the real prefetch thread fetching minus without,
    per expert. 0: the overlap is free (a DMA engine)."""
    hint_compute_s: float = 0.0
    """Compute-thread time lost per store-hint call (measured likewise)."""
    room_wait_compute_s: float = 0.0
    """Compute-thread time lost per MoE layer while a prefetch waits for room (the prefetch thread woken by
    the compute's notifications on the cache's lock), measured likewise."""
    prefetch_room: str = "wait"
    """How the worker's prefetch path takes room (SimConfig.prefetch_room): wait (a prefetch thread) or
    gate (a copy engine); `measure_profile` reads it off the worker's own composition."""


# "this-machine": the dev box (2 shared CPU cores, torch 1 thread, tiny-mixtral int4 as int4_fused, store over
# shared memory), medians of three gpu_worker.simulator.measure.measure_profile runs by bench/sim_validate.py
# --bench. The compute terms are tiny-mixtral's: for another model measure it (`simulate --measure PACK`).
PROFILES: dict[str, HardwareProfile] = {
    "this-machine": HardwareProfile(
        "this-machine", "the dev box: 2 shared CPU cores, experts from the store over shared memory, "
                        "tiny-mixtral int4 (int4_fused) compute, the copy engine prefetching",
        link_bandwidth_Bps=1.19e9, link_latency_s=8.6e-5, expert_setup_s=0.0, layer_s=9.1e-4,
        layer_token_s=2.7e-4, expert_compute_s=4.2e-5, step_s=1.2e-4, expert_bytes=124416,
        prefetch_expert_s=3.2e-5, prefetch_call_s=2.6e-5, hint_s=9.5e-4, predict_s=6.5e-5, predict_row_s=1.1e-5,
        prefetch_compute_s=5.4e-5, hint_compute_s=0.0, room_wait_compute_s=0.0, prefetch_room="gate",
        measured="a miss 0.1 ms in steady state; the compute loses 0.05 ms per expert the copy engine brings; no "
                 "store hints (the store's RAM holds every expert); medians of 3 measurements"),
    # Nominal profiles (not measured here: no such machine), for Mixtral / Qwen-MoE-class models with int4
    # experts (~2-90 MB each: pass --expert-bytes or let the trace's meta say). Measure the real target.
    "pcie3-desktop": HardwareProfile(
        "pcie3-desktop", "nominal: RTX 3090-class GPU, PCIe 3.0 x16 (~12 GB/s pinned), experts from host RAM",
        link_bandwidth_Bps=12.0e9, link_latency_s=3.0e-5, expert_setup_s=2.0e-5, layer_s=6.0e-4,
        layer_token_s=5.0e-6, expert_compute_s=5.0e-5, step_s=3.0e-3),
    "pcie1-old-gpu": HardwareProfile(
        "pcie1-old-gpu", "nominal: GTX 1080 Ti-class GPU on a PCIe 1.0 x16 link (~3 GB/s), experts from host RAM",
        link_bandwidth_Bps=3.0e9, link_latency_s=5.0e-5, expert_setup_s=3.0e-5, layer_s=1.0e-3,
        layer_token_s=1.0e-5, expert_compute_s=8.0e-5, step_s=4.0e-3),
    "nvme-host": HardwareProfile(
        "nvme-host", "nominal: CPU-only host, 8 cores, cold experts read from NVMe (~2.5 GB/s, 80 us per read)",
        link_bandwidth_Bps=2.5e9, link_latency_s=8.0e-5, expert_setup_s=2.0e-4, layer_s=2.0e-3,
        layer_token_s=1.0e-4, expert_compute_s=1.5e-3, step_s=5.0e-3),
}


def load_profile(spec: str) -> HardwareProfile:
    """A built-in name, or a JSON file with HardwareProfile's fields."""
    if spec in PROFILES:
        return PROFILES[spec]
    p = Path(spec)
    if p.is_file():
        try:
            data = json.loads(p.read_text())
            return HardwareProfile(**{k: v for k, v in data.items() if k in HardwareProfile.__dataclass_fields__})
        except (json.JSONDecodeError, TypeError) as e:
            raise SimulationError(f"{p}: not a hardware profile ({' '.join(str(e).split())})") from None
    raise SimulationError(f"unknown hardware profile {spec!r}; known: {', '.join(PROFILES)} (or a JSON file)")


@dataclass
class CostEstimate:
    profile: str
    expert_bytes: int
    decode_tokens: int
    decode_s: float
    decode_stall_s: float
    prefill_tokens: int
    prefill_s: float
    prefill_stall_s: float
    decode_prefetch_work_s: float = 0.0  # prefetch thread time of the decode steps' jobs
    decode_contention_s: float = 0.0  # compute-thread time lost to prefetch and hint work (decode steps)
    decode_hint_s: float = 0.0  # of the contention: store hints
    prefetch_jobs_dropped: int = 0  # jobs not started when the compute reached their layer (demand instead)
    hint_sends: int = 0  # store-hint calls charged (every step)
    step_times: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [S] projected seconds per step
    step_hint_sends: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [S] calls charged

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def stall_ms_per_decode_token(self) -> float:
        return 1e3 * self.decode_stall_s / self.decode_tokens if self.decode_tokens else 0.0

    def per_decode_token_ms(self, seconds: float) -> float:
        return 1e3 * seconds / self.decode_tokens if self.decode_tokens else 0.0

    def summary(self) -> dict[str, Any]:
        return {"profile": self.profile, "expert_bytes": self.expert_bytes, "decode_tokens": self.decode_tokens,
                "decode_s": round(self.decode_s, 6), "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
                "stall_ms_per_decode_token": round(self.stall_ms_per_decode_token, 4),
                "prefetch_work_ms_per_decode_token": round(self.per_decode_token_ms(self.decode_prefetch_work_s), 4),
                "contention_ms_per_decode_token": round(self.per_decode_token_ms(self.decode_contention_s), 4),
                "hint_ms_per_decode_token": round(self.per_decode_token_ms(self.decode_hint_s), 4),
                "prefetch_jobs_dropped": self.prefetch_jobs_dropped, "hint_sends": self.hint_sends,
                "prefill_tokens": self.prefill_tokens, "prefill_s": round(self.prefill_s, 6)}


def resolve_expert_bytes(profile: HardwareProfile, trace: Trace, fmt: str) -> int:
    """Bytes one expert transfer moves for `trace`: its meta.expert_bytes[fmt] (or its only entry), else
    meta.cache.expert_bytes (the recording worker's), else the profile's own expert_bytes (the machine it
    was measured on)."""
    eb = trace.expert_bytes
    if fmt in eb:
        return eb[fmt]
    if eb:
        return next(iter(eb.values()))
    cache = trace.meta.get("cache") or {}
    if int(cache.get("expert_bytes") or 0) > 0:
        return int(cache["expert_bytes"])
    if profile.expert_bytes:
        return profile.expert_bytes
    raise SimulationError(f"{trace.path}: meta.expert_bytes has no {fmt!r} entry: give the profile's expert_bytes")


def hint_batches(result: SimResult) -> np.ndarray:
    """[S, L] bool: the layers that name a store-hint batch (layer l + 1 or l + 2 has experts to bring:
    the replay prefetched some there)."""
    pf = result.step_prefetched > 0
    out = np.zeros_like(pf)
    out[:, :-1] = pf[:, 1:]
    out[:, :-2] |= pf[:, 2:]
    return out


def estimate_cost(result: SimResult, profile: HardwareProfile, expert_bytes: int,
                  store_hints: bool | None = None, hint_call_share: float | None = None) -> CostEstimate:
    """Wall-clock of the replayed steps on `profile`.

    As the worker runs a layer: its dense part; the resident and prefetched experts compute (waiting
    for a prefetch of this layer still running, if one was used); then the misses are fetched and
    built in waves on the compute thread (the stall) and computed. Load on demand is that alone.

    With a predictor, each layer's dense part grows by the controller's own time (predict_s, per row
    predict_row_s). The next layer's proposals become a job of the prefetch thread at this layer's gate
    input (after its dense part), queued behind the thread's earlier jobs and behind demand fetches
    (demand outranks prefetch): `prefetch_call_s + n * prefetch_shared_s` for the n experts the replay
    inserted; those the replay found no room for at the gate input (`step_prefetch_waiting`) wait for
    this layer's trim (the end of its demand call), in a second call. A job not started when the compute
    reaches its layer is dropped (its prefetch hits are fetched on demand instead); one still running is
    waited for when the layer uses what it brings. The prefetch thread's clock carries over steps.

    Prefetching is not free overlap: the compute thread pays `n * prefetch_compute_s` for each job (the
    measured slowdown), `room_wait_compute_s` for a layer during which a job waits for room, and with
    store hints (default: whenever the replay had a predictor) `hint_compute_s` per store-hint call.
    Layer l names a hint batch when layer l + 1 or l + 2 has experts to bring (`hint_batches`); the hint
    thread has one call of `hint_s` in flight, batches named meanwhile go out together in the next.
    `hint_call_share`: instead of that timing, the share of named batches that became a call, when a run
    measured it (its calls / named batches).
    """
    S, L = result.step_misses.shape
    tokens = result.step_tokens.astype(np.float64)
    dense = profile.layer_s + np.maximum(tokens - 1, 0) * profile.layer_token_s  # [S]
    per = expert_bytes / profile.link_bandwidth_Bps + profile.expert_setup_s
    lat = profile.link_latency_s
    lk, ms, wv = result.step_lookups, result.step_misses, result.step_waves
    pf, ph = result.step_prefetched, result.step_prefetch_hits
    wait = result.step_prefetch_waiting if result.step_prefetch_waiting is not None else np.zeros_like(pf)
    ec = profile.expert_compute_s
    predicting = result.config.predictor != "none"
    hints = predicting if store_hints is None else store_hints
    hint_c = profile.hint_compute_s if hints else 0.0
    predict = profile.predict_s + np.maximum(tokens - 1, 0) * profile.predict_row_s if predicting else \
        np.zeros(S)  # [S]
    step_time = np.zeros(S)
    step_stall = np.zeros(S)
    step_work = np.zeros(S)
    step_hint = np.zeros(S)
    step_cont = np.zeros(S)
    dropped = 0
    step_sends = np.zeros(S)
    named = hint_batches(result)
    if not pf.any() and not hint_c and not predicting:  # load on demand: closed form, vectorized
        fetch = wv * lat + ms * per  # [S, L]
        step_stall = fetch.sum(axis=1)
        step_time = profile.step_s + L * dense + (lk * ec).sum(axis=1) + step_stall
    else:
        pe = profile.prefetch_shared_s or profile.prefetch_expert_s or per
        pc = profile.prefetch_call_s if profile.prefetch_expert_s else lat
        kc = profile.prefetch_compute_s
        t = 0.0
        pf_free = 0.0  # when the prefetch thread has finished its jobs
        hint_free, hint_pending, hs = 0.0, False, profile.hint_s
        for s in range(S):
            t0 = t
            stall = 0.0
            t += profile.step_s
            jobs: dict[int, tuple[float, float]] = {}  # column -> (start, end) of this step's job
            for l in range(L):
                t += dense[s] + predict[s]
                extra = 0  # prefetch hits whose job had not started: fetched on demand
                if l in jobs:
                    start, end = jobs.pop(l)
                    if start > t:
                        dropped += 1
                        extra = int(ph[s, l])
                        pf_free = max(t, pf_free - (end - start))  # the thread skips it
                    elif end > t and ph[s, l]:
                        stall += end - t
                        t = end
                waiting = 0
                if l + 1 < L:  # the next layer's proposals, from this layer's gate input
                    n = int(pf[s, l + 1])
                    waiting = int(wait[s, l + 1]) if n else 0
                    if n:
                        start = max(t, pf_free)
                        now = n - waiting  # those with room now; the others after this layer's trim
                        pf_free = start + (pc + now * pe if now else 0.0)
                        jobs[l + 1] = (start, pf_free)
                        step_work[s] += pc * ((now > 0) + (waiting > 0)) + n * pe
                    # a hint batch is named when layers l + 1, l + 2 have experts that are not resident here;
                    # one call in flight at a time: what is named meanwhile goes out in the next call
                    h = 0.0
                    if hint_call_share is not None:
                        h = hint_call_share * hint_c if named[s, l] else 0.0
                    elif hint_pending and t >= hint_free:
                        hint_free += hs  # the merged call went out when the last one ended
                        hint_pending, h = False, hint_c
                    if hint_c and hint_call_share is None and named[s, l]:
                        if t >= hint_free:
                            hint_free = t + hs
                            h += hint_c
                        else:
                            hint_pending = True
                    cost = n * kc + h + (profile.room_wait_compute_s if waiting else 0.0)
                    t += cost
                    step_cont[s] += cost
                    step_hint[s] += h
                    step_sends[s] += h / hint_c if h else 0.0
                t += (lk[s, l] - ms[s, l] - extra) * ec
                fetch = wv[s, l] * lat + ms[s, l] * per + (lat + extra * per if extra else 0.0)
                if fetch:
                    for c, (start, end) in list(jobs.items()):  # demand outranks a job not yet started
                        if start >= t:
                            jobs[c] = (start + fetch, end + fetch)
                            pf_free = max(pf_free, end + fetch)
                    t += fetch
                    stall += fetch
                    t += (ms[s, l] + extra) * ec
                if waiting:  # this layer's call has ended: its trim makes room for the rest of the job
                    start, end = jobs[l + 1]
                    later = max(end, t)
                    pf_free = later + pc + waiting * pe
                    jobs[l + 1] = (start if end > start else later, pf_free)
            step_time[s] = t - t0
            step_stall[s] = stall
    dec = result.step_decode
    return CostEstimate(profile.name, expert_bytes, int(tokens[dec].sum()), float(step_time[dec].sum()),
                        float(step_stall[dec].sum()), int(tokens[~dec].sum()), float(step_time[~dec].sum()),
                        float(step_stall[~dec].sum()), decode_prefetch_work_s=float(step_work[dec].sum()),
                        decode_contention_s=float(step_cont[dec].sum()), decode_hint_s=float(step_hint[dec].sum()),
                        prefetch_jobs_dropped=dropped, hint_sends=int(round(step_sends.sum())),
                        step_times=np.asarray(step_time, np.float64), step_hint_sends=step_sends)
