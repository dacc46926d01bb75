"""The expert cache's arena and copy-engine side (a mixin of ExpertCache; see gpu_worker.arena and
gpu_worker.copier for the memory and the process).

With an arena attached, every expert of the run format the cache inserts sits in an arena slot: a
fetched blob is copied into a free slot (one copy, no build: the slot's compute form is built once),
and an evicted expert's slot goes back to the free list (the ledger's `on_evict`).

With a copy engine too, `issue_copies(L, ranked, step, fetch_only)` is the prefetch: under the lock
it reserves room as `prefetch` does (rank order, a free unit or one of L's unpinned experts outside
`ranked`), takes a slot per expert, marks them pending, and sends one request; the copier fills the
slots while the compute goes on. Landed copies become resident when the cache next looks at L
(`_land`, at the start of L's `iter_experts` and while it waits for a pending expert): a filled slot
is inserted as a prefetched expert; a failed one (not in the store's RAM, moved during every try,
a bad checksum) gives its unit and slot back and the expert is fetched on demand. If the compute
reaches an expert whose copy is still in flight, it waits for it (a late prefetch hit). A layer
that waits for room first makes every layer's landed copies resident (`_land_all`: a landed copy holds
its unit until then, and the compute may need that room before it reaches the copy's layer), then
waits for the copies still in flight; if the copier has died, every copy in flight is given up (the slots are free: nobody writes them now) and
the cache carries on without it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Collection, Sequence

from expert_store.slot_directory import FORMAT_CODES

from .policy.ledger import LayerLedger

if TYPE_CHECKING:
    from .arena import ExpertArena
    from .copier import CopyEngine

log = logging.getLogger(__name__)

LANDING_POLL_S = 50e-6  # the compute thread's wait for a copy in flight, per check
DEAD_CHECK_S = 1.0  # waiting this long for copies: check that the copier lives


class CacheCopies:
    """Mixin state and methods; ExpertCache calls `_init_copies()` in its constructor."""

    def _init_copies(self) -> None:
        self.arena: "ExpertArena | None" = None
        self.copy_engine: "CopyEngine | None" = None
        self._digest: Callable[[tuple], int | None] | None = None
        self._landing: dict[int, dict[int, tuple[int, int]]] = {}  # layer -> expert -> (slot, ticket)
        self.copies_issued = self.copies_landed = self.copies_failed = 0

    def attach_arena(self, arena: "ExpertArena") -> None:
        """Keep every run-format expert in `arena` from now on (before anything is inserted)."""
        if arena.n_slots < self.total_slots or arena.blob_bytes != self.expert_bytes:
            raise ValueError(f"an arena of {arena.n_slots} slots of {arena.blob_bytes} bytes cannot hold "
                             f"{self.total_slots} experts of {self.expert_bytes} bytes")
        with self.cond:
            if self.ledger.used:
                raise ValueError("attach the arena before the cache holds experts")
            self.arena = arena
            self.ledger.on_evict = arena.release

    def attach_copy_engine(self, engine: "CopyEngine | None", digest: Callable[[tuple], int | None]) -> None:
        """Prefetch with `engine` (None: stop); `digest(key)`: the blob's xxh3_64 from the manifest."""
        if engine is not None and self.arena is None:
            raise ValueError("a copy engine needs the cache's arena")
        with self.cond:
            self.copy_engine, self._digest = engine, digest

    def close_copies(self) -> None:
        """Stop the copy engine and unlink the arena's name (its memory stays while experts view it)."""
        with self.cond:
            engine = self.copy_engine
            if engine is not None:
                self._give_up_copies()
        if engine is not None:
            engine.close()
        if self.arena is not None:
            self.arena.unlink()

    # -- arena slots -----------------------------------------------------------------------------

    def _fill_slot(self, blob) -> object | None:
        """The compute form of `blob` in a free arena slot (None: no arena, or no free slot)."""
        arena = self.arena
        if arena is None:
            return None
        with self.cond:
            slot = arena.alloc()
        if slot is None:
            return None
        try:
            return arena.fill(slot, blob)
        except BaseException:
            with self.cond:
                arena.free(slot)
            raise

    def _unfill(self, computes: Sequence[object]) -> None:
        """Built into slots, never inserted (a failure part-way): the slots go back (lock held)."""
        if self.arena is not None:
            for c in computes:
                self.arena.release(c)

    # -- the copy engine -----------------------------------------------------------------------------

    def issue_copies(self, layer: int, experts: Sequence[int], step: int | None,
                     fetch_only: Collection[int]) -> list[int]:
        """Prefetch those of `fetch_only` among `experts` (ranked) through the copy engine; the experts sent."""
        led = self.ledger
        L = led.layer(layer)
        want = list(dict.fromkeys(int(x) for x in experts))
        with self.cond:
            engine, arena = self.copy_engine, self.arena
            if engine is None or arena is None or (step is not None and led.passed(L, step)):
                return []
            self._land(L)
            todo = [e for e in want if e in fetch_only and e not in L.resident and e not in L.pending]
            if not todo:
                return []
            wave = led.reserve_prefetch(L, todo, protect=set(want))
            records, landing = [], self._landing.setdefault(layer, {})
            code = FORMAT_CODES[self.fmt]
            for e in wave:
                slot = arena.alloc()
                if slot is None:  # cannot happen while slots >= units; give the rest back
                    led.give_back(len(wave) - len(records))
                    wave = wave[:len(records)]
                    break
                ticket = engine.next_ticket()
                arena.status[slot] = 0
                landing[e] = (slot, ticket)
                records.append((ticket, layer, e, code, slot, self._digest((layer, e, self.fmt)) or 0))
            L.pending.update(wave)
            self.copies_issued += len(records)
        if records:
            try:
                engine.submit(records)
            except OSError as err:
                log.warning("the copy engine is gone (%s): prefetching without it", err)
                with self.cond:
                    self._give_up_copies()
                return []
        return wave

    def _land(self, L: LayerLedger) -> bool:
        """Insert L's finished copies, give back failed ones (lock held); True while some are in flight."""
        landing = self._landing.get(L.layer)
        if not landing:
            return False
        arena, led = self.arena, self.ledger
        status = arena.status
        for e, (slot, ticket) in list(landing.items()):
            st = status[slot]
            if st == ticket:
                del landing[e]
                L.pending.discard(e)
                led.insert(L, e, arena.compute(slot), prefetch=True, blob_bytes=self.expert_bytes)
                L.stats.bytes_fetched += self.expert_bytes
                L.stats.prefetch_bytes += self.expert_bytes
                if led.step is not None:
                    led.step.prefetch_bytes += self.expert_bytes
                self.copies_landed += 1
            elif st == -ticket:
                del landing[e]
                L.pending.discard(e)
                led.give_back(1)
                arena.free(slot)
                self.copies_failed += 1
        return bool(landing)

    def _land_all(self) -> bool:
        """`_land` every layer with copies (lock held); True while some copies are in flight."""
        in_flight = False
        for layer, landing in self._landing.items():
            if landing:
                in_flight |= self._land(self.ledger.layer(layer))
        return in_flight

    def _await_copies(self, since_ns: int) -> bool:
        """Wait a moment for copies in flight, any layer's (lock held); False when there are none."""
        if not self._land_all():
            return False
        self.cond.wait(LANDING_POLL_S)
        if time.perf_counter_ns() - since_ns > DEAD_CHECK_S * 1e9 and self.copy_engine is not None \
                and not self.copy_engine.alive():
            log.warning("the copy engine died: prefetching without it")
            self._give_up_copies()
        return True

    def _give_up_copies(self) -> None:
        """The copier is gone: nothing writes the slots in flight, so they and their units come back (lock held)."""
        self.copy_engine = None
        for layer, landing in self._landing.items():
            L = self.ledger.layer(layer)
            for e, (slot, _) in landing.items():
                L.pending.discard(e)
                self.ledger.give_back(1)
                self.arena.free(slot)
                self.copies_failed += 1
            landing.clear()
