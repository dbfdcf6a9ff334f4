"""Batched multi-LoRA math: every token of a batch gets its own adapter.

For one target module the adapters live in a preallocated pool

    A[slots, r_max, in]    sBᵀ[slots, r_max, out]

B is stored transposed, so the slots stack into one [slots·r_max, out] matrix, and pre-multiplied
by the adapter's scale s (α/r, or α/√r for rsLoRA) when it is written, so the forward never
multiplies by it. Slot 0 is "no adapter" and stays zero. An adapter of rank r < r_max is
zero-padded: padded rows of A and Bᵀ contribute exactly 0. Loading an adapter is a `copy_` into a
free slot; shapes never change, so nothing here allocates per step or blocks CUDA graphs.

The math, three ways:
- `lora_delta_reference` — the definition, token by token (gather + bmm). Readable; everything
  else is checked against it.
- `lora_delta_stacked` (TorchLoRA, the CPU path): one GEMM shrinks x by every slot's A at once, a
  per-token mask keeps only the token's own slot, one GEMM expands. Dense GEMMs instead of
  per-token weight gathers; its extra work grows with max_adapters·max_rank, fine on CPU.
- server/kernels/lora.py (TritonLoRA, CUDA): BGMV/SGMV kernels that read only the slots the batch
  uses, up to each slot's own rank.
The engine picks TorchLoRA or TritonLoRA once (EngineConfig.kernels); a LoRABatch carries the
choice and what it prepared for one forward.
"""

from __future__ import annotations

from dataclasses import dataclass

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


class TorchLoRA:
    """The stacked formulation in plain torch (CPU, and the readable twin of the kernels)."""

    name = "torch"

    def prepare(self, token_slots: torch.Tensor, rows: int, num_slots: int, dtype: torch.dtype) -> torch.Tensor:
        return slot_mask(token_slots, num_slots, dtype)

    def add(self, y: torch.Tensor, x: torch.Tensor, pool: "LoRAPool", mask: torch.Tensor) -> torch.Tensor:
        return y + lora_delta_stacked(x, mask, pool.lora_a, pool.scaled_b_t)


@dataclass(frozen=True)
class _Segments:
    starts: torch.Tensor  # int32 [rows + 1]
    slots: torch.Tensor  # int32 [rows]
    longest: int


class TritonLoRA:
    """server/kernels/lora.py: BGMV when every row is one token (decode), SGMV when rows are
    prompts (prefill: each row is a segment on its own slot). Adds into y in place."""

    name = "triton"

    def prepare(self, token_slots: torch.Tensor, rows: int, num_slots: int, dtype: torch.dtype):
        per_row = token_slots.numel() // rows
        if per_row == 1:
            return token_slots
        starts = torch.arange(rows + 1, device=token_slots.device, dtype=torch.int32) * per_row
        return _Segments(starts, token_slots.view(rows, per_row)[:, 0].to(torch.int32), per_row)

    def add(self, y: torch.Tensor, x: torch.Tensor, pool: "LoRAPool", prepared) -> torch.Tensor:
        from .kernels import lora as kernels

        r_max = pool.lora_a.shape[1]
        if isinstance(prepared, _Segments):
            h = kernels.sgmv_shrink(x, pool.lora_a, prepared.starts, prepared.slots, pool.slot_ranks, r_max, prepared.longest)
            return kernels.sgmv_expand(y, h, pool.scaled_b_t, prepared.starts, prepared.slots, pool.slot_ranks,
                                       pool.slice_starts, prepared.longest)
        h = kernels.bgmv_shrink(x, pool.lora_a, prepared, pool.slot_ranks, r_max)
        return kernels.bgmv_expand(y, h, pool.scaled_b_t, prepared, pool.slot_ranks, pool.slice_starts)


LoRAKernels = TorchLoRA | TritonLoRA


class LoRABatch:
    """Which slot each token of one forward uses, prepared once for the engine's LoRA kernels and
    shared by every module. token_slots: [rows·tokens_per_row]."""

    def __init__(self, token_slots: torch.Tensor, rows: int, num_slots: int, dtype: torch.dtype,
                 kernels: LoRAKernels = TorchLoRA()):
        self.token_slots = token_slots
        self.kernels = kernels
        self.prepared = kernels.prepare(token_slots, rows, num_slots, dtype)


class LoRAPool(nn.Module):
    """The slots of one target module. Buffers, not parameters: serving never trains them."""

    def __init__(self, num_slots: int, max_rank: int, in_features: int, out_features: int,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("lora_a", torch.zeros(num_slots, max_rank, in_features, device=device, dtype=dtype))
        self.register_buffer("scaled_b_t", torch.zeros(num_slots, max_rank, out_features, device=device, dtype=dtype))
        # what the kernels need to skip work: each slot's rank (0 = empty) and the output's slices
        self.register_buffer("slot_ranks", torch.zeros(num_slots, dtype=torch.int32, device=device))
        self.register_buffer("slice_starts", torch.tensor([0, out_features], dtype=torch.int32, device=device))

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
        self.slot_ranks[slot] = 0
        if lora_a is None:
            return
        rank = lora_a.shape[0]
        self.lora_a[slot, :rank].copy_(lora_a)
        self.scaled_b_t[slot, :rank].copy_(lora_b.T * scale)
        self.slot_ranks[slot] = rank


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
        return lora.kernels.add(y, x, self.pool, lora.prepared)
