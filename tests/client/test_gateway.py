"""The gateway with real processes on loopback: one store, three workers (tiny-mixtral, int4), and
gateways in front of them, driven by the official `openai` package (sync and async) and httpx.

- completions and streamed chat completions; streamed == non-streamed == `python -m client
  generate` for the same rendered prompt (rendered by transformers' apply_chat_template); usage
  equal to the worker's token counts;
- stop strings, max_tokens -> "length", seed reproducibility; 400 / 401 / 404 / 429 / 503 with
  OpenAI's error shape;
- two workers: 16 concurrent requests reach both; a disconnected client cancels its request on
  the worker; a worker killed mid-run loses no request that had not started streaming (the last
  test: it leaves that worker dead).

Bounded: every call has a timeout, every wait a deadline; no timing assertions.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from client.api import WorkerClient
from client.processes import module_command
from tests.conftest import Processes
from tests.test_end_to_end import free_port, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny-mixtral"
KEY = "sk-test-gateway"
TIMEOUT_S = 120
TEMPLATE = """{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}
{% else %}### {{ m['role'] | capitalize }}:
{{ m['content'] | trim }}
{% endif %}{% endfor %}{% if add_generation_prompt %}### Assistant:
{% endif %}"""
MESSAGES = [{"role": "system", "content": "Answer like a Unix manual page."},
            {"role": "user", "content": "What does the ls command do?"}]
PROMPT = "The command"


def start_gateway(procs: Processes, name: str, workers: list[str], *extra: str, ready: bool = True) -> str:
    """A gateway process in `procs`, waited for until /health answers 200 (503 with ready=False); its URL."""
    port = free_port()
    cmd = module_command("client", "gateway", "--listen", f"127.0.0.1:{port}", *extra)
    for w in workers:
        cmd += ["--worker", w]
    url = f"http://127.0.0.1:{port}"
    svc = procs.start(name, cmd, url)
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        assert svc.proc.poll() is None, f"{name} exited {svc.proc.returncode}:\n{svc.output()[-3000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == (200 if ready else 503):
                return url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{name} not answering /health within {TIMEOUT_S} s:\n{svc.output()[-3000:]}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(sock_dir, tiny_mixtral_pack):
    """Store; workers a (batch 8), b (batch 2: requests queue there), c (batch 1, queue 1); gateways
    gw1 -> a (API key, the test's chat template), gw2 -> a + b (no key, no template), gw3 -> c,
    gw4 -> a socket nobody serves. A test may kill a worker; the others must exit 0 on SIGTERM."""
    (sock_dir / "chat.jinja").write_text(TEMPLATE)
    procs = Processes(sock_dir)
    urls: dict[str, str] = {}
    try:
        store_addr = procs.start_store(tiny_mixtral_pack, "store", "--ram-bytes", str(64 << 20))
        procs.wait("store")
        flags = {"a": (), "b": ("--max-batch-size", "2"), "c": ("--max-batch-size", "1", "--max-queue", "1")}
        addresses = {"store": store_addr}
        for name, extra in flags.items():
            addresses[name] = procs.start_worker(store_addr, name, "--budget-bytes", "100%", "--grace-s", "1", *extra)
        procs.wait(*flags)
        gws = {"gw1": ([addresses["a"]], ("--api-key", KEY, "--chat-template", str(sock_dir / "chat.jinja"))),
               "gw2": ([addresses["a"], addresses["b"]], ()), "gw3": ([addresses["c"]], ()),
               "gw4": ([f"unix:{sock_dir}/nobody.sock"], ())}
        for name, (workers, extra) in gws.items():
            urls[name] = start_gateway(procs, name, workers, *extra, ready=name != "gw4")
        yield procs.services, addresses, urls
    finally:
        alive = [n for n, svc in procs.services.items() if svc.proc.poll() is None]
        rcs = {n: procs.stop(n) for n in reversed(alive)}
        assert all(rc == 0 for rc in rcs.values()), {n: procs.output(n) for n in rcs if rcs[n]}


@pytest.fixture(scope="module")
def rendered(tiny_mixtral_dir) -> str:
    """MESSAGES through transformers' apply_chat_template with TEMPLATE (a local tokenizer, no hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_mixtral_dir))
    tok.chat_template = TEMPLATE
    return tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def sync_client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=TIMEOUT_S)


def async_client(url: str, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=TIMEOUT_S)


def client_generate(address: str, prompt: str, max_new_tokens: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "client", "generate", "--address", address, prompt, "--max-new-tokens",
                        str(max_new_tokens), "--json"], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# -- one worker ---------------------------------------------------------------------------------


def test_health_and_models(cluster):
    _, _, urls = cluster
    assert httpx.get(f"{urls['gw1']}/health", timeout=10).json()["status"] == "ok"
    models = sync_client(urls["gw1"]).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_gateway_ignores_sigpipe(cluster):
    """A write to a closed socket (a client gone, a killed worker) is an error on that connection, not
    the end of the gateway: `python -m client gateway` runs with SIGPIPE ignored."""
    services, _, _ = cluster
    status = Path(f"/proc/{services['gw1'].pid}/status").read_text()
    ignored = int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    assert ignored & (1 << (signal.SIGPIPE - 1))


def test_worker_model_info_and_tokenize(cluster, tiny_mixtral_dir):
    from tokenizers import Tokenizer

    _, addresses, _ = cluster
    with WorkerClient(addresses["a"], timeout_s=TIMEOUT_S) as w:
        info = w.model_info()
        ids = w.tokenize("<s>### User:\nls", add_special_tokens=False)
    assert (info.model_name, info.family, info.max_context_tokens, info.vocab_size) == (MODEL, "mixtral", 1024, 4096)
    assert (info.bos_token, info.eos_token, info.eos_token_ids, info.has_tokenizer) == ("<s>", "</s>", (1,), True)
    assert info.chat_template == ""  # tiny-mixtral ships none: the tests supply one
    assert ids == Tokenizer.from_file(str(tiny_mixtral_dir / "tokenizer.json")).encode(
        "<s>### User:\nls", add_special_tokens=False).ids
    assert ids[0] == 0  # the BOS written in the text is the special token


def test_sync_completion_equals_client_generate(cluster):
    _, addresses, urls = cluster
    r = sync_client(urls["gw1"]).completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    direct = client_generate(addresses["a"], PROMPT, 20)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert r.choices[0].text == direct["text"] and r.choices[0].text
    assert r.usage.prompt_tokens == direct["result"]["usage"]["prompt_tokens"]
    assert r.usage.completion_tokens == direct["result"]["usage"]["completion_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


async def test_streamed_chat_equals_non_streamed_and_client_generate(cluster, rendered):
    _, addresses, urls = cluster
    client = async_client(urls["gw1"])
    with WorkerClient(addresses["a"], timeout_s=TIMEOUT_S) as w:
        before = w.stats()
        full = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0)
        after = w.stats()
        prompt_ids = w.tokenize(rendered, add_special_tokens=False)
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    pieces, finish, usage, roles = [], None, None, []
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            roles += [c.delta.role] if c.delta.role else []
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    await client.close()
    text = full.choices[0].message.content
    direct = client_generate(addresses["a"], rendered, 24)
    assert text and "".join(pieces) == text == direct["text"]
    assert roles == ["assistant"] and finish == full.choices[0].finish_reason
    # usage: the worker's own counts
    assert full.usage.prompt_tokens == len(prompt_ids) == direct["result"]["usage"]["prompt_tokens"]
    assert full.usage.completion_tokens == direct["result"]["usage"]["completion_tokens"]
    assert after.prompt_tokens_total - before.prompt_tokens_total == full.usage.prompt_tokens
    assert after.generated_tokens_total - before.generated_tokens_total == full.usage.completion_tokens
    assert usage is not None and usage.model_dump() == full.usage.model_dump()
    sync_stream = sync_client(urls["gw1"]).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24,
                                                                   temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in sync_stream if c.choices) == text
    # the gateway's metrics saw these requests
    metrics = httpx.get(f"{urls['gw1']}/metrics", timeout=10).text
    assert re.search(r'^fate_gateway_requests_total{endpoint="chat",status="200"} [1-9]', metrics, re.M)
    assert re.search(r'^fate_gateway_time_to_first_token_seconds_count{endpoint="chat"} [1-9]', metrics, re.M)
    assert re.search(r'^fate_gateway_completion_tokens_total [1-9]', metrics, re.M)


def test_max_tokens_is_length_and_stop_strings_stop(cluster):
    _, _, urls = cluster
    c = sync_client(urls["gw1"])
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    long = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0).choices[0].text
    stop = long[12:15]
    want = long[:long.index(stop)]
    for stream in (False, True):
        if stream:
            parts, finish = [], None
            for chunk in c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0, stop=[stop],
                                              stream=True):
                parts.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            got = "".join(parts)
        else:
            r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0, stop=stop)
            got, finish = r.choices[0].text, r.choices[0].finish_reason
        assert (got, finish) == (want, "stop")


def test_seed_reproduces_a_sampled_completion(cluster):
    _, _, urls = cluster
    c = sync_client(urls["gw1"])

    def sample(seed: int) -> str:
        return c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed,
                                    extra_body={"ignore_eos": True}).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3))


def test_logprobs_of_the_sampled_tokens(cluster):
    _, _, urls = cluster
    r = sync_client(urls["gw1"]).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                                         logprobs=True)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    assert all(t.logprob <= 0.0 for t in content)


def test_wrong_type_missing_key_wrong_key_unknown_model(cluster):
    _, _, urls = cluster
    url = urls["gw1"]
    auth = {"Authorization": f"Bearer {KEY}"}
    err = assert_error(httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": "5"},
                                  headers=auth, timeout=30), 400, "invalid_type")
    assert err["param"] == "max_tokens" and err["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as ei:
        sync_client(url).chat.completions.create(model=MODEL, messages=MESSAGES, temperature="warm")
    assert ei.value.status_code == 400 and ei.value.body["param"] == "temperature"
    assert_error(httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=30), 401,
                 "missing_api_key")
    assert_error(httpx.get(f"{url}/v1/models", timeout=30), 401)
    with pytest.raises(openai.AuthenticationError) as ei:
        sync_client(url, key="sk-wrong").completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert ei.value.status_code == 401 and ei.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as ei:
        sync_client(url).completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert ei.value.status_code == 404 and ei.value.body["code"] == "model_not_found"
    assert ei.value.body["param"] == "model"
    # the worker's INVALID_ARGUMENT (a token id beyond the vocabulary) is a 400 too
    assert_error(httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [999999], "max_tokens": 2},
                            headers=auth, timeout=30), 400, "invalid_request")


def test_model_without_chat_template_says_how_to_pass_one(cluster):
    _, _, urls = cluster
    resp = httpx.post(f"{urls['gw2']}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES}, timeout=30)
    err = assert_error(resp, 400, "no_chat_template")
    assert "--chat-template" in err["message"]


async def test_full_worker_queue_is_429(cluster):
    _, _, urls = cluster
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
        resps = await asyncio.gather(*(http.post(f"{urls['gw3']}/v1/completions", json=body) for _ in range(6)))
    statuses = sorted(r.status_code for r in resps)
    assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}, statuses
    for r in resps:
        if r.status_code == 429:
            assert assert_error(r, 429, "worker_queue_full")["type"] == "rate_limit_error"


def test_client_gone_while_queued_cancels_on_the_worker(cluster):
    """Worker c runs one request at a time: a second one waits in its queue; its client gives up
    before any token (a read timeout), and the gateway cancels it there, so it never runs."""
    _, addresses, urls = cluster
    url = f"{urls['gw3']}/v1/completions"
    with WorkerClient(addresses["c"], timeout_s=TIMEOUT_S) as w:
        wait_until(lambda: w.stats().active_requests == 0, TIMEOUT_S, "worker c to be idle")
        before = w.stats()
        long = {"model": MODEL, "prompt": PROMPT, "max_tokens": 900, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", url, json=long, timeout=TIMEOUT_S) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            first = next(lines)  # the long one is running: c's only batch slot is taken
            running = w.stats()
            try:
                r = httpx.post(url, json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0},
                               timeout=httpx.Timeout(TIMEOUT_S, read=1.0))
            except httpx.ReadTimeout:
                r = None
            assert r is None, (r.status_code, r.text, first, running, w.stats())
        # both cancelled: the streaming one at once, the queued one when its turn comes (never run)
        wait_until(lambda: w.stats().requests_cancelled >= before.requests_cancelled + 2, TIMEOUT_S,
                   "both requests cancelled on worker c")
        after = w.stats()
    assert after.requests_total - before.requests_total == 2
    assert after.generated_tokens_total - before.generated_tokens_total < 900


def test_no_worker_up_is_503(cluster):
    _, _, urls = cluster
    url = urls["gw4"]
    assert httpx.get(f"{url}/health", timeout=10).status_code == 503
    assert_error(httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=30), 503,
                 "no_worker_available")
    with pytest.raises(openai.InternalServerError) as ei:
        sync_client(url).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert ei.value.status_code == 503


def test_disconnected_client_cancels_its_request_on_the_worker(cluster):
    _, addresses, urls = cluster
    with WorkerClient(addresses["a"], timeout_s=TIMEOUT_S) as w:
        cancelled = w.stats().requests_cancelled
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 900, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", f"{urls['gw1']}/v1/chat/completions", json=body, timeout=TIMEOUT_S,
                          headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [line for line, _ in zip(lines, range(8)) if line.startswith("data: ")]
            assert len(got) >= 3
        # the connection is closed before the 900 tokens: the gateway cancels the gRPC stream
        wait_until(lambda: w.stats().requests_cancelled > cancelled, TIMEOUT_S, "the worker's cancelled counter")
        wait_until(lambda: w.stats().active_requests == 0, TIMEOUT_S, "the worker to drop the request")


# -- two workers --------------------------------------------------------------------------------


async def test_sixteen_concurrent_requests_spread_over_both_workers(cluster):
    _, addresses, urls = cluster
    ws = [WorkerClient(addresses[n], timeout_s=TIMEOUT_S) for n in ("a", "b")]
    before = [w.stats().requests_total for w in ws]
    client = async_client(urls["gw2"], key="unused")
    prompts = [PROMPT, "The file"]
    rs = await asyncio.gather(*(client.completions.create(model=MODEL, prompt=prompts[i % 2], max_tokens=8,
                                                          temperature=0) for i in range(16)))
    await client.close()
    after = [w.stats().requests_total for w in ws]
    for w in ws:
        w.close()
    assert all(a - b > 0 for a, b in zip(after, before)), (before, after)
    assert sum(a - b for a, b in zip(after, before)) == 16
    for i, r in enumerate(rs):  # the same greedy text whichever worker served it
        assert r.choices[0].text == rs[i % 2].choices[0].text


async def test_killing_a_worker_loses_no_request_that_had_not_started(cluster):
    """Last test of the module: worker b is left dead."""
    services, _, urls = cluster
    client = async_client(urls["gw2"], key="unused")
    started: list[bool] = [False] * 16
    retries = metric(urls["gw2"], "fate_gateway_retries_total")

    async def one(i: int):
        stream = await client.completions.create(model=MODEL, prompt=f"{PROMPT} {i}", max_tokens=32, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        usage = None
        async for chunk in stream:
            started[i] = True
            usage = chunk.usage or usage
        return usage

    async def killer():
        deadline = time.monotonic() + TIMEOUT_S
        while sum(started) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        services["b"].proc.send_signal(signal.SIGKILL)

    results = await asyncio.gather(*(one(i) for i in range(16)), killer(), return_exceptions=True)
    await client.close()
    services["b"].proc.wait(30)
    gw2 = services["gw2"].proc
    assert gw2.poll() is None, f"gw2 exited {gw2.returncode}:\n{services['gw2'].output()[-12000:]}"
    bad = [i for i, res in enumerate(results[:16]) if isinstance(res, BaseException) and not started[i]]
    if bad:
        time.sleep(3)
    for i, res in enumerate(results[:16]):
        if isinstance(res, BaseException):
            assert started[i], f"request {i} failed before streaming: {res!r} {res.__cause__!r} {bad}\n{services['gw2'].output()[-12000:]}"
        else:
            assert res is not None and res.completion_tokens == 32
    assert metric(urls["gw2"], "fate_gateway_retries_total") > retries  # b's queued requests moved to a
