"""Configuration of the gateway: one frozen dataclass, filled by a TOML file and CLI flags.

Precedence: the defaults, then the TOML file (`--config gateway.toml`, keys at the top level or in a
`[gateway]` table: when that table is present only it is read), then the flags given on the command
line. The API key may also come from $FATE_GATEWAY_API_KEY or from `api_key_file` (keep keys out of
world-readable config files). An unknown key is an error that names it; relative paths are relative
to the file's directory.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

DEFAULT_LISTEN = "127.0.0.1:8000"
API_KEY_ENV = "FATE_GATEWAY_API_KEY"


class SettingsError(ValueError):
    """A bad flag or config value; the message names the key and what is allowed."""


@dataclass(frozen=True)
class GatewaySettings:
    workers: tuple[str, ...]
    """Worker addresses (`host:port` or `unix:/path.sock`); every one must serve the same pack."""

    listen: str = DEFAULT_LISTEN
    """HTTP address: `host:port` (loopback by default) or `unix:/path/to.sock`."""

    api_key: str | None = None
    """Bearer token every /v1 route requires; None: no authentication (keep the gateway on loopback)."""

    api_key_file: Path | None = None
    """File holding the API key (first line); used when api_key is unset."""

    chat_template: Path | None = None
    """A Jinja chat template (`.jinja`, or a JSON file with "chat_template") overriding the model's."""

    model_name: str | None = None
    """Model id clients pass as `model`; None: the name the workers report (the packed checkpoint's)."""

    health_interval_s: float = 1.0
    """Seconds between health checks of each worker (grpc.health.v1 Check)."""

    request_timeout_s: float = 600.0
    """Deadline of one generation on a worker; past it the request ends with 504."""

    max_tokens_limit: int = 0
    """Largest max_tokens a request may ask; 0: the model's context is the only limit."""

    retry_unavailable: bool = True
    """Retry once on another worker a request that fails UNAVAILABLE before its first token."""

    log_level: str = "info"
    """Logging level: debug, info, warning, error."""

    def __post_init__(self) -> None:
        if not self.workers:
            raise SettingsError("no workers: give --worker ADDR (repeatable) or `workers = [...]` in the config")
        for w in self.workers:
            _check_address("workers", w)
        _check_address("listen", self.listen)
        if self.health_interval_s <= 0:
            raise SettingsError(f"health_interval_s = {self.health_interval_s}: must be > 0")
        if self.request_timeout_s <= 0:
            raise SettingsError(f"request_timeout_s = {self.request_timeout_s}: must be > 0")
        if self.max_tokens_limit < 0:
            raise SettingsError(f"max_tokens_limit = {self.max_tokens_limit}: must be >= 0")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise SettingsError(f"log_level = {self.log_level!r}: choose from debug, info, warning, error")

    def resolved_api_key(self) -> str | None:
        """api_key, else the first line of api_key_file, else $FATE_GATEWAY_API_KEY; None: no auth."""
        if self.api_key:
            return self.api_key
        if self.api_key_file is not None:
            try:
                key = self.api_key_file.read_text().strip().splitlines()
            except OSError as e:
                raise SettingsError(f"api_key_file = {str(self.api_key_file)!r}: cannot read ({e.strerror})") from None
            if not key or not key[0].strip():
                raise SettingsError(f"api_key_file = {str(self.api_key_file)!r}: the file is empty")
            return key[0].strip()
        return os.environ.get(API_KEY_ENV) or None


_FIELDS = {f.name: f for f in dataclasses.fields(GatewaySettings)}
_TYPES: dict[str, tuple[type, ...]] = {
    "listen": (str,), "api_key": (str,), "model_name": (str,), "log_level": (str,),
    "health_interval_s": (int, float), "request_timeout_s": (int, float), "max_tokens_limit": (int,),
    "retry_unavailable": (bool,),
}


def load_toml(path: str | Path) -> dict[str, Any]:
    """The GatewaySettings keys of a TOML file (top level or its [gateway] table), type-checked."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise SettingsError(f"{path}: cannot read the config file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{path}: not valid TOML ({e})") from None
    table = data["gateway"] if isinstance(data.get("gateway"), dict) else data
    where = f"{path} [gateway]" if table is not data else str(path)
    unknown = sorted(k for k in table if k not in _FIELDS)
    if unknown:
        raise SettingsError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(_FIELDS)})")
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key == "workers":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SettingsError(f'{where}: workers = {value!r}: expected a list of addresses, e.g. ["127.0.0.1:50061"]')
            out[key] = tuple(value)
        elif key in ("chat_template", "api_key_file"):
            if not isinstance(value, str) or not value:
                raise SettingsError(f"{where}: {key} = {value!r}: expected a path string")
            p = Path(value).expanduser()
            out[key] = p if p.is_absolute() else path.parent / p
        else:
            types = _TYPES[key]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise SettingsError(f"{where}: {key} = {value!r}: expected {' or '.join(t.__name__ for t in types)}")
            out[key] = float(value) if float in types else value
    return out


def build_settings(toml_path: str | Path | None, overrides: Mapping[str, Any]) -> GatewaySettings:
    """Defaults < TOML file < overrides (flags given on the command line; None and () mean not given)."""
    values: dict[str, Any] = load_toml(toml_path) if toml_path is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    values.setdefault("workers", ())
    return GatewaySettings(**values)


def _check_address(key: str, address: str) -> None:
    if address.startswith("unix:"):
        if not address[len("unix:"):]:
            raise SettingsError(f"{key} = {address!r}: give a socket path after unix:")
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise SettingsError(f"{key} = {address!r}: expected host:port (e.g. 127.0.0.1:8000) or unix:/path/to.sock")
