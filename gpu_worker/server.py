"""The worker server: `python -m gpu_worker serve --store ADDR --budget-bytes N --listen ...`.

Start-up (blocking, before the port opens): wait for the store's health SERVING,
read its manifest, size the expert cache (a budget below one layer's top-k experts
is a start-up error naming the minimum), stream the dense weights and tokenizer,
build the model with the cache as its expert provider. Then grpc.aio on uvloop
serves `moe.v1.Worker` and the standard health service (SERVING while the model is
loaded and the store reachable), sd_notify READY=1.

Errors become status codes in one place (`status_for`, applied by the edge
interceptor, expert_store/edge.py, which also checks the bearer token and turns
undecodable request bytes into INVALID_ARGUMENT): bad input is INVALID_ARGUMENT, a
prompt + max_new_tokens beyond the context (or a prompt over max_prompt_bytes)
OUT_OF_RANGE, a full queue RESOURCE_EXHAUSTED, an unreachable store or a worker
shutting down UNAVAILABLE, a corrupt blob DATA_LOSS, a store that came back with
another pack FAILED_PRECONDITION; INTERNAL only for bugs.

Bounded work before admission: the request message is capped by gRPC
(max_request_bytes), the prompt's bytes and the stop strings are checked before
tokenizing, and the conversion (tokenizing included) runs in a thread, so the
event loop keeps streaming other requests' tokens.

Staying alive: a store restart within store_retry_s is waited out by the fetches
themselves (requests keep their KV state). If the compute thread dies, or the store
comes back serving another pack, health goes NOT_SERVING and the process exits
non-zero (1, or 3 for a changed pack) so its supervisor restarts it; under systemd
the compute loop pings the watchdog (WatchdogSec=) on every turn.

SIGTERM/SIGINT: health NOT_SERVING, sd_notify STOPPING=1, new requests get
UNAVAILABLE, in-flight ones get `grace_s` to finish and otherwise end with
UNAVAILABLE; then the store leases are released and the process exits 0.
"""

from __future__ import annotations

import asyncio
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
from expert_store.edge import ClientSecurity, EdgeInterceptor, ServerSecurity, bind
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
from .expert_compute import accept_pack_layout, default_compute_form
from .generate import SamplingError, SamplingParams
from .metrics import WorkerMetrics
from .model_info import load_template_info
from .model import MoEModel, TokenRangeError, WeightsError
from .prefetch import PrefetchController
from .runtime import FORMAT_PREFERENCE, pick_device
from .store_client import StoreClient
from .store_protocol import PackChangedError, StoreError, StoreManifest, StoreUnavailableError
from .tokenizer import TextTokenizer, TokenizerError
from .traces import TraceRecorder
from .wiring import WorkerSpec, build_worker

log = logging.getLogger("gpu_worker.server")

SERVICE_NAME = "moe.v1.Worker"
EXIT_ENGINE_DIED, EXIT_PACK_CHANGED = 1, 3
_PROMPT_BYTES_PER_TOKEN = 32  # max_prompt_bytes = 0: this many bytes per token of context
_PACK_CHECK_S = 5.0  # how often an idle worker compares the store's pack id with its own


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
    if isinstance(e, PackChangedError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    if isinstance(e, (StoreUnavailableError, EngineStoppedError, WorkerUnavailableError)):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    if isinstance(e, ChecksumError):
        return grpc.StatusCode.DATA_LOSS, str(e)
    if isinstance(e, StoreError):  # the store refused a fetch: a dependency failed, not our input
        return grpc.StatusCode.UNAVAILABLE, f"expert store error: {e}"
    if isinstance(e, FateError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}): {e}"


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
    security = ClientSecurity.from_files(tls=bool(cfg.store_tls_ca), ca=cfg.store_tls_ca, cert=cfg.store_tls_cert,
                                         key=cfg.store_tls_key, token_file=cfg.store_auth_token_file)
    store = StoreClient(cfg.store, client_id=cfg.worker_id or None, transport=cfg.transport,  # type: ignore[arg-type]
                        retry_window_s=cfg.store_retry_s, security=security)
    try:
        log.info("waiting for the expert store at %s (up to %.0f s, store_wait_s)", cfg.store, cfg.store_wait_s)
        store.wait_ready(cfg.store_wait_s)
        m = store.manifest()
        accept_pack_layout(m.pack_manifest, device)  # int4 blobs in this CPU kernel's layout, or a warning
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
                          allocation=cfg.allocation,
                          full_layers=None if cfg.full_layers == "auto" else int(cfg.full_layers), staging_slots=staging,
                          tail_fmt=tail_fmt, predictor=cfg.predictor, prefetch_width=cfg.prefetch_width,
                          lookahead=cfg.lookahead, store_hint_lookahead=cfg.store_hint_lookahead, throttle=cfg.throttle, int2_tail_share=cfg.int2_tail,
                          prefetch_sync=cfg.prefetch_sync, prefetch_inline=cfg.prefetch_inline, copy_engine=cfg.copy_engine, trace_dir=cfg.trace_dir, trace_every=cfg.trace_every,
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
    cfg, context = rt.config, rt.model.args.max_position_embeddings
    which = r.WhichOneof("input")
    if which is None:
        raise RequestError("no input: set prompt (text) or token_ids")
    check_stop_strings(r.stop_strings, cfg)
    if len(r.stop_token_ids) > cfg.max_stop_strings:
        raise RequestError(f"{len(r.stop_token_ids)} stop token ids; at most {cfg.max_stop_strings}")
    if which == "prompt":
        if not r.prompt:
            raise RequestError("the prompt is empty")
        if rt.tokenizer is None:
            raise RequestError("this model has no tokenizer: send token_ids instead of a prompt")
        limit = cfg.max_prompt_bytes or _PROMPT_BYTES_PER_TOKEN * context
        if len(r.prompt) > limit or len(r.prompt.encode("utf-8", "surrogatepass")) > limit:  # before tokenizing
            raise ContextLengthError(f"the prompt has {len(r.prompt.encode('utf-8', 'surrogatepass'))} bytes; at most "
                                     f"{limit} (max_prompt_bytes; the model's context is {context} tokens)")
        ids = rt.tokenizer.encode(r.prompt)
    else:
        if len(r.token_ids.ids) > context:
            raise ContextLengthError(f"{len(r.token_ids.ids)} prompt token ids; the model's context is {context}")
        ids = list(r.token_ids.ids)
    if not ids:
        raise RequestError("the prompt is empty")
    if r.top_p < 0.0 or r.top_p > 1.0 or r.top_p != r.top_p:
        raise SamplingError(f"top_p must be in [0, 1] (0 or 1: no nucleus cut), got {r.top_p}")
    max_new = r.max_new_tokens
    if max_new == 0:  # the worker's default: like an explicit value, it must fit the context with the prompt
        max_new = cfg.default_max_new_tokens
        if len(ids) + max_new > context:
            raise ContextLengthError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new}, the worker's default) exceeds the model's "
                f"context of {context} tokens: shorten the prompt or send max_new_tokens <= {max(context - len(ids), 0)}")
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


def check_stop_strings(stops, cfg: WorkerConfig) -> None:
    if len(stops) > cfg.max_stop_strings:
        raise RequestError(f"{len(stops)} stop strings; at most {cfg.max_stop_strings} (max_stop_strings)")
    for s in stops:
        if len(s) > cfg.max_stop_string_bytes or len(s.encode("utf-8", "surrogatepass")) > cfg.max_stop_string_bytes:
            raise RequestError(f"a stop string is longer than {cfg.max_stop_string_bytes} bytes "
                               f"(max_stop_string_bytes)")


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
        store_hints_sent=p.store_hints.sends if p else 0, store_hint_experts=p.store_hints.experts if p else 0,
        store_hint_errors=p.store_hints.errors if p else 0, fetched_tier_ram=getattr(f, "tier_ram", 0),
        fetched_tier_nvme=getattr(f, "tier_nvme", 0), fetched_tier_ram_demand=getattr(f, "tier_ram_demand", 0),
        fetched_tier_nvme_demand=getattr(f, "tier_nvme_demand", 0),
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

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        if self.rt.store.pack_changed:
            raise PackChangedError(f"the expert store at {self.rt.config.store} serves another pack than this "
                                   f"worker loaded: the worker is restarting")
        req = await asyncio.to_thread(request_from_pb, request, self.rt)  # tokenizing off the event loop
        if not self.rt.store_connected:
            raise WorkerUnavailableError(f"the expert store at {self.rt.config.store} is unreachable: retry later")
        stream = AsyncRequestStream(self.rt.engine, req)
        async for ev in stream:  # leaving early (client gone: this task is cancelled) cancels the request
            yield event_to_pb(ev)

    async def GetStats(self, request: pb.GetWorkerStatsRequest, context: grpc.aio.ServicerContext):
        return stats_to_pb(self.rt, request.include_layers)

    # -- model info for front ends (the HTTP gateway): read once from the pack's tokenizer files ----
    _model_info: pb.ModelInfo | None = None

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext):
        if self._model_info is None:
            rt, m = self.rt, self.rt.manifest
            t = await asyncio.get_running_loop().run_in_executor(
                None, load_template_info, m.tokenizer_files, rt.store.files)
            self._model_info = pb.ModelInfo(
                model_name=str(m.pack_manifest.get("model", {}).get("name", "") or m.family), pack_id=m.pack_id,
                family=m.family, max_context_tokens=rt.model.args.max_position_embeddings,
                vocab_size=rt.model.args.vocab_size, has_tokenizer=rt.tokenizer is not None,
                chat_template=t.chat_template, named_chat_templates=t.named_chat_templates,
                eos_token_ids=list(rt.model.args.eos_token_ids),
                default_max_new_tokens=rt.config.default_max_new_tokens, **t.special_tokens)
        return self._model_info

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext):
        if self.rt.tokenizer is None:
            raise TokenizerError("this model has no tokenizer: send token ids")
        return pb.TokenizeResponse(ids=self.rt.tokenizer.encode(request.text, request.add_special_tokens))


# -- serving -----------------------------------------------------------------------------------------


class _Health:
    def __init__(self):
        self.servicer = health.aio.HealthServicer()

    async def set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.servicer.set(name, status)


async def _watch(rt: WorkerRuntime, hl: _Health, stop: asyncio.Event, exit_code: list[int]) -> None:
    """Every half second: a dead compute thread or a changed pack stops the process (non-zero exit, so
    its supervisor restarts it); while the store is marked unreachable (a fetch failed for good), poll it
    and say SERVING again once it answers. Every few seconds the store's pack id is compared with ours,
    so a store restarted with another pack is noticed even while no request fetches."""
    loop = asyncio.get_running_loop()
    next_pack_check = time.monotonic() + _PACK_CHECK_S
    while not stop.is_set():
        if rt.store_connected and time.monotonic() >= next_pack_check:
            next_pack_check = time.monotonic() + _PACK_CHECK_S
            try:
                await loop.run_in_executor(None, rt.store.check_pack_id, rt.store.rpc_timeout_s)
            except (PackChangedError, grpc.RpcError):
                pass  # a changed pack sets rt.store.pack_changed; an unreachable store is the fetches' business
        if not rt.engine.alive and not stop.is_set():
            log.error("the compute thread died (%s): NOT_SERVING, exiting %d so the supervisor restarts the worker",
                      rt.engine.crashed, EXIT_ENGINE_DIED)
            exit_code[0] = EXIT_ENGINE_DIED
            await hl.set(False)
            stop.set()
            return
        if rt.store.pack_changed:
            log.error("the expert store at %s serves another pack: NOT_SERVING, exiting %d so the supervisor "
                      "restarts the worker on the new pack", rt.config.store, EXIT_PACK_CHANGED)
            exit_code[0] = EXIT_PACK_CHANGED
            await hl.set(False)
            stop.set()
            return
        if not rt.store_connected:
            try:
                await loop.run_in_executor(None, rt.store.wait_ready, 1.0)
                await loop.run_in_executor(None, rt.store.revalidate, rt.store.rpc_timeout_s)
            except PackChangedError:
                continue
            except (FateError, grpc.RpcError):
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
    security = ServerSecurity.from_files(cfg.tls_cert or None, cfg.tls_key or None, cfg.tls_client_ca or None,
                                         cfg.auth_token_file or None)
    rt = await loop.run_in_executor(None, load_runtime, cfg)
    metrics = WorkerMetrics(rt.engine.stats, rt.cache.stats, rt.store.counters.snapshot, lambda: rt.store_connected,
                            rt.controller.stats if rt.controller is not None else (lambda: None))
    rt.engine.on_final = metrics.observe_final
    hl = _Health()

    def on_step_error(e: BaseException) -> None:  # compute thread
        # the store stayed unreachable past store_retry_s: NOT_SERVING until its health check answers
        if isinstance(e, StoreError) and not isinstance(e, PackChangedError) and rt.store_connected:
            log.warning("expert store failure (%s): NOT_SERVING until the store answers", e)
            rt.store_connected = False
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(hl.set(False)))

    rt.engine.on_step_error = on_step_error
    watchdog = sdnotify.Watchdog()
    rt.engine.on_heartbeat = watchdog.ping
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", cfg.max_request_bytes)],
        interceptors=[EdgeInterceptor(status_for, security.token, log)],
    )
    pb_grpc.add_WorkerServicer_to_server(WorkerServicer(rt), server)
    health_pb2_grpc.add_HealthServicer_to_server(hl.servicer, server)
    listener = None
    try:
        listener = bind(server, cfg.listen, security, "listen")
        if cfg.metrics_port:
            try:
                metrics.serve(cfg.metrics_port, cfg.metrics_host)
            except OSError as e:
                raise ConfigError(f"metrics_port = {cfg.metrics_port}: cannot listen on {cfg.metrics_host}:"
                                  f"{cfg.metrics_port} ({e.strerror}): choose another port, or 0 for no metrics") from None
    except BaseException:
        await server.stop(None)
        if listener is not None:
            listener.remove_socket()
        rt.store.close()
        raise
    rt.engine.start()
    await server.start()
    await hl.set(True)
    sdnotify.ready(f"serving on {listener.address}")
    log.info("worker %s serving on %s%s", rt.store.client_id, listener.address,
             f" (watchdog ping every {watchdog.interval_s / 3:.1f} s)" if watchdog.enabled else "")

    stop = asyncio.Event()
    exit_code = [0]
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch(rt, hl, stop, exit_code))
    await stop.wait()

    log.info("stopping: draining %d active and %d queued requests (grace %.1f s)",
             rt.engine.stats().active_requests, rt.engine.stats().queued_requests, cfg.grace_s)
    sdnotify.stopping("draining")
    await hl.set(False)
    rt.engine.stop_accepting()
    drained = await loop.run_in_executor(None, rt.engine.drain, cfg.grace_s if rt.engine.alive else 0.0)
    if not drained:
        log.warning("grace period over: unfinished requests end with UNAVAILABLE")
    await loop.run_in_executor(None, rt.engine.shutdown)
    if rt.recorder is not None:
        await loop.run_in_executor(None, rt.recorder.close)  # writes the session's (or last partial) file
    if rt.controller is not None:
        await loop.run_in_executor(None, rt.controller.close)
    await server.stop(grace=2.0)  # lets the handlers send their final messages or errors
    listener.remove_socket()
    watcher.cancel()
    rt.store.close()  # releases our leases at the store
    metrics.close()
    log.info("stopped" + (f" (exit status {exit_code[0]})" if exit_code[0] else ""))
    return exit_code[0]


def run(cfg: WorkerConfig) -> int:
    """Run the server until SIGTERM/SIGINT on uvloop (asyncio's loop where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(serve(cfg))
    return uvloop.run(serve(cfg))
