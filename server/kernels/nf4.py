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
    absmax2: torch.Tensor  # f32 [ceil(blocks/256)]
    offset: torch.Tensor  # f32 [] (a 1-element tensor: no host sync to read it)
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
        return cls(weight.data.view(torch.uint8).reshape(-1), state.code.float(), state.absmax,
                   state.state2.code.float(), state.state2.absmax.float(), state.offset.float().reshape(1),
                   out_features, in_features, state.blocksize)


def dequantize_reference(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] weight in `dtype`, computed as the module docstring defines it."""
    numel = w.out_features * w.in_features
    scale2 = w.absmax2.repeat_interleave(NESTED_BLOCKSIZE)[: w.absmax.numel()]
    scales = w.code2[w.absmax.long()] * scale2 + w.offset
    nibbles = torch.stack([w.packed >> 4, w.packed & 0xF], dim=1).reshape(-1).long()
    values = w.code[nibbles] * scales.repeat_interleave(w.blocksize)[:numel]
    return values.reshape(w.out_features, w.in_features).to(dtype)


def linear_reference(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ + b with W dequantized in x's dtype."""
    return torch.nn.functional.linear(x, dequantize_reference(w, x.dtype), bias)


if triton is not None:

    @triton.jit
    def _scales(w_absmax, w_code2, w_absmax2, w_offset, flat_index, mask, BLOCKSIZE: tl.constexpr):
        block = flat_index // BLOCKSIZE
        q = tl.load(w_absmax + block, mask=mask, other=0).to(tl.int32)
        return tl.load(w_code2 + q, mask=mask, other=0.0) * tl.load(w_absmax2 + block // 256, mask=mask, other=0.0) \
            + tl.load(w_offset)

    @triton.jit
    def _nf4_linear_kernel(x_ptr, w_packed, w_code, w_absmax, w_code2, w_absmax2, w_offset, bias_ptr, y_ptr,
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
        for start in range(0, half_k, BLOCK_KP):
            bytes_k = start + tl.arange(0, BLOCK_KP)  # byte column within a row
            k_ok = bytes_k < half_k
            w_mask = col_ok[:, None] & k_ok[None, :]
            byte_index = cols[:, None] * half_k + bytes_k[None, :]  # [BLOCK_N, BLOCK_KP]
            packed = tl.load(w_packed + byte_index, mask=w_mask, other=0).to(tl.int32)
            # both nibbles of a byte share a block (blocks are even-sized)
            scale = _scales(w_absmax, w_code2, w_absmax2, w_offset, byte_index * 2, w_mask, BLOCKSIZE)
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
    def _nf4_dequantize_kernel(w_packed, w_code, w_absmax, w_code2, w_absmax2, w_offset, out_ptr, num_bytes,
                               BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = index < num_bytes
        packed = tl.load(w_packed + index, mask=ok, other=0).to(tl.int32)
        scale = _scales(w_absmax, w_code2, w_absmax2, w_offset, index * 2, ok, BLOCKSIZE)
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
        w.packed, w.code, w.absmax, w.code2, w.absmax2, w.offset, out, num_bytes,
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
        x2, w.packed, w.code, w.absmax, w.code2, w.absmax2, w.offset, bias if bias is not None else y, y,
        m, w.out_features, w.in_features, x2.stride(0), x2.stride(1), y.stride(0),
        HAS_BIAS=bias is not None, BLOCKSIZE=w.blocksize, DOT_FP32=not x.is_cuda, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_KP=block_kp, **_launch_options(x2))
    return y.reshape(*lead, w.out_features)


def _launch_options(t: torch.Tensor) -> dict:
    # the interpreter (TRITON_INTERPRET=1, CPU tensors) takes no compiler options
    return _EXACT if t.is_cuda else {}

# Triton's interpreter (CPU tensors) multiplies bfloat16 tiles as raw 16-bit integers in tl.dot,
# so there the kernels pass DOT_FP32 and widen both operands first; on CUDA the dot stays bf16.
