"""The batching engine: one compute thread owns the model and runs every forward.

Requests wait in a bounded queue and are admitted into the batch (up to
`max_batch_size` sequences). Each step is ONE ragged forward over every active
sequence: a newly admitted request brings its whole prompt (its prefill), the
others one token each (decode). The provider therefore sees, per layer, the union
of the experts the batch routed to and fetches each of them once.

Results leave the compute thread through a per-request `sink` callable; the
asyncio side (`AsyncRequestStream`) passes one that hops onto the event loop with
`loop.call_soon_threadsafe` into an `asyncio.Queue`.

The engine takes its step hooks at construction (gpu_worker.step_hooks: the cache as
`tracker`, the prefetch `controller`, the trace `recorder`, and the per-request
`attribution`, gpu_worker.request_stats) and passes their routing observers to each
forward; nothing else is wired into the model. The public types (requests, events,
errors) live in gpu_worker.events and are importable from here.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import replace
from typing import Callable, Iterable

import torch

from expert_store.errors import FateError

from .events import (  # noqa: F401 - the engine's public API
    ContextLengthError, EngineStats, EngineStoppedError, ErrorEvent, Event, ExpertStats, FinalEvent, FinishReason,
    GenerationRequest, LayerExpertStats, QueueFullError, RequestError, Sink, Timings, TokenEvent,
)
from .generate import make_generator, sample
from .model import MoEModel
from .request_state import ActiveRequest, RequestHandle, held_suffix
from .request_state import logprob as token_logprob
from .request_stats import StepAttribution, StepExperts, step_experts_from  # noqa: F401
from .step_hooks import RoutingFanout, StepController, StepListener, StepTiming, StepTracker  # noqa: F401
from .tokenizer import TextTokenizer

log = logging.getLogger("gpu_worker.engine")


def _now() -> int:
    return time.perf_counter_ns()


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
        recorder: StepListener | None = None,
        attribution: StepAttribution | None = None,
        on_final: Callable[[FinalEvent], None] | None = None,
        on_step_error: Callable[[BaseException], None] | None = None,
        on_step: Callable[[StepTiming], None] | None = None,
        on_heartbeat: Callable[[], None] | None = None,
        heartbeat_s: float = 1.0,
        num_threads: int | None = None,
    ):
        """tracker: the expert cache's step outcomes (default: the model's provider when it has
        begin_step/end_step); controller: the prefetch controller (rows, predictions; also a routing
        observer); recorder: the trace recorder (rows, requests, routing); attribution: charges each
        step to its requests (a fresh StepAttribution by default); on_final: each FinalEvent
        (metrics); on_step_error: a failed forward's exception (e.g. mark the store unreachable);
        on_step: each step's wall time and shape (StepTiming); on_heartbeat: called from the compute
        thread each loop turn, and at least every heartbeat_s when idle (a watchdog ping)."""
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
        self.recorder = recorder
        self.attribution = attribution or StepAttribution()
        self.on_final = on_final
        self.on_step_error = on_step_error
        self.on_step = on_step
        self.on_heartbeat = on_heartbeat
        self.heartbeat_s = heartbeat_s
        self.crashed: BaseException | None = None  # set when the compute loop itself died
        self.num_threads = num_threads  # torch threads, set on the compute thread itself (OpenMP's is per thread)
        # listeners in call order for begin_step / start_request (end_* run in reverse)
        self._listeners: tuple[StepListener, ...] = tuple(x for x in (recorder, controller) if x is not None)
        self._routing = RoutingFanout([self.attribution, recorder, controller])
        self._cond = threading.Condition()
        self._pending: deque[ActiveRequest] = deque()
        self._active: list[ActiveRequest] = []
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._counts = dict(total=0, failed=0, cancelled=0, prompt=0, generated=0, steps=0)
        self._next_rid = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
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
        handle = RequestHandle(self._wake, request_id)
        stops = set(req.params.stop_token_ids)
        if not req.params.ignore_eos:
            stops |= set(self.model.args.eos_token_ids)
        r = ActiveRequest(req=req, sink=sink, handle=handle, seed=seed, t_accepted=_now(), stops=frozenset(stops))
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
            for x in self._listeners:
                x.start_request(r.rid)
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

    def _release(self, r: ActiveRequest) -> None:
        """The step listeners forget a finished, failed or cancelled request."""
        if r.started:
            r.started = False
            for x in reversed(self._listeners):
                try:
                    x.end_request(r.rid)
                except Exception:  # noqa: BLE001 - statistics must not break generation
                    log.exception("engine: end_request of %s failed", type(x).__name__)

    def _step(self) -> None:
        t_start = _now()
        batch = list(self._active)
        tokens = [torch.tensor(r.next_input, dtype=torch.long) for r in batch]
        lengths = [len(t) for t in tokens]
        decode = all(r.prefilled for r in batch)
        self.attribution.begin_step()
        if self.tracker is not None:
            self.tracker.begin_step()
        if self._listeners:
            rids = [r.rid for r, t in zip(batch, tokens) for _ in range(t.numel())]
            prefill = [not r.prefilled for r, t in zip(batch, tokens) for _ in range(t.numel())]
            for x in self._listeners:
                x.begin_step(rids, prefill)
        t0 = _now()
        predictions = None
        try:
            logits = self.model.forward([r.seq for r in batch], tokens, observer=self._routing)  # [B, V]
            raw = self.tracker.end_step() if self.tracker is not None else None
            outcome = step_experts_from(raw) if self.tracker is not None else None
            if self.controller is not None:
                predictions = self.controller.end_step(raw)
            if self.recorder is not None:
                self.recorder.end_step(raw)
        except Exception as e:  # noqa: BLE001 - the step's requests fail, the engine goes on
            for x in (self.tracker, self.controller, self.recorder):
                if x is not None:
                    try:
                        x.end_step()
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
        self.attribution.attribute([r.experts for r in batch], [r.prefilled for r in batch],
                                   [len(t) for t in tokens], outcome, predictions, [r.rid for r in batch])
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
        if self.on_step is not None:
            self.on_step(StepTiming(_now() - t_start, len(batch), sum(lengths), decode))

    def _routed_to_failed_expert(self, batch: list[ActiveRequest], tokens: list[torch.Tensor],
                                 e: BaseException) -> list[ActiveRequest]:
        """The requests whose tokens routed to the expert a ChecksumError names ([] when unknown)."""
        layer, expert = getattr(e, "layer", None), getattr(e, "expert", None)
        ids = self.attribution.ids.get(layer) if layer is not None and expert is not None else None
        if ids is None or len(batch) < 2:
            return []
        out, start = [], 0
        for r, t in zip(batch, tokens):
            n = t.numel()
            if bool((ids[start : start + n] == expert).any()):
                out.append(r)
            start += n
        return out

    def _on_token(self, r: ActiveRequest, token: int, logits: torch.Tensor) -> None:
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
        logprob = token_logprob(logits, p, token) if r.req.details else None
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
            keep = held_suffix(text, r.req.stop_strings)
            r.held = text[len(text) - keep :] if keep else ""
            text = text[: len(text) - keep]
        self._emit(r, TokenEvent(index, token, text, logprob))
        if r.generated >= p.max_new_tokens:
            self._finish(r, FinishReason.LENGTH, trailing_text=r.held)
            return
        r.next_input = [token]

    def _emit(self, r: ActiveRequest, ev: Event) -> None:
        try:
            r.sink(ev)
        except Exception:  # noqa: BLE001 - a broken sink (its loop closed) must not stop the engine
            log.debug("engine: sink of request %s failed", r.req.request_id, exc_info=True)
            r.handle.cancelled = True

    def _finish(self, r: ActiveRequest, reason: FinishReason, **kw) -> None:
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

    def _fail(self, batch: Iterable[ActiveRequest], error: BaseException) -> None:
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
