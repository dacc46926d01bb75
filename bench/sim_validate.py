"""Validate the simulator's cost model against measured decode on this machine.

    PYTHONPATH=. .venv/bin/python bench/sim_validate.py [--pack DIR] [--out runs/sim_validate]
        [--budgets 25%,50%] [--new-tokens 48]

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", default=None, help="tiny-mixtral pack with int4 (default: packed into OUT/pack)")
    ap.add_argument("--out", default=str(REPO / "runs" / "sim_validate"))
    ap.add_argument("--budgets", default="25%,50%")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--skip-worker", action="store_true", help="no worker-process runs")
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure the profile and every run this many times; report medians (a noisy machine)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
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
    from dataclasses import replace

    fields = ("link_bandwidth_Bps", "link_latency_s", "expert_setup_s", "layer_s", "layer_token_s", "expert_compute_s",
              "step_s")
    profile = replace(profiles[-1], measured=f"medians of {len(profiles)} measurements by bench/sim_validate.py",
                      **{f: statistics.median(getattr(p, f) for p in profiles) for f in fields})
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
