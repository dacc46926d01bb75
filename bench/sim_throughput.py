"""Replay speed of the simulator: token-layer cells (rows x MoE layers) per second, per policy.

    PYTHONPATH=. .venv/bin/python bench/sim_throughput.py [TRACE...] [--repeats 3]

For each trace and policy: the default sweep of `simulate` (uniform and shallow_favoring x 10/25/50/75%,
load on demand, worker semantics; flat semantics too with --flat), each replay timed best-of-`repeats`
(the machine is shared), in CPU seconds of this process (`time.process_time`: other load on the machine does
not count). Prints cells/s per policy: the sweep's total cells over its total time, and the slowest single
configuration. Targets: >= 1M cells/s for every policy on the tiny-mixtral traces, >= 300k on the Qwen trace.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpu_worker.simulator import SIM_POLICIES, Replay, SimConfig, parse_budget, simulate  # noqa: E402
from gpu_worker.traces import load_trace  # noqa: E402

TRACES = Path(os.environ.get("FATE_SHARED_DIR", REPO.parent / "shared")) / "traces"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="*", default=[str(TRACES / f) for f in (
        "tiny-mixtral-8req-interleaved.npz", "tiny-mixtral-8req-sequential.npz", "mixtral-8x7b-humaneval0.npz",
        "qwen1.5-moe-gsm8k-5layers.npz")])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flat", action="store_true", help="also the flat (token, expert) semantics")
    a = ap.parse_args()
    semantics = ("worker", "flat") if a.flat else ("worker",)
    print(f"{'trace':<34}{'semantics':<9}" + "".join(f"{p:>18}" for p in SIM_POLICIES))
    for path in a.traces:
        t = load_trace(path)
        rp = Replay(t)
        _ = rp.by_step, rp.flat_rows, rp.occurrences("worker"), rp.occurrences("flat")  # preparation not timed
        for sem in semantics:
            cells = []
            for pol in SIM_POLICIES:
                total_s, n, worst = 0.0, 0, float("inf")
                for al in ("uniform", "shallow_favoring"):
                    for b in ("10%", "25%", "50%", "75%"):
                        q = parse_budget(b, t.num_layers, t.num_experts)
                        if q < t.top_k:
                            continue
                        cfg = SimConfig(pol, q, allocation=al, semantics=sem)
                        best = float("inf")
                        for _ in range(a.repeats):
                            t0 = time.process_time()
                            simulate(rp, cfg)
                            best = min(best, max(time.process_time() - t0, 1e-6))
                        total_s += best
                        n += rp.N * rp.L
                        worst = min(worst, rp.N * rp.L / best)
                cells.append(f"{n / total_s / 1e3:8.0f}k ({worst / 1e3:4.0f}k)")
            print(f"{Path(path).stem[:33]:<34}{sem:<9}" + "".join(f"{c:>18}" for c in cells), flush=True)
    print("cells per CPU-second over the sweep (slowest configuration in parentheses)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
