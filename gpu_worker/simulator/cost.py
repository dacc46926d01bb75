"""The cost model: a replay's per-step counts turned into seconds on a hardware profile."""

from __future__ import annotations

import json
from dataclasses import dataclass
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
    a demand wave of n experts takes `link_latency_s + n * (bytes /
    link_bandwidth_Bps + expert_setup_s)` with compute stalled; prefetches use the link after the
    previous layer's demand fetches and overlap with compute (see CostModel)."""

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


# "this-machine": the dev box (2 shared CPU cores, torch 1 thread, tiny-mixtral int4 as int4_fused, store over
# shared memory), medians of three gpu_worker.simulator.measure.measure_profile runs by bench/sim_validate.py. The
# compute terms are tiny-mixtral's: for another model measure it (`simulate --measure PACK`).
PROFILES: dict[str, HardwareProfile] = {
    "this-machine": HardwareProfile(
        "this-machine", "the dev box: 2 shared CPU cores, experts from the store over shared memory, "
                        "tiny-mixtral int4 (int4_fused) compute",
        link_bandwidth_Bps=2.53e8, link_latency_s=1.2e-3, expert_setup_s=0.0, layer_s=3.0e-4,
        layer_token_s=7.5e-5, expert_compute_s=1.75e-5, step_s=3.6e-4, expert_bytes=124416,
        measured="demand wave 1.2 ms + 0.49 ms/expert (fetch + build); medians of 3 runs of bench/sim_validate.py"),
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

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def stall_ms_per_decode_token(self) -> float:
        return 1e3 * self.decode_stall_s / self.decode_tokens if self.decode_tokens else 0.0

    def summary(self) -> dict[str, Any]:
        return {"profile": self.profile, "expert_bytes": self.expert_bytes, "decode_tokens": self.decode_tokens,
                "decode_s": round(self.decode_s, 6), "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
                "stall_ms_per_decode_token": round(self.stall_ms_per_decode_token, 4),
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


def estimate_cost(result: SimResult, profile: HardwareProfile, expert_bytes: int) -> CostEstimate:
    """Wall-clock of the replayed steps on `profile`.

    As the worker runs a layer: its dense part (a = t + dense(T)); the resident and prefetched experts
    compute first (waiting for the prefetch to land if one is used); then the misses are fetched in
    waves, the compute thread blocked (the stall), and computed. The next layer's proposals go on
    the link when this layer's router ran, overlapping this layer's compute; a demand fetch
    outranks them.
    """
    S, L = result.step_misses.shape
    tokens = result.step_tokens.astype(np.float64)
    dense = profile.layer_s + np.maximum(tokens - 1, 0) * profile.layer_token_s  # [S]
    per = expert_bytes / profile.link_bandwidth_Bps + profile.expert_setup_s
    lat = profile.link_latency_s
    lk, ms, wv = result.step_lookups, result.step_misses, result.step_waves
    pf, ph = result.step_prefetched, result.step_prefetch_hits
    step_time = np.empty(S)
    step_stall = np.empty(S)
    ec = profile.expert_compute_s
    if not pf.any():  # load on demand: closed form, vectorized
        fetch = wv * lat + ms * per  # [S, L]
        step_stall = fetch.sum(axis=1)
        step_time = profile.step_s + L * dense + (lk * ec).sum(axis=1) + step_stall
    else:
        for s in range(S):
            t = profile.step_s
            link_free = 0.0
            arrival = 0.0  # when this layer's prefetched experts are all in
            stall = 0.0
            for l in range(L):
                a = t + dense[s]
                ready = arrival if ph[s, l] and arrival > a else a
                stall += ready - a
                p_end = 0.0
                if l + 1 < L and pf[s, l + 1]:  # the next layer's proposals go out once this router ran
                    p_end = max(a, link_free) + lat + pf[s, l + 1] * per
                    link_free = p_end
                hit_done = ready + (lk[s, l] - ms[s, l]) * ec
                end = hit_done
                fetch = wv[s, l] * lat + ms[s, l] * per
                if fetch:
                    # a demand fetch outranks prefetches: it waits for at most the expert in flight,
                    # and pushes the queued prefetch back by its own duration
                    d_start = max(hit_done, min(link_free, hit_done + per))
                    d_end = d_start + fetch
                    if p_end > d_start:
                        p_end += fetch
                    link_free = max(link_free, p_end, d_end)
                    stall += d_end - hit_done
                    end = d_end + ms[s, l] * ec
                arrival = p_end
                t = end
            step_time[s] = t
            step_stall[s] = stall
    dec = result.step_decode
    return CostEstimate(profile.name, expert_bytes, int(tokens[dec].sum()), float(step_time[dec].sum()),
                        float(step_stall[dec].sum()), int(tokens[~dec].sum()), float(step_time[~dec].sum()),
                        float(step_stall[~dec].sum()))
