"""Settings of a process: a frozen dataclass, and the one converter that fills it from TOML and flags.

A settings class is a frozen dataclass whose fields each carry a type, a default and a
docstring (the string literal under the field). From that alone:

  - `add_flags(parser, cls)` adds one `--field-name` flag per field, whose help is the docstring
    and the default as a user writes it (1GiB, 100%, off);
  - `read_toml(cls, path, section)` reads the keys of a TOML file (its top level, or its
    `[section]` table when it has one, so one deploy file can carry a table per process);
  - `build(cls, path, section, flags)` fills the class: defaults < TOML file < flags.

Adding a setting is adding the field and its docstring. The store and the worker both use
this module (the worker imports the store's package, never the reverse).

Types the converter knows: bool, int, float, str, Path (relative paths in a TOML file are
relative to the file), `X | None`, `tuple[str, ...]` (a TOML list or "a,b"), `Size` (bytes:
123, "512MiB", "1.5G"), `Budget` (bytes, or a share: "25%"), `CountOrAuto` ("auto" or a
count). `Annotated[T, Choices(...)]` names the values a field allows, `ListenAddress` an address to
serve on; both are checked by `check_settings`, which a class's `__post_init__` calls.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import math
import re
import sys
import textwrap
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Collection, Mapping, TypeVar

from .errors import FateError

FORMAT_NAMES: tuple[str, ...] = ("bf16", "int8", "int4", "int2")
"""The stored expert formats (expert_store.codec.FORMATS holds their layouts)."""

LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")

T = TypeVar("T")


class ConfigError(FateError):
    """A bad flag value or config file; the message names the key and what is allowed."""


# -- value types ------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int, name: str = "size") -> int:
    """Bytes from 123, "123", "64KiB", "1.5GiB", "2G"; a ConfigError naming `name` otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: {value!r} is not a size (give bytes, or a number with KiB/MiB/GiB)")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{name}: {value} is negative")
        return value
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{name}: {value!r} is not a size (examples: 1048576, 512MiB, 4GiB, 2G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(nbytes: int) -> str:
    """The largest binary unit that divides it exactly: 1073741824 -> "1GiB", 1234 -> "1234"."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)


@dataclass(frozen=True)
class Budget:
    """A byte budget given as bytes or as a share of a total known later (the pack's expert bytes)."""

    bytes: int | None = None
    """Bytes, when given as a size."""
    share: float | None = None
    """A fraction in (0, 1], when given as a percentage."""

    @classmethod
    def parse(cls, value: "int | str | Budget", name: str = "budget_bytes") -> "Budget":
        """From 123, "512MiB" or "25%" (or a Budget, returned as is)."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, str) and value.strip().endswith("%"):
            try:
                pct = float(value.strip()[:-1])
            except ValueError:
                raise ConfigError(f"{name} = {value!r}: expected a percentage like '25%'") from None
            if math.isnan(pct) or not 0 < pct <= 100:
                raise ConfigError(f"{name} = {value!r}: a percentage must be in (0, 100]")
            return cls(share=pct / 100.0)
        return cls(bytes=parse_size(value, name))

    def resolve(self, total_bytes: int) -> int:
        """Bytes: as given, or the share of `total_bytes`."""
        return self.bytes if self.bytes is not None else int((self.share or 0.0) * total_bytes)

    def __str__(self) -> str:
        return format_size(self.bytes) if self.bytes is not None else f"{100 * (self.share or 0):g}%"


@dataclass(frozen=True)
class Choices:
    """The values a setting allows; `patterns` are further forms shown as is ("learned:PATH": any
    value starting with "learned:")."""

    values: tuple[Any, ...]
    patterns: tuple[str, ...] = ()

    def allows(self, value: Any) -> bool:
        return value in self.values or (isinstance(value, str) and any(
            value.startswith(p.split(":")[0] + ":") for p in self.patterns if ":" in p))

    def __str__(self) -> str:
        return ", ".join([*map(str, self.values), *self.patterns])


class _Kind:
    """Marks an annotated type with how its values are read (see Size, CountOrAuto)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"_Kind({self.name})"


Size = Annotated[int, _Kind("size")]
"""Bytes; written 123, "512MiB", "4GiB", "1.5G" (KiB/MiB/GiB: powers of 1024; K/M/G: of 1000)."""
CountOrAuto = Annotated[typing.Union[int, str], _Kind("count_or_auto")]
""""auto" or a count >= 0."""
ListenAddress = Annotated[str, _Kind("address")]
"""An address to serve on: host:port, or unix:/path/to.sock (checked by check_settings)."""


# -- fields -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One field of a settings class, as the converter sees it."""

    name: str
    kind: str  # bool, int, float, str, address, path, strs, size, budget, count_or_auto
    optional: bool  # None allowed
    default: Any  # dataclasses.MISSING: required
    doc: str
    choices: Choices | None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def convert(self, value: Any, where: str, base: Path | None = None, text: bool = False) -> Any:
        """A TOML value (text=False) or a command-line string (text=True) as the field's type."""
        def bad(want: str) -> ConfigError:
            return ConfigError(f"{where} = {value!r}: expected {want}")

        if self.optional and (value is None or (isinstance(value, str) and value in ("", "auto")
                                                and self.kind in ("str", "path"))):
            return None
        k = self.kind
        if k == "bool":
            if isinstance(value, bool):
                return value
            if text and str(value).lower() in ("true", "false", "on", "off", "yes", "no", "1", "0"):
                return str(value).lower() in ("true", "on", "yes", "1")
            raise bad("true or false")
        if k == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if text and isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
                return int(value)
            raise bad("an integer")
        if k == "float":
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if text and isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise bad("a number")
        if k == "size":
            return parse_size(value, where)
        if k == "budget":
            if isinstance(value, bool) or not isinstance(value, (int, str, Budget)):
                raise bad('bytes, a size like "512MiB", or a share like "25%"')
            return Budget.parse(value, where)
        if k == "count_or_auto":
            if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
                return value
            if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value):
                return int(value)
            raise bad('"auto" or an integer')
        if k == "strs":
            if isinstance(value, str):
                value = value.split(",")
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise bad('a list of names, e.g. ["int4", "int2"] or "int4,int2"')
            return tuple(v.strip() for v in value if v.strip())
        if not isinstance(value, (str, Path)) or (k == "path" and not str(value)):  # str, address, path
            raise bad("a path" if k == "path" else "a string")
        if k == "path":
            p = Path(value).expanduser()
            return p if p.is_absolute() or base is None else base / p
        return value

    def show(self, value: Any) -> str:
        """A value as a user writes it: 1GiB, 25%, on/off, auto."""
        if value is None:
            return "auto" if self.kind == "str" else "none"
        if self.kind == "bool":
            return "on" if value else "off"
        if self.kind == "size":
            return format_size(value)
        if self.kind == "strs":
            return ",".join(value) if value else "empty"
        if value == "":
            return "empty"
        return str(value)

    def shown_default(self) -> str:
        """The default, followed by what the docstring says it means ("0 (off)")."""
        if self.required:
            return "required"
        shown = self.show(self.default)
        keys = {shown, str(self.default)} | ({"None"} if self.default is None else set())
        for key in keys:
            m = re.search(rf"(?:^|[\s;(]){re.escape(key)}: ([^.;,()]+)", self.doc)
            if m:
                return f"{shown} ({m.group(1).strip()})"
        return shown


def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each annotated field of `cls` (and of its dataclass bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (frozen app): flags go without their docs
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _kind_of(tp: Any) -> tuple[str, bool, Choices | None]:
    choices = None
    kind = None
    if typing.get_origin(tp) is Annotated:
        tp, *meta = typing.get_args(tp)
        for m in meta:
            if isinstance(m, Choices):
                choices = m
            elif isinstance(m, _Kind):
                kind = m.name
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if kind is None and optional and len(args) == 1:
            return _kind_of(Annotated[args[0], choices] if choices else args[0])[0], True, choices
        tp = args[0] if len(args) == 1 else tp
    if kind is None:
        if typing.get_origin(tp) is tuple:
            kind = "strs"
        else:
            kind = {bool: "bool", int: "int", float: "float", str: "str", Path: "path", Budget: "budget"}.get(tp)
    if kind is None:
        raise TypeError(f"settings: no converter for the type {tp!r}")  # a bug: a field of an unknown type
    return kind, optional, choices


@functools.cache
def settings_of(cls: type) -> tuple[Setting, ...]:
    """Every field of the settings class `cls`, with its kind, default and docstring."""
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = _field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind, optional, choices = _kind_of(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        out.append(Setting(f.name, kind, optional, default, docs.get(f.name, ""), choices))
    return tuple(out)


def check_settings(obj: Any) -> None:
    """ConfigError for the first field of `obj` whose value its Choices do not allow, or whose listen
    address is malformed. A settings class's __post_init__ calls it, then checks its own ranges."""
    for s in settings_of(type(obj)):
        if s.kind == "address":
            check_address(s.name, getattr(obj, s.name))
        if s.choices is None:
            continue
        value = getattr(obj, s.name)
        for v in (value if s.kind == "strs" else (value,)):
            if v is not None and not s.choices.allows(v):
                raise ConfigError(f"{s.name} = {v!r}: choose from {s.choices}")


def check(ok: bool, key: str, value: Any, why: str) -> None:
    """ConfigError `key = value: why` unless ok."""
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {why}")


def check_address(key: str, address: str, example: str = "127.0.0.1:50051") -> None:
    """An address is host:port or unix:/path."""
    if address.startswith("unix:"):
        if not address[len("unix:"):]:
            raise ConfigError(f"{key} = {address!r}: give a socket path after unix:")
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        hint = f" (a socket path needs the scheme: unix:{address})" if "/" in address else ""
        raise ConfigError(f"{key} = {address!r}: expected host:port (e.g. {example}) or unix:/path/to.sock{hint}")


# -- TOML -------------------------------------------------------------------------------------


def read_toml_table(path: str | Path, section: str, known: Collection[str]) -> tuple[dict[str, Any], str]:
    """The [section] table of a TOML file (or its top level when it has none), every key in `known`;
    returns (table, where) with `where` naming the file and table for error messages."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    table = data[section] if isinstance(data.get(section), dict) else data
    where = f"{path} [{section}]" if table is not data else str(path)
    unknown = sorted(k for k in table if k not in known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})")
    return table, where


def read_toml(cls: type, path: str | Path, section: str) -> dict[str, Any]:
    """The keys of `cls` in a TOML file (top level, or its [section] table), converted and checked."""
    by_name = {s.name: s for s in settings_of(cls)}
    table, where = read_toml_table(path, section, by_name)
    base = Path(path).parent
    return {k: by_name[k].convert(v, f"{where}: {k}", base=base) for k, v in table.items()}


# -- command line -----------------------------------------------------------------------------

_METAVARS = {"int": "N", "float": "X", "address": "ADDR", "size": "SIZE", "budget": "SIZE|PCT%", "count_or_auto": "N|auto",
             "strs": "A,B", "path": "PATH", "str": "TEXT"}  # fmt: skip


def flag_help(s: Setting) -> str:
    """The docstring, the allowed values and the default, %-escaped for argparse."""
    parts = [s.doc.rstrip(".") + "." if s.doc else ""]
    if s.choices is not None and not all(str(v) in s.doc for v in [*s.choices.values, *s.choices.patterns]):
        parts.append(f"One of: {s.choices}.")
    parts.append("(required)" if s.required else f"(default: {s.shown_default()})")
    return " ".join(p for p in parts if p).replace("%", "%%")


def add_flags(parser: argparse.ArgumentParser, cls: type, *, positional: Collection[str] = (),
              aliases: Mapping[str, Collection[str]] | None = None, skip: Collection[str] = ()) -> None:
    """One flag per field of `cls` (`--field-name`; booleans also `--no-field-name`), each defaulting to
    None (not given) so that the TOML file and the class defaults fill what the command line leaves."""
    aliases = aliases or {}
    for s in settings_of(cls):
        if s.name in skip:
            continue
        if s.name in positional:
            parser.add_argument(s.name, metavar=s.name.upper(), nargs="?", default=None,
                                help=flag_help(s).replace("(required)", f"(required, here or as `{s.name}` in the config file)"))
            continue
        names = [s.flag, *aliases.get(s.name, ())]
        if s.kind == "bool":
            parser.add_argument(*names, dest=s.name, default=None, action=argparse.BooleanOptionalAction,
                                help=flag_help(s))
        else:
            if s.choices and s.choices.patterns:
                metavar = "|".join(["NAME", *s.choices.patterns])
            elif s.choices and s.kind != "strs":
                metavar = "{" + ",".join(map(str, s.choices.values)) + "}"
            else:
                metavar = _METAVARS[s.kind]
            parser.add_argument(*names, dest=s.name, default=None, metavar=metavar, help=flag_help(s))


def add_config_flag(parser: argparse.ArgumentParser, cls: type, section: str) -> None:
    parser.add_argument("--config", type=Path, default=None, metavar="TOML",
                        help=f"TOML file with {cls.__name__} keys, at the top level or in a [{section}] table; "
                             "flags override it, it overrides the defaults")


def flags_given(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` given on the command line (as typed, not yet converted)."""
    return {s.name: getattr(ns, s.name) for s in settings_of(cls) if getattr(ns, s.name, None) is not None}


def build(cls: type[T], toml_path: str | Path | None, section: str, flags: Mapping[str, Any]) -> T:
    """Defaults < TOML file < flags (command-line strings, or values already typed; None: not given)."""
    by_name = {s.name: s for s in settings_of(cls)}
    unknown = sorted(set(flags) - set(by_name))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}")
    values: dict[str, Any] = read_toml(cls, toml_path, section) if toml_path is not None else {}
    for k, v in flags.items():
        if v is not None:
            values[k] = by_name[k].convert(v, by_name[k].flag, text=True)
    for s in by_name.values():
        if s.required and values.get(s.name) in (None, ""):
            raise ConfigError(f"no {s.name}: give {s.flag.upper()[2:] if s.kind == 'path' else s.flag + ' ...'} "
                              f"or `{s.name} = ...` in the config file")
    return cls(**values)


def prog_name(module: str) -> str:
    """The command as the user typed it: `fate-store` (the installed script), else `python -m module`."""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return script if script.startswith("fate-") else f"python -m {module}"
