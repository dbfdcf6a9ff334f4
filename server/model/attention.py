"""Decode attention: each running sequence's new token attends to its own keys in the paged KV
cache, through its block table.

Three implementations, chosen once per engine with the other kernels (EngineConfig.kernels):
- TorchDecodeAttention: gathers the rows' blocks up to kv_length into a [B, kv_heads, L, d]
  copy and masks each row's tail (scaled_dot_product_attention). Plain and readable; the CPU path.
- TritonDecodeAttention: server/kernels/attention.py reads every row's blocks where they are, up
  to its own length; nothing is copied.
- CPUDecodeAttention: the same in place on CPU, in server/kernels/cpu_kernels.c.
`prepare` runs once per forward (what every layer shares); `__call__` once per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv_cache import KVCache


class TorchDecodeAttention:
    name = "torch"

    def prepare(self, positions: torch.Tensor, kv_length: int) -> torch.Tensor:
        """The [B, 1, T, kv_length] mask: a row sees its cache up to its own position."""
        key_pos = torch.arange(kv_length, device=positions.device)
        return key_pos[None, None, None, :] <= positions[:, None, :, None]

    def __call__(self, q: torch.Tensor, cache: KVCache, layer: int, block_tables: torch.Tensor, kv_length: int,
                 mask: torch.Tensor) -> torch.Tensor:
        keys, values = cache.gather(layer, block_tables, kv_length)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


class TritonDecodeAttention(TorchDecodeAttention):
    """One new token per row through the kernel; a prefill chunk (several new tokens of one
    prompt, chunked prefill) attends through the gather path it inherits."""

    name = "triton"

    def prepare(self, positions: torch.Tensor, kv_length: int) -> torch.Tensor:
        if positions.shape[1] > 1:
            return super().prepare(positions, kv_length)
        return (positions[:, -1] + 1).to(torch.int32)  # each row's length: its new token's position + 1

    def __call__(self, q: torch.Tensor, cache: KVCache, layer: int, block_tables: torch.Tensor, kv_length: int,
                 context: torch.Tensor) -> torch.Tensor:
        if q.shape[2] > 1:
            return super().__call__(q, cache, layer, block_tables, kv_length, context)
        from ..kernels.attention import decode_attention

        out = decode_attention(q[:, :, 0], cache.keys[layer], cache.values[layer], block_tables, context,
                               q.shape[-1] ** -0.5)
        return out.unsqueeze(2)  # [B, heads, 1, head_dim], as scaled_dot_product_attention returns


class CPUDecodeAttention(TorchDecodeAttention):
    """One new token per row through the C kernel, in place; a prefill chunk through the gather
    path it inherits."""

    name = "cpu"

    def __init__(self, library):
        self.library = library

    def prepare(self, positions: torch.Tensor, kv_length: int) -> torch.Tensor:
        if positions.shape[1] > 1:
            return super().prepare(positions, kv_length)
        return (positions[:, -1] + 1).to(torch.int32)

    def __call__(self, q: torch.Tensor, cache: KVCache, layer: int, block_tables: torch.Tensor, kv_length: int,
                 context: torch.Tensor) -> torch.Tensor:
        if q.shape[2] > 1:
            return super().__call__(q, cache, layer, block_tables, kv_length, context)
        out = self.library.decode_attention(q[:, :, 0], cache.keys[layer], cache.values[layer], block_tables, context,
                                            q.shape[-1] ** -0.5)
        return out.unsqueeze(2)


DecodeAttention = TorchDecodeAttention | TritonDecodeAttention | CPUDecodeAttention
