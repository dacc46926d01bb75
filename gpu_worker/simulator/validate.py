"""Predicted against measured: a recorded run's trace replayed with the run's own configuration and
costed over the window a benchmark measures (bench/sim_validate.py --bench)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..traces import Trace
from .config import SimConfig, SimResult, SimulationError, worker_config_of
from .cost import CostEstimate, HardwareProfile, estimate_cost, hint_batches, resolve_expert_bytes
from .replay import Replay
from .run import simulate


@dataclass(frozen=True)
class RunPrediction:
    """One trace's replay, costed over its last `requests` requests from their first first-token on (the
    summary's counts are the window's)."""

    config: SimConfig
    result: SimResult
    cost: CostEstimate
    window_steps: int  # forward steps in the window
    window_tokens: int  # decode rows of the window's requests (generated tokens after each one's first)
    window_s: float  # projected seconds of those steps
    window: np.ndarray  # [S] bool: the window's steps

    @property
    def decode_tokens_per_s(self) -> float:
        return self.window_tokens / self.window_s if self.window_s > 0 else 0.0

    def per_token_ms(self, seconds: float) -> float:
        return 1e3 * seconds / self.window_tokens if self.window_tokens else 0.0

    def summary(self) -> dict[str, Any]:
        c, r = self.cost, self.result
        return {"sim_config": self.config.label(), "predicted_tok_s": round(self.decode_tokens_per_s, 1),
                "window_steps": self.window_steps, "window_tokens": self.window_tokens,
                "hit_rate": round(r.hit_rate, 4), "prefetched": int(r.step_prefetched[self.window].sum()),
                "misses": int(r.step_misses[self.window].sum()),
                "prefetch_hits": int(r.step_prefetch_hits[self.window].sum()),
                "hint_sends": int(round(c.step_hint_sends[self.window].sum())) if len(c.step_hint_sends) else 0,
                "stall_ms_per_token": round(c.stall_ms_per_decode_token, 3),
                "prefetch_work_ms_per_token": round(c.per_decode_token_ms(c.decode_prefetch_work_s), 3),
                "contention_ms_per_token": round(c.per_decode_token_ms(c.decode_contention_s), 3),
                "prefetch_jobs_dropped": c.prefetch_jobs_dropped}


def window_steps(trace: Trace, requests: int) -> np.ndarray:
    """Steps [S] (bool) of a benchmark's measured window: every row belongs to one of the trace's last
    `requests` requests (by first appearance), from the step after the first such step (the first
    first-token) to the end."""
    rp = Replay(trace)
    if trace.request is None:
        raise SimulationError(f"{trace.path}: request: the trace has no request ids to find the workload by")
    order = list(dict.fromkeys(trace.request.tolist()))
    keep = set(order[-requests:]) if requests > 0 else set(order)
    steps = np.zeros(rp.S, bool)
    rows_step = trace.steps()
    first = {int(s): True for s in np.unique(rows_step)}
    for rid, s in zip(trace.request.tolist(), rows_step.tolist()):
        if rid not in keep:
            first[s] = False
    ids = sorted(first)
    mask = np.array([first[s] for s in ids], bool)
    if len(mask) != rp.S:
        raise SimulationError(f"{trace.path}: step: {len(mask)} steps, the replay has {rp.S}")
    hits = np.flatnonzero(mask)
    if len(hits):
        steps[hits[0] + 1:] = mask[hits[0] + 1:]
    return steps


def predict_run(trace: Trace, profile: HardwareProfile, requests: int, store_hints: bool | None = None,
                fmt: str = "int4", hint_calls: int | None = None) -> RunPrediction:
    """The recording worker's configuration (meta.cache) replayed, with its recorded predictions when the
    trace has them, costed on `profile` over `window_steps(trace, requests)`. `hint_calls`: the store-hint
    calls the run made in that window (its statistics), charged in place of the hint thread's timing."""
    cfg = worker_config_of(trace)
    if cfg is None:
        raise SimulationError(f"{trace.path}: meta.cache: the trace does not say how the worker's cache ran")
    if trace.predicted is not None:
        cfg = dataclasses.replace(cfg, predictor="recorded", prefetch_room=profile.prefetch_room)
    res = simulate(trace, cfg)
    win = window_steps(trace, requests)
    share = None
    if hint_calls is not None:
        named = int(hint_batches(res)[win].sum())
        share = min(1.0, hint_calls / named) if named else 0.0
    cost = estimate_cost(res, profile, resolve_expert_bytes(profile, trace, fmt),
                         store_hints=store_hints if cfg.predictor != "none" else False, hint_call_share=share)
    rows_step = trace.steps()
    _, inv = np.unique(rows_step, return_inverse=True)
    decode_rows = (trace.phase == 1) if trace.phase is not None else np.ones(trace.num_tokens, bool)
    tokens = int((decode_rows & win[inv]).sum())
    return RunPrediction(cfg, res, cost, int(win.sum()), tokens, float(cost.step_times[win].sum()), win)
