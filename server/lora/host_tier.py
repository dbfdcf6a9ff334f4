"""The host tier of adapters and the copy from it into a device slot.

A validated adapter is packed once, in the thread that loaded it, into a SlotImage laid out
like the pools it goes to: per pool, each slice's A [r, in] and one scale·Bᵀ [r, out] across all
the pool's slices (zero columns for modules the adapter does not target), in the engine's dtype,
side by side in one host buffer (pinned on CUDA, so copies from it are truly asynchronous). Its
size is what the adapter costs the host tier (AdapterConfig.host_cache_bytes).

Making an adapter resident is then a SlotWriter.write on the engine thread: on CUDA, one
non-blocking copy per tensor on a side stream, with an event the next step that uses the slot
makes the compute stream wait on; the engine thread never blocks on it, and steps that do not use
the adapter never wait. On CPU the copies are plain and synchronous. The time each write takes
(issue to completion, measured with CUDA events off the hot path) goes to a histogram.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .layers import LoRAPool
from .peft_files import AdapterWeights


@dataclass(frozen=True)
class _Part:
    """What one pool's slot receives: each targeted slice's A at its first row of lora_a[slot],
    and the leading `rank` rows of scaled_b_t[slot]; everything else in the slot is zero."""

    rank: int
    a_rows: list[tuple[int, torch.Tensor]]  # (first row, A [r, in]): views into the image's buffer
    scaled_b_t: torch.Tensor  # [rank, out_1 + … + out_n]


class SlotImage:
    """One adapter, packed for its slot writes. parts: pool key (layer, name) -> what it receives."""

    def __init__(self, parts: dict[tuple[int, str], _Part], nbytes: int):
        self.parts = parts
        self.nbytes = nbytes

    @classmethod
    def pack(cls, weights: AdapterWeights, pools: dict[tuple[int, str], LoRAPool], dtype: torch.dtype,
             pin: bool) -> "SlotImage":
        """Scale folded into B in B's precision (float32) before the cast, as LoRAPool.write_slot does."""
        layouts = {}
        for (layer, name), pool in pools.items():
            members = [(i, weights.modules.get((layer, module))) for i, module in enumerate(pool.slices)]
            members = [(i, m) for i, m in members if m is not None]
            if not members:
                continue
            rank = max(m.lora_a.shape[0] for _, m in members)
            b_t = torch.zeros(rank, pool.starts[-1])
            for i, m in members:
                b_t[:m.lora_a.shape[0], pool.starts[i]:pool.starts[i + 1]] = m.lora_b.T * m.scale
            layouts[(layer, name)] = (rank, [(i * pool.max_rank, m.lora_a) for i, m in members], b_t)
        total = sum(sum(a.numel() for _, a in rows) + b_t.numel() for _, rows, b_t in layouts.values())
        buffer = torch.empty(total, dtype=dtype, pin_memory=pin)
        offset = 0

        def place(t: torch.Tensor) -> torch.Tensor:
            nonlocal offset
            view = buffer[offset:offset + t.numel()].view(t.shape)
            view.copy_(t)
            offset += t.numel()
            return view

        parts = {key: _Part(rank, [(row, place(a)) for row, a in rows], place(b_t))
                 for key, (rank, rows, b_t) in layouts.items()}
        nbytes = total * buffer.element_size()
        if pin:  # torch's pinned allocator hands out power-of-two blocks: that is what it costs
            nbytes = 1 << (nbytes - 1).bit_length()
        return cls(parts, nbytes)


class SlotWriter:
    """Writes SlotImages into the LoRA pools' slots; asynchronous on CUDA."""

    def __init__(self, pools: dict[tuple[int, str], LoRAPool], device: torch.device):
        self.pools = pools
        self.cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._timing: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._cpu_seconds: list[float] = []

    def write(self, slot: int, image: SlotImage) -> torch.cuda.Event | None:
        """Copy `image` into `slot` of every pool (modules it lacks are cleared). Returns the event
        a step must wait on before reading the slot (None on CPU: already done)."""
        if not self.cuda:
            started = time.perf_counter()
            self._copy(slot, image)
            self._cpu_seconds.append(time.perf_counter() - started)
            return None
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self._stream.wait_stream(torch.cuda.current_stream())  # a step still reading the old slot finishes first
        with torch.cuda.stream(self._stream):
            start.record()
            self._copy(slot, image)
            done.record()
        self._timing.append((start, done))
        return done

    def completed_seconds(self) -> list[float]:
        """Durations of the writes finished since the last call (never waits for one)."""
        if not self.cuda:
            finished, self._cpu_seconds = self._cpu_seconds, []
            return finished
        done = [d.query() for _, d in self._timing]
        finished = [t for t, ok in zip(self._timing, done) if ok]
        self._timing = [t for t, ok in zip(self._timing, done) if not ok]
        return [s.elapsed_time(d) / 1000 for s, d in finished]

    def _copy(self, slot: int, image: SlotImage) -> None:
        for key, pool in self.pools.items():
            part = image.parts.get(key)
            pool.lora_a[slot].zero_()
            if part is None:
                pool.scaled_b_t[slot].zero_()
                pool.slot_ranks[slot].fill_(0)
                continue
            for row, a in part.a_rows:
                pool.lora_a[slot, row:row + a.shape[0]].copy_(a, non_blocking=True)
            pool.scaled_b_t[slot, :part.rank].copy_(part.scaled_b_t, non_blocking=True)
            if part.rank < pool.max_rank:
                pool.scaled_b_t[slot, part.rank:].zero_()
            pool.slot_ranks[slot].fill_(part.rank)
