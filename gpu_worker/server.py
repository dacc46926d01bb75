"""The worker server: `python -m gpu_worker serve --store ADDR --budget-bytes N --listen ...`.

Start-up (blocking, before the port opens): wait for the store's health SERVING,
read its manifest, size the expert cache (a budget below one layer's top-k experts
is a start-up error naming the minimum), stream the dense weights and tokenizer,
build the model with the cache as its expert provider. Then grpc.aio on uvloop
serves `moe.v1.Worker` and the standard health service (SERVING while the model is
loaded and the store reachable), sd_notify READY=1.

Errors become status codes in one place (`status_for`): bad input is
INVALID_ARGUMENT, a prompt + max_new_tokens beyond the context OUT_OF_RANGE, a full
queue RESOURCE_EXHAUSTED, an unreachable store or a worker shutting down
UNAVAILABLE, a corrupt blob DATA_LOSS; INTERNAL only for bugs.

SIGTERM/SIGINT: health NOT_SERVING, sd_notify STOPPING=1, new requests get
UNAVAILABLE, in-flight ones get `grace_s` to finish and otherwise end with
UNAVAILABLE; then the store leases are released and the process exits 0.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from moe.v1 import worker_pb2 as pb
from moe.v1 import worker_pb2_grpc as pb_grpc
from expert_store import sdnotify
from expert_store.config import ConfigError
from expert_store.errors import ChecksumError, FateError

from .cache import (
    CacheBudgetError,
    ExpertCache,
    expert_compute_nbytes,
    full_budget_bytes,
)
from .config import WorkerConfig, resolve_budget, resolve_staging
from .engine import (
    AsyncRequestStream,
    ContextLengthError,
    Engine,
    EngineStoppedError,
    FinalEvent,
    FinishReason,
    GenerationRequest,
    QueueFullError,
    RequestError,
    TokenEvent,
)
from .expert_compute import default_compute_form
from .generate import SamplingError, SamplingParams
from .metrics import WorkerMetrics
from .model import MoEModel, TokenRangeError, WeightsError
from .prefetch import PrefetchController
from .runtime import FORMAT_PREFERENCE, pick_device
from .store_client import StoreClient, StoreError, StoreManifest, StoreUnavailableError
from .tokenizer import TextTokenizer, TokenizerError
from .traces import TraceRecorder
from .wiring import WorkerSpec, build_worker

log = logging.getLogger("gpu_worker.server")

SERVICE_NAME = "moe.v1.Worker"


class WorkerUnavailableError(FateError):
    """The worker cannot serve now (starting, the store unreachable): retry later."""


# -- errors -> status codes (the one mapping) -------------------------------------------------


def status_for(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for an exception; INTERNAL only for bugs."""
    if isinstance(e, ContextLengthError):
        return grpc.StatusCode.OUT_OF_RANGE, str(e)
    if isinstance(e, (SamplingError, RequestError, TokenRangeError, TokenizerError, ConfigError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, (QueueFullError, CacheBudgetError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
    if isinstance(e, (StoreUnavailableError, EngineStoppedError, WorkerUnavailableError)):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    if isinstance(e, ChecksumError):
        return grpc.StatusCode.DATA_LOSS, str(e)
    if isinstance(e, StoreError):  # the store refused a fetch: a dependency failed, not our input
        return grpc.StatusCode.UNAVAILABLE, f"expert store error: {e}"
    if isinstance(e, FateError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}): {e}"


def _map_errors(method):
    """Turn exceptions of a servicer method (unary or server-streaming) into status codes."""

    async def abort(context: grpc.aio.ServicerContext, e: Exception):
        code, message = status_for(e)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", method.__name__)
        else:
            log.debug("%s: %s: %s", method.__name__, code.name, message)
        await context.abort(code, message)

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:  # noqa: BLE001 - mapped to a status code
                await abort(context, e)

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status code
            await abort(context, e)

    return unary


# -- the loaded worker --------------------------------------------------------------------------


@dataclass
class WorkerRuntime:
    config: WorkerConfig
    store: StoreClient
    manifest: StoreManifest
    cache: ExpertCache
    model: MoEModel
    tokenizer: TextTokenizer | None
    engine: Engine
    expert_format: str
    budget_bytes: int
    started: float
    controller: PrefetchController | None = None
    int2_tail: float = 0.0  # in effect (0 when off or the store serves no int2)
    store_connected: bool = True
    recorder: TraceRecorder | None = None  # --trace-dir


def _pick_format(cfg: WorkerConfig, m: StoreManifest) -> str:
    if cfg.expert_format is not None:
        if cfg.expert_format not in m.formats:
            raise ConfigError(f"expert_format = {cfg.expert_format!r}: the store serves {', '.join(m.formats)}")
        return cfg.expert_format
    return next(f for f in FORMAT_PREFERENCE + tuple(m.formats) if f in m.formats)


def _load_tokenizer(store: StoreClient, m: StoreManifest) -> TextTokenizer | None:
    if "tokenizer.json" not in m.tokenizer_files:
        log.warning("the pack has no tokenizer.json: requests must send token ids")
        return None
    files = store.files(["tokenizer.json"])
    with tempfile.TemporaryDirectory(prefix="fate-moe-tok-") as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_bytes(files["tokenizer.json"])
        return TextTokenizer(path)


def load_runtime(cfg: WorkerConfig) -> WorkerRuntime:
    """Connect to the store and build everything (blocking). Raises FateError subclasses on bad setup."""
    torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    store = StoreClient(cfg.store, client_id=cfg.worker_id or None, transport=cfg.transport)  # type: ignore[arg-type]
    try:
        log.info("waiting for the expert store at %s", cfg.store)
        store.wait_ready(cfg.store_wait_s)
        m = store.manifest()
        fmt = _pick_format(cfg, m)
        form = cfg.compute_form or default_compute_form(fmt, device)
        full = full_budget_bytes(m.args, fmt, form, device)
        budget = resolve_budget(cfg.budget_bytes, full)
        total_slots = budget // expert_compute_nbytes(m.args, fmt, form, device)
        staging = resolve_staging(cfg.staging_slots, cfg.predictor, total_slots, m.args.num_experts)
        tail_fmt = "int2" if cfg.int2_tail > 0 and fmt != "int2" and "int2" in m.formats else None
        transport = store.transport  # decided now: a worker asked for shm that cannot have it stops here
        t0 = time.perf_counter()
        spec = WorkerSpec(fmt=fmt, budget_bytes=budget, form=form, policy=cfg.policy, lfu_decay=cfg.lfu_decay,
                          allocation=cfg.allocation, full_layers=cfg.full_layers, staging_slots=staging,
                          tail_fmt=tail_fmt, predictor=cfg.predictor, prefetch_width=cfg.prefetch_width,
                          lookahead=cfg.lookahead, throttle=cfg.throttle, int2_tail_share=cfg.int2_tail,
                          prefetch_sync=cfg.prefetch_sync, trace_dir=cfg.trace_dir, trace_every=cfg.trace_every,
                          model_name=m.family, max_batch_size=cfg.max_batch_size, max_queue=cfg.max_queue,
                          threads=cfg.threads)
        w = build_worker(m.args, store.dense_tensors, store, lambda: _load_tokenizer(store, m), spec, device,
                         expert_bytes={f: m.expert_bytes(f) for f in m.formats})
        cache, model, tokenizer, engine, controller, recorder = w.cache, w.model, w.engine.tokenizer, w.engine, \
            w.controller, w.recorder
        if cfg.int2_tail > 0 and fmt != "int2" and tail_fmt is None:
            log.warning("int2_tail = %g: the store does not serve int2 experts (serve a pack with int2 and include "
                        "it in the store's --formats); prefill tails are fetched as %s", cfg.int2_tail, fmt)
        log.info(
            "model %s (%s) on %s: experts %s as %s, cache budget %d bytes (%.1f%% of %d), %d slots "
            "(%s, %d staging), policy %s, predictor %s (lookahead %d), int2 tail %g; transport %s; "
            "dense weights loaded in %.2f s",
            m.pack_id[:12], m.family, device, fmt, form, budget, 100.0 * budget / full, full,
            sum(cache.slots().values()), cfg.allocation, staging, cfg.policy, cfg.predictor, cfg.lookahead,
            controller.int2_tail_share, transport, time.perf_counter() - t0,
        )
    except BaseException:
        store.close()
        raise
    return WorkerRuntime(cfg, store, m, cache, model, tokenizer, engine, fmt, budget, time.monotonic(),
                         controller, controller.int2_tail_share, recorder=recorder)


# -- protobuf <-> domain (the edge) ---------------------------------------------------------------


_FINISH_TO_PB = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP_STRING: pb.FINISH_REASON_STOP_STRING,
    FinishReason.STOP_TOKEN: pb.FINISH_REASON_STOP_TOKEN,
}


def request_from_pb(r: pb.GenerateRequest, rt: WorkerRuntime) -> GenerationRequest:
    """Check and convert a GenerateRequest (raises RequestError / SamplingError / ContextLengthError)."""
    which = r.WhichOneof("input")
    if which is None:
        raise RequestError("no input: set prompt (text) or token_ids")
    if which == "prompt":
        if not r.prompt:
            raise RequestError("the prompt is empty")
        if rt.tokenizer is None:
            raise RequestError("this model has no tokenizer: send token_ids instead of a prompt")
        ids = rt.tokenizer.encode(r.prompt)
    else:
        ids = list(r.token_ids.ids)
    if not ids:
        raise RequestError("the prompt is empty")
    if r.top_p < 0.0 or r.top_p > 1.0 or r.top_p != r.top_p:
        raise SamplingError(f"top_p must be in [0, 1] (0 or 1: no nucleus cut), got {r.top_p}")
    max_new = r.max_new_tokens
    if max_new == 0:  # the worker's default, cut to what the context leaves
        room = rt.model.args.max_position_embeddings - len(ids)
        max_new = max(1, min(rt.config.default_max_new_tokens, room))
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=r.temperature,
        top_k=r.top_k,
        top_p=1.0 if r.top_p == 0.0 else r.top_p,
        seed=r.seed if r.HasField("seed") else None,
        stop_token_ids=tuple(r.stop_token_ids),
        ignore_eos=r.ignore_eos,
    )
    req = GenerationRequest(tuple(ids), params, tuple(r.stop_strings), r.details, r.request_id)
    rt.engine.validate(req)
    return req


def event_to_pb(ev: TokenEvent | FinalEvent) -> pb.GenerateResponse:
    if isinstance(ev, TokenEvent):
        tok = pb.GeneratedToken(index=ev.index, id=ev.id, text=ev.text)
        if ev.logprob is not None:
            tok.logprob = ev.logprob
        return pb.GenerateResponse(token=tok)
    t, e = ev.timings, ev.experts
    return pb.GenerateResponse(final=pb.GenerateFinal(
        request_id=ev.request_id,
        finish_reason=_FINISH_TO_PB[ev.finish_reason],
        stop_string=ev.stop_string,
        stop_token_id=ev.stop_token_id or 0,
        seed=ev.seed,
        usage=pb.GenerateUsage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens),
        timings=pb.GenerateTimings(queue_ns=t.queue_ns, prefill_ns=t.prefill_ns, decode_ns=t.decode_ns,
                                   time_to_first_token_ns=t.time_to_first_token_ns, total_ns=t.total_ns),
        experts=pb.RequestExpertStats(
            lookups=e.lookups, hits=e.hits, misses=e.misses, prefetch_hits=e.prefetch_hits,
            prefetches_issued=e.prefetches_issued, bytes_fetched=e.bytes_fetched, fetch_wait_ns=e.fetch_wait_ns,
            predictions=e.predictions, predictions_exact=e.predictions_exact, predicted_routed=e.predicted_routed,
            prefetch_bytes=e.prefetch_bytes, prefetch_wasted_bytes=e.prefetch_wasted_bytes,
            int2_misses=e.int2_misses,
            layers=[pb.RequestLayerExpertStats(layer=layer, lookups=l.lookups, hits=l.hits, misses=l.misses,
                                               prefetch_hits=l.prefetch_hits, predictions=l.predictions,
                                               predictions_exact=l.predictions_exact,
                                               predicted_routed=l.predicted_routed)
                    for layer, l in sorted(e.layers.items())],
            decode=pb.RequestLayerExpertStats(
                layer=0, lookups=e.decode.lookups, hits=e.decode.hits, misses=e.decode.misses,
                prefetch_hits=e.decode.prefetch_hits, predictions=e.decode.predictions,
                predictions_exact=e.decode.predictions_exact, predicted_routed=e.decode.predicted_routed)),
        trailing_text=ev.trailing_text,
    ))  # fmt: skip


def stats_to_pb(rt: WorkerRuntime, include_layers: bool) -> pb.WorkerStats:
    e, c, f = rt.engine.stats(), rt.cache.stats(), rt.store.counters.snapshot()
    t = c.total
    p = rt.controller.stats() if rt.controller is not None else None
    preds = {layer: (v.predictions, v.exact, v.routed_in) for layer, v in (p.layers.items() if p else ())}
    s = pb.WorkerStats(
        worker_id=rt.store.client_id, model_family=rt.manifest.family, device=str(rt.model.device),
        expert_format=rt.expert_format, cache_policy=rt.config.policy, predictor=rt.config.predictor,
        uptime_ms=int((time.monotonic() - rt.started) * 1000), store_connected=rt.store_connected,
        active_requests=e.active_requests, queued_requests=e.queued_requests, requests_total=e.requests_total,
        requests_failed=e.requests_failed, requests_cancelled=e.requests_cancelled,
        prompt_tokens_total=e.prompt_tokens_total, generated_tokens_total=e.generated_tokens_total,
        budget_bytes=c.budget_bytes, used_bytes=c.used_bytes, high_water_bytes=c.high_water_bytes,
        resident_experts=t.resident, lookups=t.lookups, hits=t.hits + t.prefetch_hits, misses=t.misses,
        prefetch_hits=t.prefetch_hits, prefetches_issued=t.prefetched, evictions=t.evictions,
        bytes_fetched_shm=f.bytes_fetched_shm, bytes_fetched_grpc=f.bytes_fetched_grpc,
        fetch_wait_ns=t.fetch_wait_ns,
        allocation=rt.config.allocation, top_k=rt.model.args.top_k, total_slots=c.total_slots,
        staging_slots=c.staging_slots, prefetch_width=p.width if p else 0, measured_width=p.measured_width if p else 0,
        lookahead=rt.config.lookahead, int2_tail=rt.int2_tail, layer_compute_ns=p.layer_ns if p else 0.0,
        expert_fetch_ns=p.expert_ns if p else 0.0, prefetch_bytes=t.prefetch_bytes,
        prefetch_wasted_bytes=t.prefetch_wasted_bytes, prefetch_unused_evictions=t.prefetch_unused_evictions,
        prefetch_late_hits=t.prefetch_late_hits, prefetch_dropped=t.prefetch_dropped,
        predictions=sum(v[0] for v in preds.values()), predictions_exact=sum(v[1] for v in preds.values()),
        predicted_routed=sum(v[2] for v in preds.values()), int2_misses=t.int2_misses, int2_bytes=t.int2_bytes,
        demand_bytes=t.demand_bytes, steps_total=e.steps_total,
    )  # fmt: skip
    if include_layers:
        for layer, ls in sorted(c.layers.items()):
            n, exact, routed = preds.get(layer, (0, 0, 0))
            s.layers.add(layer=layer, slots=ls.slots, resident_experts=ls.resident, lookups=ls.lookups,
                         hits=ls.hits + ls.prefetch_hits, misses=ls.misses, prefetch_hits=ls.prefetch_hits,
                         evictions=ls.evictions, prefetches_issued=ls.prefetched,
                         prefetch_unused_evictions=ls.prefetch_unused_evictions, prefetch_bytes=ls.prefetch_bytes,
                         prefetch_wasted_bytes=ls.prefetch_wasted_bytes, prefetch_late_hits=ls.prefetch_late_hits,
                         prefetch_dropped=ls.prefetch_dropped, fetch_wait_ns=ls.fetch_wait_ns, predictions=n,
                         predictions_exact=exact, predicted_routed=routed, int2_misses=ls.int2_misses,
                         demand_bytes=ls.demand_bytes)
    return s


# -- the servicer -----------------------------------------------------------------------------------


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(self, rt: WorkerRuntime):
        self.rt = rt

    @_map_errors
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        req = request_from_pb(request, self.rt)
        if not self.rt.store_connected:
            raise WorkerUnavailableError(f"the expert store at {self.rt.config.store} is unreachable: retry later")
        stream = AsyncRequestStream(self.rt.engine, req)
        async for ev in stream:  # leaving early (client gone: this task is cancelled) cancels the request
            yield event_to_pb(ev)

    @_map_errors
    async def GetStats(self, request: pb.GetWorkerStatsRequest, context: grpc.aio.ServicerContext):
        return stats_to_pb(self.rt, request.include_layers)


# -- serving -----------------------------------------------------------------------------------------


class _Health:
    def __init__(self):
        self.servicer = health.aio.HealthServicer()

    async def set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.servicer.set(name, status)


async def _watch_store(rt: WorkerRuntime, hl: _Health, stop: asyncio.Event) -> None:
    """While the store is marked unreachable (a fetch failed with UNAVAILABLE), poll it; SERVING again
    once it answers."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        if not rt.store_connected:
            try:
                await loop.run_in_executor(None, rt.store.wait_ready, 1.0)
            except FateError:
                pass
            else:
                rt.store_connected = True
                log.info("the expert store at %s is reachable again", rt.config.store)
                if not stop.is_set():
                    await hl.set(True)
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except asyncio.TimeoutError:
            pass


async def serve(cfg: WorkerConfig) -> int:
    loop = asyncio.get_running_loop()
    rt = await loop.run_in_executor(None, load_runtime, cfg)
    metrics = WorkerMetrics(rt.engine.stats, rt.cache.stats, rt.store.counters.snapshot, lambda: rt.store_connected,
                            rt.controller.stats if rt.controller is not None else (lambda: None))
    rt.engine.on_final = metrics.observe_final
    hl = _Health()

    def on_step_error(e: BaseException) -> None:  # compute thread
        # any store failure: NOT_SERVING until its health check answers (at once when it was a one-off)
        if isinstance(e, StoreError) and rt.store_connected:
            log.warning("expert store failure (%s): NOT_SERVING until the store answers", e)
            rt.store_connected = False
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(hl.set(False)))

    rt.engine.on_step_error = on_step_error
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_WorkerServicer_to_server(WorkerServicer(rt), server)
    health_pb2_grpc.add_HealthServicer_to_server(hl.servicer, server)
    try:
        port = server.add_insecure_port(cfg.listen)
    except RuntimeError as e:
        rt.store.close()
        raise ConfigError(f"listen = {cfg.listen!r}: cannot bind ({e})") from None
    if port == 0 and not cfg.listen.startswith("unix:"):
        rt.store.close()
        raise ConfigError(f"listen = {cfg.listen!r}: cannot bind (in use, or not an address of this host)")
    address = cfg.listen if cfg.listen.startswith("unix:") else f"{cfg.listen.rpartition(':')[0]}:{port}"
    rt.engine.start()
    await server.start()
    if cfg.metrics_port:
        metrics.serve(cfg.metrics_port, cfg.metrics_host)
    await hl.set(True)
    sdnotify.ready(f"serving on {address}")
    log.info("worker %s serving on %s", rt.store.client_id, address)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch_store(rt, hl, stop))
    await stop.wait()

    log.info("stopping: draining %d active and %d queued requests (grace %.1f s)",
             rt.engine.stats().active_requests, rt.engine.stats().queued_requests, cfg.grace_s)
    sdnotify.stopping("draining")
    await hl.set(False)
    rt.engine.stop_accepting()
    drained = await loop.run_in_executor(None, rt.engine.drain, cfg.grace_s)
    if not drained:
        log.warning("grace period over: unfinished requests end with UNAVAILABLE")
    await loop.run_in_executor(None, rt.engine.shutdown)
    if rt.recorder is not None:
        await loop.run_in_executor(None, rt.recorder.close)  # writes the session's (or last partial) file
    if rt.controller is not None:
        await loop.run_in_executor(None, rt.controller.close)
    await server.stop(grace=2.0)  # lets the handlers send their final messages or errors
    watcher.cancel()
    rt.store.close()  # releases our leases at the store
    metrics.close()
    log.info("stopped")
    return 0


def run(cfg: WorkerConfig) -> int:
    """Run the server until SIGTERM/SIGINT on uvloop (asyncio's loop where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(serve(cfg))
    return uvloop.run(serve(cfg))
