"""Who holds which KV blocks: the block manager hands out the paged cache's blocks
(server/model/kv_cache.py) and the batch rows, keeps every row's block table, and remembers which
blocks hold which prompt prefixes (prefix caching).

A sequence admitted gets a row (its place in the batch: its seen-token table, its block table)
and the blocks its tokens so far need; before each decode step it gets one more block when its
next token starts one. A finished or preempted sequence gives its blocks back at once. The block
tables live on the host as one [rows + 1, max_blocks_per_seq + 1] int32 tensor (the last row, all
scratch block, is what padding rows read); the runner copies the rows of a step's sequences to
the device with the step's other inputs.

Prefix caching. Once a prompt is in the cache, each of its full blocks is registered under a key:
a hash chain over (the previous block's key, the block's token ids), started from the identity
of what computed it — the adapter version's content hash (its files', not its name), or "base".
A LoRA on any projection changes every later layer's keys, so the base model's blocks and an
adapter's are never the same key, and a new version under an old name never hits the old one's
blocks (the same files loaded again under another name do hit: their keys are the same numbers).
A new sequence takes the blocks of its longest registered prefix and is prefilled from there.
The block holding a prompt's last token is never shared (the prompt's last position is always
computed, for its logits), so a shared block is never written. Blocks nobody holds stay
registered, and are handed out again least recently released first when the free list is empty.
The engine's base model is fixed for its life, so its fingerprint need not be in the keys.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict, deque

import torch

from ..config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from ..model.kv_cache import KVCache
from .sequence import Sequence


def pool_blocks(config: EngineConfig, per_block: int, device: torch.device, model_positions: int) -> tuple[int, int]:
    """How many blocks the KV pool gets (the scratch block comes on top), and the max_seq_len in
    force. The pool: kv_cache_bytes' worth; by default max_batch_size sequences of max_seq_len
    (more could never be used at once), on CUDA no more than kv_cache_fraction of the device
    memory still free (the weights and the LoRA pools are allocated by then), on CPU with the
    model's length no more than DEFAULT_CPU_KV_CACHE_BYTES. An explicit max_seq_len must fit the
    pool; the model's own (`model_positions`, config.max_seq_len None) is cut to what one
    sequence can take from it."""
    explicit = config.max_seq_len is not None
    wanted = config.max_seq_len if explicit else model_positions
    per_sequence = math.ceil(wanted / config.kv_block_size)
    if config.kv_cache_bytes is not None:
        blocks, budget = config.kv_cache_bytes // per_block - 1, f"kv_cache_bytes={config.kv_cache_bytes}"
    else:
        blocks, budget = config.max_batch_size * per_sequence, ""
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            blocks = min(blocks, int(free * config.kv_cache_fraction) // per_block - 1)
            budget = f"{free / 2**30:.1f} GiB free on {device}: kv_cache_fraction={config.kv_cache_fraction} of it"
        elif not explicit:
            blocks = min(blocks, DEFAULT_CPU_KV_CACHE_BYTES // per_block - 1)
    if blocks < (per_sequence if explicit else 1):
        raise ValueError(f"{budget} holds no sequence of {wanted} tokens ({per_sequence} blocks of {per_block} bytes, "
                         "and one scratch block); lower --max-seq-len")
    return blocks, min(wanted, blocks * config.kv_block_size)


class BlockManager:
    def __init__(self, cache: KVCache, rows: int, prefix_caching: bool = True):
        self.cache = cache
        self.block_size = cache.block_size
        self.rows = rows
        self.scratch_row = rows
        self.prefix_caching = prefix_caching
        # one column more than a sequence can use, always the scratch block: attention's slice of
        # a table is then never the whole table (torch.compile would specialize on that)
        self.tables = torch.full((rows + 1, cache.max_blocks_per_seq + 1), cache.scratch_block, dtype=torch.int32)
        self._free_rows = list(range(rows - 1, -1, -1))
        self._free_blocks: deque[int] = deque(range(cache.num_blocks))  # holding nothing
        self._holders = [0] * cache.num_blocks  # sequences holding each block
        self._registered: dict[bytes, int] = {}  # prefix key -> the block holding those tokens' keys
        self._key_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # registered blocks nobody holds, oldest first
        self.prompt_tokens = 0  # prompt tokens admitted (prefix caching's denominator)
        self.cached_tokens = 0  # of which found in the cache

    # ---------------------------------------------------------------- counts

    @property
    def free_blocks(self) -> int:
        """Blocks a sequence can take: empty ones and registered ones nobody holds."""
        return len(self._free_blocks) + len(self._idle)

    @property
    def used_blocks(self) -> int:
        return self.cache.num_blocks - self.free_blocks

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    def usage_ratio(self) -> float:
        return self.used_blocks / self.cache.num_blocks

    def holds_every_row(self) -> bool:
        """Whether every row can reach max_seq_len at once (then no sequence is ever preempted)."""
        return self.cache.num_blocks >= self.rows * self.cache.max_blocks_per_seq

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    # ---------------------------------------------------------------- sequences

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        """A row and the blocks for seq's tokens are free (its cached prefix counted), with
        `reserve` blocks to spare."""
        if not self._free_rows:
            return False
        hits = self._hits(seq)
        taken_idle = sum(1 for block in hits if self._holders[block] == 0)  # they leave the free pool too
        return self.blocks_for(len(seq.tokens)) - len(hits) + taken_idle + reserve <= self.free_blocks

    def first_key(self, seq: Sequence) -> bytes | None:
        """The key of seq's first shareable block (None: none, or prefix caching is off)."""
        keys = self._keys(seq) if self.prefix_caching else []
        return keys[0] if keys else None

    def cached_prefix(self, seq: Sequence) -> int:
        """How many of seq's tokens allocate() would find in the cache now."""
        return len(self._hits(seq)) * self.block_size

    def allocate(self, seq: Sequence, share: bool = True) -> None:
        """A row and blocks for every token seq holds (can_allocate must have said yes): its
        longest cached prefix's blocks when `share`, fresh ones for the rest. seq.prefilled is
        set to the tokens already in the cache."""
        hits = self._hits(seq) if share else []
        for block in hits:
            if self._holders[block] == 0:
                del self._idle[block]
            self._holders[block] += 1
        fresh = [self._take() for _ in range(self.blocks_for(len(seq.tokens)) - len(hits))]
        seq.row = self._free_rows.pop()
        seq.blocks = hits + fresh
        seq.prefilled = len(hits) * self.block_size
        self.tables[seq.row, : len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
        if share and not seq.preempted:  # a readmission mostly finds its own blocks: not a prompt
            self.prompt_tokens += len(seq.tokens)
            self.cached_tokens += seq.prefilled

    def register(self, seq: Sequence) -> None:
        """seq's prompt is in the cache: its full blocks (but the last token's) can be shared."""
        if not self.prefix_caching:
            return
        for key, block in zip(self._keys(seq), seq.blocks):
            if key not in self._registered and block not in self._key_of:
                self._registered[key] = block
                self._key_of[block] = key

    def grow(self, seq: Sequence) -> bool:
        """Blocks for seq's next token too (the decode step writes it at position len(tokens) - 1,
        after prefill the first position not yet in the cache). False when none is free."""
        needed = self.blocks_for(len(seq.tokens)) - len(seq.blocks)
        if needed > self.free_blocks:
            return False
        for _ in range(needed):
            block = self._take()
            self.tables[seq.row, len(seq.blocks)] = block
            seq.blocks.append(block)
        return True

    def release(self, seq: Sequence) -> None:
        """seq's row and blocks go back (its table row back to the scratch block). Registered
        blocks stay registered; the tail of a prefix is released first, so it is reused last."""
        if seq.row < 0:
            return
        for block in reversed(seq.blocks):
            self._holders[block] -= 1
            if self._holders[block] == 0:
                if block in self._key_of:
                    self._idle[block] = None
                else:
                    self._free_blocks.append(block)
        self.tables[seq.row].fill_(self.cache.scratch_block)
        self._free_rows.append(seq.row)
        seq.row, seq.blocks = -1, []

    def slots(self, seq: Sequence, start: int, stop: int) -> torch.Tensor:
        """The flat cache slots (block * block_size + offset) of seq's positions [start, stop)."""
        positions = torch.arange(start, stop)
        blocks = self.tables[seq.row, positions // self.block_size].long()
        return blocks * self.block_size + positions % self.block_size

    # ---------------------------------------------------------------- parts

    def _take(self) -> int:
        """An empty block, else the registered one released longest ago (it is unregistered)."""
        if self._free_blocks:
            block = self._free_blocks.popleft()
        else:
            block, _ = self._idle.popitem(last=False)
            del self._registered[self._key_of.pop(block)]
        self._holders[block] = 1
        return block

    def _hits(self, seq: Sequence) -> list[int]:
        """The registered blocks of seq's longest cached prefix (none while seq must compute every
        prompt position for its prompt logprobs)."""
        if not (self.prefix_caching and seq.shares_prefix):
            return []
        hits = []
        for key in self._keys(seq):
            block = self._registered.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def _keys(self, seq: Sequence) -> list[bytes]:
        """The keys of seq's full blocks before the one holding its last token (cached on seq
        until its tokens change)."""
        if seq.prefix_keys is not None and seq.prefix_keys[0] == len(seq.tokens):
            return seq.prefix_keys[1]
        size = self.block_size
        # a tenant's prefixes are its own: another tenant must not learn from a cache hit (its
        # cached_tokens, its time to first token) that a prompt was sent (no tenants: all share)
        root = seq.adapter.weights.content_hash if seq.adapter else "base"
        if seq.request.tenant is not None:
            root += "\0tenant\0" + seq.request.tenant
        parent = hashlib.sha256(root.encode()).digest()
        keys = []
        for start in range(0, (len(seq.tokens) - 1) // size * size, size):
            parent = hashlib.sha256(parent + array("q", seq.tokens[start:start + size]).tobytes()).digest()
            keys.append(parent)
        seq.prefix_keys = (len(seq.tokens), keys)
        return keys
