"""NF4 with double quantization, read where bitsandbytes stores it, never dequantized whole.

bitsandbytes' Params4bit for an [N, K] weight (blocksize 64, nested blocksize 256) holds, over the
row-major flattened weight (element e = n·K + k):

    packed   uint8 [N·K/2]   element 2i in the high nibble of byte i, 2i+1 in the low nibble
    code     f32 [16]        the NF4 values
    absmax   uint8 [N·K/64]  the block's scale, itself 8-bit quantized ...
    code2    f32 [256]       ... with this dynamic code,
    absmax2  f32 [⌈N·K/64/256⌉] per 256 blocks,
    offset   f32 scalar      and this offset:

    W[e] = code[nibble(e)] · (code2[absmax[e // 64]] · absmax2[e // 64 // 256] + offset)

(the scale is a product then a sum, in float32, never fused: that is bitsandbytes' order.)

Projections that share an input (q/k/v, gate/up) are stacked into one weight, each still
quantized on its own as bitsandbytes did it: their packed bytes and absmax concatenate (each
holds whole 64-blocks), but every projection's absmax2 groups restart at its first block and it
has its own offset. So each output row n carries `group_shift[n]` (int32) and `offset[n]` (f32):

    W[e] = code[nibble(e)] · (code2[absmax[b]] · absmax2[(b + group_shift[n]) // 256] + offset[n]),
    b = e // 64,  n = e // K

group_shift = (the projection's first absmax2 index)·256 − (its first block): 0 for one projection.

`dequantize_reference` and `linear_reference` are the definition in plain torch. `nf4_linear`
computes y = x·Wᵀ (+ b) for small M (decode batches) with a Triton kernel that unpacks the
weight tile by tile: every weight byte is read once per 16 tokens, no dequantized copy is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import triton_or_none

triton, tl = triton_or_none()

NESTED_BLOCKSIZE = 256


@dataclass(frozen=True)
class NF4Weight:
    """The tensors of one double-quantized NF4 weight, as bitsandbytes stores them."""

    packed: torch.Tensor  # uint8 [N*K/2]
    code: torch.Tensor  # f32 [16]
    absmax: torch.Tensor  # uint8 [N*K/blocksize]
    code2: torch.Tensor  # f32 [256]
    absmax2: torch.Tensor  # f32 [sum over projections of ceil(blocks/256)]
    group_shift: torch.Tensor  # int32 [N]: see the module docstring
    offset: torch.Tensor  # f32 [N]: each row's projection's offset
    out_features: int
    in_features: int
    blocksize: int

    @classmethod
    def from_bitsandbytes(cls, weight) -> "NF4Weight":
        """From a Params4bit (quant_type nf4, compress_statistics=True), sharing its storage."""
        state = weight.quant_state
        if state.quant_type != "nf4" or not state.nested or state.state2.blocksize != NESTED_BLOCKSIZE:
            raise ValueError("NF4Weight needs an nf4 weight with double quantization (nested blocksize 256)")
        out_features, in_features = state.shape
        if in_features % 2:
            raise ValueError(f"in_features must be even (two weights per byte), got {in_features}")
        device = weight.data.device
        return cls(weight.data.view(torch.uint8).reshape(-1), state.code.float(), state.absmax,
                   state.state2.code.float(), state.state2.absmax.float(),
                   torch.zeros(out_features, dtype=torch.int32, device=device),
                   state.offset.float().reshape(1).expand(out_features).contiguous(),
                   out_features, in_features, state.blocksize)

    @classmethod
    def stack(cls, weights: list) -> "NF4Weight":
        """One weight whose rows are the Params4bit `weights`' rows in order (same in_features),
        bit for bit. The weights' own storage becomes views into the stacked tensors, so nothing
        is held twice."""
        parts = [cls.from_bitsandbytes(w) for w in weights]
        first = parts[0]
        for part in parts:
            if part.in_features != first.in_features or part.blocksize != first.blocksize:
                raise ValueError("stacked NF4 weights need the same in_features and blocksize")
            if not (torch.equal(part.code, first.code) and torch.equal(part.code2, first.code2)):
                raise ValueError("stacked NF4 weights need the same NF4 and nested codes")
            if (part.out_features * part.in_features) % part.blocksize:
                raise ValueError(f"a {part.out_features}x{part.in_features} NF4 weight does not end on a "
                                 f"{part.blocksize}-weight block, so it cannot be stacked with others")
        if len(parts) == 1:
            return first
        shifts, block, group = [], 0, 0
        for part in parts:
            shifts.append(torch.full((part.out_features,), group * NESTED_BLOCKSIZE - block, dtype=torch.int32))
            block += part.absmax.numel()
            group += part.absmax2.numel()
        stacked = cls(torch.cat([p.packed for p in parts]), first.code, torch.cat([p.absmax for p in parts]),
                      first.code2, torch.cat([p.absmax2 for p in parts]), torch.cat(shifts).to(first.packed.device),
                      torch.cat([p.offset for p in parts]), sum(p.out_features for p in parts), first.in_features,
                      first.blocksize)
        _share_storage(weights, stacked)
        return stacked


def _share_storage(weights: list, stacked: NF4Weight) -> None:
    """Point each Params4bit's packed data and (nested) absmax at its part of `stacked`."""
    byte, block, group = 0, 0, 0
    for weight in weights:
        state = weight.quant_state
        count, blocks, groups = weight.data.numel(), state.absmax.numel(), state.state2.absmax.numel()
        weight.data = stacked.packed[byte:byte + count].view(weight.data.dtype).view(weight.data.shape)
        state.absmax = stacked.absmax[block:block + blocks]
        if state.state2.absmax.dtype == torch.float32:
            state.state2.absmax = stacked.absmax2[group:group + groups]
        byte, block, group = byte + count, block + blocks, group + groups


def dequantize_reference(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] weight in `dtype`, computed as the module docstring defines it."""
    numel = w.out_features * w.in_features
    blocks = torch.arange(w.absmax.numel(), device=w.absmax.device)
    rows = blocks * w.blocksize // w.in_features  # a block's row (blocks never straddle projections)
    scale2 = w.absmax2[(blocks + w.group_shift[rows]) // NESTED_BLOCKSIZE]
    scales = w.code2[w.absmax.long()] * scale2 + w.offset[rows]
    nibbles = torch.stack([w.packed >> 4, w.packed & 0xF], dim=1).reshape(-1).long()
    values = w.code[nibbles] * scales.repeat_interleave(w.blocksize)[:numel]
    return values.reshape(w.out_features, w.in_features).to(dtype)


def linear_reference(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ + b with W dequantized in x's dtype."""
    return torch.nn.functional.linear(x, dequantize_reference(w, x.dtype), bias)


if triton is not None:

    @triton.jit
    def _scales(w_absmax, w_code2, w_absmax2, flat_index, group_shift, offset, mask, BLOCKSIZE: tl.constexpr):
        """The scale of each weight at flat_index, given its row's group_shift and offset."""
        block = flat_index // BLOCKSIZE
        q = tl.load(w_absmax + block, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(w_absmax2 + (block + group_shift) // 256, mask=mask, other=0.0)
        return tl.load(w_code2 + q, mask=mask, other=0.0) * scale2 + offset

    @triton.jit
    def _nf4_linear_kernel(x_ptr, w_packed, w_code, w_absmax, w_code2, w_absmax2, w_shift, w_offset, bias_ptr, y_ptr,
                           M, N, K, stride_xm, stride_xk, stride_ym,
                           HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr, DOT_FP32: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr):
        """One [BLOCK_M, BLOCK_N] tile of y; walks K two weights (one byte) at a time: BLOCK_KP
        bytes = 2·BLOCK_KP columns per iteration, the high nibbles meeting x's even columns and
        the low nibbles its odd ones."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < M, cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        half_k = K // 2
        group_shift = tl.load(w_shift + cols, mask=col_ok, other=0)[:, None]  # per weight row, read once
        offset = tl.load(w_offset + cols, mask=col_ok, other=0.0)[:, None]
        for start in range(0, half_k, BLOCK_KP):
            bytes_k = start + tl.arange(0, BLOCK_KP)  # byte column within a row
            k_ok = bytes_k < half_k
            w_mask = col_ok[:, None] & k_ok[None, :]
            byte_index = cols[:, None] * half_k + bytes_k[None, :]  # [BLOCK_N, BLOCK_KP]
            packed = tl.load(w_packed + byte_index, mask=w_mask, other=0).to(tl.int32)
            # both nibbles of a byte share a block (blocks are even-sized)
            scale = _scales(w_absmax, w_code2, w_absmax2, byte_index * 2, group_shift, offset, w_mask, BLOCKSIZE)
            w_even = (tl.load(w_code + (packed >> 4)) * scale).to(x_ptr.dtype.element_ty)
            w_odd = (tl.load(w_code + (packed & 0xF)) * scale).to(x_ptr.dtype.element_ty)
            x_mask = row_ok[:, None] & k_ok[None, :]
            x_even = tl.load(x_ptr + rows[:, None] * stride_xm + (2 * bytes_k[None, :]) * stride_xk, mask=x_mask, other=0.0)
            x_odd = tl.load(x_ptr + rows[:, None] * stride_xm + (2 * bytes_k[None, :] + 1) * stride_xk, mask=x_mask, other=0.0)
            if DOT_FP32:
                x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
                w_even, w_odd = w_even.to(tl.float32), w_odd.to(tl.float32)
            acc += tl.dot(x_even, tl.trans(w_even), out_dtype=tl.float32, input_precision="ieee")
            acc += tl.dot(x_odd, tl.trans(w_odd), out_dtype=tl.float32, input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _nf4_dequantize_kernel(w_packed, w_code, w_absmax, w_code2, w_absmax2, w_shift, w_offset, out_ptr, num_bytes,
                               K, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = index < num_bytes
        packed = tl.load(w_packed + index, mask=ok, other=0).to(tl.int32)
        row = index * 2 // K
        scale = _scales(w_absmax, w_code2, w_absmax2, index * 2, tl.load(w_shift + row, mask=ok, other=0),
                        tl.load(w_offset + row, mask=ok, other=0.0), ok, BLOCKSIZE)
        tl.store(out_ptr + 2 * index, (tl.load(w_code + (packed >> 4)) * scale).to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(out_ptr + 2 * index + 1, (tl.load(w_code + (packed & 0xF)) * scale).to(out_ptr.dtype.element_ty), mask=ok)


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton NF4 kernels need the triton package (pip install triton)")


# fp contraction off: the scale is bitsandbytes' product then sum, not a fused multiply-add
_EXACT = {"enable_fp_fusion": False}


def nf4_dequantize(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dequantize_reference through the Triton kernel (bit for bit; for tests and prefill)."""
    _require_triton()
    out = torch.empty(w.out_features, w.in_features, dtype=dtype, device=w.packed.device)
    num_bytes = w.packed.numel()
    block = 1024
    _nf4_dequantize_kernel[(triton.cdiv(num_bytes, block),)](
        w.packed, w.code, w.absmax, w.code2, w.absmax2, w.group_shift, w.offset, out, num_bytes, w.in_features,
        BLOCKSIZE=w.blocksize, BLOCK=block, **_launch_options(w.packed))
    return out


def nf4_linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ + b for x [M, K] (any strides) without a dequantized copy of W."""
    _require_triton()
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {w.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    m = x2.shape[0]
    y = torch.empty(m, w.out_features, dtype=x.dtype, device=x.device)
    block_m, block_n, block_kp = 16, 64, 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(w.out_features, block_n))
    _nf4_linear_kernel[grid](
        x2, w.packed, w.code, w.absmax, w.code2, w.absmax2, w.group_shift, w.offset, bias if bias is not None else y, y,
        m, w.out_features, w.in_features, x2.stride(0), x2.stride(1), y.stride(0),
        HAS_BIAS=bias is not None, BLOCKSIZE=w.blocksize, DOT_FP32=not x.is_cuda, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_KP=block_kp, **_launch_options(x2))
    return y.reshape(*lead, w.out_features)


def _launch_options(t: torch.Tensor) -> dict:
    # the interpreter (TRITON_INTERPRET=1, CPU tensors) takes no compiler options
    return _EXACT if t.is_cuda else {}

# Triton's interpreter (CPU tensors) multiplies bfloat16 tiles as raw 16-bit integers in tl.dot,
# so there the kernels pass DOT_FP32 and widen both operands first; on CUDA the dot stays bf16.
