"""Batched multi-LoRA math: every token of a batch gets its own adapter.

For one target module the adapters live in a preallocated pool

    A[slots, r_max, in]    sBᵀ[slots, r_max, out]

B is stored transposed, so the slots stack into one [slots·r_max, out] matrix, and pre-multiplied
by the adapter's scale s (α/r, or α/√r for rsLoRA) when it is written, so the forward never
multiplies by it. Slot 0 is "no adapter" and stays zero. An adapter of rank r < r_max is
zero-padded: padded rows of A and Bᵀ contribute exactly 0. Loading an adapter is a `copy_` into a
free slot; shapes never change, so nothing here allocates per step or blocks CUDA graphs.

Two implementations of the same math (the hot path takes the token→slot one-hot, built once per
forward, instead of the slot indices):
- `lora_delta_reference` — the definition, token by token (gather + bmm). Readable; tests and
  any future kernel are checked against it.
- `lora_delta_stacked` — the hot path: one GEMM shrinks x by every slot's A at once, a per-token
  mask keeps only the token's own slot, one GEMM expands. Dense GEMMs instead of
  per-token weight gathers; extra work grows with max_adapters·max_rank, which stays small next to
  the hidden size for the pool sizes a server uses.
"""

from __future__ import annotations

import torch
from torch import nn


def lora_delta_reference(x: torch.Tensor, token_slots: torch.Tensor, lora_a: torch.Tensor,
                         scaled_b_t: torch.Tensor) -> torch.Tensor:
    """delta[t] = (x[t] @ A[s]ᵀ) @ sBᵀ[s]  with s = token_slots[t], for every token t.

    x: [N, in]; token_slots: [N] int64; lora_a: [S, r, in]; scaled_b_t: [S, r, out].
    Returns [N, out] in x's dtype.
    """
    shrunk = torch.bmm(lora_a[token_slots], x.unsqueeze(-1)).squeeze(-1)     # [N, r]
    return torch.bmm(shrunk.unsqueeze(1), scaled_b_t[token_slots]).squeeze(1)  # [N, out]


def slot_mask(token_slots: torch.Tensor, num_slots: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, S-1] one-hot of each token's slot, slot 0 (no adapter) left out. Built once per forward
    and shared by every LoRA module. (Not F.one_hot: on CUDA it validates its input with a sync.)"""
    slots = torch.arange(1, num_slots, device=token_slots.device)
    return (token_slots[:, None] == slots[None, :]).to(dtype)


def lora_delta_stacked(x: torch.Tensor, mask: torch.Tensor, lora_a: torch.Tensor,
                       scaled_b_t: torch.Tensor) -> torch.Tensor:
    """Same result as lora_delta_reference, given mask = slot_mask(token_slots, S, x.dtype)."""
    num_tokens = x.shape[0]
    slots, rank = lora_a.shape[0] - 1, lora_a.shape[1]
    shrunk = x @ lora_a[1:].reshape(slots * rank, -1).T                     # [N, (S-1)·r]
    shrunk = (shrunk.view(num_tokens, slots, rank) * mask.unsqueeze(-1)).view(num_tokens, slots * rank)
    return shrunk @ scaled_b_t[1:].reshape(slots * rank, -1)                 # [N, out]


class LoRABatch:
    """Which slot each token of a forward uses: token_slots [N] and its mask, computed once."""

    def __init__(self, token_slots: torch.Tensor, num_slots: int, dtype: torch.dtype):
        self.token_slots = token_slots
        self.mask = slot_mask(token_slots, num_slots, dtype)


class LoRAPool(nn.Module):
    """The slots of one target module. Buffers, not parameters: serving never trains them."""

    def __init__(self, num_slots: int, max_rank: int, in_features: int, out_features: int,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("lora_a", torch.zeros(num_slots, max_rank, in_features, device=device, dtype=dtype))
        self.register_buffer("scaled_b_t", torch.zeros(num_slots, max_rank, out_features, device=device, dtype=dtype))

    @property
    def num_slots(self) -> int:
        return self.lora_a.shape[0]

    def write_slot(self, slot: int, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scale: float) -> None:
        """Copy one adapter (A [r, in], B [out, r] as PEFT stores them) into `slot`, zero-padded
        to max_rank, with `scale` folded into B (in B's precision, before any cast); None clears it."""
        if slot == 0:
            raise ValueError("slot 0 is the base model and stays zero")
        self.lora_a[slot].zero_()
        self.scaled_b_t[slot].zero_()
        if lora_a is None:
            return
        rank = lora_a.shape[0]
        self.lora_a[slot, :rank].copy_(lora_a)
        self.scaled_b_t[slot, :rank].copy_(lora_b.T * scale)

    def forward(self, x: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
        return lora_delta_stacked(x, batch.mask, self.lora_a, self.scaled_b_t)


class LoRALinear(nn.Module):
    """y = base(x) + scale[s]·(x·A[s]ᵀ)·B[s]ᵀ — a frozen (NF4) projection plus its adapter pool."""

    def __init__(self, base: nn.Module, pool: LoRAPool):
        super().__init__()
        self.base = base
        self.pool = pool

    def forward(self, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        """x: [N, in]. lora None means no token in the batch has an adapter."""
        y = self.base(x)
        if lora is None:
            return y
        return y + self.pool(x, lora)
