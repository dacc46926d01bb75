"""Chat templates: a model's Jinja template rendered as transformers' `apply_chat_template` renders it.

The environment is jinja2's ImmutableSandboxedEnvironment (templates come from model repositories:
untrusted code) with transformers' settings: trim_blocks, lstrip_blocks, the loopcontrols extension,
a `tojson` that does not HTML-escape, and the globals `raise_exception`, `strftime_now`, `dict` and
a `namespace` that refuses underscore names. The template sees `messages`, `tools`, `documents`,
`add_generation_prompt` and the special tokens (`bos_token`, `eos_token`, ...), as transformers
passes them. A template's `raise_exception(...)` (e.g. "roles must alternate") is a ChatTemplateError:
the request's fault, answered with 400.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import jinja2.utils


class ChatTemplateError(ValueError):
    """The template could not render these messages (its own raise_exception, or a template bug)."""


class _TemplateDict:
    """`dict(...)` inside templates without dict's class attributes."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's namespace refusing underscore-prefixed names (no reach into CPython internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 - jinja2.utils.Namespace's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def make_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    return env


def _plain(value: Any) -> Any:
    """JSON-plain copies of what the template sees (no objects with methods inside the sandbox)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


class ChatTemplate:
    """One compiled template with the model's special tokens."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None, origin: str = "the model"):
        self.source = source
        self.origin = origin  # for messages: "the model", "--chat-template FILE"
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v}
        try:
            self._template = make_environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template of {origin} does not compile: {e} (line {e.lineno})") from None

    @classmethod
    def from_file(cls, path: str | Path, special_tokens: Mapping[str, str] | None = None) -> "ChatTemplate":
        """A `.jinja` file, or a JSON file holding {"chat_template": "..."} (tokenizer_config.json)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ChatTemplateError(f"{path}: cannot read the chat template ({e.strerror})") from None
        if path.suffix == ".json":
            try:
                value = json.loads(text).get("chat_template")
            except (ValueError, AttributeError):
                value = None
            if isinstance(value, list):
                value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"),
                             None)
            if not isinstance(value, str):
                raise ChatTemplateError(f"{path}: no \"chat_template\" string in this JSON file")
            text = value
        return cls(text, special_tokens, origin=str(path))

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None, documents: Sequence[Mapping[str, Any]] | None = None,
               **kwargs: Any) -> str:
        """The prompt text for `messages`; extra kwargs reach the template (chat_template_kwargs)."""
        context = {**self.special_tokens, **_plain(kwargs)}
        try:
            return self._template.render(messages=_plain(list(messages)), tools=_plain(tools),
                                         documents=_plain(documents), add_generation_prompt=add_generation_prompt,
                                         **context)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused these messages: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages ({type(e).__name__}: {e})") from None
