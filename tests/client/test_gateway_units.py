"""The gateway's parts without servers: chat templates against transformers' apply_chat_template,
OpenAI request parsing and refusals, settings and the deploy files, the pool's routing choice."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client.gateway import schema
from client.gateway.pool import NoWorkerError, Worker, WorkerPool
from client.gateway.schema import ApiError
from client.gateway.settings import GatewaySettings, SettingsError, build_settings, load_toml
from client.gateway.templates import ChatTemplate, ChatTemplateError

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

# A Llama-2 / Mistral style template: system folding, alternation enforced with raise_exception,
# loop controls, a namespace, tojson, whitespace control (trim_blocks / lstrip_blocks matter here).
TEMPLATE = """{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}
    {% set loop_messages = messages[1:] %}
{% else %}
    {% set system = none %}
    {% set loop_messages = messages %}
{% endif %}
{% set ns = namespace(turns=0) %}
{{ bos_token }}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {% set ns.turns = ns.turns + 1 %}
        {{ '[INST] ' }}{% if loop.first and system %}{{ '<<SYS>>' + system + '<</SYS>> ' }}{% endif %}{{ message['content'] | trim }}{{ ' [/INST]' }}
    {% else %}
        {{ ' ' + message['content'] | trim + eos_token }}
    {% endif %}
    {% if message.get('meta') %}{{ message['meta'] | tojson }}{% endif %}
    {% if ns.turns > 5 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}{{ ' ' }}{% endif %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "What does `ls -la` print?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  Hi  "},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a Vim command: ünïcode"}],
    [{"role": "user", "content": "a", "meta": {"k": "é", "n": [1, 2]}}, {"role": "assistant", "content": "b"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_mixtral_dir):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_mixtral_dir))  # a local directory: no hub
    tok.chat_template = TEMPLATE
    return tok


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendered_prompt_equals_transformers_apply_chat_template(hf_tokenizer, conv, add_generation_prompt):
    messages = CONVERSATIONS[conv]
    want = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    special = {"bos_token": hf_tokenizer.bos_token, "eos_token": hf_tokenizer.eos_token}
    got = ChatTemplate(TEMPLATE, special).render(messages, add_generation_prompt=add_generation_prompt)
    assert got == want
    assert got.startswith("<s>")


def test_template_raise_exception_and_syntax_errors_are_chat_template_errors():
    t = ChatTemplate(TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        t.render([{"role": "assistant", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def test_template_is_sandboxed_and_has_strftime_now():
    escape = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError):
        ChatTemplate(escape).render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}").render([])
    import datetime

    year = ChatTemplate("{{ strftime_now('%Y') }}").render([])
    assert year in {str(datetime.date.today().year), str(datetime.date.today().year + 1)}


def test_template_from_json_file(tmp_path):
    p = tmp_path / "tokenizer_config.json"
    p.write_text('{"chat_template": [{"name": "default", "template": "D{{ messages|length }}"}, '
                 '{"name": "tool_use", "template": "T"}]}')
    assert ChatTemplate.from_file(p).render([{"role": "user", "content": "x"}]) == "D1"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ChatTemplateError, match="no \"chat_template\""):
        ChatTemplate.from_file(tmp_path / "bad.json")


def test_worker_reads_templates_as_transformers_stores_them():
    from gpu_worker.model_info import read_template_info

    cfg = b'{"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>", "chat_template": "C"}'
    info = read_template_info({"tokenizer_config.json": cfg})
    assert info.chat_template == "C" and info.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    info = read_template_info({"tokenizer_config.json": cfg, "chat_template.jinja": b"J"})
    assert info.chat_template == "J"  # the .jinja file wins, as in transformers
    lst = b'{"chat_template": [{"name": "default", "template": "D"}, {"name": "rag", "template": "R"}]}'
    info = read_template_info({"chat_template.json": lst})
    assert info.chat_template == "D" and info.named_chat_templates == {"rag": "R"}
    assert read_template_info({}).chat_template == ""


# -- request parsing ------------------------------------------------------------------------------


def _err(fn, *a, **kw) -> ApiError:
    with pytest.raises(ApiError) as ei:
        fn(*a, **kw)
    return ei.value


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"model": "m", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "m", "prompt": 3}, "prompt"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "m", "prompt": "x", "stop": 7}, "stop"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x"}, "model"),
])
def test_wrong_types_are_400_naming_the_parameter(body, param):
    e = _err(schema.parse, schema.CompletionRequest, body)
    assert e.status == 400 and e.param == param
    assert e.body()["error"]["type"] == "invalid_request_error"


def test_unknown_parameters_are_ignored_and_user_accepted():
    r = schema.parse(schema.CompletionRequest, {"model": "m", "prompt": "x", "user": "u", "frobnicate": {"a": 1}})
    s = schema.sampling_of(r, max_tokens=r.max_tokens, logprobs=False, max_tokens_limit=0)
    assert s.temperature == 1.0 and s.top_p == 1.0 and s.stop == () and s.max_new_tokens == 0


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"), ({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": 1.0}, "frequency_penalty"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"), ({"stop": [""]}, "stop"),
])
def test_unsupported_sampling_parameters_are_refused(extra, param):
    r = schema.parse(schema.CompletionRequest, {"model": "m", "prompt": "x", **extra})
    e = _err(schema.sampling_of, r, max_tokens=None, logprobs=False, max_tokens_limit=0)
    assert e.status == 400 and e.param == param


@pytest.mark.parametrize("extra, param", [
    ({"echo": True}, "echo"), ({"suffix": "s"}, "suffix"), ({"best_of": 3}, "best_of"), ({"logprobs": 2}, "logprobs"),
    ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": ""}, "prompt"),
])
def test_unsupported_completion_parameters_are_refused(extra, param):
    r = schema.parse(schema.CompletionRequest, {"model": "m", "prompt": "x", **extra})
    assert _err(schema.completion_prompt, r).param == param


def test_completion_prompt_forms():
    def prompt(p):
        return schema.completion_prompt(schema.parse(schema.CompletionRequest, {"model": "m", "prompt": p}))

    assert prompt("hi") == ("hi", None)
    assert prompt([5, 6]) == (None, [5, 6])
    assert prompt(["hi"]) == ("hi", None)
    assert prompt([[7]]) == (None, [7])


@pytest.mark.parametrize("extra, param", [
    ({"top_logprobs": 3, "logprobs": True}, "top_logprobs"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
])
def test_unsupported_chat_parameters_are_refused(extra, param):
    r = schema.parse(schema.ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], **extra})
    assert _err(schema.chat_messages, r).param == param


def test_chat_text_parts_are_joined_and_extra_message_keys_kept():
    r = schema.parse(schema.ChatRequest, {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "bob"}]})
    assert schema.chat_messages(r) == [{"role": "user", "content": "a\nb", "name": "bob"}]
    assert _err(schema.parse, schema.ChatRequest, {"model": "m", "messages": []}).param == "messages"


def test_worker_status_codes_map_to_http():
    from client.api import WorkerError

    for code, status in [("INVALID_ARGUMENT", 400), ("OUT_OF_RANGE", 400), ("RESOURCE_EXHAUSTED", 429),
                         ("UNAVAILABLE", 503), ("DEADLINE_EXCEEDED", 504), ("INTERNAL", 500)]:
        assert schema.api_error_from_worker(WorkerError(code, "x")).status == status


# -- routing --------------------------------------------------------------------------------------


def test_least_outstanding_routing_skips_down_and_excluded_workers():
    pool = WorkerPool(["a:1", "b:1", "c:1"])
    pool.workers = [Worker(a, client=None) for a in pool.addresses]  # type: ignore[arg-type]
    a, b, c = pool.workers
    for w in pool.workers:
        w.serving = True
    a.outstanding, b.outstanding, c.outstanding = 2, 0, 1
    assert pool.pick() is b
    b.serving = False
    assert pool.pick() is c
    assert pool.pick(exclude=[c]) is a
    c.mismatch = True
    assert pool.pick() is a
    a.serving = False
    e = _err(pool.pick)
    assert isinstance(e, NoWorkerError) and e.status == 503


def test_ties_rotate():
    pool = WorkerPool(["a:1", "b:1"])
    pool.workers = [Worker(a, client=None) for a in pool.addresses]  # type: ignore[arg-type]
    for w in pool.workers:
        w.serving = True
    assert [pool.pick().address for _ in range(4)] == ["a:1", "b:1", "a:1", "b:1"]


# -- watching the client while a request waits --------------------------------------------------


def _request(receive):
    from starlette.requests import Request

    return Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, receive)


async def test_a_failing_connection_watch_does_not_drop_the_request():
    from client.gateway.app import _unless_disconnected

    async def receive():
        raise RuntimeError("the server's receive channel failed")

    async def work():
        await asyncio.sleep(0.05)
        return "first token"

    assert await _unless_disconnected(_request(receive), work()) == "first token"


async def test_only_a_disconnect_is_a_client_gone_and_it_cancels_the_work():
    from client.gateway.app import _ClientGone, _unless_disconnected

    messages = [{"type": "http.request", "body": b"", "more_body": False}, {"type": "http.disconnect"}]
    cancelled = asyncio.Event()

    async def receive():
        await asyncio.sleep(0)
        return messages.pop(0)

    async def work():
        try:
            await asyncio.Event().wait()  # a queued request: no token comes
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(_ClientGone):
        await _unless_disconnected(_request(receive), work())
    assert cancelled.is_set() and messages == []


# -- settings and deploy --------------------------------------------------------------------------


def test_settings_precedence_and_errors(tmp_path, monkeypatch):
    toml = tmp_path / "g.toml"
    toml.write_text('[gateway]\nworkers = ["127.0.0.1:1"]\nlisten = "127.0.0.1:9"\nchat_template = "t.jinja"\n')
    s = build_settings(toml, {"listen": "127.0.0.1:10", "workers": ()})
    assert s.workers == ("127.0.0.1:1",) and s.listen == "127.0.0.1:10"
    assert s.chat_template == tmp_path / "t.jinja"
    toml.write_text('[gateway]\nworkers = ["x"]\n')
    with pytest.raises(SettingsError, match="workers"):
        build_settings(toml, {})
    toml.write_text("[gateway]\nbogus = 1\n")
    with pytest.raises(SettingsError, match="unknown key"):
        load_toml(toml)
    monkeypatch.setenv("FATE_GATEWAY_API_KEY", "from-env")
    assert GatewaySettings(workers=("h:1",)).resolved_api_key() == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert GatewaySettings(workers=("h:1",), api_key_file=tmp_path / "key").resolved_api_key() == "from-file"


def test_cli_reports_bad_settings_in_one_line():
    r = subprocess.run([sys.executable, "-m", "client", "gateway", "--worker", "nonsense"], capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and r.stderr.startswith("error: workers = 'nonsense'") and "Traceback" not in r.stderr


def test_deploy_gateway_toml_loads_and_talks_to_the_shipped_worker():
    from gpu_worker.config import load_toml as load_worker_toml

    g = load_toml(DEPLOY / "gateway.toml")
    s = GatewaySettings(**g)
    assert s.listen.startswith("127.0.0.1:") or s.listen.startswith("unix:/run/")
    assert load_worker_toml(DEPLOY / "worker.toml")["listen"] in s.workers


def test_gateway_unit_mirrors_the_worker_hardening():
    import configparser

    def unit(name):
        cp = configparser.ConfigParser(strict=False, interpolation=None)
        cp.optionxform = str
        cp.read(DEPLOY / name)
        return cp

    gw, worker = unit("fate-moe-gateway.service"), unit("fate-moe-worker.service")
    s = gw["Service"]
    assert "-m client gateway --config /etc/fate-moe/gateway.toml" in s["ExecStart"]
    assert "fate-moe-worker.service" in gw["Unit"]["After"]
    for key in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "RestrictNamespaces",
                "CapabilityBoundingSet", "SystemCallArchitectures", "UMask", "User", "Restart"):
        assert s[key] == worker["Service"][key], key
    assert s["PrivateDevices"] == "yes"  # the gateway needs neither the GPU nor the store's segment


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_gateway_unit_passes_systemd_analyze_verify(tmp_path):
    text = (DEPLOY / "fate-moe-gateway.service").read_text().replace("/opt/fate-moe/.venv/bin/python", sys.executable)
    (tmp_path / "fate-moe-gateway.service").write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "fate-moe-gateway.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
