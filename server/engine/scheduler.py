"""Which requests run at each step: the scheduler owns the waiting, prefilling and running queues,
the KV blocks and adapter slots its admissions take, and what a finished request gives back.

Admission is weighted round robin across tenants (requests without one are one tenant), then
round robin across each tenant's adapters (the base model being one), S-LoRA style: each adapter's
requests in arrival order, the adapter admitted least recently first, so a flood on one adapter
delays another's request by at most one of its own, and a tenant with many adapters gets no more
turns than one with a single adapter. Tenants take turns by virtual time (weighted fair queueing):
each admission moves its tenant's clock on by 1/weight, the tenant furthest behind goes first, and
one that was idle rejoins at the current time instead of spending credit saved while away. When
every row is taken and the tenant whose turn it is runs fewer sequences than its share of the
batch, the newest sequence of the tenant furthest over its share is preempted for it (one a step),
so a tenant's first request does not wait for another's long ones to finish. It stops at the batch size, the free KV
blocks (server/engine/blocks.py: blocks for the prompt, with one spare block per sequence in
flight so running ones can grow) and the prefill token budget (a prompt longer than
prefill_chunk_tokens is admitted to be prefilled chunk by chunk instead). Adapter slots are
handed out here too (server/engine/slots.py); see Scheduler.schedule for what happens when every
slot is held. A request whose prompt starts with blocks another admitted one is computing right
now (samples of one prompt, a burst sharing a system prompt) waits a step and takes them from the
prefix cache instead.

When the blocks run out mid-decode anyway, the newest running sequence is preempted: its blocks
go back, and it waits at the head of its queue to be recomputed (prompt and tokens so far
prefilled again) — no request fails because another one grew. Seeded sampling is keyed by step
and the seen tokens are rebuilt, so a preempted sequence generates what it would have
uninterrupted, up to float32 noise in the recomputed keys (tests/test_paged_kv.py checks equal tokens).

Locking: the queues are changed on the engine thread, and `waiting` by the threads that submit
requests too; every move between queues happens under the engine's lock, so in_flight() (close()
reads it from another thread) never misses a sequence in transit. Methods marked "holds the lock"
expect the caller to hold it; the others take it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from ..config import EngineConfig
from ..errors import InvalidRequest, ResourceExhausted
from .blocks import BlockManager
from .requests import FinishReason
from .sequence import Sequence
from .slots import AdapterSlots, LoadedAdapter

log = logging.getLogger(__name__)


@dataclass
class Admission:
    whole: list[Sequence] = field(default_factory=list)  # prefilled together now
    chunked: list[Sequence] = field(default_factory=list)  # prefilled a chunk per step from now
    failed: list[tuple[Sequence, BaseException]] = field(default_factory=list)  # their adapter's slot write failed


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, slots: AdapterSlots, lock: threading.Condition):
        self.config = config
        self.blocks = blocks
        self.slots = slots
        self._lock = lock
        self.waiting: deque[Sequence] = deque()
        self.admitted: list[Sequence] = []  # admitted this step, prompts prefilled together next
        self.prefilling: deque[Sequence] = deque()  # admitted, prompt going in chunk by chunk
        self.running: list[Sequence] = []
        self._last_admitted: dict[tuple[str | None, str | None], int] = {}  # Sequence.queue_key -> admission number
        self._admissions = itertools.count()
        self._virtual_time = 0.0  # the tenants' clock at the latest admission
        self._tenant_time: dict[str | None, float] = {}  # a tenant's clock: where its next admission starts
        self._slot_victim: LoadedAdapter | None = None
        self.preemptions = 0
        self.fair_share_preemptions = 0  # of those, the ones that made room for a tenant under its share

    # ---------------------------------------------------------------- the queues

    def add(self, seqs: list[Sequence]) -> None:  # holds the lock
        """Queue sequences on one adapter, all or none, within the queue limits; each holds its
        adapter from now on."""
        if len(seqs) > min(self.config.max_queue, self.config.queue_per_adapter):
            raise InvalidRequest(f"{len(seqs)} samples: this engine queues at most "
                                 f"{min(self.config.max_queue, self.config.queue_per_adapter)} per adapter")
        if len(self.waiting) + len(seqs) > self.config.max_queue:
            raise ResourceExhausted(f"request queue is full ({self.config.max_queue} waiting)")
        adapter = seqs[0].adapter
        waiting = sum(1 for s in self.waiting if s.adapter is adapter)
        if waiting + len(seqs) > self.config.queue_per_adapter:
            raise ResourceExhausted(f"{'adapter ' + repr(adapter.name) if adapter else 'the base model'} already has "
                                    f"{waiting} requests waiting (max_queue_per_adapter)")
        for seq in seqs:
            if adapter is not None:
                adapter.refs += 1
                adapter.last_used = time.time()
            self.waiting.append(seq)

    def has_work(self) -> bool:  # holds the lock
        return bool(self.waiting or self.admitted or self.prefilling or self.running)

    def in_flight(self) -> list[Sequence]:
        """Every sequence, wherever it is: a snapshot (the lock covers `waiting`; other threads,
        as close() does, may read `prefilling` and `running` as they are at that moment)."""
        with self._lock:
            return [*self.waiting, *self.admitted, *self.prefilling, *self.running]

    def stopped(self, now: float) -> list[tuple[Sequence, FinishReason]]:
        """The sequences cancelled or past their deadline, wherever they are."""
        return [(s, reason) for s in self.in_flight() if (reason := _stop_reason(s, now))]

    def start(self, seqs: list[Sequence]) -> None:
        """Their prompts are in the cache (and can be shared from now on): they decode from the next step."""
        for seq in seqs:
            with self._lock:
                if seq in self.admitted:
                    self.admitted.remove(seq)
                if seq in self.prefilling:
                    self.prefilling.remove(seq)
                self.running.append(seq)
            self.blocks.register(seq)

    def finish(self, seq: Sequence) -> None:
        """Out of every queue; its KV blocks and its hold on its adapter go back."""
        with self._lock:
            for queue in (self.waiting, self.admitted, self.prefilling, self.running):
                if seq in queue:
                    queue.remove(seq)
        self._release_blocks(seq)
        self.slots.release(seq.adapter)

    def decodable(self) -> list[Sequence]:
        """The running sequences, each with a block for the token the next step writes; when the
        blocks run out, the newest are preempted until the older ones fit."""
        for seq in list(self.running):
            while seq in self.running and not self.blocks.grow(seq):
                self._preempt(self.running[-1])
        return list(self.running)

    def _preempt(self, seq: Sequence) -> None:
        with self._lock:
            self.running.remove(seq)
            self.waiting.appendleft(seq)
        self._release_blocks(seq)
        seq.prefilled = 0
        seq.preempted += 1
        self.preemptions += 1

    def _release_blocks(self, seq: Sequence) -> None:
        if seq.row >= 0:
            self.blocks.release(seq)
            if seq.adapter is not None:
                seq.adapter.active -= 1

    def forget(self, adapter_name: str) -> None:
        """An adapter gone for good loses its admission turn."""
        for key in [k for k in self._last_admitted if k[1] == adapter_name]:
            del self._last_admitted[key]

    # ---------------------------------------------------------------- admission

    def schedule(self) -> Admission:
        """Admit waiting sequences, in order()'s order, while the batch, the KV blocks and the
        prefill budget allow: the admitted ones leave `waiting` with their KV blocks.

        A request whose adapter has no slot takes a free one or evicts the least recently used
        adapter that no running request holds. When every slot is held, it waits and requests
        behind it on resident adapters go ahead — except on one adapter, the victim (the one whose
        running requests finish soonest): nobody new is admitted on it, so its slot frees within
        that many decode steps and the waiting request gets it. A cold adapter therefore waits at
        most about max_new_tokens steps, however steady the traffic on warm ones. Later cold
        requests wait behind the first, so slots are handed out in admission order.
        """
        with self._lock:
            candidates = self.order(self.waiting)
            resident = self.slots.resident()  # a copy: unload_adapter may change the registry meanwhile
        admission = Admission()
        busy = len(self.running) + len(self.prefilling) + len(self.admitted)
        if candidates and busy >= self.config.max_batch_size and self._preempt_for_fair_share(candidates):
            busy -= 1
        # a spare block per sequence in flight (this one included), so the running can grow; a
        # pool that holds every row at max_seq_len never preempts: no spare blocks needed
        spare = 0 if self.blocks.holds_every_row() else 1
        waiting_for_slot = False
        chunk = self.config.prefill_chunk_tokens
        for seq in candidates:
            taken = len(admission.whole) + len(admission.chunked)
            if busy + taken >= self.config.max_batch_size:
                break
            if self._prefix_in_flight(seq):
                continue
            if not self.blocks.can_allocate(seq, reserve=spare * (busy + taken + 1)):
                break  # the rest wait until running sequences give blocks back
            todo = len(seq.tokens) - self.blocks.cached_prefix(seq)  # what its prefill computes
            chunked = chunk is not None and todo > chunk
            longest = max([len(s.tokens) - s.prefilled for s in admission.whole] + [todo])
            if admission.whole and not chunked and longest * (len(admission.whole) + 1) > self.config.max_prefill_tokens:
                break  # the rest join at the next step
            adapter = seq.adapter
            if adapter is not None and adapter.slot == 0:
                seq.missed = True
                if waiting_for_slot or not self._make_resident(adapter, admission):
                    if not waiting_for_slot and self._slot_victim is None:
                        self._slot_victim = _soonest_to_finish(self.running, resident)
                    waiting_for_slot = True
                    continue
                if not waiting_for_slot:
                    self._slot_victim = None
            elif adapter is not None and adapter is self._slot_victim:
                continue
            if not self._take(seq, self.prefilling if chunked else self.admitted):
                continue
            self._admitted(seq)
            (admission.chunked if chunked else admission.whole).append(seq)
        if not waiting_for_slot:
            self._slot_victim = None
        return admission

    def order(self, pending: Iterable[Sequence]) -> list[Sequence]:
        """The waiting sequences in the order they are offered admission: tenants by their
        clocks (fair_share), and within each tenant its adapters in turn (round_robin). Turns
        carry over from one step to the next."""
        tenants: dict[str | None, list[Sequence]] = {}
        for seq in pending:
            tenants.setdefault(seq.request.tenant, []).append(seq)
        if len(tenants) == 1:  # one tenant, or none at all: its adapters' round robin
            return self.round_robin(next(iter(tenants.values())))
        return self.fair_share({tenant: self.round_robin(seqs) for tenant, seqs in tenants.items()})

    def round_robin(self, pending: list[Sequence]) -> list[Sequence]:
        """One tenant's waiting sequences, one per adapter in turn; the adapter admitted least
        recently goes first."""
        queues: dict[tuple[str | None, str | None], deque[Sequence]] = {}
        for seq in pending:
            queues.setdefault(seq.queue_key, deque()).append(seq)
        keys = sorted(queues, key=lambda k: self._last_admitted.get(k, -1))  # stable: ties keep arrival order
        order = []
        while keys:
            for key in list(keys):
                order.append(queues[key].popleft())
                if not queues[key]:
                    keys.remove(key)
        return order

    def fair_share(self, tenants: dict[str | None, list[Sequence]]) -> list[Sequence]:
        """The tenants' ordered sequences merged by weighted fair queueing: the tenant whose
        clock is furthest behind goes next and its clock moves on by 1/weight (ties: the tenant
        admitted least recently, then the one that arrived first)."""
        clocks = {t: max(self._tenant_time.get(t, self._virtual_time), self._virtual_time) for t in tenants}
        last = {t: max((self._last_admitted.get(s.queue_key, -1) for s in seqs), default=-1) for t, seqs in tenants.items()}
        queues = {t: deque(seqs) for t, seqs in tenants.items()}
        order = []
        while queues:
            tenant = min(queues, key=lambda t: (clocks[t], last[t]))
            seq = queues[tenant].popleft()
            order.append(seq)
            clocks[tenant] += 1 / seq.request.weight
            if not queues[tenant]:
                del queues[tenant]
        return order

    def _preempt_for_fair_share(self, candidates: list[Sequence]) -> bool:
        """With every row taken: preempt the newest running sequence of the tenant furthest over
        its share of the batch (max_batch_size x its weight / the weights of the tenants with
        work), when the first candidate's tenant is under its own and that candidate could run
        now (its adapter in a slot). True if a row was freed so."""
        head = candidates[0]
        if head.adapter is not None and head.adapter.slot == 0:
            return False  # it waits for a slot, not a row: a row freed now would go to someone else
        weights = {s.request.tenant: s.request.weight for s in (*self.running, *self.prefilling, *self.admitted,
                                                                   *candidates)}
        if len(weights) < 2:
            return False
        in_batch = Counter(s.request.tenant for s in (*self.running, *self.prefilling, *self.admitted))
        share = {t: self.config.max_batch_size * w / sum(weights.values()) for t, w in weights.items()}
        # only a move that cannot be undone by the same rule at the next step: the head stays within
        # its share after it, the victim's tenant at or above its own (fractional shares would swap
        # rows back and forth otherwise)
        if in_batch[head.request.tenant] + 1 > share[head.request.tenant]:
            return False
        over = max(weights, key=lambda t: in_batch[t] / share[t])
        # its newest sequence that was never preempted: no sequence is recomputed twice for fairness
        victim = next((s for s in reversed(self.running) if s.request.tenant == over and not s.preempted), None)
        if victim is None or in_batch[over] - 1 < share[over]:
            return False
        self._preempt(victim)
        self.fair_share_preemptions += 1
        return True

    def _admitted(self, seq: Sequence) -> None:
        """Its adapter's turn and its tenant's clock move on (a preempted sequence readmitted is
        not a new turn)."""
        self._last_admitted[seq.queue_key] = next(self._admissions)
        if seq.preempted:
            return
        tenant = seq.request.tenant
        start = max(self._tenant_time.get(tenant, self._virtual_time), self._virtual_time)
        self._virtual_time = start
        self._tenant_time[tenant] = start + 1 / seq.request.weight

    @contextlib.contextmanager
    def reserved(self, seqs: list[Sequence]) -> Iterator[None]:
        """KV blocks and adapter slots for sequences computed outside the queues (scoring), given back after."""
        needed = sum(self.blocks.blocks_for(len(s.tokens)) for s in seqs)
        if len(seqs) > self.blocks.free_rows or needed > self.blocks.free_blocks:
            raise ResourceExhausted(f"scoring {len(seqs)} prompts needs {len(seqs)} batch rows and {needed} KV blocks "
                                    f"({self.blocks.free_rows} and {self.blocks.free_blocks} free)")
        adapters = list({id(s.adapter): s.adapter for s in seqs if s.adapter}.values())
        pinned = []
        try:
            for adapter in adapters:
                if not self.slots.make_resident(adapter, evict=True):
                    raise ResourceExhausted(f"scoring needs {len(adapters)} adapters in slots at once; "
                                            f"{len(pinned)} of {self.config.max_adapters} slots could be had")
                adapter.active += 1
                pinned.append(adapter)
            for s in seqs:
                self.blocks.allocate(s, share=False)  # scoring needs every position's logits
            yield
        finally:
            for adapter in pinned:
                adapter.active -= 1
            for s in seqs:
                self.blocks.release(s)

    def _prefix_in_flight(self, seq: Sequence) -> bool:
        """Its first block is being computed by a sequence admitted before it (the same adapter
        version, the same tokens: samples of one prompt, a burst sharing a system prompt) and is
        not cached yet: it waits a step, then takes those blocks from the cache instead of
        computing them again."""
        key = self.blocks.first_key(seq) if seq.shares_prefix else None
        if key is None or self.blocks.cached_prefix(seq):
            return False
        return any(self.blocks.first_key(s) == key for s in (*self.admitted, *self.prefilling))

    def _make_resident(self, adapter: LoadedAdapter, admission: Admission) -> bool:
        """slots.make_resident, evicting if need be. A slot write that fails (a device error) fails
        the requests waiting on that adapter, not the engine thread."""
        try:
            return self.slots.make_resident(adapter, evict=True)
        except Exception as exc:
            log.exception("writing adapter %s into a slot failed; failing the requests waiting for it", adapter.name)
            with self._lock:
                self.slots.evict(adapter)
                failed = [s for s in self.waiting if s.adapter is adapter]
                for seq in failed:
                    self.waiting.remove(seq)
            admission.failed += [(seq, exc) for seq in failed]
            return False

    def _take(self, seq: Sequence, to: list[Sequence] | deque[Sequence]) -> bool:
        """Move an admitted sequence from the queue to `to`, onto its KV blocks; False if it was cancelled."""
        with self._lock:
            if seq.handle.cancelled.is_set() or seq not in self.waiting:
                return False
            self.waiting.remove(seq)
            to.append(seq)
        self.blocks.allocate(seq)
        if not seq.preempted:
            seq.cached_tokens = seq.prefilled
        if seq.adapter is not None:
            seq.adapter.active += 1
        return True


def _stop_reason(seq: Sequence, now: float) -> FinishReason | None:
    if seq.handle.cancelled.is_set():
        return FinishReason.CANCELLED
    if seq.request.deadline is not None and now > seq.request.deadline:
        return FinishReason.DEADLINE
    return None


def _soonest_to_finish(running: list[Sequence], resident: Iterable[LoadedAdapter]) -> LoadedAdapter | None:
    """The resident adapter whose running requests are done soonest (by max_new_tokens)."""
    remaining: dict[int, int] = {}
    for s in running:
        if s.adapter is not None:
            remaining[id(s.adapter)] = max(remaining.get(id(s.adapter), 0), s.remaining())
    held = [e for e in resident if id(e) in remaining]
    return min(held, key=lambda e: remaining[id(e)], default=None)
