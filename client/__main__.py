"""`python -m client ...`: the command line of fate-moe's client.

    python -m client demo                       # the README's run command: store + worker + one generation
    python -m client generate "prompt" --stream # stream a generation from a running worker
    python -m client stats [--layers]           # the worker's counters
    python -m client gateway --worker ADDR      # OpenAI-compatible HTTP API over workers

(installed as `fate-client`). The worker's address comes from --address, else
$FATE_WORKER_ADDRESS, else unix:/run/fate-moe/worker.sock (a bearer token: $FATE_WORKER_TOKEN_FILE;
TLS: $FATE_WORKER_TLS_CA). A failed call prints `error: CODE: message` and exits 1. Each subcommand is
one `_add_*` function listed in COMMANDS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from pathlib import Path

from .settings import ADDRESS_HELP, TIMEOUT_HELP, ClientSettings


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _cmd_demo(a: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    return run_demo(DemoConfig(**{k: v for k, v in vars(a).items() if k in fields}))


def _client(a: argparse.Namespace):
    from .api import WorkerClient

    defaults = ClientSettings()
    return WorkerClient(a.address or defaults.address, timeout_s=a.timeout_s)


def _cmd_generate(a: argparse.Namespace) -> int:
    from .api import WorkerError
    from .formatting import summary_line

    sampling = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                    seed=a.seed, stop=a.stop or (), ignore_eos=a.ignore_eos)
    ids = [int(t) for t in a.token_ids.split(",")] if a.token_ids else None
    if (a.prompt is None) == (ids is None):
        print("error: give a prompt or --token-ids (not both)", file=sys.stderr)
        return 2
    try:
        with _client(a) as w:
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
    from .api import WorkerError
    from .formatting import stats_json, stats_lines

    try:
        with _client(a) as w:
            s = w.stats(include_layers=a.layers)
    except WorkerError as e:
        print(f"error: {e.code}: {e.details}", file=sys.stderr)
        return 1
    print(json.dumps(stats_json(s)) if a.json else "\n".join(stats_lines(s)))
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


def _add_gateway(sub: argparse._SubParsersAction) -> None:
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
    gw.add_argument("--log-level", default=None, choices=("debug", "info", "warning", "error"),
                    help="logging level (default: info)")
    gw.set_defaults(func=_cmd_gateway)


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.add_argument("--timeout-s", type=float, default=None, help=TIMEOUT_HELP)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from .demo import DemoConfig

    d0 = DemoConfig()
    d = sub.add_parser(
        "demo", help="make (or reuse) the built-in default model, pack it, serve it, generate from it",
        description="End to end on a fresh machine: the store and the worker run as their own processes, started "
                    "by their command lines. The default model has random weights: its text is noise.",
    )
    d.add_argument("--prompt", default=d0.prompt, help="prompt text (default: %(default)r)")
    d.add_argument("--max-new-tokens", type=_positive_int, default=d0.max_new_tokens,
                   help="tokens to generate (default: %(default)s)")
    d.add_argument("--checkpoint", type=Path, default=None,
                   help="a Hugging Face checkpoint directory to use instead of the random default model "
                        "(e.g. ../shared/models/tiny-mixtral)")
    d.add_argument("--cache-dir", type=Path, default=None,
                   help="where the default model and packs go (default: $FATE_MOE_CACHE, $XDG_CACHE_HOME/fate-moe, "
                        "or .cache/fate-moe in the checkout)")
    d.add_argument("--device", default=d0.device, help="auto (cuda when present), cpu, cuda, cuda:N (default: auto)")
    d.add_argument("--seed", type=int, default=d0.seed,
                   help="seed of the default model's random weights (default: %(default)s)")
    d.add_argument("--budget", default=d0.budget, help="the worker's expert-cache budget: bytes, a size like 512MiB "
                                                        "or a share of the experts (default: %(default)s)")
    d.add_argument("--transport", default=d0.transport, choices=("auto", "shm", "grpc"),
                   help="how experts travel from the store to the worker (default: %(default)s)")
    d.set_defaults(func=_cmd_demo)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate from a running worker",
                       description="Prints the text (as it arrives with --stream), then a summary line on stderr.")
    g.add_argument("prompt", nargs="?", default=None, help="prompt text")
    g.add_argument("--token-ids", default=None, help="comma-separated prompt token ids instead of text")
    _add_connection_flags(g)
    g.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    g.add_argument("--max-new-tokens", type=int, default=0,
                   help="tokens to generate at most; 0: the worker's default (default: 0)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0: no cut (default: 0)")
    g.add_argument("--top-p", type=float, default=0.0, help="nucleus mass; 0 or 1: no nucleus cut (default: 0)")
    g.add_argument("--seed", type=int, default=None,
                   help="sampling seed (default: the worker picks one and reports it)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="go on past the model's end-of-sequence token")
    g.add_argument("--json", action="store_true", help="JSON output (JSON lines per token with --stream)")
    g.set_defaults(func=_cmd_generate)


def _add_stats(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("stats", help="print a running worker's statistics")
    _add_connection_flags(st)
    st.add_argument("--layers", action="store_true", help="per-layer cache statistics too")
    st.add_argument("--json", action="store_true", help="one JSON object (null for figures that do not apply)")
    st.set_defaults(func=_cmd_stats)


COMMANDS = [_add_demo, _add_generate, _add_stats, _add_gateway]  # one more subcommand: its _add_* function here


def prog_name() -> str:
    """`fate-client` when run as the installed script, else `python -m client`."""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return script if script.startswith("fate-") else "python -m client"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog_name(), description="fate-moe client")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
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
