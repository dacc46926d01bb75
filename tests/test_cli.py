"""The command lines: every flag shows its doc and default, names are spelled the way the user ran
them, and --help answers without importing torch."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices[name]


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every option and positional of a parser -> its help text, expanded as --help prints it."""
    fmt = parser._get_formatter()
    out = {}
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        out[(a.option_strings or [a.dest])[0]] = fmt._expand_help(a) if a.help else ""
    return out


def _help(argv: list[str], module: str) -> str:
    r = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_serve_flags_show_their_doc_and_default():
    from expert_store.__main__ import build_parser as store_parser
    from gpu_worker.__main__ import build_parser as worker_parser

    store = _flags(_sub(store_parser(), "serve"))
    worker = _flags(_sub(worker_parser(["serve"]), "serve"))
    for name, text in {**store, **worker}.items():
        assert text and ("(default: " in text or "(required" in text or name == "--config"), (name, text)
    assert store["--ram-bytes"].endswith("(default: 1GiB)")  # not 1073741824
    assert worker["--budget-bytes"].endswith("(default: 100%)")
    assert worker["--metrics-port"].endswith("(default: 0 (off))")
    assert "learned:PATH" in worker["--allocation"] and "lru, lfu, lfu_decay, arc" in worker["--policy"]
    assert "(required" in worker["--store"] and "required" in store["pack"]


def test_in_process_and_bench_flags_have_help():
    from expert_store.__main__ import build_parser as store_parser
    from gpu_worker.__main__ import build_parser as worker_parser

    gen = _flags(_sub(worker_parser(["generate"]), "generate"))
    ppl = _flags(_sub(worker_parser(["perplexity"]), "perplexity"))
    for flag in ("--max-new-tokens", "--top-k", "--top-p", "--seed", "--temperature"):
        assert "default" in gen[flag], flag
    for flag in ("--text", "--window", "--max-tokens"):
        assert ppl[flag], flag
    assert "default: 512" in ppl["--window"] and "default: 8192" in ppl["--max-tokens"]
    for cmd in ("inspect", "verify"):
        assert _flags(_sub(store_parser(), cmd))["pack"], cmd
    profile = _help(["profile", "--help"], "bench")
    for flag in ("--pack", "--out", "--format", "--device", "--prompts", "--text"):
        line = profile.split(f"  {flag} ", 1)[1].split("\n  --", 1)[0]
        assert len(line.split()) > 2, (flag, line)


def test_top_level_help_lists_each_subcommand_once():
    text = _help(["--help"], "gpu_worker")
    assert text.startswith("usage: python -m gpu_worker ") and "serve|generate|perplexity" not in text
    for name in ("serve", "generate", "perplexity", "simulate", "analyze", "make-default-model"):
        assert sum(line.split()[:1] == [name] for line in text.splitlines()) == 1, name


def test_client_help_shows_the_default_address(monkeypatch):
    from client.__main__ import build_parser as client_parser

    monkeypatch.delenv("FATE_WORKER_ADDRESS", raising=False)
    text = _flags(_sub(client_parser(), "stats"))["--address"]
    assert "unix:/run/fate-moe/worker.sock" in text and "$FATE_WORKER_ADDRESS" in text


def test_the_program_name_is_the_one_the_user_ran(monkeypatch):
    from client.__main__ import build_parser as client_parser
    from expert_store.__main__ import build_parser as store_parser
    from gpu_worker.__main__ import build_parser as worker_parser

    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/fate-store"])
    assert store_parser().prog == "fate-store"
    monkeypatch.setattr(sys, "argv", ["/x/gpu_worker/__main__.py"])
    assert worker_parser().prog == "python -m gpu_worker" and client_parser().prog == "python -m client"


def test_help_imports_no_torch():
    """`--help` of every command answers without loading torch (it took seconds when it did)."""
    code = ("import sys\n"
            "from expert_store.__main__ import build_parser as s\n"
            "from gpu_worker.__main__ import build_parser as w\n"
            "from client.__main__ import build_parser as c\n"
            "for p in (s(), w([]), w(['serve']), w(['generate']), c()):\n"
            "    p.format_help()\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
    assert r.returncode == 0, r.stderr


def test_bad_flag_values_are_one_line_errors(capsys):
    from gpu_worker.__main__ import main as worker_main

    assert worker_main(["serve", "--store", "unix:/nowhere.sock", "--budget-bytes", "lots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --budget-bytes") and "lots" in err[0]
    assert worker_main(["serve", "--store", "unix:/nowhere.sock", "--policy", "fifo"]) == 2
    assert "policy = 'fifo': choose from lru, lfu, lfu_decay, arc" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["expert_store", "gpu_worker", "client"])
def test_installed_scripts_are_declared(module):
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert f"{module}.__main__:main" in scripts.values()


def test_pack_reuse_and_inspect_json(hf_tiny_mixtral_dir, tmp_path, capsys):
    """What the demo runs: `pack --reuse` keeps a pack that has the formats, repacks one that lacks them;
    `inspect --json` gives the expert sizes."""
    import json

    from expert_store.__main__ import main as store_main

    out = tmp_path / "pack"
    args = ["pack", str(hf_tiny_mixtral_dir), str(out), "--no-progress", "--reuse"]
    assert store_main([*args, "--formats", "int4"]) == 0
    assert store_main([*args, "--formats", "int4"]) == 0 and "reusing" in capsys.readouterr().out
    assert store_main([*args, "--formats", "int2"]) == 0 and "reusing" not in capsys.readouterr().out
    assert store_main(["inspect", str(out), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert list(facts["expert_bytes"]) == ["int2"] and facts["experts"] == 2 * 8 and facts["top_k"] == 2
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("mine")
    assert store_main(["pack", str(hf_tiny_mixtral_dir), str(tmp_path / "precious"), "--reuse", "--no-progress"]) == 2
    assert (tmp_path / "precious" / "notes.txt").read_text() == "mine"  # --reuse never replaces a non-pack


def test_make_default_model_prints_its_directory(tmp_path, capsys):
    from gpu_worker.__main__ import main as worker_main

    assert worker_main(["make-default-model", str(tmp_path), "--seed", "3"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.parent == tmp_path and (path / "config.json").is_file() and "seed3" in path.name
