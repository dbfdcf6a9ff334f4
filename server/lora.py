"""Batched multi-LoRA math: every token of a batch gets its own adapter.

For one target module the adapters live in a preallocated pool

    A[slots, r_max, in]    B[slots, out, r_max]    scale[slots]

Slot 0 is "no adapter" and stays zero. An adapter of rank r < r_max is zero-padded: the padded
rows of A and columns of B contribute exactly 0. Loading an adapter is a `copy_` into a free slot;
shapes never change, so nothing here allocates per step or blocks CUDA graphs.

`lora_delta_reference` is the one implementation used on CPU and the readable definition that any
faster kernel (same signature) is tested against.
"""

from __future__ import annotations

import torch
from torch import nn

# Tokens processed per gather: bounds the temporary A[idx]/B[idx] copies during long prefills.
_TOKENS_PER_CHUNK = 256


def lora_delta_reference(x: torch.Tensor, token_slots: torch.Tensor, lora_a: torch.Tensor,
                         lora_b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """delta[t] = scale[s] · B[s] @ (A[s] @ x[t])  with s = token_slots[t], for every token t.

    x: [N, in]; token_slots: [N] (int64); lora_a: [S, r, in]; lora_b: [S, out, r]; scale: [S].
    Returns [N, out] in x's dtype.
    """
    if x.shape[0] <= _TOKENS_PER_CHUNK:
        return _gather_bmm(x, token_slots, lora_a, lora_b, scale)
    return torch.cat([
        _gather_bmm(x[i:i + _TOKENS_PER_CHUNK], token_slots[i:i + _TOKENS_PER_CHUNK], lora_a, lora_b, scale)
        for i in range(0, x.shape[0], _TOKENS_PER_CHUNK)
    ])


def _gather_bmm(x, token_slots, lora_a, lora_b, scale):
    shrunk = torch.bmm(lora_a[token_slots], x.unsqueeze(-1))            # [N, r, 1]
    shrunk = shrunk * scale[token_slots].view(-1, 1, 1)
    return torch.bmm(lora_b[token_slots], shrunk).squeeze(-1)           # [N, out]


class LoRAPool(nn.Module):
    """The slots of one target module. Buffers, not parameters: serving never trains them."""

    def __init__(self, num_slots: int, max_rank: int, in_features: int, out_features: int,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("lora_a", torch.zeros(num_slots, max_rank, in_features, device=device, dtype=dtype))
        self.register_buffer("lora_b", torch.zeros(num_slots, out_features, max_rank, device=device, dtype=dtype))
        self.register_buffer("scale", torch.zeros(num_slots, device=device, dtype=dtype))

    @property
    def max_rank(self) -> int:
        return self.lora_a.shape[1]

    def write_slot(self, slot: int, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scale: float) -> None:
        """Copy one adapter's matrices into `slot` (zero-padded to max_rank); None clears it."""
        if slot == 0:
            raise ValueError("slot 0 is the base model and stays zero")
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if lora_a is None:
            self.scale[slot] = 0.0
            return
        rank = lora_a.shape[0]
        self.lora_a[slot, :rank].copy_(lora_a, non_blocking=True)
        self.lora_b[slot, :, :rank].copy_(lora_b, non_blocking=True)
        self.scale[slot] = scale

    def forward(self, x: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
        return lora_delta_reference(x, token_slots, self.lora_a, self.lora_b, self.scale)


class LoRALinear(nn.Module):
    """y = base(x) + scale[s]·(x·A[s]ᵀ)·B[s]ᵀ — a frozen (NF4) projection plus its adapter pool."""

    def __init__(self, base: nn.Module, pool: LoRAPool):
        super().__init__()
        self.base = base
        self.pool = pool

    def forward(self, x: torch.Tensor, token_slots: torch.Tensor | None) -> torch.Tensor:
        """x: [N, in]. token_slots None means no token in the batch has an adapter."""
        y = self.base(x)
        if token_slots is None:
            return y
        return y + self.pool(x, token_slots)
