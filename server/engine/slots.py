"""The adapters an engine knows, and the device slots they occupy (slot 0 is the base model).

A registered adapter is packed once for the device (server/lora/host_tier.py); it holds a slot
only while it is resident. Slots are a cache: a free one is taken, or the least recently used one
that no running request holds. An adapter replaced or unloaded is retired: queued and running
requests keep it (`refs`) and its slot frees when the last of them finishes.

Locking: the registry shares the engine's lock (the queue and the registry change together when
a request is submitted); methods marked "holds the lock" expect the caller to hold it, the others
take it. Slot writes happen on the engine thread (make_resident).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch

from ..errors import AdapterNotFound
from ..lora.host_tier import SlotImage, SlotWriter
from ..lora.layers import LoRAPool
from ..lora.peft_files import AdapterWeights
from .requests import AdapterInfo


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


class AdapterSlots:
    def __init__(self, pools: dict[tuple[int, str], LoRAPool], num_slots: int, device: torch.device,
                 dtype: torch.dtype, lock: threading.Condition, on_forget: Callable[[str], None]):
        self.pools = pools
        self.writer = SlotWriter(pools, device)
        self.dtype = dtype
        self._pin = device.type == "cuda"
        self._lock = lock
        self._on_forget = on_forget  # a retired adapter's name is gone for good (its admission turn too)
        self._free = list(range(num_slots, 0, -1))
        self._by_name: dict[str, LoadedAdapter] = {}
        self._resident: dict[int, LoadedAdapter] = {}  # slot -> adapter in it

    def register(self, name: str, weights: AdapterWeights) -> LoadedAdapter:
        """Pack validated host weights (in the caller's thread) and register them under `name`,
        retiring what was registered under it before."""
        image = SlotImage.pack(weights, self.pools, self.dtype, pin=self._pin)
        entry = LoadedAdapter(name, replace(weights, modules={}), image)
        with self._lock:
            old = self._by_name.get(name)
            self._by_name[name] = entry
            if old is not None:
                self._retire(old)
        return entry

    def unregister(self, name: str) -> None:
        """New requests can no longer use `name`; queued and running ones finish on it."""
        with self._lock:
            entry = self._by_name.pop(name, None)
            if entry is None:
                raise AdapterNotFound(f"adapter {name!r} is not loaded")
            self._retire(entry)

    def get(self, name: str) -> LoadedAdapter | None:  # holds the lock
        return self._by_name.get(name)

    def infos(self) -> list[AdapterInfo]:
        with self._lock:
            return [self.info(e) for e in self._by_name.values()]

    @staticmethod
    def info(entry: LoadedAdapter) -> AdapterInfo:
        w = entry.weights
        return AdapterInfo(entry.name, w.rank, w.target_modules, w.content_hash, w.source, entry.refs,
                           entry.slot > 0, entry.last_used, entry.image.nbytes)

    def names(self) -> list[str]:  # holds the lock
        """Every registered adapter's name, in a slot or not."""
        return list(self._by_name)

    def resident(self) -> list[LoadedAdapter]:  # holds the lock
        return list(self._resident.values())

    @property
    def free(self) -> int:
        return len(self._free)

    def release(self, entry: LoadedAdapter | None) -> None:
        """A request that held `entry` has finished."""
        if entry is None:
            return
        with self._lock:
            entry.refs -= 1
            entry.last_used = time.time()
            if entry.retired and entry.refs == 0:
                self._forget(entry)

    def make_resident(self, entry: LoadedAdapter, evict: bool) -> bool:
        """(engine thread) Give `entry` a slot: a free one, or with evict=True the least recently
        used slot that no running request holds. False when every slot is held."""
        with self._lock:
            if entry.slot or entry.retired and entry.refs == 0:
                return bool(entry.slot)
            if not self._free and evict:
                idle = [e for e in self._resident.values() if e.active == 0]
                if idle:
                    self.evict(min(idle, key=lambda e: e.last_used))
            if not self._free:
                return False
            entry.slot = self._free.pop()
            self._resident[entry.slot] = entry
        entry.ready = self.writer.write(entry.slot, entry.image)
        return True

    def evict(self, entry: LoadedAdapter) -> None:  # holds the lock
        if entry.slot:
            del self._resident[entry.slot]
            self._free.append(entry.slot)
            entry.slot = 0

    @staticmethod
    def wait_for_writes(adapters: Iterable[LoadedAdapter | None]) -> None:
        """Make this step's kernels wait for the slot writes of the adapters it uses (never the host)."""
        for adapter in adapters:
            if adapter is not None and adapter.ready is not None:
                torch.cuda.current_stream().wait_event(adapter.ready)
                adapter.ready = None

    def _retire(self, entry: LoadedAdapter) -> None:  # holds the lock
        entry.retired = True
        if entry.refs == 0:
            self._forget(entry)

    def _forget(self, entry: LoadedAdapter) -> None:  # holds the lock
        """A retired adapter nobody uses any more: its slot and its admission turn go."""
        self.evict(entry)
        if entry.name not in self._by_name:  # a replacement under the same name keeps its turn
            self._on_forget(entry.name)
