"""The worker's components, composed in one place: cache, model, predictor, prefetch controller,
trace recorder and engine, each given what it needs at construction.

How one step's data flows (the engine's hooks, gpu_worker.step_hooks): the engine tells the
cache (`tracker`) a step begins, tells the recorder and the controller the step's token rows,
and runs the model's forward with a fan-out of routing observers (per-request attribution,
recorder, controller). At each MoE layer the controller asks the predictor for the next layers
and queues prefetches for the prefetch thread, which calls `ExpertCache.prefetch`; the model
asks the cache for the layer's experts (`iter_experts`). After the forward the cache's step
outcome and the controller's predictions are charged to the requests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from expert_store.model_args import ModelArgs

from .arena import ExpertArena
from .cache import ExpertCache
from .copier import CopyEngine
from .expert_compute import int4_in_place
from .engine import Engine, FinalEvent
from .model import MoEModel, WeightsError
from .policy import make_allocation, make_policy_factory
from .predictors import Predictor, make_predictor
from .prefetch import PrefetchController, measure_width_inputs
from .store_hints import StoreHinter
from .store_client import ExpertFetcher
from .tokenizer import TextTokenizer
from .traces import RecordingPredictor, TraceRecorder, recorder_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """How to compose one worker (the server fills it from WorkerConfig; tests and benchmarks directly)."""

    fmt: str
    """Expert format the cache fetches and computes."""
    budget_bytes: int
    """The expert cache's byte budget (>= one layer's top-k experts)."""
    form: str = "auto"
    """Compute form of cached experts (auto: the device's default for fmt)."""
    policy: str = "lru"
    """Replacement policy per layer: lru, lfu, lfu_decay, arc."""
    lfu_decay: float = 0.9
    """lfu_decay: the per-step decay factor."""
    allocation: str = "uniform"
    """uniform, shallow_favoring or learned:PATH."""
    full_layers: int | None = None
    """shallow_favoring: MoE layers kept whole."""
    staging_slots: int = 0
    """Budget units kept out of the allocation for prefetched experts."""
    tail_fmt: str | None = None
    """Format of the INT2 prefill tail (None: off)."""
    predictor: str = "none"
    """none, cross_layer, eap, prev_token, random."""
    predictor_seed: int | None = None
    """Seed of a random predictor (None: its default)."""
    prefetch_width: int = 0
    """Experts proposed per row and layer; 0: measured at start-up and throttled."""
    lookahead: int = 1
    """Layers ahead the controller predicts (1 or 2)."""
    store_hint_lookahead: int = 2
    """Layers ahead whose predicted experts go to the store as hints (0: none; only with a store client)."""
    throttle: bool = True
    """Narrow the width when predictions go unused."""
    int2_tail_share: float = 0.0
    """Share of a prefill's token assignments sent as INT2 (only with tail_fmt)."""
    copy_engine: bool = True
    """A copier process fills the cache's arena with predicted experts (CPU, shared memory, a predictor)."""
    prefetch_inline: bool = False
    """Copy predicted experts the fetcher holds at memory speed on the compute thread (CPU device only)."""
    prefetch_sync: bool = False
    """Prefetch on the compute thread, to completion (analysis, deterministic tests)."""
    measure_width: bool = True
    """Measure layer compute and expert fetch times at start-up when the width is not fixed."""
    trace_dir: str | Path | None = None
    """Record expert-activation traces here (None: off)."""
    trace_every: int = 0
    """A trace file every N finished requests (0: one per session)."""
    model_name: str = ""
    """Model name written into traces."""
    max_batch_size: int = 8
    """Sequences per decode batch."""
    max_queue: int = 64
    """Requests waiting beyond the batch's free slots."""
    threads: int | None = None
    """torch threads of the compute thread (None: torch's default)."""


@dataclass
class Worker:
    """The composed components."""

    cache: ExpertCache
    model: MoEModel
    predictor: Predictor
    controller: PrefetchController
    recorder: TraceRecorder | None
    engine: Engine


def start_copy_engine(cache: ExpertCache, fetcher: ExpertFetcher) -> CopyEngine | None:
    """An arena for the cache and a copier filling it from the store's RAM tier, when the fetcher has a slot
    directory on this host and the expert format computes in place; None (logged) when not."""
    source = getattr(fetcher, "copy_source", lambda: None)()
    if source is None or cache.form != "int4_fused" or cache.fmt != "int4":
        return None
    a = cache.args
    need = cache.total_slots * (cache.expert_bytes + 64) + (1 << 16)
    try:
        import os
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize < need:
            log.warning("no copy engine: /dev/shm has %d MiB free, the arena needs %d MiB",
                        st.f_bavail * st.f_frsize >> 20, need >> 20)
            return None
        arena = ExpertArena(cache.total_slots, cache.expert_bytes, cache.expert_bytes,
                            lambda t: int4_in_place(t, a.hidden_size, a.expert_intermediate_size))
    except (OSError, ValueError) as e:
        log.warning("no copy engine: %s", e)
        return None
    try:
        engine = CopyEngine(source[0], source[1], arena.name, arena.stride)
    except OSError as e:
        log.warning("no copy engine: %s", e)
        arena.close()
        return None
    cache.attach_arena(arena)
    cache.attach_copy_engine(engine, fetcher.blob_digest_of)  # type: ignore[attr-defined]
    log.info("copy engine: pid %d, arena of %d slots (%.1f MiB)", engine.proc.pid, arena.n_slots,
             arena.size / (1 << 20))
    return engine


def build_worker(args: ModelArgs, dense: Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]],
                 fetcher: ExpertFetcher,
                 tokenizer: TextTokenizer | None | Callable[[], TextTokenizer | None], spec: WorkerSpec,
                 device: torch.device | str = "cpu", *,
                 expert_bytes: dict[str, int] | None = None, on_final: Callable[[FinalEvent], None] | None = None,
                 on_step_error: Callable[[BaseException], None] | None = None) -> Worker:
    """Compose a worker. `dense`: every non-expert tensor (each must be used), or a function returning them,
    called once the cache has accepted the budget (so a bad budget fails before the download); `tokenizer`
    likewise; `expert_bytes`: blob bytes per format (written into traces). Raises FateError subclasses on a
    configuration that cannot work."""
    device = torch.device(device)
    cache = ExpertCache(args, fetcher, spec.fmt, spec.form, device, spec.budget_bytes,
                        policy=make_policy_factory(spec.policy, spec.lfu_decay),
                        allocation=make_allocation(spec.allocation, spec.full_layers),
                        staging_slots=spec.staging_slots, tail_fmt=spec.tail_fmt)
    if callable(dense):
        dense = dense()
    model = MoEModel(args, dict(dense), cache, device=device)
    unused = set(dense) - model.loaded_names
    if unused:
        raise WeightsError(f"dense weights include tensors the runtime does not use: {sorted(unused)[:5]}")
    kw = {} if spec.predictor_seed is None else {"seed": spec.predictor_seed}
    predictor: Predictor = make_predictor(spec.predictor, routers=[model.layers[i].router for i in args.moe_layers],
                                          num_moe_layers=args.num_moe_layers, num_experts=args.num_experts, **kw)
    recorder = None
    if spec.trace_dir:
        recorder = recorder_for(args, spec.trace_dir, spec.trace_every, model_name=spec.model_name,
                                expert_bytes=expert_bytes, cache=cache, predictor_name=predictor.name)
        predictor = RecordingPredictor(predictor, recorder)  # type: ignore[assignment]
        log.info("recording expert-activation traces into %s", spec.trace_dir)
    copier = start_copy_engine(cache, fetcher) if spec.copy_engine and device.type == "cpu" \
        and predictor.name != "none" and not spec.prefetch_sync else None
    send_hint = getattr(fetcher, "prefetch_hint", None)  # a store client; a pack reader has no store
    hints = StoreHinter(send_hint) if send_hint is not None and spec.store_hint_lookahead > 0 \
        and predictor.name != "none" else None
    controller = PrefetchController(args, cache, predictor, width=spec.prefetch_width, lookahead=spec.lookahead,
                                    throttle=spec.throttle,
                                    int2_tail_share=spec.int2_tail_share if spec.tail_fmt else 0.0,
                                    synchronous=spec.prefetch_sync, store_hints=hints,
                                    inline=(spec.prefetch_inline or copier is not None) and device.type == "cpu",
                                    store_lookahead=spec.store_hint_lookahead if hints else 0)
    if controller.enabled and not spec.prefetch_width and spec.measure_width:
        layer_ns, expert_ns = measure_width_inputs(model, cache)
        controller.width.observe_layer_ns(layer_ns)
        controller.width.observe_expert_ns(expert_ns)
        log.info("prefetch width %d: layer compute %.0f us (1 token), expert fetch + build %.0f us",
                 controller.width.width, layer_ns / 1e3, expert_ns / 1e3)
    if callable(tokenizer):
        tokenizer = tokenizer()
    engine = Engine(model, tokenizer, max_batch_size=spec.max_batch_size, max_queue=spec.max_queue,
                    tracker=cache, controller=controller, recorder=recorder, on_final=on_final,
                    on_step_error=on_step_error, num_threads=spec.threads)
    return Worker(cache, model, predictor, controller, recorder, engine)
