"""`python -m gpu_worker serve|generate|perplexity ...`.

    serve        the worker server (gRPC Generate/GetStats) over an expert store
    generate     generate in process, reading experts straight from a pack
    perplexity   perplexity of a pack on a text file
    simulate     replay expert traces through the cache policies (gpu_worker/simulator.py)
    analyze      report + plots + a learned allocation from traces (gpu_worker/analysis.py)

User errors (bad flags or config, a budget below the minimum, an unreachable
store) print one line `error: ...` on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from expert_store.errors import FateError

from .analysis import add_analyze_parser
from .generate import SamplingError, SamplingParams, generate
from .simulator import add_simulate_parser


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pack", required=True, help="pack directory (python -m expert_store pack ...)")
    p.add_argument("--format", default=None, help="expert format to run (default: int4 if the pack has it)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    p.add_argument("--compute-form", default=None, help="fp32, bf16, int4_fused, dequant_per_use (default: per device)")


def _cmd_generate(a: argparse.Namespace) -> int:
    from .runtime import load_local

    rt = load_local(a.pack, a.format, a.device, a.compute_form)
    if a.prompt_ids:
        ids = [int(t) for t in a.prompt_ids.split(",")]
    else:
        if rt.tokenizer is None:
            raise SamplingError("this pack has no tokenizer: pass --prompt-ids")
        ids = rt.tokenizer.encode(a.prompt)
    params = SamplingParams(
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
        seed=a.seed, ignore_eos=a.ignore_eos,
    )
    print(f"[{rt.pack.name}: {rt.pack.args.family}, experts {rt.source.fmt} as {rt.source.form} "
          f"on {rt.model.device}; prompt {len(ids)} tokens]", file=sys.stderr)
    stream = rt.tokenizer.stream() if rt.tokenizer else None
    t0 = time.perf_counter()
    t_first = None
    out: list[int] = []
    for tok in generate(rt.model, ids, params):
        t_first = t_first or time.perf_counter()
        out.append(tok)
        sys.stdout.write(stream.push(tok) if stream else f"{tok} ")
        sys.stdout.flush()
    t1 = time.perf_counter()
    print(file=sys.stdout)
    decode_s = t1 - t_first if t_first else 0.0
    rate = (len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else float("nan")
    print(f"[{len(out)} tokens; first token {1e3 * ((t_first or t1) - t0):.0f} ms; decode {rate:.1f} tokens/s; "
          f"{rt.source.loads} experts loaded from the pack]", file=sys.stderr)
    if a.print_ids:
        print(",".join(map(str, out)))
    return 0


def _cmd_perplexity(a: argparse.Namespace) -> int:
    from .perplexity import perplexity
    from .runtime import load_local

    rt = load_local(a.pack, a.format, a.device, a.compute_form)
    if rt.tokenizer is None:
        raise SamplingError("this pack has no tokenizer")
    ids = rt.tokenizer.encode(Path(a.text).read_text())
    r = perplexity(rt.model, ids, window=a.window, max_tokens=a.max_tokens)
    print(f"{rt.source.fmt}\tperplexity {r.perplexity:.3f}\t({r.tokens_scored} tokens, {r.windows} windows)")
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    import logging

    from .config import build_config
    from .server import run

    overrides = {k: getattr(a, k) for k in _SERVE_FLAGS}
    cfg = build_config(a.config, overrides)
    logging.basicConfig(level=cfg.log_level.upper(), format="[worker] %(levelname)s %(name)s: %(message)s")
    return run(cfg)


_SERVE_FLAGS = (
    "store", "listen", "budget_bytes", "expert_format", "compute_form", "device", "transport", "metrics_port",
    "metrics_host", "max_batch_size", "max_queue", "default_max_new_tokens", "threads", "policy", "predictor",
    "worker_id", "store_wait_s", "grace_s", "log_level", "lfu_decay", "allocation", "full_layers", "staging_slots",
    "prefetch_width", "lookahead", "throttle", "int2_tail", "prefetch_sync", "trace_dir", "trace_every",
    "store_retry_s", "max_request_bytes", "max_prompt_bytes", "max_stop_strings", "max_stop_string_bytes", "tls_cert",
    "tls_key", "tls_client_ca", "auth_token_file", "store_tls_ca", "store_tls_cert", "store_tls_key",
    "store_auth_token_file",
)  # fmt: skip


def _staging_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a count, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_serve(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve", help="serve Generate over gRPC with a budgeted expert cache fed by an expert store",
        description="Flags override the TOML file (--config); see gpu_worker/config.py for every setting.",
    )
    s.add_argument("--config", default=None, help="TOML file with WorkerConfig keys (top level or [worker])")
    s.add_argument("--store", default=None, help="expert store address: host:port or unix:/path")
    s.add_argument("--listen", default=None,
                   help="address to serve on (default unix:/run/fate-moe/worker.sock; host:port for TCP)")
    s.add_argument("--budget-bytes", default=None,
                   help='expert-cache budget: bytes, a size like 512MiB, or a share of the experts like 25%%')
    s.add_argument("--format", dest="expert_format", default=None, help="expert format to fetch (default int4)")
    s.add_argument("--compute-form", default=None, help="fp32, bf16, int4_fused, dequant_per_use")
    s.add_argument("--device", default=None, help="auto (cuda when present), cpu, cuda, cuda:N")
    s.add_argument("--transport", default=None, choices=("auto", "shm", "grpc"), help="how experts travel")
    s.add_argument("--metrics-port", type=int, default=None, help="Prometheus endpoint port (0: off)")
    s.add_argument("--metrics-host", default=None, help="address the metrics endpoint binds (127.0.0.1)")
    s.add_argument("--max-batch-size", type=int, default=None, help="sequences per decode step at most")
    s.add_argument("--max-queue", type=int, default=None, help="requests waiting at most")
    s.add_argument("--default-max-new-tokens", type=int, default=None, help="for requests that send 0")
    s.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    s.add_argument("--policy", default=None, help="cache replacement policy per layer: lru (default), lfu, "
                   "lfu_decay, arc")
    s.add_argument("--lfu-decay", type=float, default=None, help="lfu_decay's factor per step (0.9)")
    s.add_argument("--allocation", default=None, help="budget split across layers: uniform (default), "
                   "shallow_favoring")
    s.add_argument("--full-layers", type=int, default=None, help="shallow_favoring: fully resident MoE layers (4)")
    s.add_argument("--staging-slots", type=_staging_arg, default=None,
                   help="budget units kept for prefetched experts: a count or auto (default)")
    s.add_argument("--predictor", default=None, help="expert predictor: none (default), cross_layer, eap, prev_token")
    s.add_argument("--prefetch-width", type=int, default=None,
                   help="experts predicted per token; 0 (default): measured layer time / expert fetch time")
    s.add_argument("--lookahead", type=int, default=None, help="layers ahead to prefetch: 1 (default) or 2")
    s.add_argument("--throttle", default=None, action=argparse.BooleanOptionalAction,
                   help="narrow the width when prefetches go unused or back up (default on)")
    s.add_argument("--prefetch-sync", default=None, action=argparse.BooleanOptionalAction,
                   help="analysis: prefetch on the compute thread (the hit rate of an infinitely fast link)")
    s.add_argument("--int2-tail", type=float, default=None,
                   help="prefill: share of token assignments whose least popular experts come as INT2 (default 0: "
                        "off; lossy: output then depends on the cache state)")
    s.add_argument("--worker-id", default=None, help="id at the store (default worker-<pid>-<random>)")
    s.add_argument("--store-wait-s", type=float, default=None, help="how long to wait for the store at start")
    s.add_argument("--grace-s", type=float, default=None, help="SIGTERM grace for in-flight requests")
    s.add_argument("--log-level", default=None, help="debug, info, warning, error")
    s.add_argument("--trace-dir", default=None, help="write expert-activation traces (moe-trace/1) here")
    s.add_argument("--trace-every", type=int, default=None, help="one trace file per N finished requests (0: one per session)")
    s.add_argument("--store-retry-s", type=float, default=None,
                   help="how long in-flight requests wait for an unreachable store (default 15; 0: fail fast)")
    s.add_argument("--max-request-bytes", type=int, default=None, help="largest Generate request message (1 MiB)")
    s.add_argument("--max-prompt-bytes", type=int, default=None,
                   help="largest prompt in UTF-8 bytes, checked before tokenizing (0: 32 per context token)")
    s.add_argument("--max-stop-strings", type=int, default=None, help="stop strings per request at most (16)")
    s.add_argument("--max-stop-string-bytes", type=int, default=None, help="longest stop string in bytes (256)")
    s.add_argument("--tls-cert", default=None, help="PEM certificate chain: TLS on a TCP listener")
    s.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    s.add_argument("--tls-client-ca", default=None, help="PEM CA: require client certificates it signed")
    s.add_argument("--auth-token-file", default=None, help="file with the bearer token callers must send")
    s.add_argument("--store-tls-ca", default=None, help="PEM CA of the store's certificate (a store with TLS)")
    s.add_argument("--store-tls-cert", default=None, help="PEM client certificate for the store")
    s.add_argument("--store-tls-key", default=None, help="PEM private key of --store-tls-cert")
    s.add_argument("--store-auth-token-file", default=None, help="file with the store's bearer token")
    s.set_defaults(func=_cmd_serve)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpu_worker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_serve(sub)
    g = sub.add_parser("generate", help="generate in process, reading experts straight from a pack")
    _add_runtime_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--print-ids", action="store_true", help="also print the generated ids, comma-separated")
    g.set_defaults(func=_cmd_generate)
    p = sub.add_parser("perplexity", help="perplexity of a pack on a text file")
    _add_runtime_args(p)
    p.add_argument("--text", required=True)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.set_defaults(func=_cmd_perplexity)
    add_simulate_parser(sub)
    add_analyze_parser(sub)
    a = ap.parse_args(argv)
    try:
        return a.func(a)
    except (FateError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
