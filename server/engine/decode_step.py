"""The decode step on fixed shapes: static input buffers, padded batch sizes, CUDA graphs.

The model runner (server/engine/runner.py) hands the step its running sequences' last tokens,
positions, batch rows and adapter slots as host lists. The step looks up each row's block table
(server/engine/blocks.py) and the cache slot its new key goes to, writes the inputs into one
pinned host buffer and the rows' tables into another, copies both to static device buffers (two
transfers, a grammar bitmask a third), and runs the decode forward on views of them. With
`padded`, the batch is padded to the next size of SIZES (up to max_batch_size): padding rows use
slot 0 (no adapter) and the scratch row, whose block table names only the KV cache's scratch
block, so they touch no sequence. With `graphs` (CUDA), each padded size is captured once as a
CUDA graph at start-up and replayed each step: one launch instead of ~75 per layer. Elsewhere the
same step runs eagerly, so the CPU tests cover what is captured on the GPU.

What the graph fixes: the batch size (padded), the KV span (max_seq_len; the Triton decode
attention reads each row's blocks only up to its own length, through the block tables copied into
a static buffer each step), and the LoRA path (always on: slot 0 rows cost nothing in BGMV).

Sampling is part of the step too, on static buffers: each row's parameters (temperature, top-k/p,
penalty, seed, step) are loaded when the batch's membership changes (one pinned copy), a grammar's
allowed-token bitmask each step it has one. Which ops sampling needs depends on the batch
(`SamplingFlags`), so on CUDA each padded size has a sampling graph per VARIANT, replayed after
its forward graph: the greedy one skips the noise, the sampling one the sort that top-k/p needs;
all apply the logit bias, the penalty and the grammar mask (no-ops on rows without them), the
sampling ones min-p. The one host
sync of a step is the model runner reading the sampled tokens.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..model.llama import ForwardBatch
from ..model.sampling import (MAX_LOGIT_BIAS, PARAMETERS, SamplingBatch, SamplingFlags, SamplingParams, bias_table,
                              parameter_table, sample, top_logprobs_of)
from .blocks import BlockManager
from .structured import allowed_tokens, bitmask_words

log = logging.getLogger(__name__)

SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
_TOKENS, _POSITIONS, _ROWS, _SLOTS, _CACHE_SLOTS = range(5)  # rows of the step's input buffers


# The sampling graphs captured per padded size, and the one a batch replays (SamplingFlags -> name).
VARIANTS = {"greedy": SamplingFlags(all_greedy=True, use_penalty=True, use_bias=True),
            "sample": SamplingFlags(all_greedy=False, use_penalty=True, use_min_p=True, use_bias=True),
            "top-k/p": SamplingFlags(all_greedy=False, use_top_k=True, use_top_p=True, use_penalty=True, use_min_p=True,
                                     use_bias=True)}
_PADDING_ROW = SamplingParams(temperature=0.0)  # what padding rows (and an unloaded step) sample with


def variant_for(flags: SamplingFlags) -> str:
    if flags.all_greedy:
        return "greedy"
    return "top-k/p" if flags.use_top_k or flags.use_top_p else "sample"


def padded_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a padded step runs at: SIZES up to max_batch, and max_batch itself."""
    return tuple(sorted({s for s in SIZES if s < max_batch} | {max_batch}))


class DecodeStep:
    """forward: ForwardBatch -> logits [B, vocab] of each row's last position (the model's plain
    forward, or its torch.compile'd one). seen: the runner's [batch rows + scratch row, vocab] bool
    table of the tokens each row has seen (the repetition penalty reads it, each step marks its
    sampled tokens in it)."""

    def __init__(self, blocks: BlockManager, forward: Callable[[ForwardBatch], torch.Tensor],
                 device: torch.device, seen: torch.Tensor, padded: bool = False):
        self.blocks = blocks
        self.forward = forward
        self.device = device
        self.seen = seen
        self.padded = padded
        self.sizes = padded_sizes(blocks.rows) if padded else ()
        width = blocks.rows if not padded else self.sizes[-1]
        pin = device.type == "cuda"
        self.vocab_size = seen.shape[1]
        self._host = torch.zeros(5, width, dtype=torch.int64, pin_memory=pin)
        self._inputs = torch.zeros(5, width, dtype=torch.int64, device=device)
        self._host_tables = torch.zeros(width, blocks.tables.shape[1], dtype=torch.int32, pin_memory=pin)
        self._tables = torch.zeros(width, blocks.tables.shape[1], dtype=torch.int32, device=device)
        self._host_parameters = torch.zeros(len(PARAMETERS), width, dtype=torch.float64, pin_memory=pin)
        self._parameters = torch.zeros(len(PARAMETERS), width, dtype=torch.float64, device=device)
        self._sampling = {name: torch.zeros(width, dtype=dtype, device=device) for name, dtype in PARAMETERS}
        self._bias_ids = torch.zeros(width, MAX_LOGIT_BIAS, dtype=torch.int64, device=device)
        self._bias_values = torch.zeros(width, MAX_LOGIT_BIAS, dtype=torch.float32, device=device)
        self._bitmask = torch.full((width, bitmask_words(self.vocab_size)), -1, dtype=torch.int32, device=device)
        self._bitmask_clean = True  # every token allowed on every row
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_logits: dict[int, torch.Tensor] = {}
        self._sample_graphs: dict[tuple[int, str], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._bias_loaded = False  # some row's bias is in the bias buffers
        self.load_sampling([], [], [])

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def load_sampling(self, params: list[SamplingParams], seeds: list[int], steps: list[int]) -> None:
        """The sampling parameters of the rows of the steps that follow (call when the batch's
        membership changes); the rows past them sample as greedy padding."""
        count, width = len(params), self._host_parameters.shape[1]
        padding = width - count
        self._host_parameters.copy_(parameter_table(params + [_PADDING_ROW] * padding, seeds + [0] * padding,
                                                    steps + [0] * padding, self.vocab_size))
        self._parameters.copy_(self._host_parameters, non_blocking=True)
        for i, (name, _) in enumerate(PARAMETERS):
            self._sampling[name].copy_(self._parameters[i])
        self.flags = SamplingFlags.of(params)
        if self.flags.use_bias or self._bias_loaded:
            ids, values = bias_table(params)
            self._bias_ids.zero_()
            self._bias_values.zero_()
            self._bias_ids[:count].copy_(ids)
            self._bias_values[:count].copy_(values)
        self._bias_loaded = self.flags.use_bias
        self.top_logprobs = top_logprobs_of(params)

    def decode(self, tokens: list[int], positions: list[int], rows: list[int], slots: list[int],
               bitmask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step: (logits [len(tokens), vocab], the sampled next tokens [len(tokens)]);
        the KV cache gets each row's new key. bitmask: host int32 [len(tokens), words], the tokens
        each row's grammar allows (None: no row has a grammar)."""
        count = len(tokens)
        size = next(s for s in self.sizes if s >= count) if self.padded else count
        host = self._host[:, :size]
        host[:4, :count] = torch.tensor([tokens, positions, rows, slots], dtype=torch.int64)
        if size > count:  # padding: token 0 at position 0 of the scratch row, no adapter
            host[:, count:] = 0
            host[_ROWS, count:] = self.blocks.scratch_row
        tables = self._host_tables[:size]
        torch.index_select(self.blocks.tables, 0, host[_ROWS], out=tables)
        page = self.blocks.block_size
        block = tables.gather(1, (host[_POSITIONS] // page)[:, None])[:, 0]
        host[_CACHE_SLOTS] = block * page + host[_POSITIONS] % page
        # whole buffers: a slice would not be one pinned block
        self._inputs.copy_(self._host, non_blocking=True)
        self._tables.copy_(self._host_tables, non_blocking=True)
        if bitmask is not None:
            self._bitmask[:count].copy_(bitmask, non_blocking=True)
            self._bitmask_clean = False
        elif not self._bitmask_clean:
            self._bitmask.fill_(-1)
            self._bitmask_clean = True
        if size in self._graphs:
            self._graphs[size].replay()
            graph, next_tokens = self._sample_graphs[(size, variant_for(self.flags))]
            graph.replay()
            return self._graph_logits[size][:count], next_tokens[:count]
        # padded steps keep the LoRA path on (as captured); unpadded ones skip it without adapters
        with_lora = self.padded or any(slots)
        kv_length = self.blocks.cache.max_seq_len if self.padded else max(positions) + 1
        logits = self.forward(self._batch(size, kv_length, with_lora))
        return logits[:count], self._sample(logits, size, self.flags, grammar=bitmask is not None)[:count]

    def capture(self) -> None:
        """Capture every padded size as a CUDA graph, largest first, sharing one memory pool, and
        each size's sampling variants after it. Warm-up runs write only into the scratch block
        (every input row is padding)."""
        if not self.padded or self.device.type != "cuda":
            raise ValueError("CUDA graphs need a padded step on a CUDA device")
        self._inputs.zero_()
        self._inputs[_ROWS] = self.blocks.scratch_row
        self._inputs[_CACHE_SLOTS] = self.blocks.cache.scratch_slot
        self._tables.fill_(self.blocks.cache.scratch_block)
        max_seq_len = self.blocks.cache.max_seq_len
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):  # warm up: Triton compiles, allocator settles
                logits = self.forward(self._batch(size, max_seq_len, True))
                for flags in VARIANTS.values():
                    self._sample(logits, size, flags, grammar=True)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for size in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._graph_logits[size] = self.forward(self._batch(size, max_seq_len, True))
            self._graphs[size] = graph
            for name, flags in VARIANTS.items():
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    next_tokens = self._sample(self._graph_logits[size], size, flags, grammar=True)
                self._sample_graphs[(size, name)] = (graph, next_tokens)
        torch.cuda.synchronize()
        self.load_sampling([], [], [])  # the warm-up advanced the padding rows' steps
        log.info("captured the decode step as CUDA graphs at batch sizes %s (sampling: %s)",
                 ", ".join(map(str, self.sizes)), ", ".join(VARIANTS))

    def _sample(self, logits: torch.Tensor, size: int, flags: SamplingFlags, grammar: bool) -> torch.Tensor:
        """The next token of each of the first `size` rows, from the loaded parameters (as
        server/model/sampling.py's sample), marked as seen in each row's table."""
        rows = self._inputs[_ROWS, :size]
        batch = SamplingBatch(**{name: t[:size] for name, t in self._sampling.items()}, flags=flags,
                              bias_ids=self._bias_ids[:size], bias_values=self._bias_values[:size])
        allowed = allowed_tokens(self._bitmask[:size], self.vocab_size) if grammar else None
        next_tokens = sample(logits, batch, self.seen[rows] if flags.use_penalty else None, allowed)
        self.seen[rows, next_tokens] = True
        return next_tokens

    def _batch(self, size: int, kv_length: int, with_lora: bool) -> ForwardBatch:
        inputs = self._inputs[:, :size]
        return ForwardBatch(tokens=inputs[_TOKENS, :, None], positions=inputs[_POSITIONS, :, None],
                            slots=inputs[_CACHE_SLOTS], block_tables=self._tables[:size],
                            token_slots=inputs[_SLOTS] if with_lora else None, prefill=False, kv_length=kv_length)
