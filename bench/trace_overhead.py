"""What recording traces costs in decode speed (goal: under 5%).

    PYTHONPATH=. .venv/bin/python bench/trace_overhead.py [--pack DIR] [--new-tokens 64] [--repeats 5]

The worst case for the recorder's relative cost: every expert resident (an in-process cache at 100%,
warm, so no fetch hides the recorder's work), torch on one thread. Decodes the 8 prompts of
prompts.jsonl sequentially (batch 1) and concurrently (batch 8) through the Engine, alternately without
and with a TraceRecorder attached (Engine(recorder=...), weights recorded), and compares
the median decode tokens/s (decode steps' wall time, through the engine's step). Also reports the time
spent inside the recorder's hooks per step and the time to write the file at close().
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

MODEL = REPO.parent / "shared" / "models" / "tiny-mixtral"


def decode_rate(model, prompts, concurrent: bool, new_tokens: int, recorder_dir: Path | None):
    from gpu_worker.engine import Engine, FinalEvent, GenerationRequest
    from gpu_worker.generate import SamplingParams
    from gpu_worker.traces import recorder_for

    recorder = recorder_for(model.args, recorder_dir, model_name="tiny-mixtral") if recorder_dir is not None else None
    steps: list[tuple[float, int, bool]] = []  # (seconds, rows, all decode)
    engine = Engine(model, None, max_batch_size=8, num_threads=1, recorder=recorder,
                    on_step=lambda t: steps.append((t.wall_ns / 1e9, t.sequences, t.decode)))
    with engine:
        groups = [prompts] if concurrent else [[p] for p in prompts]
        for group in groups:
            done = [threading.Event() for _ in group]
            for i, ids in enumerate(group):
                engine.submit(GenerationRequest(tuple(ids), SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)),
                              lambda ev, i=i: done[i].set() if isinstance(ev, FinalEvent) else None)
            for d in done:
                d.wait(600)
    write_s = hook_ms = 0.0
    if recorder is not None:
        n_steps = len(steps)
        hook_ms = recorder.record_ns / 1e6 / max(1, n_steps)
        t0 = time.perf_counter()
        recorder.close()
        write_s = time.perf_counter() - t0
    dec = [(s, n) for s, n, d in steps if d]
    return sum(n for _, n in dec) / sum(s for s, _ in dec), hook_ms, write_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", default=None)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "runs" / "trace_overhead"))
    a = ap.parse_args()
    from expert_store.pack import write_pack
    from expert_store.packfile import Pack
    from gpu_worker.cache import ExpertCache, full_budget_bytes
    from gpu_worker.runtime import build_model
    from gpu_worker.store_client import PackFetcher
    from gpu_worker.tokenizer import TextTokenizer

    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pack_dir = Path(a.pack) if a.pack else out / "pack"
    if not (pack_dir / "manifest.json").exists():
        write_pack(MODEL, pack_dir, formats=("int4",), progress=False)
    cpu = torch.device("cpu")
    with Pack.open(pack_dir) as pack:
        tok = TextTokenizer(pack.tokenizer_path)
        prompts = [tok.encode(json.loads(line)["prompt"]) for line in (MODEL / "prompts.jsonl").read_text().splitlines()]
        cache = ExpertCache(pack.args, PackFetcher(pack), "int4", "auto", cpu, full_budget_bytes(pack.args, "int4", "auto", cpu))
        model = build_model(pack, cache, cpu)
        for layer in pack.args.moe_layers:  # warm: every expert resident
            for _ in cache.iter_experts(layer, list(range(pack.args.num_experts))):
                pass
        results = {}
        for concurrent in (False, True):
            base, rec, hooks, writes = [], [], [], []
            for _ in range(a.repeats):
                base.append(decode_rate(model, prompts, concurrent, a.new_tokens, None)[0])
                with tempfile.TemporaryDirectory() as d:
                    r, h, w = decode_rate(model, prompts, concurrent, a.new_tokens, Path(d))
                rec.append(r)
                hooks.append(h)
                writes.append(w)
            b, r = statistics.median(base), statistics.median(rec)
            mode = "concurrent" if concurrent else "sequential"
            results[mode] = {"without_tok_s": round(b, 1), "with_tok_s": round(r, 1),
                             "overhead_pct": round(100 * (b - r) / b, 2), "hook_ms_per_step": round(statistics.median(hooks), 4),
                             "close_write_s": round(statistics.median(writes), 4), "runs_without": base, "runs_with": rec}
            print(f"{mode:<11} decode {b:7.1f} tok/s without, {r:7.1f} with the recorder: "
                  f"{100 * (b - r) / b:+.2f}% ({statistics.median(hooks):.3f} ms/step in its hooks; file written in "
                  f"{statistics.median(writes) * 1e3:.1f} ms)", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
