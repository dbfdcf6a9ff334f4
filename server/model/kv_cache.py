"""The paged KV cache: one preallocated pool of fixed-size blocks per layer.

A sequence's keys live in the blocks its block table names, in order: position p is at offset
p % block_size of block table[p // block_size]. Memory is taken a block at a time as a sequence
grows (server/engine/blocks.py hands blocks out), so a 40-token request holds 3 blocks of 16, not
max_seq_len. Blocks hold stale keys past a sequence's length; attention masks them (by each row's
length), and writes overwrite them before they are read.

Layout per layer: [blocks, block_size, kv_heads, head_dim], so one token's keys are one
contiguous [kv_heads, head_dim] piece and a write is an index_copy_ at flat token slots
(block * block_size + offset). One more block than `num_blocks` is allocated and never handed
out: the scratch block, where padding tokens (a right-padded prefill's tail, a fixed-shape decode
step's padding rows, server/engine/decode_step.py) write their keys, so padding never touches a
sequence's cache. Unused block-table entries name it too.
"""

from __future__ import annotations

import math

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 max_seq_len: int, device: torch.device, dtype: torch.dtype):
        shape = (num_layers, num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_block = num_blocks
        self.scratch_slot = num_blocks * block_size  # where a padding token's keys go
        self.max_seq_len = max_seq_len
        self.max_blocks_per_seq = math.ceil(max_seq_len / block_size)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [B, kv_heads, T, head_dim] for the tokens whose flat slots are slots [B*T]."""
        heads, dim = k.shape[1], k.shape[3]
        self.keys[layer].view(-1, heads, dim).index_copy_(0, slots, k.transpose(1, 2).reshape(-1, heads, dim))
        self.values[layer].view(-1, heads, dim).index_copy_(0, slots, v.transpose(1, 2).reshape(-1, heads, dim))

    def gather(self, layer: int, tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions of each table's sequence, copied out: two
        [B, kv_heads, length, head_dim] (the readable path; the Triton kernel reads in place)."""
        # at least two blocks (where the table has them): a torch.compile'd decode would otherwise
        # specialize on one block and recompile when a sequence reaches its second
        count = max(math.ceil(length / self.block_size), min(2, tables.shape[1]))
        blocks = tables[:, :count]

        def take(pool: torch.Tensor) -> torch.Tensor:
            return pool[layer][blocks].flatten(1, 2)[:, :length].transpose(1, 2)

        return take(self.keys), take(self.values)
