"""The batching engine on tiny-mixtral (int4, in-process PackExpertSource): batched decoding gives
the single-sequence reference tokens, stop strings, cancellation, failures, stats attribution."""

from __future__ import annotations

import gc
import json
import threading
import time
import weakref
from dataclasses import dataclass, field

import pytest

from expert_store.errors import FateError
from gpu_worker.engine import (
    ContextLengthError,
    Engine,
    EngineStoppedError,
    ErrorEvent,
    FinalEvent,
    FinishReason,
    GenerationRequest,
    QueueFullError,
    RequestError,
    StepExperts,
    TokenEvent,
)
from gpu_worker.generate import SamplingError, SamplingParams, generate
from gpu_worker.runtime import load_local

pytestmark = pytest.mark.slow

NEW_TOKENS = 24
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def rt(tiny_mixtral_pack):
    return load_local(tiny_mixtral_pack, fmt="int4", device="cpu")


@pytest.fixture(scope="module")
def prompts(rt, tiny_mixtral_dir) -> list[list[int]]:
    lines = (tiny_mixtral_dir / "prompts.jsonl").read_text().splitlines()
    return [rt.tokenizer.encode(json.loads(line)["prompt"]) for line in lines[:8]]


@pytest.fixture(scope="module")
def reference(rt, prompts) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return [list(generate(rt.model, ids, params)) for ids in prompts]


@dataclass
class Collected:
    tokens: list[TokenEvent] = field(default_factory=list)
    final: FinalEvent | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __call__(self, ev) -> None:  # the engine's sink (compute thread)
        if isinstance(ev, TokenEvent):
            self.tokens.append(ev)
        elif isinstance(ev, FinalEvent):
            self.final = ev
            self.done.set()
        elif isinstance(ev, ErrorEvent):
            self.error = ev.error
            self.done.set()

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tokens]

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens) + (self.final.trailing_text if self.final else "")


def greedy(ids, n=NEW_TOKENS, **kw) -> GenerationRequest:
    return GenerationRequest(tuple(ids), SamplingParams(max_new_tokens=n, ignore_eos=True), **kw)


def run_all(engine: Engine, reqs: list[GenerationRequest], stagger_s: float = 0.0) -> list[Collected]:
    out = []
    for req in reqs:
        c = Collected()
        engine.submit(req, c)
        out.append(c)
        if stagger_s:
            time.sleep(stagger_s)
    for c in out:
        assert c.done.wait(TIMEOUT_S), "a request did not finish"
    return out


def test_greedy_alone_and_batched_equal_the_reference(rt, prompts, reference):
    with Engine(rt.model, rt.tokenizer, max_batch_size=8) as engine:
        alone = [run_all(engine, [greedy(ids)])[0] for ids in prompts]
        batched = run_all(engine, [greedy(ids) for ids in prompts])
        # arrivals while others decode: prefills ride in the same forward as decode tokens
        staggered = run_all(engine, [greedy(ids) for ids in prompts], stagger_s=0.01)
        stats = engine.stats()
    for runs in (alone, batched, staggered):
        assert [c.error for c in runs] == [None] * 8
        assert [c.ids for c in runs] == reference
        assert all(c.final.finish_reason is FinishReason.LENGTH for c in runs)
        assert [c.final.completion_tokens for c in runs] == [NEW_TOKENS] * 8
        assert [c.final.prompt_tokens for c in runs] == [len(p) for p in prompts]
    assert stats.active_requests == stats.queued_requests == 0
    assert stats.requests_total == 24 and stats.generated_tokens_total == 24 * NEW_TOKENS
    # the same text as the tokenizer's decode of the reference
    assert batched[0].text == rt.tokenizer.decode(reference[0])
    t = batched[0].final.timings
    assert t.total_ns >= t.time_to_first_token_ns >= t.queue_ns and t.prefill_ns > 0 and t.decode_ns > 0


def test_sampling_is_reproducible_per_seed_and_reports_the_seed(rt, prompts):
    def req(seed):
        return GenerationRequest(
            tuple(prompts[0]), SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=seed)
        )

    with Engine(rt.model, rt.tokenizer) as engine:
        a, b, c = run_all(engine, [req(5), req(5), req(None)])
        d = run_all(engine, [req(c.final.seed)])[0]
    assert a.ids == b.ids and a.final.seed == 5
    assert d.ids == c.ids
    ref = list(generate(rt.model, prompts[0], SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=5)))
    assert a.ids == ref[: len(a.ids)]


def test_details_give_log_probabilities(rt, prompts, reference):
    with Engine(rt.model, rt.tokenizer) as engine:
        c = run_all(engine, [greedy(prompts[0], n=4, details=True)])[0]
        plain = run_all(engine, [greedy(prompts[0], n=2)])[0]
    assert c.ids == reference[0][:4]
    assert all(t.logprob is not None and t.logprob <= 0.0 for t in c.tokens)
    assert all(t.logprob is None for t in plain.tokens)


def test_stop_string_ends_before_the_string_and_holds_back_prefixes(rt, prompts, reference):
    full = rt.tokenizer.decode(reference[1])
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), "pick a stop string with visible characters"
    with Engine(rt.model, rt.tokenizer) as engine:
        hit = run_all(engine, [greedy(prompts[1], stop_strings=(stop,))])[0]
        # a stop string that starts like the text but never completes: everything comes out in the end
        miss = run_all(engine, [greedy(prompts[1], stop_strings=(full[-2:] + "\x00never",))])[0]
    assert hit.final.finish_reason is FinishReason.STOP_STRING and hit.final.stop_string == stop
    assert hit.text == full[: full.index(stop)]
    assert stop not in hit.text
    assert hit.ids == reference[1][: len(hit.ids)]
    assert miss.final.finish_reason is FinishReason.LENGTH
    assert miss.text == full
    assert miss.final.trailing_text == full[-2:]  # held back until the end: it could have begun the stop


def test_stop_tokens_and_eos_are_not_streamed(rt, prompts, reference):
    stop_id = reference[2][5]
    first = reference[2].index(stop_id)
    with Engine(rt.model, rt.tokenizer) as engine:
        c = run_all(engine, [GenerationRequest(
            tuple(prompts[2]), SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, stop_token_ids=(stop_id,))
        )])[0]  # fmt: skip
    assert c.final.finish_reason is FinishReason.STOP_TOKEN and c.final.stop_token_id == stop_id
    assert c.ids == reference[2][:first] and c.final.completion_tokens == first + 1


def test_cancel_frees_the_sequence(rt, prompts):
    with Engine(rt.model, rt.tokenizer) as engine:
        c = Collected()
        handle = engine.submit(greedy(prompts[0], n=500), c)
        deadline = time.monotonic() + TIMEOUT_S
        while len(c.tokens) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        seq = weakref.ref(engine._active[0].seq)
        handle.cancel()
        while engine.stats().active_requests and time.monotonic() < deadline:
            time.sleep(0.005)
        stats = engine.stats()
        gc.collect()
        assert seq() is None, "the cancelled request's KV cache is still referenced"
        assert stats.active_requests == 0 and stats.requests_cancelled == 1
        assert c.final is None and c.error is None and len(c.tokens) < 500
        # the engine goes on serving
        assert run_all(engine, [greedy(prompts[0], n=3)])[0].final is not None


def test_bad_requests_are_refused_with_typed_errors(rt, prompts):
    engine = Engine(rt.model, rt.tokenizer, max_batch_size=1, max_queue=1)
    with pytest.raises(RequestError, match="empty"):
        engine.validate(greedy([]))
    with pytest.raises(RequestError, match="vocabulary"):
        engine.validate(greedy([1, rt.model.args.vocab_size]))
    with pytest.raises(ContextLengthError, match="context"):
        engine.validate(greedy(prompts[0], n=rt.model.args.max_position_embeddings))
    with pytest.raises(SamplingError, match="temperature"):
        engine.validate(GenerationRequest((1, 2), SamplingParams(temperature=float("nan"))))
    with pytest.raises(RequestError, match="stop string"):
        engine.validate(greedy(prompts[0], stop_strings=("",)))
    with pytest.raises(EngineStoppedError):
        engine.submit(greedy(prompts[0]), Collected())  # not started
    engine.start()
    try:
        # one in the batch, one queued, the third is refused (the compute thread is held by a slow sink)
        gate = threading.Event()
        blocker = Collected()

        def slow_sink(ev):
            gate.wait(TIMEOUT_S)
            blocker(ev)

        engine.submit(greedy(prompts[0], n=4), slow_sink)
        deadline = time.monotonic() + TIMEOUT_S
        while engine.stats().active_requests == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        queued = Collected()
        engine.submit(greedy(prompts[1], n=2), queued)
        with pytest.raises(QueueFullError):
            engine.submit(greedy(prompts[2], n=2), Collected())
        gate.set()
        assert blocker.done.wait(TIMEOUT_S) and queued.done.wait(TIMEOUT_S)
    finally:
        engine.shutdown()
    with pytest.raises(EngineStoppedError):
        engine.submit(greedy(prompts[0]), Collected())


class _Flaky:
    """An ExpertProvider that fails once at a chosen layer (a store gone mid-generation)."""

    class StoreGone(FateError):
        pass

    def __init__(self, inner):
        self.inner = inner
        self.fail_next = False

    def iter_experts(self, layer, experts):
        if self.fail_next and layer == 3:
            self.fail_next = False
            raise self.StoreGone("store unreachable")
        yield from self.inner.iter_experts(layer, experts)


def test_a_failed_step_fails_its_requests_not_the_engine(rt, prompts, reference):
    flaky = _Flaky(rt.model.experts)
    rt.model.experts = flaky
    try:
        with Engine(rt.model, rt.tokenizer) as engine:
            a, b = Collected(), Collected()
            engine.submit(greedy(prompts[0], n=400), a)
            engine.submit(greedy(prompts[1], n=400), b)
            deadline = time.monotonic() + TIMEOUT_S
            while len(a.tokens) < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            flaky.fail_next = True
            assert a.done.wait(TIMEOUT_S) and b.done.wait(TIMEOUT_S)
            assert isinstance(a.error, _Flaky.StoreGone) and isinstance(b.error, _Flaky.StoreGone)
            assert engine.stats().requests_failed == 2
            again = run_all(engine, [greedy(prompts[0])])[0]
        assert again.ids == reference[0]
    finally:
        rt.model.experts = flaky.inner


class _Tracking:
    """An ExpertProvider with per-step outcomes like the cache's: an expert is a miss the first
    time it is ever used (then kept forever), a hit after that."""

    EXPERT_BYTES = 1000

    def __init__(self, inner):
        self.inner = inner
        self.seen: set[tuple[int, int]] = set()
        self.step = StepExperts()
        self.lookups = 0
        self.steps: list[StepExperts] = []

    def begin_step(self):
        self.step = StepExperts(fetch_wait_ns=7)

    def end_step(self):
        self.steps.append(self.step)
        return self.step

    def iter_experts(self, layer, experts):
        for e in experts:
            self.lookups += 1
            kind = self.step.hits if (layer, e) in self.seen else self.step.misses
            kind.setdefault(layer, set()).add(e)
            if (layer, e) not in self.seen:
                self.step.bytes_fetched += self.EXPERT_BYTES
            self.seen.add((layer, e))
        yield from self.inner.iter_experts(layer, experts)


def test_expert_stats_attribution(rt, prompts):
    tracking = _Tracking(rt.model.experts)
    rt.model.experts = tracking
    try:
        with Engine(rt.model, rt.tokenizer) as engine:
            alone = run_all(engine, [greedy(prompts[0])])[0].final.experts
            alone_lookups, alone_steps = tracking.lookups, list(tracking.steps)
            tracking.lookups, tracking.steps = 0, []
            batched = [c.final.experts for c in run_all(engine, [greedy(ids) for ids in prompts[1:5]])]
    finally:
        rt.model.experts = tracking.inner
    a = rt.model.args
    # alone: the request's counts are the provider's, step by step
    assert alone.lookups == alone_lookups
    assert alone.hits == sum(len(v) for s in alone_steps for v in s.hits.values())
    assert alone.misses == sum(len(v) for s in alone_steps for v in s.misses.values())
    assert alone.hits + alone.misses == alone.lookups
    assert alone.bytes_fetched == sum(s.bytes_fetched for s in alone_steps)
    assert alone.fetch_wait_ns == 7 * len(alone_steps) == 7 * NEW_TOKENS
    # decode steps: top_k distinct experts per layer at most, at least one
    decode_lookups = alone.lookups - sum(len(v) for v in alone_steps[0].hits.values()) - sum(
        len(v) for v in alone_steps[0].misses.values()
    )
    assert a.num_moe_layers * (NEW_TOKENS - 1) <= decode_lookups <= a.top_k * a.num_moe_layers * (NEW_TOKENS - 1)
    # batched: each request's hits and misses add up to its lookups; shared experts count in each request,
    # so the requests' lookups cover the provider's (each expert looked up once per step)
    for s in batched:
        assert s.hits + s.misses == s.lookups > 0
    assert sum(s.lookups for s in batched) >= tracking.lookups
    # bytes and wait of a step are charged to every request in it: no request sees more than the total
    total_bytes = sum(s.bytes_fetched for s in tracking.steps)
    assert all(0 < s.bytes_fetched <= total_bytes for s in batched)
    assert max(s.bytes_fetched for s in batched) == total_bytes  # the last admitted saw every step
