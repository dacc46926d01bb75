"""`python -m bench run|profile|report|transport ...`: side-by-side benchmarks of the service on any pack.

    python -m bench run --pack PACK --out DIR [--quick] [--configs ...] [--budgets 25,50,75]
                        [--transports shm,grpc] [--workloads ...] [--repeats N] [--cold] [--transport-bench]
    python -m bench profile --pack PACK --out DIR [--config fate] [--budget 50] [--transport shm]
                            [--workloads decode-c8]   (one cell with py-spy on the worker)
    python -m bench report DIR   (re-render DIR/results.md and the plots from DIR/results.json)
    python -m bench transport [--pack PACK] [--out DIR] ...   (bench/transport.py: store -> worker GB/s)

`run` starts a real store and worker per run (configuration x budget x transport), drives the
workloads through the client, repeats every cell --repeats times with the cells interleaved
(A B C A B C ...), and writes DIR/results.json (with the machine), DIR/results.md and PNG plots.
PACK is a pack directory, or a Hugging Face checkpoint directory (packed into DIR/pack with
int4 and int2 experts, reused when already there). Fate's targets (docs/benchmarks.md) are printed as met or
missed with their margins; nothing here asserts them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

from client.processes import REPO_ROOT, child_env, module_command

from .figures import RequestRecord, workload_figures
from .harness import HarnessSettings, Runner, flag_args, run_one, worker_flags_missing
from .plan import (
    CONFIGURATIONS,
    DEFAULT_CONFIGS,
    FIGURES,
    TRANSPORTS,
    BenchError,
    Configuration,
    Workload,
    default_workloads,
    load_prompts,
    make_plan,
)
from .report import (
    RESULTS_FORMAT,
    evaluate_targets,
    fate_targets,
    machine_description,
    markdown_table,
    profile_text,
    summarize,
    summarize_profile,
    target_lines,
    write_results,
)


def prepare_pack(pack: Path, out_dir: Path) -> Path:
    """A pack directory as is; a checkpoint directory packed (int4, int2) into OUT/pack once."""
    if (pack / "manifest.json").is_file():
        return pack
    if not (pack / "config.json").is_file():
        raise BenchError(f"{pack}: neither a pack (manifest.json) nor a Hugging Face checkpoint (config.json)")
    from expert_store.errors import FateError
    from expert_store.pack import write_pack
    from expert_store.packfile import Pack

    target = out_dir / "pack"
    marker = out_dir / "pack.source"  # the checkpoint the pack was made from
    if (target / "manifest.json").is_file() and marker.is_file() and marker.read_text() == str(pack.resolve()):
        try:
            with Pack.open(target) as p:
                if "int4" in p.formats:
                    print(f"[bench] reusing the pack {target}", flush=True)
                    return target
        except FateError:
            pass
    print(f"[bench] packing {pack} into {target} (int4, int2)", flush=True)
    write_pack(pack, target, formats=("int4", "int2"), force=target.exists(), progress=False)
    marker.write_text(str(pack.resolve()))
    return target


def parse_workloads(text: str | None, quick: bool) -> list[Workload]:
    """Names of the default workloads (decode-c8, prefill-512, ...) or specs decode:C:T / prefill:N."""
    defaults = default_workloads(quick)
    if not text:
        return defaults
    by_name = {w.name: w for w in default_workloads(False) + default_workloads(True)}
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        if item in by_name:
            out.append(by_name[item])
        elif item.startswith("decode:"):
            c, t = (int(v) for v in item.split(":")[1:3])
            out.append(Workload(f"decode-c{c}-{t}", "decode", c, t))
        elif item.startswith("prefill:"):
            n = int(item.split(":")[1])
            out.append(Workload(f"prefill-{n}", "prefill", 1, 1, n))
        else:
            raise BenchError(f"--workloads: unknown {item!r} (names: {', '.join(by_name)}; or decode:C:T, prefill:N)")
    return out


def pack_facts(pack: Path, fmt: str, device: str) -> dict:
    """Model facts and the budgets the worker will compute (min and full, in the compute form's bytes)."""
    from expert_store.packfile import Pack
    from gpu_worker.cache import full_budget_bytes, min_budget_bytes
    from gpu_worker.expert_compute import default_compute_form
    from gpu_worker.runtime import pick_device

    dev = pick_device(device)
    with Pack.open(pack) as p:
        if fmt not in p.formats:
            raise BenchError(f"--format {fmt}: the pack {pack} has {', '.join(p.formats)}")
        form = default_compute_form(fmt, dev)
        served = tuple(f for f in (fmt, "int2") if f in p.formats)
        largest = max(p.expert_nbytes(f) for f in served)
        return {
            "model": p.manifest.get("model", {}).get("name") or p.path.name, "family": p.args.family,
            "moe_layers": len(p.args.moe_layers), "experts_per_layer": p.args.num_experts, "top_k": p.args.top_k,
            "vocab_size": p.args.vocab_size, "context": p.args.max_position_embeddings, "compute_form": form,
            "min_budget_bytes": min_budget_bytes(p.args, fmt, form, dev),
            "full_budget_bytes": full_budget_bytes(p.args, fmt, form, dev),
            "store_formats": served, "store_ram_bytes": largest * len(p.expert_ids) * len(served),
            "expert_blob_bytes": p.expert_nbytes(fmt),
        }  # fmt: skip


IMPLIED_WORKER_DEFAULTS = {"allocation": "uniform", "policy": "lru", "predictor": "none", "int2_tail": "0"}
"""What a worker without the flag does: a configuration asking for exactly that runs without the flag."""


def without_implied_flags(c: Configuration, help_text: str) -> Configuration:
    drop = [k for k, v in c.worker.items()
            if IMPLIED_WORKER_DEFAULTS.get(k) == v and worker_flags_missing(flag_args({k: v}), help_text)]
    if not drop:
        return c
    return dataclasses.replace(c, worker={k: v for k, v in c.worker.items() if k not in drop})


def worker_help(python: str) -> str:
    r = subprocess.run(module_command("gpu_worker", "serve", "--help", python=python), capture_output=True, text=True,
                       check=False, cwd=REPO_ROOT, timeout=120, env=child_env())
    return r.stdout


def _progress(i: int, n: int, spec, r: dict) -> str:
    head = f"[bench] {i}/{n} {spec.key} r{spec.repeat}: {r['status']} {r.get('wall_s', 0):.1f} s"
    if r["status"] != "ok":
        return f"{head}: {r['error']}"
    bits = []
    for name, w in r["workloads"].items():
        f = w["figures"]
        rate = f["decode_tokens_per_s"] if f["decode_tokens_per_s"] is not None else f["prefill_tokens_per_s"]
        hit = f"{100 * f['hit_rate']:.1f}%" if f["hit_rate"] is not None else "-"
        bits.append(f"{name} {rate or 0:.0f} tok/s hit {hit}")
    return f"{head}: " + "; ".join(bits)


def cmd_run(a: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    pack = prepare_pack(a.pack, out)
    facts = pack_facts(pack, a.format, a.device)
    configs = [CONFIGURATIONS[c] for c in _names(a.configs, CONFIGURATIONS, "--configs")]
    transports = [TRANSPORTS[t] for t in _names(a.transports, TRANSPORTS, "--transports")]
    if a.cold and TRANSPORTS["nvme-cold"] not in transports:
        transports.append(TRANSPORTS["nvme-cold"])
    budgets = [float(b) for b in a.budgets.split(",") if b.strip()]
    if any(not 0 < b <= 100 for b in budgets):
        raise BenchError(f"--budgets {a.budgets}: percentages in (0, 100]")
    repeats = a.repeats if a.repeats is not None else (1 if a.quick else 3)
    workloads = parse_workloads(a.workloads, a.quick)
    longest = max([w.prompt_tokens for w in workloads] + [256])
    prompts = load_prompts(pack, a.prompts, a.text, facts["vocab_size"], min(longest, facts["context"]) * 2)
    settings = HarnessSettings(
        pack=pack.resolve(), expert_format=a.format, store_formats=facts["store_formats"],
        store_ram_bytes=facts["store_ram_bytes"], device=a.device, context=facts["context"],
        warmup_tokens=64 if a.quick else 512, request_timeout_s=a.request_timeout_s,
        run_timeout_s=a.run_timeout_s if a.run_timeout_s else (120.0 if a.quick else 600.0),
        worker_extra=tuple(a.worker_arg or ()), store_extra=tuple(a.store_arg or ()),
    )  # fmt: skip
    min_pct = 100.0 * facts["min_budget_bytes"] / facts["full_budget_bytes"]

    help_text = worker_help(sys.executable)
    configs = [without_implied_flags(c, help_text) for c in configs]
    plan = make_plan(configs, budgets, transports, repeats, str(facts["min_budget_bytes"]), min_pct)
    print(f"[bench] {facts['model']}: {facts['moe_layers']} MoE layers x {facts['experts_per_layer']} experts, "
          f"top-{facts['top_k']}, {a.format} as {facts['compute_form']}; min budget {facts['min_budget_bytes']} bytes "
          f"({min_pct:.2f}%); {len(plan.runs)} runs ({repeats} repeat(s)); prompts: {prompts.source}", flush=True)
    unsupported: dict[str, str] = {}  # configuration -> why the worker cannot run it (its runs are recorded so)
    for c in configs:
        missing = worker_flags_missing(flag_args(c.worker), help_text)
        if missing:
            unsupported[c.name] = f"the worker has no {', '.join(missing)} flag"
            print(f"[bench] {c.name}: {unsupported[c.name]}: its runs are recorded as unsupported", flush=True)

    runs = []
    runner = Runner(workloads, prompts, settings)
    deadline = t_start + a.time_limit_min * 60 if a.time_limit_min else None
    for i, spec in enumerate(plan.runs, 1):
        base = {"config": spec.config.name, "budget": spec.budget_label, "budget_pct": spec.budget_pct,
                "budget_arg": spec.budget, "transport": spec.transport.name, "repeat": spec.repeat, "workloads": {}}
        if spec.config.name in unsupported:
            r = {**base, "status": "unsupported", "wall_s": 0.0, "error": unsupported[spec.config.name]}
        elif deadline is not None and time.perf_counter() > deadline:
            r = {**base, "status": "skipped", "wall_s": 0.0, "error": f"--time-limit-min {a.time_limit_min} passed"}
        else:
            r = runner.run(spec)
            if r["status"] == "unsupported":  # the worker refused the flags: the other repeats would too
                unsupported[spec.config.name] = r["error"]
        runs.append(r)
        elapsed = time.perf_counter() - t_start
        eta = elapsed / i * (len(plan.runs) - i)
        print(_progress(i, len(plan.runs), spec, r) + f" [{elapsed / 60:.1f} min, ~{eta / 60:.1f} min left]",
              flush=True)
    runner.wait_stopped()

    headline = max((w for w in workloads if w.kind == "decode"), key=lambda w: w.concurrency, default=workloads[0])
    results = {
        "format": RESULTS_FORMAT,
        "machine": machine_description(),
        "settings": {
            "pack": str(pack), "model": facts["model"], "expert_format": a.format, "device": a.device,
            "facts": facts, "quick": a.quick, "repeats": repeats, "budgets_pct": budgets,
            "transports": [t.name for t in transports], "headline_workload": headline.name,
            "workloads": [dataclasses.asdict(w) for w in workloads], "prompts": prompts.source,
            "warmup_tokens": settings.warmup_tokens,
            "configurations": {c.name: {"title": c.title, "worker": dict(c.worker), "budgets": c.budgets,
                                        "design": c.design} for c in configs},
            "command": sys.argv,
        },
        "figures": list(FIGURES),
        "runs": runs,
    }  # fmt: skip
    if a.transport_bench:
        results["transport_bench"] = run_transport_bench(pack, out, a.format, a.quick)
    results["wall_s"] = time.perf_counter() - t_start
    finish(results, out)
    return 0


def finish(results: dict, out: Path, recompute: bool = False) -> None:
    """Summary, targets, results.json/.md and plots from the runs; print the headline tables and targets.
    recompute: first rebuild every workload's figures from its stored requests and counter deltas."""
    s = results["settings"]
    workloads = {w["name"]: Workload(**w) for w in s["workloads"]}
    if recompute:
        for r in results["runs"]:
            for name, w in (r.get("workloads") or {}).items():
                records = [RequestRecord(**q) for q in w["requests"]]
                figures = workload_figures(workloads[name], records, w["stats_delta"], w["figures"]["wall_s"])
                figures["worker_peak_rss_bytes"] = w["figures"].get("worker_peak_rss_bytes")
                w["figures"] = figures
    headline = s["headline_workload"]
    results["summary"] = rows = summarize(results["runs"], list(workloads))
    results["targets"] = targets = evaluate_targets(rows, fate_targets(headline), headline)
    write_results(results, out)
    for t in s["transports"]:
        print(f"\n{t}, {headline}:\n" + markdown_table(rows, t, headline, "decode", list(s["configurations"])))
    print("\ntargets (reported, not asserted):\n" + "\n".join(target_lines(targets)))
    print(f"\n[bench] wrote {out / 'results.json'}, {out / 'results.md'}, {', '.join(results['plots'])}; "
          f"the runs took {results['wall_s'] / 60:.1f} min")


def cmd_report(a: argparse.Namespace) -> int:
    """Re-render DIR's results.md and plots (and recompute figures, summary and targets) from results.json."""
    path = a.dir / "results.json"
    if not path.is_file():
        raise BenchError(f"{path}: no results (run `python -m bench run --out {a.dir}` first)")
    finish(json.loads(path.read_text()), a.dir, recompute=True)
    return 0


def run_transport_bench(pack: Path, out: Path, fmt: str, quick: bool) -> dict:
    """bench/transport.py in a subprocess; its rows and the GB/s of each path at the largest batch."""
    cmd = module_command("bench", "transport", "--pack", pack, "--out", out / "transport", "--formats", fmt)
    if quick:
        cmd += ["--seconds", "0.2", "--min-rounds", "2", "--batches", "16"]
    print(f"[bench] transport micro-benchmark: {' '.join(cmd[1:])}", flush=True)
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=child_env(), timeout=900, check=False)
    if r.returncode != 0:
        return {"error": f"bench transport exited with {r.returncode}"}
    data = json.loads((out / "transport" / "transport.json").read_text())
    rows = data["results"]
    batch = max(row["batch"] for row in rows)
    data["summary_GBps"] = {row["path"]: row["GBps"] for row in rows if row["batch"] == batch}
    data["summary_batch"] = batch
    return data


def cmd_profile(a: argparse.Namespace) -> int:
    """One run of one cell with py-spy on the worker over the measured workloads; prints where time goes."""
    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    pack = prepare_pack(a.pack, out)
    facts = pack_facts(pack, a.format, a.device)
    config = CONFIGURATIONS[_names(a.config, CONFIGURATIONS, "--config")[0]]
    transport = TRANSPORTS[_names(a.transport, TRANSPORTS, "--transport")[0]]
    workloads = parse_workloads(a.workloads, False)
    longest = max([w.prompt_tokens for w in workloads] + [256])
    prompts = load_prompts(pack, a.prompts, a.text, facts["vocab_size"], min(longest, facts["context"]) * 2)
    min_pct = 100.0 * facts["min_budget_bytes"] / facts["full_budget_bytes"]
    spec = make_plan([config], [float(a.budget)], [transport], 1, str(facts["min_budget_bytes"]), min_pct).runs[0]
    stem = f"profile-{transport.name}-{config.name}-{spec.budget_label.rstrip('%')}"
    settings = HarnessSettings(
        pack=pack.resolve(), expert_format=a.format, store_formats=facts["store_formats"],
        store_ram_bytes=facts["store_ram_bytes"], device=a.device, context=facts["context"],
        profile_path=(out / f"{stem}.raw").resolve(),
    )  # fmt: skip
    r = run_one(spec, workloads, prompts, settings)
    print(_progress(1, 1, spec, r), flush=True)
    if r["status"] != "ok" or not r.get("profile"):
        print(f"error: the profiled run did not complete: {r['error']}\n{r.get('logs', '')}", file=sys.stderr)
        return 1
    summary = summarize_profile(Path(r["profile"]))
    text = profile_text(summary)
    (out / f"{stem}.txt").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"run": r, "profile": summary}, indent=1, default=str) + "\n")
    print(text)
    print(f"[bench] wrote {out / (stem + '.raw')} (py-spy raw: flamegraph.pl or speedscope), {stem}.txt, {stem}.json")
    return 0


def _names(text: str, known: dict, flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BenchError(f"{flag}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def cmd_transport(rest: list[str]) -> int:
    from . import transport

    return transport.main(rest, prog=f"{prog_name()} transport")


def prog_name() -> str:
    return "python -m bench"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["transport"]:
        return cmd_transport(argv[1:])
    ap = argparse.ArgumentParser(prog=prog_name(), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("transport", help="store -> worker transport GB/s (bench/transport.py; its own flags)")
    r = sub.add_parser("run", help="configurations x budgets x transports x workloads on real processes")
    r.add_argument("--pack", type=Path, required=True, help="pack directory, or a checkpoint directory to pack")
    r.add_argument("--out", type=Path, required=True, help="directory for results.json, results.md, plots")
    r.add_argument("--quick", action="store_true", help="1 repeat, short workloads (a smoke run, not a measurement)")
    r.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"from {', '.join(CONFIGURATIONS)}")
    r.add_argument("--budgets", default="25,50,75", help="budgets of the swept configurations, %% of expert bytes")
    r.add_argument("--transports", default="shm,grpc", help=f"from {', '.join(TRANSPORTS)}")
    r.add_argument("--workloads", default=None,
                   help="names (prefill-512, decode-c1, decode-c4, decode-c8) or specs decode:C:T, prefill:N")
    r.add_argument("--repeats", type=int, default=None, help="repeats per cell (default 3; --quick 1)")
    r.add_argument("--cold", action="store_true", help="also the NVMe tier cold: store --ram-bytes 0 --cold, gRPC")
    r.add_argument("--transport-bench", action="store_true", help="also run the transport micro-benchmark")
    r.add_argument("--format", default="int4", help="expert format the worker runs (default int4)")
    r.add_argument("--device", default="cpu", help="worker device: cpu, cuda, auto (default cpu)")
    r.add_argument("--prompts", type=Path, default=None, help="JSONL of {\"prompt\": ...} (default tiny-mixtral's)")
    r.add_argument("--text", type=Path, default=None, help="text for the prefill prompt (default tiny-mixtral's eval.txt)")
    r.add_argument("--request-timeout-s", type=float, default=300.0, help="deadline of each request")
    r.add_argument("--run-timeout-s", type=float, default=None, help="limit of one run (default 600; --quick 120)")
    r.add_argument("--time-limit-min", type=float, default=None, help="skip the runs left after this many minutes")
    r.add_argument("--worker-arg", action="append", help="extra worker flag (repeatable), e.g. --worker-arg=--threads=1")
    r.add_argument("--store-arg", action="append", help="extra store flag (repeatable)")
    p = sub.add_parser("profile", help="one cell with py-spy on the worker: where its time goes")
    p.add_argument("--pack", type=Path, required=True, help="pack directory, or a checkpoint directory to pack")
    p.add_argument("--out", type=Path, required=True,
                   help="directory for the py-spy raw profile and its summary (.txt, .json)")
    p.add_argument("--config", default="fate", help=f"from {', '.join(CONFIGURATIONS)} (default: %(default)s)")
    p.add_argument("--budget", default="50", help="%% of expert bytes (swept configurations; default: %(default)s)")
    p.add_argument("--transport", default="shm", help=f"from {', '.join(TRANSPORTS)} (default: %(default)s)")
    p.add_argument("--workloads", default="decode-c8", help="as for run (default: %(default)s)")
    p.add_argument("--format", default="int4", help="expert format the worker runs (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="worker device: cpu, cuda, auto (default: %(default)s)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="JSONL of {\"prompt\": ...} (default: tiny-mixtral's prompts.jsonl)")
    p.add_argument("--text", type=Path, default=None,
                   help="text for the prefill prompt (default: tiny-mixtral's eval.txt)")
    rp = sub.add_parser("report", help="re-render results.md and the plots of a finished run from its results.json")
    rp.add_argument("dir", type=Path, help="the run's --out directory")
    a = ap.parse_args(argv)
    try:
        return {"profile": cmd_profile, "report": cmd_report, "run": cmd_run}[a.cmd](a)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
