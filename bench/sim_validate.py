"""Validate the simulator's cost model against measured decode on this machine.

    PYTHONPATH=. .venv/bin/python bench/sim_validate.py [--pack DIR] [--out runs/sim_validate]
        [--budgets 25%,50%] [--new-tokens 48]
    PYTHONPATH=. .venv/bin/python bench/sim_validate.py --bench BENCH_OUT --traces TRACE_DIR [--out DIR]

With --bench: the benchmark's own runs. `python -m bench run ... --worker-arg=--trace-dir=TRACE_DIR`
records one trace per run (its meta names the run's cache: budget, policy, predictor); each is matched
to its run in BENCH_OUT/results.json, a profile is measured over a store on BENCH_OUT/pack (prefetch
path, store hints and the two threads' sharing included), and each trace is replayed with the run's
own configuration (its recorded predictions for a predictor, store hints where the run sent them) and
costed over the window the benchmark measures (its decode workload's requests, from the first
first-token on). Prints predicted vs measured decode tokens/s per run and every configuration's ratio
to LRU at the same budget, with the error (the cost model's target: within 15%), and writes
OUT/bench_validation.json. Without --bench:

1. Starts an expert store (shared-memory path) on a tiny-mixtral int4 pack.
2. Measures a hardware profile ("this-machine") over the store: fetch latency and per-expert time,
   build time, compute terms (gpu_worker.simulator.measure). Written to OUT/profile.json.
3. For each budget and mode (sequential: one request at a time; concurrent: the 8 prompts at once),
   serves the 8 prompts of prompts.jsonl in process (Engine + ExpertCache over the store, LRU, load on
   demand), recording a trace, timing every decode step; replays the trace (hit counts must equal the
   cache's) and projects decode tokens/s with the profile: predicted vs measured.
4. Runs the real worker process (python -m gpu_worker serve) on the same store and budgets, driven by
   client.api.WorkerClient: measured decode tokens/s beside the prediction from step 3's trace.
Prints a table and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from client.processes import Service, module_command  # noqa: E402
from gpu_worker.simulator import Replay, estimate_cost, simulate, worker_config_of  # noqa: E402
from gpu_worker.traces import load_trace, recorder_for  # noqa: E402

MODEL = REPO.parent / "shared" / "models" / "tiny-mixtral"


def prompts_ids(pack_dir: Path) -> list[list[int]]:
    from gpu_worker.tokenizer import TextTokenizer

    tok = TextTokenizer(pack_dir / "tokenizer.json")
    return [tok.encode(json.loads(line)["prompt"]) for line in (MODEL / "prompts.jsonl").read_text().splitlines()]


def run_in_process(pack, store_addr: str, prompts, budget: str, concurrent: bool, new_tokens: int, out: Path):
    from gpu_worker.cache import ExpertCache, full_budget_bytes
    from gpu_worker.config import resolve_budget
    from gpu_worker.engine import Engine, ErrorEvent, FinalEvent, GenerationRequest
    from gpu_worker.generate import SamplingParams
    from gpu_worker.runtime import build_model
    from gpu_worker.store_client import StoreClient

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    store = StoreClient(store_addr)
    store.wait_ready(30)
    full = full_budget_bytes(pack.args, "int4", "auto", cpu)
    cache = ExpertCache(pack.args, store, "int4", "auto", cpu, resolve_budget(budget, full), policy="lru")
    model = build_model(pack, cache, cpu)
    tdir = out / f"traces-{budget.rstrip('%')}-{'conc' if concurrent else 'seq'}"
    recorder = recorder_for(pack.args, tdir, model_name="tiny-mixtral", cache=cache,
                            expert_bytes={"int4": store.manifest().expert_bytes("int4")})
    step_s: list[float] = []
    engine = Engine(model, None, max_batch_size=8, num_threads=1, tracker=cache, recorder=recorder,
                    on_step=lambda t: step_s.append(t.wall_ns / 1e9))
    finals = []
    with engine:
        groups = [prompts] if concurrent else [[p] for p in prompts]
        for group in groups:
            done = [threading.Event() for _ in group]

            def sink(i):
                def f(ev):
                    if isinstance(ev, (FinalEvent, ErrorEvent)):
                        finals.append(ev)
                        done[i].set()
                return f

            for i, ids in enumerate(group):
                engine.submit(GenerationRequest(tuple(ids), SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)),
                              sink(i))
            for d in done:
                d.wait(600)
    errors = [f for f in finals if isinstance(f, ErrorEvent)]
    if errors:
        raise RuntimeError(errors[0].error)
    files = recorder.close()
    store.close()
    trace = load_trace(files[0])
    rp = Replay(trace)
    if len(step_s) != rp.S:
        raise RuntimeError(f"{len(step_s)} timed steps but {rp.S} steps in the trace")
    import numpy as np

    dec = rp.step_decode
    measured = float(rp.step_tokens[dec].sum() / np.array(step_s)[dec].sum())
    stats = cache.stats()
    return trace, measured, stats


def worker_process(store_addr: str, out: Path, budget: str, prompts, concurrent: bool, new_tokens: int) -> float:
    from client.api import WorkerClient

    sock = out / f"worker-{budget.rstrip('%')}.sock"
    sock.unlink(missing_ok=True)
    proc = Service("worker", module_command("gpu_worker", "serve", "--store", store_addr, "--budget-bytes", budget,
                                            "--listen", f"unix:{sock}", "--policy", "lru", "--predictor", "none",
                                            "--threads", "1", "--log-level", "warning"), sock.with_suffix(".log"))
    try:
        proc.wait_serving(f"unix:{sock}", 60)
        client = WorkerClient(f"unix:{sock}")
        client.generate_text(token_ids=prompts[0][:4], max_new_tokens=2, ignore_eos=True)  # warm the channel
        results = []
        if concurrent:
            threads = []
            for p in prompts:
                th = threading.Thread(target=lambda p=p: results.append(
                    client.generate_text(token_ids=p, max_new_tokens=new_tokens, ignore_eos=True).result))
                th.start()
                threads.append(th)
            for th in threads:
                th.join()
            tokens = sum(r.usage.completion_tokens - 1 for r in results)
            return tokens / (max(r.timings.decode_ns for r in results) / 1e9)
        for p in prompts:
            results.append(client.generate_text(token_ids=p, max_new_tokens=new_tokens, ignore_eos=True).result)
        tokens = sum(r.usage.completion_tokens - 1 for r in results)
        return tokens / (sum(r.timings.decode_ns for r in results) / 1e9)
    finally:
        proc.stop(20)


def start_store(pack_dir: Path, out: Path) -> tuple[Service, str]:
    sock = out / "store.sock"
    sock.unlink(missing_ok=True)
    store = Service("store", module_command("expert_store", "serve", pack_dir, "--listen", f"unix:{sock}",
                                            "--ram-bytes", "64MiB", "--log-level", "warning"), out / "store.log")
    store.wait_serving(f"unix:{sock}", 60)
    return store, f"unix:{sock}"


def _run_key(run: dict) -> tuple[int, str, str]:
    from bench.plan import CONFIGURATIONS

    w = CONFIGURATIONS[run["config"]].worker
    return (int(run["workloads"][next(iter(run["workloads"]))]["stats_delta"]["budget_bytes"]),
            w.get("policy", "lru"), w.get("predictor", "none"))


def _trace_key(trace) -> tuple[int, str, str]:
    c = trace.meta.get("cache") or {}
    return int(c.get("budget_bytes", 0)), str(c.get("policy", "")), str(c.get("predictor", "none"))


def median_profile(profiles: list, how: str):
    """One profile whose every number is the median over `profiles` (a noisy, shared machine)."""
    import statistics
    from dataclasses import fields, replace

    nums = {f.name: statistics.median(getattr(p, f.name) for p in profiles) for f in fields(profiles[0])
            if isinstance(getattr(profiles[0], f.name), float)}
    return replace(profiles[-1], measured=f"medians of {len(profiles)} measurements ({how}); the last: "
                                          f"{profiles[-1].measured}", **nums)


def validate_bench(bench: Path, trace_dir: Path, out: Path, profile_path: str | None, store_starter,
                   repeats: int = 3, hint_calls: str = "measured") -> int:
    """Predicted vs measured for a benchmark's own runs (module docstring)."""
    import statistics

    from gpu_worker.simulator import load_profile
    from gpu_worker.simulator.measure import measure_profile
    from gpu_worker.simulator.validate import predict_run

    results = json.loads((bench / "results.json").read_text())
    runs = [r for r in results["runs"] if r.get("status") == "ok" and r.get("workloads")]
    files = sorted(trace_dir.glob("*.npz"))
    traces: dict[tuple, list] = {}
    for f in files:
        t = load_trace(f)
        traces.setdefault(_trace_key(t), []).append(t)
    if profile_path:
        profile = load_profile(profile_path)
    else:
        pack = bench / "pack"
        store, addr = store_starter(pack, out)
        try:
            profiles = []
            for i in range(repeats):
                profiles.append(measure_profile(pack, "int4", store=addr))
                print(f"[{i}] profile: {profiles[-1].measured}", flush=True)
        finally:
            store.stop(20)
        profile = median_profile(profiles, "bench/sim_validate.py --bench")
        (out / "profile.json").write_text(json.dumps(asdict(profile), indent=1, default=float))
    rows = []
    used: dict[tuple, int] = {}
    for run in runs:
        key = _run_key(run)
        i = used.get(key, 0)
        if i >= len(traces.get(key, [])):
            print(f"note: no trace for {run['config']}@{run['budget']} (budget bytes, policy, predictor = {key})")
            continue
        used[key] = i + 1
        trace = traces[key][i]
        wl_name, wl = next(iter(run["workloads"].items()))
        sd = wl["stats_delta"]
        calls = int(sd.get("store_hints_sent", 0))
        pred = predict_run(trace, profile, int(sd["requests_total"]), store_hints=calls > 0,
                           hint_calls=calls if hint_calls == "measured" else None)
        rows.append({"config": run["config"], "budget": run["budget"], "repeat": run["repeat"], "workload": wl_name,
                     "trace": trace.path, "measured_tok_s": round(wl["figures"]["decode_tokens_per_s"], 1),
                     "measured_prefetches": sd.get("prefetches_issued", 0), "measured_misses": sd["misses"],
                     "measured_fetch_wait_ms_per_token": round(wl["figures"]["fetch_wait_ms_per_token"], 3),
                     "measured_hint_sends": sd.get("store_hints_sent", 0),
                     **pred.summary()})
    # the serving stack's own cost per step (gRPC streaming, the client, the engine around the forward),
    # measured by the all-resident run of the same repeat: its measured window time less the projected
    for r in rows:
        ar = [b for b in rows if b["config"] == "all_resident" and b["repeat"] == r["repeat"]]
        over = 0.0
        if ar:
            b = ar[0]
            over = (b["window_tokens"] / b["measured_tok_s"] - b["window_tokens"] / b["predicted_tok_s"]) / \
                b["window_steps"]
        r["serving_ms_per_step"] = round(1e3 * over, 3)
        r["predicted_serving_tok_s"] = round(r["window_tokens"] / (r["window_tokens"] / r["predicted_tok_s"] +
                                                                   over * r["window_steps"]), 1)
    ratios = []
    for r in rows:
        base = [b for b in rows if b["config"] == "lru" and b["budget"] == r["budget"] and b["repeat"] == r["repeat"]]
        if r["config"] in ("lru", "all_resident") or not base:
            continue
        b = base[0]
        m = r["measured_tok_s"] / b["measured_tok_s"]
        p = r["predicted_tok_s"] / b["predicted_tok_s"]
        ps = r["predicted_serving_tok_s"] / b["predicted_serving_tok_s"]
        ratios.append({"config": r["config"], "budget": r["budget"], "repeat": r["repeat"], "measured": round(m, 3),
                       "predicted": round(p, 3), "error": round(p / m - 1, 3), "within_15pct": abs(p / m - 1) <= 0.15,
                       "predicted_serving": round(ps, 3), "error_serving": round(ps / m - 1, 3),
                       "within_15pct_serving": abs(ps / m - 1) <= 0.15})
    summary = []
    for key in dict.fromkeys((q["config"], q["budget"]) for q in ratios):
        g = [q for q in ratios if (q["config"], q["budget"]) == key]
        m = statistics.median(q["measured"] for q in g)
        p = statistics.median(q["predicted"] for q in g)
        ps = statistics.median(q["predicted_serving"] for q in g)
        cell = {}  # the ratio of the cells' medians over repeats (per-repeat ratios above)
        for name, cfg in (("fate", key[0]), ("lru", "lru")):
            runs_ = [r for r in rows if r["config"] == cfg and r["budget"] == key[1]]
            cell[name] = {k: statistics.median(r[k] for r in runs_) for k in
                          ("measured_tok_s", "predicted_tok_s", "predicted_serving_tok_s")}
        cm = cell["fate"]["measured_tok_s"] / cell["lru"]["measured_tok_s"]
        cp = cell["fate"]["predicted_serving_tok_s"] / cell["lru"]["predicted_serving_tok_s"]
        summary.append({"config": key[0], "budget": key[1], "repeats": len(g),
                        "measured_of_medians": round(cm, 3), "predicted_serving_of_medians": round(cp, 3),
                        "error_serving_of_medians": round(cp / cm - 1, 3), "measured": round(m, 3),
                        "predicted": round(p, 3), "error": round(p / m - 1, 3),
                        "predicted_serving": round(ps, 3), "error_serving": round(ps / m - 1, 3),
                        "within_15pct": abs(p / m - 1) <= 0.15, "within_15pct_serving": abs(ps / m - 1) <= 0.15})
    (out / "bench_validation.json").write_text(json.dumps(
        {"profile": asdict(profile), "runs": rows, "ratios_to_lru": ratios, "summary": summary}, indent=1,
        default=float))
    print(f"\n{'run':<20}{'measured':>9}{'predicted':>10}{'+serving':>9}{'stall':>7}{'pf work':>8}{'lost':>7}"
          f"{'pf meas/sim':>13}{'miss meas/sim':>14}{'hints meas/sim':>15}")
    for r in rows:
        print(f"{r['config'] + '@' + r['budget'] + '#' + str(r['repeat']):<20}{r['measured_tok_s']:>9.1f}"
              f"{r['predicted_tok_s']:>10.1f}{r['predicted_serving_tok_s']:>9.1f}{r['stall_ms_per_token']:>7.2f}"
              f"{r['prefetch_work_ms_per_token']:>8.2f}{r['contention_ms_per_token']:>7.2f}"
              f"{str(r['measured_prefetches']) + '/' + str(r['prefetched']):>13}"
              f"{str(r['measured_misses']) + '/' + str(r['misses']):>14}"
              f"{str(r['measured_hint_sends']) + '/' + str(r['hint_sends']):>15}")
    print("(decode tok/s; ms per token: stall, prefetch thread busy, compute lost to prefetching; counts: the "
          f"benchmark's workload / the replay's window; store-hint calls: {hint_calls}; +serving: with the "
          "all-resident run's per-step serving cost)")
    print(f"\n{'ratio to LRU':<20}{'measured':>9}{'predicted':>10}{'error':>8}{'+serving':>9}{'error':>8}")
    for q in ratios:
        print(f"{q['config'] + '@' + q['budget'] + '#' + str(q['repeat']):<20}{q['measured']:>9.3f}"
              f"{q['predicted']:>10.3f}{100 * q['error']:>7.1f}%{q['predicted_serving']:>9.3f}"
              f"{100 * q['error_serving']:>7.1f}%")
    print(f"\nmedians over repeats: {'measured':>9}{'predicted':>10}{'error':>8}{'+serving':>9}{'error':>8}  "
          f"within 15% (profile / +serving)")
    for q in summary:
        print(f"{q['config'] + '@' + q['budget'] + ' x' + str(q['repeats']):<22}{q['measured']:>9.3f}"
              f"{q['predicted']:>10.3f}{100 * q['error']:>7.1f}%{q['predicted_serving']:>9.3f}"
              f"{100 * q['error_serving']:>7.1f}%  {'yes' if q['within_15pct'] else 'NO'} / "
              f"{'yes' if q['within_15pct_serving'] else 'NO'}")
    print(f"\nratio of the cells' medians: {'measured':>9}{'+serving':>9}{'error':>8}")
    for q in summary:
        print(f"{q['config'] + '@' + q['budget'] + ' x' + str(q['repeats']):<29}{q['measured_of_medians']:>9.3f}"
              f"{q['predicted_serving_of_medians']:>9.3f}{100 * q['error_serving_of_medians']:>7.1f}%")
    print(f"wrote {out / 'bench_validation.json'}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", default=None, help="tiny-mixtral pack with int4 (default: packed into OUT/pack)")
    ap.add_argument("--out", default=str(REPO / "runs" / "sim_validate"))
    ap.add_argument("--budgets", default="25%,50%")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--skip-worker", action="store_true", help="no worker-process runs")
    ap.add_argument("--repeats", type=int, default=0,
                    help="measure the profile and every run this many times; report medians (a noisy machine; "
                         "default 1, with --bench 3)")
    ap.add_argument("--bench", default=None, help="a `python -m bench run` output directory (results.json)")
    ap.add_argument("--traces", default=None, help="with --bench: the runs' traces (--worker-arg=--trace-dir=DIR)")
    ap.add_argument("--profile", default=None, help="with --bench: a profile JSON instead of measuring one")
    ap.add_argument("--hint-calls", default="measured", choices=("measured", "timed"),
                    help="with --bench: charge the store-hint calls each run made (measured, its statistics) or "
                         "those the hint thread's timing gives (timed: one call of the profile's hint_s in flight)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.bench:
        a.repeats = a.repeats or 1
    if a.bench:
        if not a.traces:
            ap.error("--bench needs --traces (the directory the runs recorded into)")
        return validate_bench(Path(a.bench), Path(a.traces), out, a.profile, start_store, a.repeats or 3, a.hint_calls)
    pack_dir = Path(a.pack) if a.pack else out / "pack"
    if not (pack_dir / "manifest.json").exists():
        from expert_store.pack import write_pack

        write_pack(MODEL, pack_dir, formats=("int4",), progress=False)
    from expert_store.packfile import Pack
    from gpu_worker.simulator.measure import measure_profile

    sock = out / "store.sock"
    sock.unlink(missing_ok=True)
    store = Service("store", module_command("expert_store", "serve", pack_dir, "--listen", f"unix:{sock}",
                                            "--ram-bytes", "64MiB", "--log-level", "warning"), out / "store.log")
    rows = []
    profiles = []
    try:
        store.wait_serving(f"unix:{sock}", 60)
        addr = f"unix:{sock}"
        prompts = prompts_ids(pack_dir)
        for rep in range(a.repeats):
            # calibrate right before measuring: the machine's load drifts
            profile = measure_profile(pack_dir, "int4", store=addr)
            profiles.append(profile)
            print(f"[{rep}] profile: {profile.measured}", flush=True)
            with Pack.open(pack_dir) as pack:
                for budget in a.budgets.split(","):
                    for concurrent in (False, True):
                        trace, measured, stats = run_in_process(pack, addr, prompts, budget, concurrent,
                                                                a.new_tokens, out)
                        r = simulate(trace, worker_config_of(trace))
                        exact = int(r.hits.sum()) == stats.total.hits and int(r.misses.sum()) == stats.total.misses
                        cost = estimate_cost(r, profile, profile.expert_bytes)
                        row = {"repeat": rep, "budget": budget, "mode": "concurrent" if concurrent else "sequential",
                               "hit_rate": round(r.hit_rate, 4), "replay_exact": exact,
                               "predicted_tok_s": round(cost.decode_tokens_per_s, 1),
                               "measured_in_process_tok_s": round(measured, 1)}
                        if not a.skip_worker:
                            row["measured_worker_tok_s"] = round(
                                worker_process(addr, out, budget, prompts, concurrent, a.new_tokens), 1)
                        rows.append(row)
                        print(row, flush=True)
    finally:
        store.stop(20)
    import statistics

    summary = []
    for key in dict.fromkeys((r["budget"], r["mode"]) for r in rows):
        group = [r for r in rows if (r["budget"], r["mode"]) == key]
        med = {k: round(statistics.median(r[k] for r in group), 1) for k in
               ("predicted_tok_s", "measured_in_process_tok_s", "measured_worker_tok_s") if k in group[0]}
        summary.append({"budget": key[0], "mode": key[1], "hit_rate": group[0]["hit_rate"],
                        "replay_exact": all(r["replay_exact"] for r in group), **med})
    profile = median_profile(profiles, "bench/sim_validate.py")
    (out / "profile.json").write_text(json.dumps(asdict(profile), indent=1, default=float))  # simulate --hardware
    (out / "results.json").write_text(json.dumps({"profiles": [asdict(p) for p in profiles], "rows": rows,
                                                   "summary": summary}, indent=1, default=float))
    print(f"\nmedians over {a.repeats} repeat(s):")
    print(f"{'budget':<8}{'mode':<12}{'hit rate':>9}{'exact':>7}{'predicted':>11}{'in-proc':>9}{'worker':>8}  (decode tok/s)")
    for r in summary:
        print(f"{r['budget']:<8}{r['mode']:<12}{r['hit_rate']:>9.3f}{str(r['replay_exact']):>7}"
              f"{r['predicted_tok_s']:>11.1f}{r['measured_in_process_tok_s']:>9.1f}"
              f"{r.get('measured_worker_tok_s', float('nan')):>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
