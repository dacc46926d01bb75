"""What the worker tells a front end about its model (GetModelInfo): the name, context length,
special tokens and chat template, read from the pack's tokenizer files as Hugging Face stores them.

Template sources, first found wins (as transformers loads them): `chat_template.jinja`,
`chat_template.json`'s "chat_template", `tokenizer_config.json`'s "chat_template". The last two may
hold a list of `{"name", "template"}`: the one named "default" is the default, the others are named.
Special tokens come from tokenizer_config.json, then special_tokens_map.json; either may write a
token as a string or as an AddedToken object (`{"content": ...}`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json", "special_tokens_map.json")
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


@dataclass(frozen=True)
class ModelTemplateInfo:
    chat_template: str = ""  # the default template; empty: none
    named_chat_templates: dict[str, str] = field(default_factory=dict)
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token -> "<s>", ...


def _token_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return ""


def _templates(value: Any) -> tuple[str, dict[str, str]]:
    """(default, named) from a "chat_template" value: a string, or a list of {"name", "template"}."""
    if isinstance(value, str):
        return value, {}
    named: dict[str, str] = {}
    if isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str):
                named[item["name"]] = item["template"]
    return named.pop("default", ""), named


def _json(blob: bytes | None, name: str) -> dict:
    if blob is None:
        return {}
    try:
        value = json.loads(blob)
    except ValueError as e:
        log.warning("the pack's %s is not valid JSON (%s): ignored", name, e)
        return {}
    return value if isinstance(value, dict) else {}


def read_template_info(files: Mapping[str, bytes]) -> ModelTemplateInfo:
    """The chat templates and special tokens of a pack's tokenizer files (name -> bytes)."""
    config = _json(files.get("tokenizer_config.json"), "tokenizer_config.json")
    default, named = "", {}
    if "chat_template.jinja" in files:
        default = files["chat_template.jinja"].decode("utf-8", errors="replace")
    elif "chat_template" in (tpl := _json(files.get("chat_template.json"), "chat_template.json")):
        default, named = _templates(tpl["chat_template"])
    elif "chat_template" in config:
        default, named = _templates(config["chat_template"])
    special_map = _json(files.get("special_tokens_map.json"), "special_tokens_map.json")
    special = {k: _token_text(config.get(k)) or _token_text(special_map.get(k)) for k in SPECIAL_TOKENS}
    return ModelTemplateInfo(default, named, {k: v for k, v in special.items() if v})


def load_template_info(available: Sequence[str], fetch: Callable[[list[str]], dict[str, bytes]]) -> ModelTemplateInfo:
    """Fetch the template files the pack has (fetch: the store client's `files`) and read them."""
    names = [n for n in TEMPLATE_FILES if n in available]
    return read_template_info(fetch(names) if names else {})
