"""Batched multi-LoRA math: every token of a batch gets its own adapter.

For one projection the adapters live in a preallocated pool

    A[slots, r_max, in]    sBᵀ[slots, r_max, out]

B is stored transposed, so the slots stack into one [slots·r_max, out] matrix, and pre-multiplied
by the adapter's scale s (α/r, or α/√r for rsLoRA) when it is written, so the forward never
multiplies by it. Slot 0 is "no adapter" and stays zero. An adapter of rank r < r_max is
zero-padded: padded rows of A and Bᵀ contribute exactly 0. Loading an adapter is a `copy_` into a
free slot; shapes never change, so nothing here allocates per step or blocks CUDA graphs.

Projections that share an input (q/k/v, gate/up) share one pool of n slices: A[slots, n·r_max, in]
holds slice i's A in rows i·r_max.., sBᵀ[slots, r_max, out_1 + … + out_n] slice i's in its own
columns (server/kernels/lora.py's layout). One shrink serves every slice; each slice's expand
adds only to its columns.

The math, three ways:
- `lora_delta_reference` — the definition, token by token (gather + bmm). Readable; everything
  else is checked against it.
- `lora_delta_stacked` (TorchLoRA's decode, the CPU path): one GEMM shrinks x by every slot's A at
  once, a per-token mask keeps only the token's own slot, one GEMM expands. Dense GEMMs instead of
  per-token weight gathers; its extra work grows with max_adapters·max_rank, fine for a decode step.
- `lora_delta_segmented` (TorchLoRA's prefill): rows of prompt tokens on one slot each, so each
  segment multiplies by its own slot's A and B only — the torch twin of SGMV. A long prefill pays
  for the adapters it uses, not for every slot.
- server/kernels/lora.py (TritonLoRA, CUDA): BGMV/SGMV kernels that read only the slots the batch
  uses, up to each slot's own rank.
- server/kernels/cpu_kernels.c (CPULoRA, kernels="cpu"): each slot's weights once for its tokens.
The engine picks TorchLoRA, TritonLoRA or CPULoRA once (EngineConfig.kernels); a LoRABatch carries the
choice and what it prepared for one forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def lora_delta_reference(x: torch.Tensor, token_slots: torch.Tensor, lora_a: torch.Tensor,
                         scaled_b_t: torch.Tensor, slice_starts: tuple[int, ...] | None = None) -> torch.Tensor:
    """delta[t, slice i] = (x[t] @ A_i[s]ᵀ) @ sBᵀ_i[s]  with s = token_slots[t], for every token t.

    x: [N, in]; token_slots: [N] int64; lora_a: [S, n·r, in]; scaled_b_t: [S, r, out];
    slice_starts: the n slices' first columns and out (None: one slice). Returns [N, out].
    """
    rank, out = scaled_b_t.shape[1], scaled_b_t.shape[2]
    slice_starts = slice_starts or (0, out)
    slices = []
    for i, (lo, hi) in enumerate(zip(slice_starts[:-1], slice_starts[1:])):
        shrunk = torch.bmm(lora_a[token_slots, i * rank:(i + 1) * rank], x.unsqueeze(-1)).squeeze(-1)  # [N, r]
        slices.append(torch.bmm(shrunk.unsqueeze(1), scaled_b_t[token_slots, :, lo:hi]).squeeze(1))
    return torch.cat(slices, dim=1)


def slot_mask(token_slots: torch.Tensor, num_slots: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, S-1] one-hot of each token's slot, slot 0 (no adapter) left out. Built once per forward
    and shared by every LoRA module. (Not F.one_hot: on CUDA it validates its input with a sync.)"""
    slots = torch.arange(1, num_slots, device=token_slots.device)
    return (token_slots[:, None] == slots[None, :]).to(dtype)


def lora_delta_stacked(x: torch.Tensor, mask: torch.Tensor, lora_a: torch.Tensor, scaled_b_t: torch.Tensor,
                       slice_starts: tuple[int, ...] | None = None) -> torch.Tensor:
    """Same result as lora_delta_reference, given mask = slot_mask(token_slots, S, x.dtype)."""
    num_tokens = x.shape[0]
    slots, rank = lora_a.shape[0] - 1, scaled_b_t.shape[1]
    slice_starts = slice_starts or (0, scaled_b_t.shape[2])
    n = len(slice_starts) - 1
    shrunk = x @ lora_a[1:].reshape(slots * n * rank, -1).T                 # [N, (S-1)·n·r]
    shrunk = shrunk.view(num_tokens, slots, n, rank) * mask[:, :, None, None]
    b = scaled_b_t[1:].reshape(slots * rank, -1)                            # [(S-1)·r, out]
    if n == 1:
        return shrunk.view(num_tokens, slots * rank) @ b
    return torch.cat([shrunk[:, :, i].reshape(num_tokens, slots * rank) @ b[:, lo:hi]
                      for i, (lo, hi) in enumerate(zip(slice_starts[:-1], slice_starts[1:]))], dim=1)


def lora_delta_segmented(x: torch.Tensor, segments: list[tuple[int, int, int]], lora_a: torch.Tensor,
                         scaled_b_t: torch.Tensor, slice_starts: tuple[int, ...] | None = None) -> torch.Tensor:
    """Same result as lora_delta_reference when tokens [start, stop) all use `slot`, for each
    (start, stop, slot) of `segments`, and every other token slot 0."""
    rank, out = scaled_b_t.shape[1], scaled_b_t.shape[2]
    slice_starts = slice_starts or (0, out)
    delta = x.new_zeros(x.shape[0], out)
    for start, stop, slot in segments:
        shrunk = x[start:stop] @ lora_a[slot].T  # [T, n·r]
        for i, (lo, hi) in enumerate(zip(slice_starts[:-1], slice_starts[1:])):
            delta[start:stop, lo:hi] = shrunk[:, i * rank:(i + 1) * rank] @ scaled_b_t[slot, :, lo:hi]
    return delta


def lora_add_segmented(y: torch.Tensor, x: torch.Tensor, segments: list[tuple[int, int, int]],
                       lora_a: torch.Tensor, scaled_b_t: torch.Tensor, slice_starts: tuple[int, ...]) -> torch.Tensor:
    """y += lora_delta_segmented(...), in place: each slice's expand accumulates straight into its
    columns of y (a strided GEMM output), with no [tokens, out] delta to zero, fill and add."""
    rank = scaled_b_t.shape[1]
    for start, stop, slot in segments:
        shrunk = x[start:stop] @ lora_a[slot].T
        for i, (lo, hi) in enumerate(zip(slice_starts[:-1], slice_starts[1:])):
            y[start:stop, lo:hi].addmm_(shrunk[:, i * rank:(i + 1) * rank], scaled_b_t[slot, :, lo:hi])
    return y


def row_segments(token_slots: torch.Tensor, rows: int) -> list[tuple[int, int, int]]:
    """(first token, token past the last, slot) of rows of tokens on one slot each (a prefill),
    consecutive rows on one slot merged, slot 0 (no adapter) left out."""
    per_row = token_slots.numel() // rows
    segments = []
    for row, slot in enumerate(token_slots.view(rows, per_row)[:, 0].tolist()):
        if slot and segments and segments[-1][2] == slot and segments[-1][1] == row * per_row:
            segments[-1] = (segments[-1][0], (row + 1) * per_row, slot)
        elif slot:
            segments.append((row * per_row, (row + 1) * per_row, slot))
    return segments


class TorchLoRA:
    """The formulations in plain torch (CPU, and the readable twin of the kernels): stacked for
    decode steps (one token per row), segmented for prefill (rows of tokens on one slot each)."""

    name = "torch"

    def prepare(self, token_slots: torch.Tensor, rows: int, num_slots: int, dtype: torch.dtype):
        if token_slots.numel() == rows:
            return slot_mask(token_slots, num_slots, dtype)
        return row_segments(token_slots, rows)

    def add(self, y: torch.Tensor, x: torch.Tensor, pool: "LoRAPool", prepared) -> torch.Tensor:
        if isinstance(prepared, list):
            return y + lora_delta_segmented(x, prepared, pool.lora_a, pool.scaled_b_t, pool.starts)
        return y + lora_delta_stacked(x, prepared, pool.lora_a, pool.scaled_b_t, pool.starts)


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
        from ..kernels import lora as kernels

        r_max = pool.max_rank
        if isinstance(prepared, _Segments):
            h = kernels.sgmv_shrink(x, pool.lora_a, prepared.starts, prepared.slots, pool.slot_ranks, r_max, prepared.longest)
            return kernels.sgmv_expand(y, h, pool.scaled_b_t, prepared.starts, prepared.slots, pool.slot_ranks,
                                       pool.slice_starts, prepared.longest)
        h = kernels.bgmv_shrink(x, pool.lora_a, prepared, pool.slot_ranks, r_max)
        return kernels.bgmv_expand(y, h, pool.scaled_b_t, prepared, pool.slot_ranks, pool.slice_starts)


# Rows of more tokens than this (prefills) take the segmented GEMMs; fewer, the C kernel, whose
# dot products read each slot's weights once for all its tokens but run at no GEMM's pace.
CPU_LORA_KERNEL_MAX_TOKENS_PER_ROW = 16


class CPULoRA:
    """EngineConfig.kernels="cpu"'s LoRA outside decode steps (those run theirs inside the C decoder
    layers), added into y in place: rows of a few tokens through server/kernels/cpu_kernels.c's
    lora_add (every token its own slot, each slot's A and sBᵀ read once), prompts through
    lora_add_segmented's GEMMs per segment (a 512-token prompt's LoRA took 300 ms in lora_add,
    a third of its prefill)."""

    name = "cpu"

    def __init__(self, library):
        self.library = library

    def prepare(self, token_slots: torch.Tensor, rows: int, num_slots: int, dtype: torch.dtype):
        if token_slots.numel() > rows * CPU_LORA_KERNEL_MAX_TOKENS_PER_ROW:
            return row_segments(token_slots, rows)
        return token_slots.to(torch.int64).contiguous()

    def add(self, y: torch.Tensor, x: torch.Tensor, pool: "LoRAPool", prepared) -> torch.Tensor:
        if isinstance(prepared, list):
            return lora_add_segmented(y, x, prepared, pool.lora_a, pool.scaled_b_t, pool.starts)
        return self.library.lora_add(y.contiguous(), x, pool.lora_a, pool.scaled_b_t, pool.host_starts, prepared)


LoRAKernels = TorchLoRA | TritonLoRA | CPULoRA


class LoRABatch:
    """Which slot each token of one forward uses, prepared once for the engine's LoRA kernels and
    shared by every module. token_slots: [rows·tokens_per_row]."""

    def __init__(self, token_slots: torch.Tensor, rows: int, num_slots: int, dtype: torch.dtype,
                 kernels: LoRAKernels = TorchLoRA()):
        self.token_slots = token_slots
        self.kernels = kernels
        self.prepared = kernels.prepare(token_slots, rows, num_slots, dtype)


class LoRAPool(nn.Module):
    """The slots of one projection, or of projections sharing an input (`slices`: each target
    module's name and output features, in output order). Buffers, not parameters: serving never
    trains them."""

    def __init__(self, num_slots: int, max_rank: int, in_features: int, slices: dict[str, int],
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.slices = dict(slices)
        starts = [0]
        for out in self.slices.values():
            starts.append(starts[-1] + out)
        self.starts = tuple(starts)  # host copy, for the torch path and slot writes
        n = len(self.slices)
        self.register_buffer("lora_a", torch.zeros(num_slots, n * max_rank, in_features, device=device, dtype=dtype))
        self.register_buffer("scaled_b_t", torch.zeros(num_slots, max_rank, starts[-1], device=device, dtype=dtype))
        # what the kernels need to skip work: each slot's rank (0 = empty) and the output's slices
        self.register_buffer("slot_ranks", torch.zeros(num_slots, dtype=torch.int32, device=device))
        self.register_buffer("slice_starts", torch.tensor(starts, dtype=torch.int32, device=device))
        self.host_starts = torch.tensor(starts, dtype=torch.int64)  # for server/kernels/cpu_kernels.c

    @property
    def num_slots(self) -> int:
        return self.lora_a.shape[0]

    @property
    def max_rank(self) -> int:
        return self.scaled_b_t.shape[1]

    def write_slot(self, slot: int, modules: dict) -> None:
        """Copy one adapter's modules (name -> ModuleLoRA: A [r, in], B [out, r] as PEFT stores
        them, and the scale) into `slot`, zero-padded to max_rank, with each scale folded into its
        B (in B's precision, before any cast). Slices the adapter lacks, or all of them for {}, are zero."""
        if slot == 0:
            raise ValueError("slot 0 is the base model and stays zero")
        unknown = set(modules) - set(self.slices)
        if unknown:
            raise ValueError(f"this pool holds {sorted(self.slices)}, not {sorted(unknown)}")
        self.lora_a[slot].zero_()
        self.scaled_b_t[slot].zero_()
        rank = 0
        for i, name in enumerate(self.slices):
            module = modules.get(name)
            if module is None:
                continue
            r = module.lora_a.shape[0]
            self.lora_a[slot, i * self.max_rank:i * self.max_rank + r].copy_(module.lora_a)
            self.scaled_b_t[slot, :r, self.starts[i]:self.starts[i + 1]].copy_(module.lora_b.T * module.scale)
            rank = max(rank, r)
        self.slot_ranks[slot] = rank


class LoRALinear(nn.Module):
    """y = base(x) + scale[s]·(x·A[s]ᵀ)·B[s]ᵀ — a frozen (NF4) projection plus its adapter pool
    (or projections sharing an input, base and pool stacked alike: y holds their outputs side by side)."""

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
