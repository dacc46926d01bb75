"""WorkerConfig: TOML and flags fill the same dataclass, flags win; bad keys and values are named."""

from __future__ import annotations

import pytest

from gpu_worker.config import Budget, ConfigError, WorkerConfig, build_config, resolve_budget


def test_toml_then_flags(tmp_path):
    f = tmp_path / "w.toml"
    f.write_text('[store]\nram_bytes = 1\n[worker]\nstore = "unix:/run/s.sock"\nbudget_bytes = "512MiB"\n'
                 'max_batch_size = 4\nthreads = 2\n')
    cfg = build_config(f, {"max_batch_size": 2, "listen": None})
    assert cfg == WorkerConfig(store="unix:/run/s.sock", budget_bytes="512MiB", max_batch_size=2, threads=2)
    assert resolve_budget(cfg.budget_bytes, 10**12) == 512 << 20


def test_unknown_keys_and_bad_values_are_named(tmp_path):
    f = tmp_path / "w.toml"
    f.write_text('store = "127.0.0.1:1"\nbudget = "25%"\n')
    with pytest.raises(ConfigError, match="unknown key.*budget"):
        build_config(f, {})
    with pytest.raises(ConfigError, match="store"):
        build_config(None, {})
    for kw, field in [({"transport": "tcp"}, "transport"), ({"max_batch_size": 0}, "max_batch_size"),
                      ({"listen": "nowhere"}, "listen"), ({"budget_bytes": "120%"}, "budget_bytes"),
                      ({"budget_bytes": "lots"}, "budget_bytes"), ({"expert_format": "int3"}, "expert_format")]:
        with pytest.raises(ConfigError, match=field):
            WorkerConfig(store="127.0.0.1:1", **kw)


def test_budget_shares_and_sizes():
    assert Budget.parse("25%") == Budget(share=0.25) and str(Budget.parse("25%")) == "25%"
    assert resolve_budget("25%", 1000) == 250
    assert resolve_budget(1234, 1000) == 1234
    assert resolve_budget("1KiB", 1) == 1024
