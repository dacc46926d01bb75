"""The one settings converter: a field with a docstring is a flag and a TOML key, typed and checked."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pytest

from expert_store.settings import (
    FORMAT_NAMES,
    Budget,
    Choices,
    ConfigError,
    CountOrAuto,
    Size,
    add_flags,
    build,
    flags_given,
    format_size,
    settings_of,
)


@dataclass(frozen=True)
class Toy:
    name: str
    """What it is called."""
    size: Size = 1 << 30
    """How big; 0: none."""
    budget: Budget = Budget(share=0.5)
    """How much of it."""
    on: bool = True
    """Whether it runs."""
    formats: Annotated[tuple[str, ...], Choices(FORMAT_NAMES)] = ()
    """Formats; empty: all."""
    slots: CountOrAuto = "auto"
    """Slots."""
    where: Path | None = None
    """A file."""
    kind: Annotated[str | None, Choices(("a", "b"), ("c:PATH",))] = None
    """A kind; None: a."""


def test_a_new_field_is_a_flag_and_a_toml_key(tmp_path):
    p = argparse.ArgumentParser()
    add_flags(p, Toy)
    ns = p.parse_args(["--name", "x", "--size", "2MiB", "--no-on", "--formats", "int4,int2", "--slots", "3",
                       "--kind", "c:/f"])
    f = tmp_path / "toy.toml"
    f.write_text('[toy]\nname = "from-file"\nbudget = "25%"\nwhere = "rel/file"\nsize = 7\n')
    cfg = build(Toy, f, "toy", flags_given(ns, Toy))
    assert cfg == Toy(name="x", size=2 << 20, budget=Budget(share=0.25), on=False, formats=("int4", "int2"),
                      slots=3, where=tmp_path / "rel/file", kind="c:/f")
    helps = {a.dest: a.help for a in p._actions}
    assert helps["size"].endswith("(default: 1GiB)") and "How big" in helps["size"]
    assert helps["budget"].endswith("(default: 50%%)") and helps["on"].endswith("(default: on)")
    assert helps["kind"].endswith("(default: auto (a))") and helps["name"].endswith("(required)")


def test_bad_values_name_the_key_and_where_it_came_from(tmp_path):
    f = tmp_path / "toy.toml"
    f.write_text('name = "n"\nsize = "lots"\n')
    with pytest.raises(ConfigError, match=r"toy.toml: size"):
        build(Toy, f, "toy", {})
    with pytest.raises(ConfigError, match=r"--size"):
        build(Toy, None, "toy", {"name": "n", "size": "lots"})
    with pytest.raises(ConfigError, match="no name"):
        build(Toy, None, "toy", {})
    f.write_text('name = "n"\nsizes = 1\n')
    with pytest.raises(ConfigError, match="unknown key.*sizes"):
        build(Toy, f, "toy", {})


def test_every_setting_of_the_processes_has_a_docstring():
    from expert_store.config import StoreConfig
    from gpu_worker.config import WorkerConfig

    for cls in (StoreConfig, WorkerConfig):
        missing = [s.name for s in settings_of(cls) if not s.doc]
        assert not missing, (cls.__name__, missing)


def test_sizes_budgets_and_format_names():
    from expert_store.codec import FORMATS

    assert set(FORMAT_NAMES) == set(FORMATS)
    assert format_size(1 << 30) == "1GiB" and format_size(1234) == "1234" and format_size(3 << 20) == "3MiB"
    assert Budget.parse("25%").resolve(1000) == 250 and Budget.parse("1KiB").resolve(1) == 1024
    assert str(Budget.parse("100%")) == "100%" and str(Budget.parse(512 << 20)) == "512MiB"
    for bad in ("0%", "120%", "lots", "nan%"):
        with pytest.raises(ConfigError, match="budget"):
            Budget.parse(bad)
