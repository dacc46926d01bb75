"""`python -m gpu_worker simulate`: replay expert traces through the worker's own cache ledger, policies,
allocations and predictors, and project decode speed.

    python -m gpu_worker simulate TRACE... --policies lru,lfu,lfu_decay,arc,belady \\
        --allocations uniform,shallow_favoring --budgets 10%,25%,50%,75% \\
        [--predictors none,prev_token,eap,recorded] [--prefetch-width W] [--hardware PROFILE] [--json OUT]

Two replay semantics (gpu_worker.simulator.run): `worker` (default), the worker's cache ledger
step by step, exact for load on demand; `flat`, the (token, expert) sequence of the published
studies. Belady (`belady`) evicts the resident expert whose next use is farthest (future-aware,
here only), driven through the same ledger as every other policy: the upper bound of demand caching.

Results carry per (step, layer) counts that `estimate_cost` turns into time on a hardware profile.
With a predictor the tables also show the prefetch terms: the compute thread's stall, the prefetch
thread's busy time, and the compute time prefetching costs (docs/simulator.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..traces import concat_traces, load_trace
from .config import PIN_MODES, SEMANTICS, SIM_POLICIES, SimConfig, SimResult, SimulationError, parse_budget, \
    worker_config_of
from .cost import PROFILES, HardwareProfile, estimate_cost, load_profile, resolve_expert_bytes
from .replay import Replay
from .run import make_sim_allocation, simulate


def _say(*args: object) -> None:
    """print to stdout; once the reader has gone (`simulate ... | head`), the rest goes to /dev/null and the
    simulation goes on (its --json file is still written)."""
    try:
        print(*args, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


_HINTS: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


def _full_layers(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'auto', got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_simulate_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("simulate", help="replay expert traces through the cache policies, allocations and "
                                        "predictors (with Belady's optimum) and project decode speed",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+", metavar="TRACE", help="moe-trace/1 .npz files")
    p.add_argument("--policies", default="lru,lfu,lfu_decay,arc,belady", help="comma-separated")
    p.add_argument("--allocations", default="uniform,shallow_favoring",
                   help="comma-separated: uniform, shallow_favoring, learned:PATH")
    p.add_argument("--budgets", default="10%,25%,50%,75%",
                   help="comma-separated shares of all experts (25%%) or expert counts; 'worker' = the "
                        "recording worker's own budget and slots (meta.cache)")
    p.add_argument("--predictors", default="none", help="comma-separated: none, prev_token, eap, recorded")
    p.add_argument("--prefetch-width", type=int, default=0, help="experts proposed per row and layer (0: top-k)")
    p.add_argument("--semantics", default="worker", choices=SEMANTICS,
                   help="worker: the ExpertCache's step semantics (default); flat: (token, expert) accesses")
    p.add_argument("--pin", default="reference", choices=PIN_MODES, help="flat semantics: current-token pinning")
    p.add_argument("--lfu-decay", type=float, default=0.9)
    p.add_argument("--full-layers", type=_full_layers, default=None,
                   help="shallow_favoring: MoE layers kept whole (default auto: from the budget, layers and top-k)")
    p.add_argument("--hardware", default="this-machine",
                   help=f"cost model profile: {', '.join(PROFILES)}, or a JSON file (from --measure)")
    p.add_argument("--format", default="int4", help="expert format whose bytes the link moves (meta.expert_bytes)")
    p.add_argument("--expert-bytes", type=int, default=0,
                   help="bytes one expert transfer moves (default: the trace's meta.expert_bytes[--format])")
    p.add_argument("--prefetch-room", default="auto", choices=("auto", "wait", "gate"),
                   help="when a prefetch takes its room: wait (a prefetch thread), gate (a copy engine), auto: "
                        "the hardware profile's")
    p.add_argument("--store-hints", default="auto", choices=tuple(_HINTS),
                   help="charge store hints (the profile's hint_compute_s per layer): auto = with a predictor")
    p.add_argument("--measure", metavar="PACK", default=None,
                   help="measure this machine's compute and expert set-up times on PACK first and use them")
    p.add_argument("--concat", action="store_true", help="treat the traces as one (files of one session)")
    p.add_argument("--json", dest="json_out", default=None, help="write every result as JSON here")
    p.set_defaults(func=cmd_simulate)
    return p


def cmd_simulate(a: argparse.Namespace) -> int:
    traces = [load_trace(t) for t in a.traces]
    if a.concat:
        traces = [concat_traces(traces)]
    policies = _split(a.policies)
    for pol in policies:
        if pol not in SIM_POLICIES:
            raise SimulationError(f"unknown policy {pol!r}; known: {', '.join(SIM_POLICIES)}")
    allocations = _split(a.allocations)
    for al in allocations:
        make_sim_allocation(al, a.full_layers)
    predictors = _split(a.predictors)
    if a.measure:
        from .measure import measure_profile

        profile = measure_profile(a.measure, fmt=a.format)
        print(f"[measured: {profile.measured}]", file=sys.stderr)  # noqa: T201
    else:
        profile = load_profile(a.hardware)
    room = profile.prefetch_room if a.prefetch_room == "auto" else a.prefetch_room
    out: list[dict[str, Any]] = []
    for t in traces:
        rp = Replay(t)
        budgets = _split(a.budgets)
        eb = a.expert_bytes
        if not eb:
            try:
                eb = resolve_expert_bytes(profile, t, a.format)
            except SimulationError as e:
                _say(f"note: {e} (or pass --expert-bytes); no time projection")
        _say(f"\n== {t.path}: {t.model}, {t.num_tokens} rows x {t.num_layers} MoE layers, {t.num_experts} experts, "
             f"top-{t.top_k}; {rp.S} forward steps ({'recorded' if t.step is not None else 'inferred'}); "
             f"semantics {a.semantics}")
        runs: list[SimResult] = []
        notes: set[str] = set()
        if eb and not a.expert_bytes and not t.expert_bytes and not (t.meta.get("cache") or {}).get("expert_bytes"):
            notes.add(f"{t.name}: no meta.expert_bytes: time projected with the {profile.name} profile's {eb} bytes "
                      f"per expert (pass --expert-bytes for this model's)")
        for bud in budgets:
            if bud == "worker":
                wc = worker_config_of(t)
                if wc is None:
                    notes.add(f"{t.name}: budget 'worker' skipped: the trace has no meta.cache")
                    continue
                configs = [SimConfig(policy=pol, total_slots=wc.total_slots, allocation=wc.allocation,
                                     predictor=pr, prefetch_width=a.prefetch_width, semantics=a.semantics,
                                     pin=a.pin, lfu_decay=a.lfu_decay, full_layers=a.full_layers,
                                     prefetch_room=room, slots_override=wc.slots_override)
                           for pol in policies for pr in predictors]
            else:
                q = parse_budget(bud, t.num_layers, t.num_experts)
                configs = [SimConfig(policy=pol, total_slots=q, allocation=al, predictor=pr,
                                     prefetch_width=a.prefetch_width, semantics=a.semantics, pin=a.pin,
                                     lfu_decay=a.lfu_decay, full_layers=a.full_layers, prefetch_room=room)
                           for al in allocations for pol in policies for pr in predictors]
            for cfg in configs:
                if cfg.semantics == "worker" and cfg.total_slots < t.top_k:
                    notes.add(f"budget {bud} = {cfg.total_slots} experts is below top-{t.top_k}: skipped")
                    continue
                if cfg.semantics == "flat" and cfg.predictor != "none":
                    notes.add("flat semantics replays caching only: predictors skipped")
                    continue
                res = simulate(rp, cfg)
                notes.update(res.notes)
                if res.notes and cfg.predictor != "none" and not res.prefetched.any() and \
                        any("skipped" in n for n in res.notes):
                    continue
                runs.append(res)
                row = res.summary()
                row["budget"] = bud
                if eb:
                    row["cost"] = estimate_cost(res, profile, eb, store_hints=_HINTS[a.store_hints]).summary()
                out.append(row)
        _print_tables(runs, t.num_layers * t.num_experts, eb, profile, _HINTS[a.store_hints])
        for n in sorted(notes):
            _say(f"note: {n}")
    if out:
        thr = {}
        for row in out:
            if row["predictor"] == "none":
                thr.setdefault(row["policy"], []).append(row["cells_per_s"])
        _say("\nreplay speed, load-on-demand runs (token-layer cells/s, median): " +
              ", ".join(f"{k} {int(np.median(v)):,}" for k, v in thr.items()))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"profile": asdict(profile), "results": out}, indent=1))
        _say(f"wrote {a.json_out}")
    return 0


def _print_tables(runs: list[SimResult], total: int, eb: int, profile: HardwareProfile,
                  hints: bool | None = None) -> None:
    by_key: dict[tuple[str, str, str], dict[int, SimResult]] = {}
    slot_cols: list[int] = []
    for r in runs:
        c = r.config
        by_key.setdefault((c.allocation if c.slots_override is None else "worker", c.predictor, c.policy), {})[
            c.total_slots] = r
        if c.total_slots not in slot_cols:
            slot_cols.append(c.total_slots)
    if not runs:
        return
    head = "  ".join(f"{f'{q}={100 * q / total:.0f}%' if total else q:>9}" for q in slot_cols)
    _say("hit rate (hits + prefetch hits) / lookups; columns: budget in experts (share of all experts)")
    _say(f"{'allocation':<18}{'predictor':<12}{'policy':<10}{head}")
    for (al, pr, pol), d in by_key.items():
        cells = "  ".join(f"{d[q].hit_rate:9.3f}" if q in d else f"{'-':>9}" for q in slot_cols)
        _say(f"{al[:17]:<18}{pr:<12}{pol:<10}{cells}")
    if eb:
        costs = {(k, q): estimate_cost(r, profile, eb, store_hints=hints) for k, d in by_key.items()
                 for q, r in d.items()}
        _say(f"projected decode tokens/s on {profile.name} ({eb} bytes per expert)")
        for (al, pr, pol), d in by_key.items():
            cells = "  ".join(f"{costs[(al, pr, pol), q].decode_tokens_per_s:9.1f}" if q in d else
                              f"{'-':>9}" for q in slot_cols)
            _say(f"{al[:17]:<18}{pr:<12}{pol:<10}{cells}")
        if any(k[1] != "none" for k in by_key):
            _say(f"prefetch terms on {profile.name}: {prefetch_terms(profile, eb)}")
            _say("ms per decode token: stall (compute waiting) / prefetch thread busy / compute lost to prefetching")
            for (al, pr, pol), d in by_key.items():
                if pr == "none":
                    continue
                cells = "  ".join(f"{_terms(costs[(al, pr, pol), q]):>17}" if q in d else f"{'-':>17}"
                                  for q in slot_cols)
                _say(f"{al[:17]:<18}{pr:<12}{pol:<10}{cells}")


def _terms(c) -> str:
    return (f"{c.stall_ms_per_decode_token:.2f}/{c.per_decode_token_ms(c.decode_prefetch_work_s):.2f}/"
            f"{c.per_decode_token_ms(c.decode_contention_s):.2f}")


def prefetch_terms(p: HardwareProfile, eb: int) -> str:
    """The profile's prefetch costs in one line."""
    thread = p.prefetch_shared_s or p.prefetch_expert_s or eb / p.link_bandwidth_Bps + p.expert_setup_s
    return (f"{thread * 1e6:.0f} us/expert on the prefetch thread, {p.prefetch_compute_s * 1e6:.0f} us/expert "
            f"lost by the compute thread, controller {p.predict_s * 1e6:.0f} us/layer "
            f"(+{p.predict_row_s * 1e6:.0f} per row), store hints {p.hint_compute_s * 1e6:.0f} us/call lost by "
            f"the compute thread, a prefetch waiting for room {p.room_wait_compute_s * 1e6:.0f} us/layer")
