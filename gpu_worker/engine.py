"""The batching engine: one compute thread owns the model and runs every forward.

Requests wait in a bounded queue and are admitted into the batch (up to
`max_batch_size` sequences). Each step is ONE ragged forward over every active
sequence: a newly admitted request brings its whole prompt (its prefill), the
others one token each (decode). The provider therefore sees, per layer, the union
of the experts the batch routed to and fetches each of them once.

Results leave the compute thread through a per-request `sink` callable; the
asyncio side (`AsyncRequestStream`) passes one that hops onto the event loop with
`loop.call_soon_threadsafe` into an `asyncio.Queue`.

Per-request expert statistics combine two views of a step:
  - the model's routings (a `RoutingObserver`: ids [T, K] per MoE layer) split by
    the step's token -> request map, and
  - the provider's `StepOutcome` (which experts of each layer were hits or misses
    in this forward, bytes fetched, time compute waited on fetches).
A request's lookups in a step are the distinct (layer, expert) pairs its tokens
routed to (the cache looks each expert up once per step, so a request running
alone has exactly the cache's counts); each is a hit or a miss as the expert was
in that step. Bytes fetched and fetch wait are per step, not per expert owner:
they are charged in full to every request in the step (a shared decode step
stalls every request in it), so they do not sum across requests; so are the
step's prefetched experts, prefetched bytes, wasted prefetch bytes and INT2 misses.

A `StepController` (gpu_worker.prefetch.PrefetchController) hears each request's
start and end (by the engine's integer request id) and, before each forward, the
step's token rows (request id, prefill or decode); after it, it returns what the
predictions scored per request and layer, added to the request's statistics. Each
request also keeps its counts per MoE layer and over its decode steps alone
(`ExpertStats.decode`: its prefill left out).
"""

from __future__ import annotations

import enum
import logging
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Protocol, Sequence

import torch

from expert_store.errors import FateError

from .generate import SamplingParams, make_generator, sample, scaled_scores
from .model import MoEModel, SequenceKV
from .tokenizer import IncrementalDecoder, TextTokenizer

log = logging.getLogger("gpu_worker.engine")


# -- errors -------------------------------------------------------------------------------


class RequestError(FateError, ValueError):
    """A request the engine refuses as given (bad prompt, stop strings, token ids)."""


class ContextLengthError(RequestError):
    """The prompt plus max_new_tokens do not fit the model's context."""


class QueueFullError(FateError):
    """Too many requests waiting: retry later or raise --max-queue."""


class EngineStoppedError(FateError):
    """The engine is shutting down (or has stopped): the request was not (fully) served."""


# -- domain types -------------------------------------------------------------------------


class FinishReason(enum.Enum):
    LENGTH = "length"  # reached max_new_tokens
    EOS = "eos"  # the model's end-of-sequence token
    STOP_STRING = "stop_string"
    STOP_TOKEN = "stop_token"


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams  # max_new_tokens already resolved (no "0 = default" here)
    stop_strings: tuple[str, ...] = ()
    details: bool = False  # fill TokenEvent.logprob
    request_id: str = ""  # "" -> the engine assigns one


@dataclass
class LayerExpertStats:
    """One request's counts at one MoE layer (see the module docstring for attribution)."""

    lookups: int = 0
    hits: int = 0  # prefetch hits included
    misses: int = 0
    prefetch_hits: int = 0
    predictions: int = 0  # token rows a prediction was made for
    predictions_exact: int = 0  # predicted top-k == routed top-k (as sets)
    predicted_routed: int = 0  # routed experts inside the row's prediction


@dataclass
class ExpertStats:
    """One request's expert-cache statistics (see the module docstring for attribution)."""

    lookups: int = 0
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    prefetches_issued: int = 0
    bytes_fetched: int = 0
    fetch_wait_ns: int = 0
    predictions: int = 0
    predictions_exact: int = 0
    predicted_routed: int = 0
    prefetch_bytes: int = 0  # step-charged, like bytes_fetched
    prefetch_wasted_bytes: int = 0  # step-charged: prefetched experts evicted unused during its steps
    int2_misses: int = 0  # step-charged: INT2 tail experts fetched during its steps
    layers: dict[int, LayerExpertStats] = field(default_factory=dict)  # decoder layer -> counts
    decode: LayerExpertStats = field(default_factory=LayerExpertStats)  # all layers, decode steps only

    def copy(self) -> "ExpertStats":
        return replace(self, layers={k: replace(v) for k, v in self.layers.items()}, decode=replace(self.decode))


@dataclass(frozen=True)
class Timings:
    queue_ns: int  # accepted -> admitted
    prefill_ns: int  # the forward that ran the prompt
    decode_ns: int  # first decode forward started -> last token sampled
    time_to_first_token_ns: int  # accepted -> first token sampled
    total_ns: int  # accepted -> finished


@dataclass(frozen=True)
class TokenEvent:
    index: int  # position among generated tokens
    id: int
    text: str  # may be "" (incomplete UTF-8, held back for a stop string) or carry earlier tokens' text
    logprob: float | None = None


@dataclass(frozen=True)
class FinalEvent:
    request_id: str
    finish_reason: FinishReason
    seed: int
    prompt_tokens: int
    completion_tokens: int  # generated, including a stopping token that was not streamed
    timings: Timings
    experts: ExpertStats
    stop_string: str = ""
    stop_token_id: int | None = None
    trailing_text: str = ""  # held-back text released at the end (not carried by any token event)


@dataclass(frozen=True)
class ErrorEvent:
    error: BaseException


Event = TokenEvent | FinalEvent | ErrorEvent
Sink = Callable[[Event], None]


@dataclass(frozen=True)
class EngineStats:
    active_requests: int
    queued_requests: int
    requests_total: int  # accepted
    requests_failed: int
    requests_cancelled: int
    prompt_tokens_total: int
    generated_tokens_total: int
    steps_total: int


# -- what the engine needs from the provider for per-request statistics ----------------------


@dataclass
class StepExperts:
    """The provider's view of one forward, normalized for attribution."""

    hits: dict[int, set[int]] = field(default_factory=dict)  # layer -> experts found resident
    misses: dict[int, set[int]] = field(default_factory=dict)  # layer -> experts fetched on demand
    prefetch_hits: dict[int, set[int]] = field(default_factory=dict)
    prefetches_issued: int = 0
    bytes_fetched: int = 0
    fetch_wait_ns: int = 0
    prefetch_bytes: int = 0
    prefetch_wasted_bytes: int = 0
    int2_misses: int = 0


class StepTracker(Protocol):
    """A provider that reports per step (gpu_worker.cache.ExpertCache)."""

    def begin_step(self) -> None: ...

    def end_step(self): ...  # -> an outcome `step_experts_from` understands


class StepController(Protocol):
    """Sees each step's token rows and requests' lifetimes (gpu_worker.prefetch.PrefetchController)."""

    def start_request(self, rid: int) -> None: ...

    def end_request(self, rid: int) -> None: ...

    def begin_step(self, rids: Sequence[int], prefill: Sequence[bool]) -> None: ...

    def end_step(self, outcome=None): ...  # -> StepPredictions (.by_request: {rid: {layer: counts}})


def step_experts_from(outcome) -> StepExperts:
    """Normalize a provider's step outcome: a StepExperts as is, or the cache's StepOutcome
    (`hits`, `prefetch_hits`, `misses`: {layer: [expert]}, and `bytes_fetched`, `fetch_wait_ns` totals).
    Hits include prefetch hits, as in RequestExpertStats."""
    if outcome is None:
        return StepExperts()
    if isinstance(outcome, StepExperts):
        return outcome

    def sets(name: str) -> dict[int, set[int]]:
        return {int(layer): {int(e) for e in es} for layer, es in (getattr(outcome, name, None) or {}).items()}

    pre = sets("prefetch_hits")
    hits = sets("hits")
    for layer, es in pre.items():
        hits.setdefault(layer, set()).update(es)
    return StepExperts(
        hits=hits,
        misses=sets("misses"),
        prefetch_hits=pre,
        prefetches_issued=int(getattr(outcome, "prefetches_issued", 0) or 0),
        bytes_fetched=int(outcome.bytes_fetched),
        fetch_wait_ns=int(outcome.fetch_wait_ns),
        prefetch_bytes=int(getattr(outcome, "prefetch_bytes", 0) or 0),
        prefetch_wasted_bytes=int(getattr(outcome, "prefetch_wasted_bytes", 0) or 0),
        int2_misses=int(getattr(outcome, "int2_misses", 0) or 0),
    )


class _StepRouting:
    """RoutingObserver recording this step's routings (and passing them on to a previous observer)."""

    def __init__(self, inner=None):
        self.inner = inner
        self.ids: dict[int, torch.Tensor] = {}  # layer -> [T, K] on the CPU

    def on_gate_input(self, layer: int, gate_input: torch.Tensor) -> None:
        if self.inner is not None:
            self.inner.on_gate_input(layer, gate_input)

    def on_routing(self, layer: int, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
        self.ids[layer] = expert_ids.detach().to("cpu")
        if self.inner is not None:
            self.inner.on_routing(layer, expert_ids, weights)


# -- requests inside the engine ---------------------------------------------------------------


class RequestHandle:
    """The caller's side of a submitted request: cancel it (client gone)."""

    def __init__(self, engine: "Engine", request_id: str):
        self._engine = engine
        self.request_id = request_id
        self.cancelled = False
        self.done = False

    def cancel(self) -> None:
        """Drop the request at the next step (its KV cache is freed); no further events."""
        if not self.done and not self.cancelled:
            self.cancelled = True
            self._engine._wake()


@dataclass
class _Request:
    req: GenerationRequest
    sink: Sink
    handle: RequestHandle
    seed: int
    t_accepted: int
    stops: frozenset[int] = frozenset()
    seq: SequenceKV | None = None
    generator: torch.Generator | None = None
    decoder: IncrementalDecoder | None = None
    next_input: list[int] = field(default_factory=list)
    generated: int = 0
    held: str = ""  # decoded text not yet streamed (a possible stop-string prefix)
    prefilled: bool = False
    t_admitted: int = 0
    prefill_ns: int = 0
    t_first_token: int = 0
    t_decode_start: int = 0
    t_last_token: int = 0
    experts: ExpertStats = field(default_factory=ExpertStats)
    rid: int = 0  # the engine's integer id (predictors, traces)
    started: bool = False  # the controller saw start_request


def _now() -> int:
    return time.perf_counter_ns()


def _held_suffix(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _logprob(logits: torch.Tensor, params: SamplingParams, token: int) -> float:
    """log P(token) under the distribution `sample` draws from (greedy: the model's softmax)."""
    if params.greedy:
        return float(torch.log_softmax(logits.float(), -1)[token])
    scores = scaled_scores(logits, params.temperature)
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        p = torch.softmax(sorted_scores, dim=-1)
        drop = (p.cumsum(-1) - p) >= params.top_p
        drop[0] = False
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    return float(torch.log_softmax(scores, -1)[token])


# -- the engine -------------------------------------------------------------------------------


class Engine:
    """Batched generation on one model; all model work happens on the engine's thread."""

    def __init__(
        self,
        model: MoEModel,
        tokenizer: TextTokenizer | None = None,
        *,
        max_batch_size: int = 8,
        max_queue: int = 64,
        tracker: StepTracker | None = None,
        controller: StepController | None = None,
        on_final: Callable[[FinalEvent], None] | None = None,
        num_threads: int | None = None,
    ):
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_queue >= 0, got {max_batch_size}, {max_queue}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        if tracker is None and hasattr(model.experts, "begin_step") and hasattr(model.experts, "end_step"):
            tracker = model.experts  # type: ignore[assignment]
        self.tracker = tracker
        self.controller = controller
        self.on_final = on_final
        self.num_threads = num_threads  # torch threads, set on the compute thread itself (OpenMP's is per thread)
        self.on_step_error: Callable[[BaseException], None] | None = None  # e.g. mark the store unreachable
        self.on_heartbeat: Callable[[], None] | None = None  # compute thread, each loop turn (a watchdog ping)
        self.heartbeat_s = 1.0  # an idle compute thread still beats this often
        self.crashed: BaseException | None = None  # set when the compute loop itself died
        self._cond = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._counts = dict(total=0, failed=0, cancelled=0, prompt=0, generated=0, steps=0)
        self._routing = _StepRouting()
        self._next_rid = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            self._routing = _StepRouting(self.model.observer)
            self.model.observer = self._routing
            self._thread = threading.Thread(target=self._run, name="engine-compute", daemon=True)
            self._thread.start()
        return self

    def stop_accepting(self) -> None:
        """New submissions raise EngineStoppedError; queued and active requests go on."""
        with self._cond:
            self._accepting = False

    def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or active; True when that happened within timeout_s."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending or self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the compute thread after its current step; unfinished requests get EngineStoppedError."""
        with self._cond:
            self._accepting = False
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("engine: the compute thread did not stop within %.0f s", timeout_s)

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- submission --------------------------------------------------------------------------

    def validate(self, req: GenerationRequest) -> None:
        """Raise SamplingError / RequestError / ContextLengthError for a request that cannot run."""
        req.params.validate()
        a = self.model.args
        if not req.prompt_ids:
            raise RequestError("the prompt is empty: send text or at least one token id")
        bad = [t for t in req.prompt_ids if not 0 <= t < a.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is out of the vocabulary (0..{a.vocab_size - 1})")
        limit = a.max_position_embeddings
        if len(req.prompt_ids) + req.params.max_new_tokens > limit:
            raise ContextLengthError(
                f"prompt ({len(req.prompt_ids)} tokens) + max_new_tokens ({req.params.max_new_tokens}) "
                f"exceeds the model's context of {limit} tokens: shorten the prompt or lower max_new_tokens"
            )
        bad_ids = [t for t in req.params.stop_token_ids if not 0 <= t < a.vocab_size]
        if bad_ids:
            raise RequestError(f"stop token id {bad_ids[0]} is out of the vocabulary (0..{a.vocab_size - 1})")
        if req.stop_strings:
            if self.tokenizer is None:
                raise RequestError("stop strings need the model's tokenizer, and this model has none")
            if any(not s for s in req.stop_strings):
                raise RequestError("a stop string is empty")

    def submit(self, req: GenerationRequest, sink: Sink) -> RequestHandle:
        """Queue a request; `sink` receives its events on the compute thread (it must not block)."""
        self.validate(req)
        if self._thread is None:
            raise EngineStoppedError("the engine is not started")
        seed = req.params.seed if req.params.seed is not None else secrets.randbits(63)
        request_id = req.request_id or uuid.uuid4().hex[:16]
        req = replace(req, request_id=request_id, params=replace(req.params, seed=seed))
        handle = RequestHandle(self, request_id)
        stops = set(req.params.stop_token_ids)
        if not req.params.ignore_eos:
            stops |= set(self.model.args.eos_token_ids)
        r = _Request(req=req, sink=sink, handle=handle, seed=seed, t_accepted=_now(), stops=frozenset(stops))
        with self._cond:
            if not self._accepting or self._stop or not self.alive:
                raise EngineStoppedError("the worker is shutting down: retry on another worker")
            waiting = len(self._pending) - (self.max_batch_size - len(self._active))  # beyond the free slots
            if waiting >= self.max_queue:
                raise QueueFullError(
                    f"{len(self._pending)} requests are queued (max_queue {self.max_queue}): retry later"
                )
            self._pending.append(r)
            self._counts["total"] += 1
            self._cond.notify_all()
        return handle

    def stats(self) -> EngineStats:
        c = self._counts
        return EngineStats(
            active_requests=len(self._active), queued_requests=len(self._pending), requests_total=c["total"],
            requests_failed=c["failed"], requests_cancelled=c["cancelled"], prompt_tokens_total=c["prompt"],
            generated_tokens_total=c["generated"], steps_total=c["steps"],
        )  # fmt: skip

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- the compute thread ------------------------------------------------------------------

    def _run(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            while True:
                self._beat()
                with self._cond:
                    while not self._stop and not self._pending and not self._active:
                        self._cond.wait(self.heartbeat_s)
                        self._beat()
                    if self._stop:
                        break
                    self._admit()
                self._drop_cancelled()
                if self._active:
                    self._step()
                with self._cond:
                    self._cond.notify_all()  # drain() waiters
        except BaseException as e:  # a bug in the loop itself: fail everyone rather than hang them
            log.exception("engine: the compute loop crashed")
            self.crashed = e
            with self._cond:
                self._accepting = False
            self._fail_all(e)
            raise
        self._fail_all(EngineStoppedError("the worker shut down before the request finished"))

    @property
    def alive(self) -> bool:
        """The compute thread runs (False before start, after shutdown, and after a crash)."""
        return self._thread is not None and self._thread.is_alive()

    def _beat(self) -> None:
        if self.on_heartbeat is not None:
            try:
                self.on_heartbeat()
            except Exception:  # noqa: BLE001 - a failed ping must not stop generation
                log.debug("engine: heartbeat callback failed", exc_info=True)

    def _admit(self) -> None:
        """Move queued requests into the batch (caller holds the lock)."""
        while self._pending and len(self._active) < self.max_batch_size:
            r = self._pending.popleft()
            if r.handle.cancelled:
                self._counts["cancelled"] += 1
                r.handle.done = True
                continue
            p = r.req.params
            r.t_admitted = _now()
            r.seq = self.model.new_sequence(capacity=len(r.req.prompt_ids) + p.max_new_tokens)
            r.generator = make_generator(p, self.model.device)
            r.decoder = self.tokenizer.stream() if self.tokenizer is not None else None
            r.next_input = list(r.req.prompt_ids)
            r.rid = self._next_rid
            self._next_rid += 1
            self._active.append(r)
            if self.controller is not None:
                self.controller.start_request(r.rid)
                r.started = True

    def _drop_cancelled(self) -> None:
        gone = [r for r in self._active if r.handle.cancelled]
        if gone:
            with self._cond:
                for r in gone:
                    self._active.remove(r)
                    r.seq = None  # frees the KV cache
                    r.handle.done = True
                    self._counts["cancelled"] += 1
                    self._release(r)

    def _release(self, r: _Request) -> None:
        """The controller forgets a finished, failed or cancelled request."""
        if r.started and self.controller is not None:
            r.started = False
            try:
                self.controller.end_request(r.rid)
            except Exception:  # noqa: BLE001 - statistics must not break generation
                log.exception("engine: controller.end_request failed")

    def _step(self) -> None:
        batch = list(self._active)
        tokens = [torch.tensor(r.next_input, dtype=torch.long) for r in batch]
        self._routing.ids.clear()
        if self.tracker is not None:
            self.tracker.begin_step()
        if self.controller is not None:
            rids = [r.rid for r, t in zip(batch, tokens) for _ in range(t.numel())]
            prefill = [not r.prefilled for r, t in zip(batch, tokens) for _ in range(t.numel())]
            self.controller.begin_step(rids, prefill)
        t0 = _now()
        predictions = None
        try:
            logits = self.model.forward([r.seq for r in batch], tokens)  # [B, V]
            raw = self.tracker.end_step() if self.tracker is not None else None
            outcome = step_experts_from(raw) if self.tracker is not None else None
            if self.controller is not None:
                predictions = self.controller.end_step(raw)
        except Exception as e:  # noqa: BLE001 - the step's requests fail, the engine goes on
            for end in (getattr(self.tracker, "end_step", None), getattr(self.controller, "end_step", None)):
                if end is not None:
                    try:
                        end()
                    except Exception:  # noqa: BLE001 - the step already failed; its outcome is moot
                        pass
            if not isinstance(e, FateError):
                log.exception("engine: a forward of %d sequences failed", len(batch))
            if self.on_step_error is not None:
                self.on_step_error(e)
            culprits = self._routed_to_failed_expert(batch, tokens, e)
            self._fail(culprits or batch, e)  # the others (KV untouched: a failed forward never advances) rerun
            return
        t1 = _now()
        self._counts["steps"] += 1
        self._attribute(batch, [len(t) for t in tokens], outcome, predictions)
        for j, r in enumerate(batch):
            if not r.prefilled:
                r.prefilled = True
                r.prefill_ns = t1 - t0
                self._counts["prompt"] += len(r.req.prompt_ids)
            elif not r.t_decode_start:
                r.t_decode_start = t0
            try:  # one request's sampling or streaming failure is that request's alone
                token = sample(logits[j], r.req.params, r.generator)
                self._on_token(r, token, logits[j])
            except Exception as e:  # noqa: BLE001 - the rest of the batch goes on
                if not isinstance(e, FateError):
                    log.exception("engine: request %s failed after its forward", r.req.request_id)
                self._fail([r], e)

    def _routed_to_failed_expert(self, batch: list[_Request], tokens: list[torch.Tensor],
                                 e: BaseException) -> list[_Request]:
        """The requests whose tokens routed to the expert a ChecksumError names ([] when unknown)."""
        layer, expert = getattr(e, "layer", None), getattr(e, "expert", None)
        ids = self._routing.ids.get(layer) if layer is not None and expert is not None else None
        if ids is None or len(batch) < 2:
            return []
        out, start = [], 0
        for r, t in zip(batch, tokens):
            n = t.numel()
            if bool((ids[start : start + n] == expert).any()):
                out.append(r)
            start += n
        return out

    def _attribute(self, batch: list[_Request], lengths: list[int], outcome: StepExperts | None,
                   predictions=None) -> None:
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        for layer, ids in self._routing.ids.items():
            hits = outcome.hits.get(layer, set()) if outcome else set()
            misses = outcome.misses.get(layer, set()) if outcome else set()
            pre = outcome.prefetch_hits.get(layer, set()) if outcome else set()
            for j, r in enumerate(batch):
                mine = set(ids[starts[j] : starts[j + 1]].reshape(-1).tolist())
                s = r.experts
                n_hits, n_misses, n_pre = len(mine & hits), len(mine & misses), len(mine & pre)
                s.lookups += len(mine)
                s.hits += n_hits
                s.misses += n_misses
                s.prefetch_hits += n_pre
                for ls in (s.layers.setdefault(layer, LayerExpertStats()),) + ((s.decode,) if r.prefilled else ()):
                    ls.lookups += len(mine)
                    ls.hits += n_hits
                    ls.misses += n_misses
                    ls.prefetch_hits += n_pre
        if predictions is not None:
            for r in batch:
                for layer, c in predictions.by_request.get(r.rid, {}).items():
                    s = r.experts
                    s.predictions += c.predictions
                    s.predictions_exact += c.exact
                    s.predicted_routed += c.routed_in
                    for ls in (s.layers.setdefault(layer, LayerExpertStats()),) + ((s.decode,) if r.prefilled else ()):
                        ls.predictions += c.predictions
                        ls.predictions_exact += c.exact
                        ls.predicted_routed += c.routed_in
        if outcome is not None:
            for r in batch:
                r.experts.bytes_fetched += outcome.bytes_fetched
                r.experts.fetch_wait_ns += outcome.fetch_wait_ns
                r.experts.prefetches_issued += outcome.prefetches_issued
                r.experts.prefetch_bytes += outcome.prefetch_bytes
                r.experts.prefetch_wasted_bytes += outcome.prefetch_wasted_bytes
                r.experts.int2_misses += outcome.int2_misses

    def _on_token(self, r: _Request, token: int, logits: torch.Tensor) -> None:
        p = r.req.params
        now = _now()
        index = r.generated
        r.generated += 1
        self._counts["generated"] += 1
        r.t_first_token = r.t_first_token or now
        r.t_last_token = now
        if token in r.stops:
            reason = FinishReason.STOP_TOKEN if token in p.stop_token_ids else FinishReason.EOS
            self._finish(r, reason, stop_token_id=token, trailing_text=r.held)
            return
        logprob = _logprob(logits, p, token) if r.req.details else None
        piece = r.decoder.push(token) if r.decoder is not None else ""
        text = r.held + piece
        if r.req.stop_strings:
            found = [(text.find(s), s) for s in r.req.stop_strings if s in text]
            if found:
                at, s = min(found)
                if at > 0:
                    self._emit(r, TokenEvent(index, token, text[:at], logprob))
                self._finish(r, FinishReason.STOP_STRING, stop_string=s)
                return
            keep = _held_suffix(text, r.req.stop_strings)
            r.held = text[len(text) - keep :] if keep else ""
            text = text[: len(text) - keep]
        self._emit(r, TokenEvent(index, token, text, logprob))
        if r.generated >= p.max_new_tokens:
            self._finish(r, FinishReason.LENGTH, trailing_text=r.held)
            return
        r.next_input = [token]

    def _emit(self, r: _Request, ev: Event) -> None:
        try:
            r.sink(ev)
        except Exception:  # noqa: BLE001 - a broken sink (its loop closed) must not stop the engine
            log.debug("engine: sink of request %s failed", r.req.request_id, exc_info=True)
            r.handle.cancelled = True

    def _finish(self, r: _Request, reason: FinishReason, **kw) -> None:
        now = _now()
        final = FinalEvent(
            request_id=r.req.request_id,
            finish_reason=reason,
            seed=r.seed,
            prompt_tokens=len(r.req.prompt_ids),
            completion_tokens=r.generated,
            timings=Timings(
                queue_ns=r.t_admitted - r.t_accepted,
                prefill_ns=r.prefill_ns,
                decode_ns=(r.t_last_token - r.t_decode_start) if r.t_decode_start else 0,
                time_to_first_token_ns=r.t_first_token - r.t_accepted,
                total_ns=now - r.t_accepted,
            ),
            experts=r.experts.copy(),
            **kw,
        )
        with self._cond:
            self._active.remove(r)
            r.seq = None
            r.handle.done = True
        self._release(r)
        self._emit(r, final)
        if self.on_final is not None:
            try:
                self.on_final(final)
            except Exception:  # noqa: BLE001 - metrics must not break generation
                log.exception("engine: on_final callback failed")

    def _fail(self, batch: Iterable[_Request], error: BaseException) -> None:
        with self._cond:
            for r in batch:
                if r in self._active:
                    self._active.remove(r)
                r.seq = None
                r.handle.done = True
                self._counts["failed"] += 1
        for r in batch:
            self._release(r)
            self._emit(r, ErrorEvent(error))

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            rest = list(self._active) + list(self._pending)
            self._active.clear()
            self._pending.clear()
        self._fail([r for r in rest if not r.handle.cancelled], error)
        with self._cond:
            self._cond.notify_all()


# -- the asyncio side -------------------------------------------------------------------------


class AsyncRequestStream:
    """Submit on the event loop's thread; iterate to get TokenEvents then the FinalEvent.

    An ErrorEvent is raised as its exception. Leaving the iteration early (the client
    went away: the handler task is cancelled) cancels the request in the engine.
    """

    def __init__(self, engine: Engine, req: GenerationRequest):
        import asyncio

        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

        def sink(ev: Event) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._queue.put_nowait, ev)

        self.handle = engine.submit(req, sink)
        self.request_id = self.handle.request_id

    def cancel(self) -> None:
        self.handle.cancel()

    def __aiter__(self):
        return self._iter()

    async def _iter(self):
        try:
            while True:
                ev = await self._queue.get()
                if isinstance(ev, ErrorEvent):
                    raise ev.error
                yield ev
                if isinstance(ev, FinalEvent):
                    return
        finally:
            self.handle.cancel()  # a no-op once the request is done
