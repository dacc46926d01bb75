"""`python -m client ...`: the command line of fate-moe's client.

    python -m client demo                       # the README's run command: store + worker + one generation
    python -m client generate "prompt" --stream # stream a generation from a running worker
    python -m client stats [--layers]           # the worker's counters
    python -m client gateway --worker ADDR      # OpenAI-compatible HTTP API over workers

The worker's address comes from --address, else $FATE_WORKER_ADDRESS, else
127.0.0.1:50061. A failed call prints `error: CODE: message` and exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

from .demo import DEFAULT_PROMPT, DemoConfig, run_demo


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _cmd_demo(a: argparse.Namespace) -> int:
    cfg = DemoConfig(
        prompt=a.prompt,
        max_new_tokens=a.max_new_tokens,
        cache_dir=a.cache_dir,
        checkpoint=a.checkpoint,
        device=a.device,
        seed=a.seed,
        budget=a.budget,
        transport=a.transport,
    )
    return run_demo(cfg)


def _address(a: argparse.Namespace) -> str:
    from .api import DEFAULT_ADDRESS

    return a.address or os.environ.get("FATE_WORKER_ADDRESS") or DEFAULT_ADDRESS


def summary_line(result) -> str:
    """One line: finish reason, usage, timings and the request's expert statistics."""
    t, e, u = result.timings, result.experts, result.usage
    finish = result.finish_reason + (f" {result.stop_string!r}" if result.stop_string else "") + (
        f" (token {result.stop_token_id})" if result.finish_reason in ("eos", "stop_token") else "")
    rate = f"{result.decode_tokens_per_s:.1f} tokens/s" if result.decode_tokens_per_s else "n/a"
    return (
        f"[finish {finish}; {u.completion_tokens} tokens, prompt {u.prompt_tokens}; "
        f"queue {t.queue_ns / 1e6:.1f} ms, prefill {t.prefill_ns / 1e6:.1f} ms, "
        f"first token {t.time_to_first_token_ns / 1e6:.1f} ms, decode {rate}, total {t.total_ns / 1e6:.1f} ms; "
        f"experts: {e.lookups} lookups, {e.hits} hits ({100 * e.hit_rate:.1f}%, {e.prefetch_hits} by prefetch), "
        f"{e.misses} misses, {e.bytes_fetched / 2**20:.2f} MiB fetched on demand, "
        f"{e.prefetch_bytes / 2**20:.2f} MiB prefetched, fetch wait {e.fetch_wait_ns / 1e6:.1f} ms"
        + (f", strict top-k {100 * e.strict_topk_accuracy:.1f}%" if e.predictions else "")
        + f"; seed {result.seed}]"
    )


def _cmd_generate(a: argparse.Namespace) -> int:
    from .api import WorkerClient, WorkerError

    sampling = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                    seed=a.seed, stop=a.stop or (), ignore_eos=a.ignore_eos)
    ids = [int(t) for t in a.token_ids.split(",")] if a.token_ids else None
    if (a.prompt is None) == (ids is None):
        print("error: give a prompt or --token-ids (not both)", file=sys.stderr)
        return 2
    try:
        with WorkerClient(_address(a)) as w:
            gen = w.generate(a.prompt, token_ids=ids, **sampling)
            for tok in gen:
                if a.stream and a.json:
                    print(json.dumps({"token": dataclasses.asdict(tok)}), flush=True)
                elif a.stream:
                    sys.stdout.write(tok.text)
                    sys.stdout.flush()
            result = gen.result
    except WorkerError as e:
        if a.stream and not a.json:
            print()
        print(f"error: {e.code}: {e.details}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps({"text": gen.text, "token_ids": [t.id for t in gen.tokens],
                          "result": dataclasses.asdict(result)}))
    else:
        sys.stdout.write(result.trailing_text if a.stream else gen.text)
        print(flush=True)
        print(summary_line(result), file=sys.stderr)
    return 0


def _cmd_stats(a: argparse.Namespace) -> int:
    from .api import WorkerClient, WorkerError

    try:
        with WorkerClient(_address(a)) as w:
            s = w.stats(include_layers=a.layers)
    except WorkerError as e:
        print(f"error: {e.code}: {e.details}", file=sys.stderr)
        return 1
    tokens = max(1, s.generated_tokens_total)
    derived = {
        "hit_rate": s.hit_rate, "strict_topk_accuracy": s.strict_topk_accuracy,
        "prefetch_recall": s.prefetch_recall, "prefetch_precision": s.prefetch_precision,
        "wasted_bytes_per_token": s.prefetch_wasted_bytes / tokens,
        "fetch_wait_ms_per_token": s.fetch_wait_ns / 1e6 / tokens,
    }  # fmt: skip
    if a.json:
        print(json.dumps({**s.to_dict(), **derived}))
        return 0
    for f in dataclasses.fields(s):
        if f.name != "layers":
            print(f"{f.name:26} {getattr(s, f.name)}")
    for name, value in derived.items():
        print(f"{name:26} {value:.4f}")
    if s.layers:
        print(f"{'layer':>5} {'slots':>5} {'resid':>5} {'lookups':>8} {'hit%':>6} {'cache':>7} {'prefetch':>8} "
              f"{'miss':>6} {'evict':>6} {'pf_in':>6} {'wasted':>6} {'late':>5} {'strict%':>7} {'recall%':>7} "
              f"{'prec%':>6} {'wait_ms':>8}")
        for l in s.layers:
            print(f"{l.layer:>5} {l.slots:>5} {l.resident_experts:>5} {l.lookups:>8} {100 * l.hit_rate:>6.2f} "
                  f"{l.cache_hits:>7} {l.prefetch_hits:>8} {l.misses:>6} {l.evictions:>6} {l.prefetches_issued:>6} "
                  f"{l.prefetch_unused_evictions:>6} {l.prefetch_late_hits:>5} {100 * l.strict_topk_accuracy:>7.2f} "
                  f"{100 * l.prefetch_recall:>7.2f} {100 * l.prefetch_precision:>6.2f} {l.fetch_wait_ns / 1e6:>8.1f}")
    return 0


def _cmd_gateway(a: argparse.Namespace) -> int:
    from .gateway.server import run
    from .gateway.settings import SettingsError, build_settings
    from .gateway.templates import ChatTemplateError

    overrides = dict(workers=tuple(a.worker or ()), listen=a.listen, api_key=a.api_key,
                     chat_template=a.chat_template, model_name=a.model_name, log_level=a.log_level)
    try:
        settings = build_settings(a.config, overrides)
        return run(settings)
    except (SettingsError, ChatTemplateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _add_gateway_parser(sub) -> None:
    gw = sub.add_parser("gateway", help="serve the OpenAI HTTP API in front of one or many workers",
                        description="OpenAI-compatible HTTP gateway (docs/gateway.md). Flags override --config.")
    gw.add_argument("--worker", action="append", default=None, metavar="ADDR",
                    help="worker address, host:port or unix:/path (repeatable)")
    gw.add_argument("--listen", default=None, help="HTTP address, host:port or unix:/path (default 127.0.0.1:8000)")
    gw.add_argument("--api-key", default=None, help="bearer token required on /v1 routes (or $FATE_GATEWAY_API_KEY)")
    gw.add_argument("--chat-template", type=Path, default=None, metavar="FILE",
                    help="Jinja chat template overriding the model's")
    gw.add_argument("--model-name", default=None, help="model id clients send (default: the worker's model name)")
    gw.add_argument("--config", type=Path, default=None, help="gateway.toml ([gateway] table)")
    gw.add_argument("--log-level", default=None, choices=("debug", "info", "warning", "error"))
    gw.set_defaults(func=_cmd_gateway)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m client", description="fate-moe client")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    d = sub.add_parser(
        "demo",
        help="make (or reuse) the built-in default model, pack it, generate from it",
        description="End to end on a fresh machine. The default model has random weights: its text is noise.",
    )
    d.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text")
    d.add_argument("--max-new-tokens", type=_positive_int, default=32, help="tokens to generate (default 32)")
    d.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a Hugging Face checkpoint directory to use instead of the random default model "
        "(e.g. ../shared/models/tiny-mixtral)",
    )
    d.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the default model and packs go (default: $FATE_MOE_CACHE, $XDG_CACHE_HOME/fate-moe, "
        "or .cache/fate-moe in the checkout)",
    )
    d.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    d.add_argument("--seed", type=int, default=0, help="seed of the default model's random weights")
    d.add_argument("--budget", default="50%", help="the worker's expert-cache budget (default 50%% of the experts)")
    d.add_argument("--transport", default="auto", choices=("auto", "shm", "grpc"), help="store -> worker path")
    d.set_defaults(func=_cmd_demo)

    g = sub.add_parser("generate", help="generate from a running worker",
                       description="Prints the text (as it arrives with --stream), then a summary line on stderr.")
    g.add_argument("prompt", nargs="?", default=None, help="prompt text")
    g.add_argument("--token-ids", default=None, help="comma-separated prompt token ids instead of text")
    g.add_argument("--address", default=None, help="worker address (host:port or unix:/path)")
    g.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    g.add_argument("--max-new-tokens", type=int, default=0, help="0: the worker's default")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.0, help="0 or 1: no nucleus cut")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--json", action="store_true", help="JSON output (JSON lines per token with --stream)")
    g.set_defaults(func=_cmd_generate)

    st = sub.add_parser("stats", help="print a running worker's statistics")
    st.add_argument("--address", default=None, help="worker address (host:port or unix:/path)")
    st.add_argument("--layers", action="store_true", help="per-layer cache statistics too")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_stats)
    _add_gateway_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):  # `client stats | head`: stop quietly when the reader goes (CLI only)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
