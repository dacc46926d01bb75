"""The prefetch pipeline: predictions made during the forward become prefetches run by a thread.

`PrefetchController` sits between the model, the predictor and the cache:
  - the engine tells it each forward step's token rows (request ids, prefill or decode);
  - as the model's `RoutingObserver` it sees, at every MoE layer m, the gate input before the
    router runs: it asks the predictor for layers m + 1 (and m + 2 with a lookahead of two)
    and queues one prefetch job per target layer; then it sees layer m's routing: it feeds
    the predictor, scores the prediction made for m, and names the INT2 tail of a prefill;
  - at the end of the step it hands the engine per-request prediction counts and adjusts
    the width.
`Prefetcher` is the thread: a priority queue of jobs (the nearest layer first; a newer
job for a layer replaces a queued older one), a job dropped once the compute has passed
its layer, no fetch started while the compute thread handles misses (demand outranks
prefetch; the store also serves demand first), and jobs that found no room wait for room
(the current layer's trim frees it) until their layer is reached.

Width (experts per token row the predictor proposes): `--prefetch-width N` fixes it;
otherwise max(top_k, floor(layer compute time / one expert's fetch + build time)),
both measured at start-up and tracked online by EWMAs (layer time between consecutive
MoE layers' gate inputs, minus the compute thread's fetch wait; fetch time per expert of
each prefetch), capped at the number of experts. Prefill rows always use top_k (Fate's
prefill): their proposals, counted over all prompt tokens, rank the fetch by popularity.
The rows' proposals are merged into one ranked list per layer: experts in more rows'
top-k first, then in more rows' lists, then by best rank, then by id.

Store hints (`StoreHinter`, with a store client): at each MoE layer m the controller also names
the predicted experts of layers m + 1 .. m + `store_lookahead` that are not resident here, in one
batch, to the store's Prefetch RPC, which promotes them from its NVMe tier into its RAM tier
(demand reads first) so that the worker's miss finds them there. The hint thread sends them;
`submit` never blocks the compute thread: batches queued while a call is in flight are merged
into the next one, and errors are counted, not raised.

Throttle (on unless fixed width): every `THROTTLE_EVERY` steps, with EWMAs over steps of
precision (prefetched experts used / prefetched experts landed) and backlog (experts of
jobs dropped stale / experts queued), the width is narrowed by one (not below top_k)
when precision < 0.25 or backlog > 0.5, and widened back by one (not above the measured
width) when precision > 0.5 and backlog < 0.2.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from expert_store.model_args import ModelArgs

from .policy.predictors import Predictor, int2_tail, merge_ranked
from .store_hints import BlobKey, StoreHinter, StoreHintStats

if TYPE_CHECKING:
    from .cache import ExpertCache, StepOutcome
    from .model import MoEModel

log = logging.getLogger(__name__)

THROTTLE_EVERY = 8
MAX_ROOM_WAITS = 40  # a job waits for room this many times (room_wait_s each) at most, then is given up
EWMA_ALPHA = 0.1


# -- width ------------------------------------------------------------------------------------


class WidthController:
    """The per-row prediction width: fixed, or measured (EWMAs) and throttled (module docstring)."""

    def __init__(self, top_k: int, num_experts: int, fixed: int = 0, throttle: bool = True,
                 alpha: float = EWMA_ALPHA):
        self.top_k, self.num_experts = top_k, num_experts
        self.fixed = min(fixed, num_experts) if fixed > 0 else 0
        self.throttle = throttle and not self.fixed
        self.alpha = alpha
        self.layer_ns: float | None = None  # EWMA of one MoE layer's compute time (stalls excluded)
        self.expert_ns: float | None = None  # EWMA of one expert's fetch + build time
        self.cut = 0  # the throttle's narrowing
        self.precision: float | None = None  # EWMA over steps
        self.backlog: float | None = None
        self._steps = 0

    def _ewma(self, old: float | None, x: float) -> float:
        return x if old is None else old + self.alpha * (x - old)

    def observe_layer_ns(self, ns: float) -> None:
        if ns > 0:
            self.layer_ns = self._ewma(self.layer_ns, ns)

    def observe_expert_ns(self, ns: float) -> None:
        if ns > 0:
            self.expert_ns = self._ewma(self.expert_ns, ns)

    @property
    def measured(self) -> int:
        """max(top_k, floor(layer time / expert time)), capped at the number of experts."""
        if self.fixed:
            return self.fixed
        if not self.layer_ns or not self.expert_ns:
            return self.top_k
        return max(self.top_k, min(self.num_experts, int(self.layer_ns // self.expert_ns)))

    @property
    def width(self) -> int:
        m = self.measured
        return max(min(self.top_k, m), m - self.cut)

    def on_step(self, landed: int, used: int, queued: int, dropped: int) -> None:
        if not self.throttle:
            return
        if landed:
            self.precision = self._ewma(self.precision, min(1.0, used / landed))
        if queued:
            self.backlog = self._ewma(self.backlog, dropped / queued)
        self._steps += 1
        if self._steps % THROTTLE_EVERY:
            return
        p = self.precision if self.precision is not None else 1.0
        b = self.backlog if self.backlog is not None else 0.0
        if (p < 0.25 or b > 0.5) and self.width > self.top_k:
            self.cut += 1
        elif p > 0.5 and b < 0.2 and self.cut > 0:
            self.cut -= 1


# -- the prefetch thread --------------------------------------------------------------------------


@dataclass(order=True)
class _Job:
    step: int
    target: int  # MoE layer index (priority: nearest first)
    seq: int
    layer: int = field(compare=False)  # decoder layer
    experts: list[int] = field(compare=False)
    lookahead: int = field(compare=False, default=1)
    room_waits: int = field(compare=False, default=0)


@dataclass
class PrefetcherStats:
    jobs: int = 0
    jobs_stale: int = 0  # dropped: the compute had passed their layer
    jobs_replaced: int = 0  # superseded by a newer job for the same layer and step
    experts_queued: int = 0
    experts_dropped: int = 0  # of jobs dropped stale (not yet resident)
    room_waits: int = 0
    errors: int = 0


class Prefetcher:
    """The prefetch thread. Waits on the cache's `prefetch_cond` (the cache's lock): a new job wakes it, and
    while it says it waits for the cache (`prefetcher_waiting`), a freed unit or an idle compute thread does."""

    def __init__(self, cache: "ExpertCache", width: WidthController | None = None, room_wait_s: float = 0.05):
        self.cache = cache
        self.width = width
        self.room_wait_s = room_wait_s
        self.stats = PrefetcherStats()
        self._cond = cache.prefetch_cond  # the cache's lock guards this queue too
        self._heap: list[_Job] = []
        self._seq = itertools.count()
        self._stop = False
        self._busy = False  # a job is being fetched (outside the lock)
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def submit(self, step: int, target: int, layer: int, experts: list[int], lookahead: int = 1) -> None:
        if not experts:
            return
        with self._cond:
            keep = []
            for j in self._heap:
                if j.step != step:
                    self._drop(j)  # an older step's: stale
                elif j.target == target:
                    self.stats.jobs_replaced += 1
                else:
                    keep.append(j)
            self._heap = keep
            heapq.heapify(self._heap)
            heapq.heappush(self._heap, _Job(step, target, next(self._seq), layer, experts, lookahead))
            self.stats.jobs += 1
            self.stats.experts_queued += len(experts)
            self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            return not self._heap and not self._busy

    def close(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._heap.clear()
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _pop(self) -> _Job | None:
        """The next job that is not stale (lock held); waits for one."""
        while not self._stop:
            while self._heap:
                job = heapq.heappop(self._heap)
                if self.cache.passed(job.layer, job.step):
                    self._drop(job)
                    continue
                return job
            self._cond.wait(1.0)
        return None

    def _drop(self, job: _Job) -> None:
        self.stats.jobs_stale += 1
        left = self.cache.not_resident(job.layer, job.experts)
        self.stats.experts_dropped += left
        self.cache.count_dropped(job.layer, left)

    def _run(self) -> None:
        torch.set_num_threads(1)  # building experts must not fight the compute thread for cores
        while True:
            with self._cond:
                job = self._pop()
                if job is None:
                    return
                # demand outranks prefetch: start nothing while the compute thread fetches
                while self.cache.demand_fetching and not self._stop:
                    self._wait_cache(self.room_wait_s)
                if self._stop:
                    return
                if self.cache.passed(job.layer, job.step):
                    self._drop(job)
                    continue
                self._busy = True
            try:
                res = self.cache.prefetch(job.layer, job.experts, step=job.step)
            except Exception:  # noqa: BLE001 - a failed prefetch is not an error: demand will fetch
                log.debug("prefetch of layer %d failed", job.layer, exc_info=True)
                with self._cond:
                    self.stats.errors += 1
                    self._busy = False
                continue
            if res.inserted and self.width is not None:
                self.width.observe_expert_ns(res.fetch_ns / len(res.inserted))
            with self._cond:
                if res.no_room and not res.stale and not self._stop:
                    # wait for a unit to free up (the current layer's trim), then try again unless a newer
                    # job for this layer arrived meanwhile (a stale one is dropped when popped)
                    self.stats.room_waits += 1
                    self._wait_cache(self.room_wait_s, lambda: self._stop or self._heap_has(job.step, job.target)
                                     or self.cache.has_free_unit or self.cache.passed(job.layer, job.step))
                    job.room_waits += 1
                    if not self._heap_has(job.step, job.target) and job.room_waits < MAX_ROOM_WAITS:
                        heapq.heappush(self._heap, job)
                self._busy = False

    def _wait_cache(self, timeout_s: float, predicate=None) -> None:
        """Wait (lock held) until the cache changes for us: the compute thread wakes us only meanwhile."""
        self.cache.prefetcher_waiting = True
        try:
            if predicate is None:
                self._cond.wait(timeout_s)
            else:
                self._cond.wait_for(predicate, timeout_s)
        finally:
            self.cache.prefetcher_waiting = False

    def _heap_has(self, step: int, target: int) -> bool:
        return any(j.step == step and j.target == target for j in self._heap)


# -- the controller -------------------------------------------------------------------------------


@dataclass
class LayerPredictionCounts:
    predictions: int = 0  # token rows a prediction was made for (this layer)
    exact: int = 0  # of which the predicted top-k equals the routed top-k (as sets)
    routed_in: int = 0  # routed experts inside the row's prediction list

    def add(self, other: "LayerPredictionCounts") -> None:
        self.predictions += other.predictions
        self.exact += other.exact
        self.routed_in += other.routed_in


@dataclass
class StepPredictions:
    """Per request, per decoder layer: what the predictions of this step scored."""

    by_request: dict[int, dict[int, LayerPredictionCounts]] = field(default_factory=dict)


@dataclass
class ControllerStats:
    width: int
    measured_width: int
    layer_ns: float
    expert_ns: float
    lookahead: int
    layers: dict[int, LayerPredictionCounts]
    prefetcher: PrefetcherStats
    store_lookahead: int = 0
    store_hints: StoreHintStats = field(default_factory=StoreHintStats)


class PrefetchController:
    """RoutingObserver + the engine's step hooks; see the module docstring."""

    def __init__(self, args: ModelArgs, cache: "ExpertCache", predictor: Predictor, *, width: int = 0,
                 lookahead: int = 1, throttle: bool = True, int2_tail_share: float = 0.0,
                 start_thread: bool = True, synchronous: bool = False,
                 store_hints: StoreHinter | None = None, store_lookahead: int = 0, inline: bool = False):
        """synchronous: no thread; each prefetch runs to completion on the compute thread when it is
        proposed (before layer m's experts run): the hit rate of an infinitely fast link, for analysis
        and deterministic tests (the tokens are the same either way). store_hints: where the predicted
        experts of layers m + 1 .. m + store_lookahead go as store hints (None or 0: none). inline: copy the
        predicted experts the cache's fetcher holds at memory speed (`in_memory`) on the compute thread when
        they are predicted; the rest go to the thread (module docstring)."""
        if lookahead not in (1, 2):
            raise ValueError(f"lookahead must be 1 or 2, got {lookahead}")
        a = args
        self.args = a
        self.cache = cache
        self.predictor = predictor
        self.lookahead = lookahead
        self.int2_tail_share = int2_tail_share if cache.tail_fmt is not None else 0.0
        self.moe_layers = list(a.moe_layers)
        self._moe_index = {layer: m for m, layer in enumerate(self.moe_layers)}
        self.width = WidthController(a.top_k, a.num_experts, fixed=width, throttle=throttle)
        self.enabled = predictor.name != "none"
        self.synchronous = synchronous
        self._in_memory = getattr(getattr(cache, "fetcher", None), "in_memory", None)
        self.inline = inline and not synchronous and self._in_memory is not None
        self.inline_experts = 0  # experts copied inline (on the compute thread)
        self.copied_experts = 0  # experts sent to the copy engine
        self.prefetcher = Prefetcher(cache, self.width) if self.enabled and start_thread and not synchronous else None
        if store_lookahead < 0:
            raise ValueError(f"store_lookahead must be >= 0, got {store_lookahead}")
        self.store_lookahead = store_lookahead if self.enabled and store_hints is not None else 0
        self.store_hints = store_hints if self.store_lookahead else None
        self._hinted: set[tuple[int, int]] = set()  # (decoder layer, expert) hinted this step
        self._rids: list[int] = []
        self._prefill: list[bool] = []
        self._any_prefill = False
        self._any_decode = False
        self._step = 0
        self._preds: dict[int, list[list[int]]] = {}  # moe layer -> per-row lists (the latest, lookahead 1)
        self._counts = StepPredictions()
        self._layer_counts = {layer: LayerPredictionCounts() for layer in a.moe_layers}  # decoder layer -> totals
        self._t_gate: float | None = None
        self._wait_at_gate = 0
        self._sync_ns = 0  # time spent in synchronous prefetches (not layer compute)
        self._queued = 0
        self._dropped_before = 0
        self._lock = threading.Lock()  # guards _layer_counts for stats readers

    # -- engine hooks ----------------------------------------------------------------------------

    def start_request(self, rid: int) -> None:
        self.predictor.start_request(rid)

    def end_request(self, rid: int) -> None:
        self.predictor.end_request(rid)

    def begin_step(self, rids: Sequence[int], prefill: Sequence[bool]) -> None:
        """This step's token rows, in the forward's order (after the cache's begin_step)."""
        self._rids = list(rids)
        self._prefill = list(prefill)
        self._any_prefill = any(self._prefill)
        self._any_decode = not all(self._prefill)
        self._step = self.cache.step_seq
        self._preds.clear()
        self._counts = StepPredictions()
        self._t_gate = None
        self._queued = 0
        self._hinted.clear()

    def end_step(self, outcome: "StepOutcome | None" = None) -> StepPredictions:
        out, self._counts = self._counts, StepPredictions()
        if self.prefetcher is not None and outcome is not None:
            s = self.prefetcher.stats
            dropped = s.experts_dropped - self._dropped_before
            self._dropped_before = s.experts_dropped
            self.width.on_step(outcome.prefetches_issued, outcome.count("prefetch_hits"), self._queued, dropped)
        self._t_gate = None
        return out

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        close = getattr(self.cache, "close_copies", None)
        if close is not None:
            close()
        if self.store_hints is not None:
            self.store_hints.close()

    def stats(self) -> ControllerStats:
        with self._lock:
            layers = {k: LayerPredictionCounts(v.predictions, v.exact, v.routed_in)
                      for k, v in self._layer_counts.items()}
        w = self.width
        return ControllerStats(w.width if self.enabled else 0, w.measured if self.enabled else 0, w.layer_ns or 0.0,
                               w.expert_ns or 0.0, self.lookahead, layers,
                               PrefetcherStats(**vars(self.prefetcher.stats)) if self.prefetcher else PrefetcherStats(),
                               self.store_lookahead,
                               StoreHintStats(**vars(self.store_hints.stats)) if self.store_hints else StoreHintStats())

    # -- RoutingObserver -----------------------------------------------------------------------------

    def on_gate_input(self, layer: int, gate_input: torch.Tensor) -> None:
        m = self._moe_index[layer]
        now = time.perf_counter_ns()
        wait = self._layer_wait_ns() + self._sync_ns
        if self._t_gate is not None and not self._any_prefill:  # decode steps set the width
            self.width.observe_layer_ns(now - self._t_gate - (wait - self._wait_at_gate))
        self._t_gate, self._wait_at_gate = now, wait
        if not self.enabled or not self._rids or len(self._rids) != gate_input.shape[0]:
            return
        k = self.args.top_k
        w = self.width.width
        call_width = max(w if self._any_decode else 0, k if self._any_prefill else 0)
        predicted: dict[int, list[list[int]]] = {}
        for d in range(1, self.lookahead + 1):
            t = m + d
            if t >= len(self.moe_layers):
                break
            lists = self.predictor.predict(t, self._rids, call_width,
                                           gate_input if self.predictor.needs_gate_input else None)
            if self._any_prefill:
                lists = [row[:k] if pre else row for row, pre in zip(lists, self._prefill)]
            predicted[t] = lists
            if d == 1:
                self._preds[t] = lists
            ranked = merge_ranked(lists, k)
            if ranked and self.prefetcher is not None:
                layer_t = self.moe_layers[t]
                resident = set(self.cache.resident(layer_t))
                todo = [e for e in ranked if e not in resident]
                if todo and self.inline:
                    fmt = self.cache.fmt
                    fast = {e for e, ok in zip(todo, self._in_memory([(layer_t, e, fmt) for e in todo])) if ok}
                    if fast and self.cache.copy_engine is not None:  # the copier fills them meanwhile
                        sent = self.cache.issue_copies(layer_t, ranked, self._step, fast)
                        self.copied_experts += len(sent)
                        todo = [e for e in todo if e not in fast]
                    elif fast:
                        t0 = time.perf_counter_ns()
                        res = self.cache.prefetch(layer_t, ranked, step=self._step, fetch_only=fast)
                        self._sync_ns += time.perf_counter_ns() - t0
                        self.inline_experts += len(res.inserted)
                        todo = [e for e in todo if e not in fast]
                if todo:
                    self._queued += len(todo)
                    self.prefetcher.submit(self._step, t, layer_t, ranked, lookahead=d)
            elif ranked and self.synchronous:
                t0 = time.perf_counter_ns()
                self.cache.prefetch(self.moe_layers[t], ranked, step=self._step)
                self._sync_ns += time.perf_counter_ns() - t0
        if self.store_hints is not None:
            self._hint_store(m, predicted, call_width, gate_input)

    def _hint_store(self, m: int, predicted: dict[int, list[list[int]]], width: int,
                    gate_input: torch.Tensor) -> None:
        """One batch of store hints: the predicted experts of layers m + 1 .. m + store_lookahead not
        resident here and not hinted yet this step. Layers beyond the prefetch lookahead are predicted
        with the bare predictor (a trace records only what the prefetches used)."""
        k = self.args.top_k
        bare = getattr(self.predictor, "inner", self.predictor)
        keys: list[BlobKey] = []
        for d in range(1, self.store_lookahead + 1):
            t = m + d
            if t >= len(self.moe_layers):
                break
            lists = predicted.get(t)
            if lists is None:
                lists = bare.predict(t, self._rids, width, gate_input if bare.needs_gate_input else None)
                if self._any_prefill:
                    lists = [row[:k] if pre else row for row, pre in zip(lists, self._prefill)]
            layer = self.moe_layers[t]
            resident = set(self.cache.resident(layer))
            for e in merge_ranked(lists, k):
                if e not in resident and (layer, e) not in self._hinted:
                    self._hinted.add((layer, e))
                    keys.append((layer, e, self.cache.fmt))
        if keys and self._in_memory is not None:  # already in the store's RAM: nothing to promote
            keys = [key for key, warm in zip(keys, self._in_memory(keys)) if not warm]
        if keys:
            self.store_hints.submit(keys)  # type: ignore[union-attr]

    def on_routing(self, layer: int, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
        m = self._moe_index[layer]
        if not self._rids or len(self._rids) != expert_ids.shape[0]:
            return  # a forward outside the engine's steps (no rows told): nothing to attribute
        rows = expert_ids.tolist()
        if self.int2_tail_share > 0 and self._any_prefill:
            tail = int2_tail(rows, self._prefill, self.int2_tail_share)
            if tail:
                self.cache.set_int2_tail(layer, tail)
        preds = self._preds.pop(m, None)
        if preds is not None:
            k = self.args.top_k
            per_req = self._counts.by_request
            total = LayerPredictionCounts()
            for rid, row, pred in zip(self._rids, rows, preds):
                c = per_req.setdefault(rid, {}).setdefault(layer, LayerPredictionCounts())
                actual = set(row)
                exact = set(pred[:k]) == actual
                routed_in = len(actual.intersection(pred))
                c.predictions += 1
                c.exact += exact
                c.routed_in += routed_in
                total.predictions += 1
                total.exact += exact
                total.routed_in += routed_in
            with self._lock:
                self._layer_counts[layer].add(total)
        if self.enabled:
            self.predictor.observe(m, self._rids, rows)

    def _layer_wait_ns(self) -> int:
        return self.cache.step_fetch_wait_ns


# -- start-up measurement -----------------------------------------------------------------------------


class _OneExpert:
    """An ExpertProvider that serves one prebuilt expert for every id (timing the dense part + experts)."""

    def __init__(self, compute):
        self.compute = compute

    def iter_experts(self, layer, experts):
        for e in experts:
            yield e, self.compute


class _NoObserver:
    """A RoutingObserver that ignores everything (the measurement's forwards are nobody's steps)."""

    def on_gate_input(self, layer, gate_input) -> None:
        pass

    def on_routing(self, layer, expert_ids, weights) -> None:
        pass


def measure_width_inputs(model: "MoEModel", cache: "ExpertCache", samples: int = 5) -> tuple[float, float]:
    """(one MoE layer's compute ns for one token, one expert's fetch + build ns), medians of `samples`
    runs, measured with the cache's own fetcher (prefetch priority) and compute form."""
    a = model.args
    fetch_ns = []
    compute = None
    for i in range(samples):
        layer, e = a.moe_layers[i % len(a.moe_layers)], (i * 7) % a.num_experts
        t0 = time.perf_counter_ns()
        blob = cache.fetcher.fetch([(layer, e, cache.fmt)], "prefetch")[0]
        compute = cache.build_expert(blob)
        fetch_ns.append(time.perf_counter_ns() - t0)
    one, quiet = _OneExpert(compute), _NoObserver()
    layer_ns = []
    for _ in range(samples + 1):
        seq = model.new_sequence(4)
        t0 = time.perf_counter_ns()
        model.forward([seq], [torch.tensor([a.bos_token_id or 0])], observer=quiet, experts=one)
        layer_ns.append((time.perf_counter_ns() - t0) / max(1, a.num_layers))
    return statistics.median(layer_ns[1:]), statistics.median(fetch_ns)
