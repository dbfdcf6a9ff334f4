"""Batched multi-LoRA: every token of a batch with its own adapter slot, reading only the slots used.

Layout of one (possibly fused) target module's pool, S slots, slot 0 = no adapter (all zeros):

    lora_a      [S, n_slices·r_max, in]   slice i's A in rows i·r_max .. i·r_max + r_max
    scaled_b_t  [S, r_max, out_total]     slice i's (scale·B)ᵀ in columns starts[i] .. starts[i+1]
    slot_ranks  [S] int32                 the adapter's rank (rows past it are zero padding)

A fused module (q/k/v, gate/up) shares its input, so one shrink computes every slice's
x·Aᵀ at once; the expand adds each slice's part to its own columns of the fused output.

    shrink:  h[t, i·r + j] = x[t] · A_i[s_t, j]                     (float32)
    expand:  y[t, c]      += Σ_j h[t, i·r + j] · sBᵀ[s_t, j, c]      for c in slice i

Two shapes of the same math:
- BGMV (decode): `token_slots[t]` names each token's slot. One program per token (and block of
  rank or output): a token on slot 0, and rank rows past a slot's own rank, load nothing.
- SGMV (prefill): tokens come in contiguous segments, one slot each (`segment_starts`,
  `segment_slots`); one program per segment and block of tokens, so a segment's A and B are read
  once per block instead of once per token.

The `*_reference` functions are the definition (gather + bmm, float32); the Triton kernels are
tested against them under TRITON_INTERPRET=1 on CPU and run compiled on CUDA.
"""

from __future__ import annotations

import torch

from . import triton_or_none

triton, tl = triton_or_none()


def bgmv_shrink_reference(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """h [N, n_slices·r_max] = per token x[t] · A[s_t]ᵀ, in float32 (float64 for float64 inputs)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.bmm(lora_a[token_slots].to(dtype), x.to(dtype).unsqueeze(-1)).squeeze(-1)


def bgmv_expand_reference(y: torch.Tensor, h: torch.Tensor, scaled_b_t: torch.Tensor, token_slots: torch.Tensor,
                          slice_starts: list[int]) -> torch.Tensor:
    """y[t, slice i] += h[t, slice i's ranks] · sBᵀ[s_t][:, slice i]; in place, returns y."""
    rank = scaled_b_t.shape[1]
    b = scaled_b_t[token_slots].to(h.dtype)
    for i, (lo, hi) in enumerate(zip(slice_starts[:-1], slice_starts[1:])):
        delta = torch.bmm(h[:, i * rank:(i + 1) * rank].unsqueeze(1), b[:, :, lo:hi]).squeeze(1)
        y[:, lo:hi] += delta.to(y.dtype)
    return y


def sgmv_shrink_reference(x: torch.Tensor, lora_a: torch.Tensor, segment_starts: list[int],
                          segment_slots: list[int]) -> torch.Tensor:
    return bgmv_shrink_reference(x, lora_a, _token_slots(segment_starts, segment_slots, x.device))


def sgmv_expand_reference(y: torch.Tensor, h: torch.Tensor, scaled_b_t: torch.Tensor, segment_starts: list[int],
                          segment_slots: list[int], slice_starts: list[int]) -> torch.Tensor:
    return bgmv_expand_reference(y, h, scaled_b_t, _token_slots(segment_starts, segment_slots, y.device), slice_starts)


def _token_slots(segment_starts: list[int], segment_slots: list[int], device) -> torch.Tensor:
    lengths = torch.tensor(segment_starts[1:]) - torch.tensor(segment_starts[:-1])
    return torch.tensor(segment_slots).repeat_interleave(lengths).to(device)


if triton is not None:

    @triton.jit
    def _shrink_tile(x_ptr, a_ptr, h_ptr, tokens, token_ok, slot, rank, stride_xt, stride_as, stride_ar, stride_ht,
                     K, R_MAX: tl.constexpr, R_TOTAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, pid_r):
        """h[tokens, rows] for one slot: rows pid_r·BLOCK_R.. of the stacked slices' ranks."""
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        # padding rows and slot 0 are never loaded (the slot is broadcast first: Triton's
        # interpreter refuses a scalar bool inside a mask)
        row_ok = (rows < R_TOTAL) & ((rows % R_MAX) < rank) & ((rows * 0 + slot) != 0)
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x = tl.load(x_ptr + tokens[:, None] * stride_xt + ks[None, :], mask=token_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(a_ptr + slot * stride_as + rows[:, None] * stride_ar + ks[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if BLOCK_T >= 16:  # SGMV: a tensor-core tile
                if DOT_FP32:  # see nf4.py: the interpreter's bf16 tl.dot is wrong
                    x, a = x.to(tl.float32), a.to(tl.float32)
                acc += tl.dot(x, tl.trans(a), out_dtype=tl.float32, input_precision="ieee")
            else:  # BGMV: one token, a GEMV
                acc += tl.sum(x.to(tl.float32)[:, None, :] * a.to(tl.float32)[None, :, :], axis=2)
        tl.store(h_ptr + tokens[:, None] * stride_ht + rows[None, :], acc,
                 mask=token_ok[:, None] & (rows < R_TOTAL)[None, :])

    @triton.jit
    def _expand_tile(y_ptr, h_ptr, b_ptr, starts_ptr, tokens, token_ok, slot, rank, stride_yt, stride_ht, stride_bs,
                     stride_br, N, R_MAX: tl.constexpr, N_SLICES: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, pid_n):
        """y[tokens, cols] += h · sBᵀ[slot], each column taking the h of its own slice."""
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = (cols < N) & ((cols * 0 + slot) != 0)
        slice_of = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for i in tl.static_range(1, N_SLICES):
            slice_of += (cols >= tl.load(starts_ptr + i)).to(tl.int32)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for start in range(0, R_MAX, BLOCK_R):
            js = start + tl.arange(0, BLOCK_R)
            j_ok = js < rank
            b = tl.load(b_ptr + slot * stride_bs + js[:, None] * stride_br + cols[None, :],
                        mask=j_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            for i in tl.static_range(N_SLICES):  # a block of columns may straddle slices
                h = tl.load(h_ptr + tokens[:, None] * stride_ht + i * R_MAX + js[None, :],
                            mask=token_ok[:, None] & j_ok[None, :], other=0.0)
                b_i = tl.where((slice_of == i)[None, :], b, 0.0)
                if BLOCK_T >= 16:
                    acc += tl.dot(h, b_i, input_precision="ieee")
                else:
                    acc += tl.sum(h[:, :, None] * b_i[None, :, :], axis=1)
        mask = token_ok[:, None] & col_ok[None, :]
        y_ptrs = y_ptr + tokens[:, None] * stride_yt + cols[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bgmv_shrink_kernel(x_ptr, a_ptr, slots_ptr, ranks_ptr, h_ptr, K, stride_xt, stride_as, stride_ar, stride_ht,
                            R_MAX: tl.constexpr, R_TOTAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        token = tl.program_id(0)
        slot = tl.load(slots_ptr + token)
        tokens = (token + tl.arange(0, 1)).to(tl.int64)  # offsets past 2**31 in long prompts
        _shrink_tile(x_ptr, a_ptr, h_ptr, tokens, tokens == token, slot, tl.load(ranks_ptr + slot), stride_xt,
                     stride_as, stride_ar, stride_ht, K, R_MAX, R_TOTAL, 1, BLOCK_R, BLOCK_K, False, tl.program_id(1))

    @triton.jit
    def _bgmv_expand_kernel(y_ptr, h_ptr, b_ptr, slots_ptr, ranks_ptr, starts_ptr, N, stride_yt, stride_ht,
                            stride_bs, stride_br, R_MAX: tl.constexpr, N_SLICES: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        token = tl.program_id(0)
        slot = tl.load(slots_ptr + token)
        tokens = (token + tl.arange(0, 1)).to(tl.int64)  # offsets past 2**31 in long prompts
        _expand_tile(y_ptr, h_ptr, b_ptr, starts_ptr, tokens, tokens == token, slot, tl.load(ranks_ptr + slot),
                     stride_yt, stride_ht, stride_bs, stride_br, N, R_MAX, N_SLICES, 1, BLOCK_N, BLOCK_R,
                     tl.program_id(1))

    @triton.jit
    def _sgmv_shrink_kernel(x_ptr, a_ptr, seg_starts_ptr, seg_slots_ptr, ranks_ptr, h_ptr, K, stride_xt, stride_as,
                            stride_ar, stride_ht, R_MAX: tl.constexpr, R_TOTAL: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
        segment, pid_t = tl.program_id(0), tl.program_id(1)
        first, end = tl.load(seg_starts_ptr + segment), tl.load(seg_starts_ptr + segment + 1)
        slot = tl.load(seg_slots_ptr + segment)
        tokens = (first + pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        _shrink_tile(x_ptr, a_ptr, h_ptr, tokens, tokens < end, slot, tl.load(ranks_ptr + slot), stride_xt,
                     stride_as, stride_ar, stride_ht, K, R_MAX, R_TOTAL, BLOCK_T, BLOCK_R, BLOCK_K, DOT_FP32,
                     tl.program_id(2))

    @triton.jit
    def _sgmv_expand_kernel(y_ptr, h_ptr, b_ptr, seg_starts_ptr, seg_slots_ptr, ranks_ptr, starts_ptr, N, stride_yt,
                            stride_ht, stride_bs, stride_br, R_MAX: tl.constexpr, N_SLICES: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        segment, pid_t = tl.program_id(0), tl.program_id(1)
        first, end = tl.load(seg_starts_ptr + segment), tl.load(seg_starts_ptr + segment + 1)
        slot = tl.load(seg_slots_ptr + segment)
        tokens = (first + pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        _expand_tile(y_ptr, h_ptr, b_ptr, starts_ptr, tokens, tokens < end, slot, tl.load(ranks_ptr + slot),
                     stride_yt, stride_ht, stride_bs, stride_br, N, R_MAX, N_SLICES, BLOCK_T, BLOCK_N, BLOCK_R,
                     tl.program_id(2))


def _check(x: torch.Tensor, weights: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("the Triton LoRA kernels need the triton package (pip install triton)")
    if x.stride(-1) != 1 or weights.stride(-1) != 1:
        raise ValueError("the LoRA kernels need a unit stride along features")
    if x.shape[-1] != weights.shape[-1]:  # a mismatch would read out of bounds, not fail
        raise ValueError(f"features {x.shape[-1]} do not match the pool's {weights.shape[-1]}")


BLOCK_K, BLOCK_R, BLOCK_N, BLOCK_T = 64, 16, 64, 16


def _options(t: torch.Tensor) -> dict:
    # Compiled (CUDA) launches say what they want: fused multiply-adds are fine in these sums
    # (Triton 3.9 warns when left to its default). The interpreter takes no compiler options.
    return {"enable_fp_fusion": True} if t.is_cuda else {}


def bgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor, slot_ranks: torch.Tensor,
                r_max: int) -> torch.Tensor:
    """bgmv_shrink_reference with the Triton kernel. x [N, in]; lora_a [S, n_slices·r_max, in]."""
    _check(x, lora_a)
    r_total = lora_a.shape[1]
    if r_total % r_max:
        raise ValueError(f"lora_a holds {r_total} rank rows, not a whole number of slices of {r_max}")
    h = torch.empty(x.shape[0], r_total, dtype=torch.float32, device=x.device)
    grid = (x.shape[0], triton.cdiv(r_total, BLOCK_R))
    _bgmv_shrink_kernel[grid](x, lora_a, token_slots, slot_ranks, h, x.shape[1], x.stride(0), lora_a.stride(0),
                              lora_a.stride(1), h.stride(0), R_MAX=r_max, R_TOTAL=r_total, BLOCK_R=BLOCK_R,
                              BLOCK_K=BLOCK_K, **_options(x))
    return h


def bgmv_expand(y: torch.Tensor, h: torch.Tensor, scaled_b_t: torch.Tensor, token_slots: torch.Tensor,
                slot_ranks: torch.Tensor, slice_starts: torch.Tensor) -> torch.Tensor:
    """bgmv_expand_reference with the Triton kernel; slice_starts is a device int32 tensor."""
    _check(y, scaled_b_t)
    n = y.shape[1]
    grid = (y.shape[0], triton.cdiv(n, BLOCK_N))
    _bgmv_expand_kernel[grid](y, h, scaled_b_t, token_slots, slot_ranks, slice_starts, n, y.stride(0), h.stride(0),
                              scaled_b_t.stride(0), scaled_b_t.stride(1), R_MAX=scaled_b_t.shape[1],
                              N_SLICES=slice_starts.numel() - 1, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, **_options(y))
    return y


def sgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, segment_starts: torch.Tensor, segment_slots: torch.Tensor,
                slot_ranks: torch.Tensor, r_max: int, max_segment: int) -> torch.Tensor:
    """sgmv_shrink_reference with the Triton kernel; `max_segment` (a host int) sizes the grid."""
    _check(x, lora_a)
    r_total = lora_a.shape[1]
    h = torch.zeros(x.shape[0], r_total, dtype=torch.float32, device=x.device)  # tokens outside segments: 0
    grid = (segment_slots.numel(), triton.cdiv(max_segment, BLOCK_T), triton.cdiv(r_total, BLOCK_R))
    _sgmv_shrink_kernel[grid](x, lora_a, segment_starts, segment_slots, slot_ranks, h, x.shape[1], x.stride(0),
                              lora_a.stride(0), lora_a.stride(1), h.stride(0), R_MAX=r_max, R_TOTAL=r_total,
                              BLOCK_T=BLOCK_T, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, DOT_FP32=not x.is_cuda, **_options(x))
    return h


def sgmv_expand(y: torch.Tensor, h: torch.Tensor, scaled_b_t: torch.Tensor, segment_starts: torch.Tensor,
                segment_slots: torch.Tensor, slot_ranks: torch.Tensor, slice_starts: torch.Tensor,
                max_segment: int) -> torch.Tensor:
    _check(y, scaled_b_t)
    n = y.shape[1]
    grid = (segment_slots.numel(), triton.cdiv(max_segment, BLOCK_T), triton.cdiv(n, BLOCK_N))
    _sgmv_expand_kernel[grid](y, h, scaled_b_t, segment_starts, segment_slots, slot_ranks, slice_starts, n,
                              y.stride(0), h.stride(0), scaled_b_t.stride(0), scaled_b_t.stride(1),
                              R_MAX=scaled_b_t.shape[1], N_SLICES=slice_starts.numel() - 1, BLOCK_T=BLOCK_T,
                              BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, **_options(y))
    return y
