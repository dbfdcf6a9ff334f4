"""The decode step on fixed shapes: static input buffers, padded batch sizes, CUDA graphs.

The engine hands the runner its running sequences' last tokens, positions, KV rows and adapter
slots as host lists. The runner writes them into one pinned host buffer, copies that to a static
device buffer in one transfer, and runs the decode forward on views of it. With `padded`, the
batch is padded to the next size of SIZES (up to max_batch_size): padding rows use slot 0 (no
adapter) and write their keys into the KV cache's scratch row, so they touch no sequence. With
`graphs` (CUDA), each padded size is captured once as a CUDA graph at start-up and replayed each
step: one launch instead of ~75 per layer. Elsewhere the same step runs eagerly, so the CPU tests
cover what is captured on the GPU.

What the graph fixes: the batch size (padded), the KV span (max_seq_len; the Triton decode
attention reads each row only up to its own length), and the LoRA path (always on: slot 0 rows
cost nothing in BGMV). Sampling runs after the graph, on the step's first B logits: its batch
flags (all greedy? top-k? penalties? grammar?) change which ops run, so capturing it means a graph
per combination, or always the full path.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from .kv_cache import KVCache
from .model import ForwardBatch

log = logging.getLogger(__name__)

SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
_TOKENS, _POSITIONS, _ROWS, _SLOTS = range(4)


def padded_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a padded runner runs at: SIZES up to max_batch, and max_batch itself."""
    return tuple(sorted({s for s in SIZES if s < max_batch} | {max_batch}))


class DecodeRunner:
    """forward: ForwardBatch -> logits [B, vocab] of each row's last position (the model's plain
    forward, or its torch.compile'd one)."""

    def __init__(self, cache: KVCache, max_batch: int, forward: Callable[[ForwardBatch], torch.Tensor],
                 device: torch.device, padded: bool = False):
        self.cache = cache
        self.forward = forward
        self.device = device
        self.padded = padded
        self.sizes = padded_sizes(max_batch) if padded else ()
        width = max_batch if not padded else self.sizes[-1]
        self._host = torch.zeros(4, width, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._inputs = torch.zeros(4, width, dtype=torch.int64, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_logits: dict[int, torch.Tensor] = {}

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def decode(self, tokens: list[int], positions: list[int], rows: list[int], slots: list[int]) -> torch.Tensor:
        """Logits [len(tokens), vocab] of one decode step; the KV cache gets each row's new key."""
        count = len(tokens)
        size = next(s for s in self.sizes if s >= count) if self.padded else count
        host = self._host[:, :size]
        host[:, :count] = torch.tensor([tokens, positions, rows, slots], dtype=torch.int64)
        if size > count:  # padding: token 0 at position 0 of the scratch row, no adapter
            host[:, count:] = 0
            host[_ROWS, count:] = self.cache.scratch_row
        self._inputs.copy_(self._host, non_blocking=True)  # whole: a slice would not be one pinned block
        if size in self._graphs:
            self._graphs[size].replay()
            return self._graph_logits[size][:count]
        # padded steps keep the LoRA path on (as captured); unpadded ones skip it without adapters
        with_lora = self.padded or any(slots)
        kv_length = self.cache.max_seq_len if self.padded else max(positions) + 1
        return self.forward(self._batch(size, kv_length, with_lora))[:count]

    def cache_rows(self, count: int) -> torch.Tensor:
        """The device tensor of the last step's KV rows (its first `count`)."""
        return self._inputs[_ROWS, :count]

    def capture(self) -> None:
        """Capture every padded size as a CUDA graph, largest first, sharing one memory pool.
        Warm-up runs write only into the scratch row (every input row is padding)."""
        if not self.padded or self.device.type != "cuda":
            raise ValueError("CUDA graphs need a padded runner on a CUDA device")
        self._inputs.zero_()
        self._inputs[_ROWS] = self.cache.scratch_row
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):  # warm up: Triton compiles, allocator settles
                self.forward(self._batch(size, self.cache.max_seq_len, True))
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for size in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._graph_logits[size] = self.forward(self._batch(size, self.cache.max_seq_len, True))
            self._graphs[size] = graph
        torch.cuda.synchronize()
        log.info("captured the decode step as CUDA graphs at batch sizes %s", ", ".join(map(str, self.sizes)))

    def _batch(self, size: int, kv_length: int, with_lora: bool) -> ForwardBatch:
        inputs = self._inputs[:, :size]
        return ForwardBatch(tokens=inputs[_TOKENS, :, None], positions=inputs[_POSITIONS, :, None],
                            cache_rows=inputs[_ROWS], token_slots=inputs[_SLOTS] if with_lora else None,
                            prefill=False, kv_length=kv_length)
