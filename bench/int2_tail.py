"""Perplexity cost of the INT2 prefill tail: `python -m bench.int2_tail [--pack DIR] [--text FILE]`.

Scores `--text` (default: tiny-mixtral's eval.txt, first 8,192 tokens, windows of 512, as
gpu_worker.perplexity does) with int4 experts through the worker's own cache and prefetch
controller, every window a prefill (all its rows are prompt rows), for several `int2_tail`
shares and budgets. At a budget near the minimum nothing stays cached, so every tail expert
is fetched as INT2: the worst case. At larger budgets tail experts already resident run as
INT4 (the cache never holds INT2 copies), so the cost shrinks. Also prints the all-int4 and
all-int2 perplexities for scale. Writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from expert_store.packfile import Pack

from .fate_table import TINY_MIXTRAL, REPO


def score(model, ids: list[int], window: int, controller=None, cache=None) -> tuple[float, int]:
    """gpu_worker.perplexity.perplexity's loop, with each window announced as one prefill step."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[start: start + window])
        if chunk.numel() < 2:
            break
        if cache is not None:
            cache.begin_step()
        if controller is not None:
            controller.begin_step([0] * chunk.numel(), [True] * chunk.numel())
        with torch.inference_mode():
            logits = model.forward([model.new_sequence(chunk.numel())], [chunk], all_logits=True, observer=controller)
        if controller is not None:
            controller.end_step()
        if cache is not None:
            cache.end_step()
        logp = torch.log_softmax(logits[:-1].double(), dim=-1)
        nll -= float(logp.gather(1, chunk[1:, None]).sum())
        count += chunk.numel() - 1
    return math.exp(nll / count), count


def main(argv: list[str] | None = None) -> int:
    from gpu_worker.cache import ExpertCache, expert_compute_nbytes, full_budget_bytes
    from gpu_worker.experts import PackExpertSource
    from gpu_worker.predictors import make_predictor
    from gpu_worker.prefetch import PrefetchController
    from gpu_worker.runtime import build_model
    from gpu_worker.store_client import PackFetcher
    from gpu_worker.tokenizer import TextTokenizer

    ap = argparse.ArgumentParser(prog="python -m bench.int2_tail", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", type=Path, default=None, help="a pack with int4 and int2 (default: tiny-mixtral)")
    ap.add_argument("--text", type=Path, default=TINY_MIXTRAL / "eval.txt")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--shares", default="0.1,0.2,0.3,0.5")
    ap.add_argument("--budgets", default="min,25%,50%")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "int2_tail")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.pack is None:
        from .fate_table import ensure_pack

        a.pack = ensure_pack(None, Path("."))
    cpu = torch.device("cpu")
    results: dict = {"text": str(a.text), "tokens": a.max_tokens, "window": a.window, "runs": []}
    with Pack.open(a.pack) as pack:
        args = pack.args
        tok = TextTokenizer(pack.tokenizer_path)
        ids = tok.encode(a.text.read_text())[: a.max_tokens]
        base = {}
        for fmt in ("int4", "int2"):
            model = build_model(pack, PackExpertSource(pack, fmt, cpu), cpu)
            base[fmt], n = score(model, ids, a.window)
            print(f"all {fmt}: perplexity {base[fmt]:.3f} ({n} tokens)", flush=True)
        results["int4"], results["int2"] = base["int4"], base["int2"]
        eb = expert_compute_nbytes(args, "int4", "auto", cpu)
        full = full_budget_bytes(args, "int4", "auto", cpu)
        for budget_name in a.budgets.split(","):
            for share in [float(x) for x in a.shares.split(",")]:
                budget = 2 * args.top_k * eb if budget_name == "min" else int(full * float(budget_name[:-1]) / 100)
                cache = ExpertCache(args, PackFetcher(pack), "int4", "auto", cpu, budget, tail_fmt="int2")
                model = build_model(pack, cache, cpu)
                ctl = PrefetchController(args, cache, make_predictor("none"), int2_tail_share=share,
                                         start_thread=False)
                t0 = time.perf_counter()
                ppl, _ = score(model, ids, a.window, ctl, cache)
                s = cache.stats().total
                row = dict(budget=budget_name, share=share, perplexity=ppl,
                           cost_pct=100 * (ppl / base["int4"] - 1), int2_misses=s.int2_misses, misses=s.misses,
                           lookups=s.lookups, int2_bytes=s.int2_bytes, demand_bytes=s.demand_bytes,
                           seconds=time.perf_counter() - t0)
                results["runs"].append(row)
                print(f"budget {budget_name:>4} tail {share:.1f}: perplexity {ppl:.3f} ({row['cost_pct']:+.2f}% vs "
                      f"int4); {s.int2_misses}/{s.lookups} lookups as INT2, demand bytes "
                      f"{s.demand_bytes / 2**20:.1f} MiB of which INT2 {s.int2_bytes / 2**20:.1f} MiB", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
