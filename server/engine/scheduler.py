"""Which waiting requests join the batch at each step, and the state the engine keeps per request
and per adapter.

Admission is round robin across adapters (the base model being one), S-LoRA style: each adapter's
requests in arrival order, the adapter admitted least recently first, so a flood on one adapter
delays another's request by at most one of its own. It stops at the batch size, the free KV rows
and the prefill token budget (a prompt longer than prefill_chunk_tokens is admitted to be
prefilled chunk by chunk instead). Adapter slots are handed out here too, through the engine's
make_resident; see Scheduler.admit for what happens when every slot is held.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..config import EngineConfig
from ..lora.host_tier import SlotImage
from ..lora.peft_files import AdapterWeights
from .requests import Request, RequestHandle
from .structured import TokenMatcher


@dataclass(eq=False)
class LoadedAdapter:
    """A registered adapter: its packed host image always, a device slot while resident (slot > 0).
    weights keeps the adapter's description (rank, modules, hash); its tensors live in image."""

    name: str
    weights: AdapterWeights
    image: SlotImage
    slot: int = 0
    ready: object = None  # the CUDA event of a slot write not yet waited on by a step
    refs: int = 0    # queued + running requests; keeps the entry alive after it is retired
    active: int = 0  # running requests; a slot with active > 0 is never evicted
    last_used: float = 0.0
    retired: bool = False  # unloaded or replaced: no new requests; dropped when refs reaches 0


@dataclass(eq=False)
class Sequence:
    request: Request
    handle: RequestHandle
    adapter: LoadedAdapter | None
    stop_ids: frozenset[int]
    seed: int  # of its sampling noise (server/model/sampling.py)
    matcher: TokenMatcher | None = None  # the request's place in its grammar
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    generated: list[int] = field(default_factory=list)
    row: int = -1
    prefilled: int = 0  # prompt tokens already in the KV cache (chunked prefill)
    submitted: float = field(default_factory=time.monotonic)
    missed: bool = False  # its adapter had no slot when it was first up for admission

    @property
    def slot(self) -> int:
        return self.adapter.slot if self.adapter else 0


@dataclass
class Admission:
    whole: list[Sequence] = field(default_factory=list)  # prefilled together now
    chunked: list[Sequence] = field(default_factory=list)  # prefilled a chunk per step from now


class Scheduler:
    def __init__(self, config: EngineConfig):
        self.config = config
        self._last_admitted: dict[str | None, int] = {}  # adapter name (None: base) -> admission number
        self._admissions = itertools.count()
        self._slot_victim: LoadedAdapter | None = None

    def order(self, pending: Iterable[Sequence]) -> list[Sequence]:
        """The waiting sequences, one per adapter in turn; the adapter admitted least recently
        goes first, so turns carry over from one step to the next."""
        queues: dict[str | None, deque[Sequence]] = {}
        for seq in pending:
            queues.setdefault(_queue_key(seq), deque()).append(seq)
        keys = sorted(queues, key=lambda k: self._last_admitted.get(k, -1))  # stable: ties keep arrival order
        order = []
        while keys:
            for key in list(keys):
                order.append(queues[key].popleft())
                if not queues[key]:
                    keys.remove(key)
        return order

    def admit(self, candidates: list[Sequence], running: list[Sequence], prefilling: Iterable[Sequence],
              free_rows: int, resident: Iterable[LoadedAdapter], make_resident: Callable[[LoadedAdapter], bool],
              take: Callable[[Sequence], bool]) -> Admission:
        """Admit `candidates` (in order()'s order) while the batch, the KV rows and the prefill
        budget allow. take(seq) moves a sequence out of the queue (False: it was cancelled).

        A request whose adapter has no slot takes a free one or evicts the least recently used
        adapter that no running request holds (make_resident). When every slot is held, it waits
        and requests behind it on resident adapters go ahead — except on one adapter, the victim
        (the one whose running requests finish soonest): nobody new is admitted on it, so its slot
        frees within that many decode steps and the waiting request gets it. A cold adapter
        therefore waits at most about max_new_tokens steps, however steady the traffic on warm
        ones. Later cold requests wait behind the first, so slots are handed out in admission order.
        """
        admission = Admission()
        busy = len(running) + len(list(prefilling))
        waiting_for_slot = False
        chunk = self.config.prefill_chunk_tokens
        for seq in candidates:
            taken = len(admission.whole) + len(admission.chunked)
            if busy + taken >= self.config.max_batch_size or taken >= free_rows:
                break  # the rest wait until a running sequence frees its row
            chunked = chunk is not None and len(seq.tokens) > chunk
            longest = max([len(s.tokens) for s in admission.whole] + [len(seq.tokens)])
            if admission.whole and not chunked and longest * (len(admission.whole) + 1) > self.config.max_prefill_tokens:
                break  # the rest join at the next step
            adapter = seq.adapter
            if adapter is not None and adapter.slot == 0:
                seq.missed = True
                if waiting_for_slot or not make_resident(adapter):
                    if not waiting_for_slot and self._slot_victim is None:
                        self._slot_victim = _soonest_to_finish(running, resident)
                    waiting_for_slot = True
                    continue
                if not waiting_for_slot:
                    self._slot_victim = None
            elif adapter is not None and adapter is self._slot_victim:
                continue
            if not take(seq):
                continue
            self._last_admitted[_queue_key(seq)] = next(self._admissions)
            (admission.chunked if chunked else admission.whole).append(seq)
        if not waiting_for_slot:
            self._slot_victim = None
        return admission

    def forget(self, adapter_name: str) -> None:
        """An adapter gone for good loses its admission turn."""
        self._last_admitted.pop(adapter_name, None)


def _queue_key(seq: Sequence) -> str | None:
    return seq.adapter.name if seq.adapter else None


def _soonest_to_finish(running: list[Sequence], resident: Iterable[LoadedAdapter]) -> LoadedAdapter | None:
    """The resident adapter whose running requests are done soonest (by max_new_tokens)."""
    remaining: dict[int, int] = {}
    for s in running:
        if s.adapter is not None:
            left = s.request.sampling.max_new_tokens - len(s.generated)
            remaining[id(s.adapter)] = max(remaining.get(id(s.adapter), 0), left)
    held = [e for e in resident if id(e) in remaining]
    return min(held, key=lambda e: remaining[id(e)], default=None)
