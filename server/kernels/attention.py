"""Decode attention over the KV cache where it is: one new query token per running sequence,
attending to its own cache row up to its length, without gathering rows into a copy.

Cache layout (server/model/kv_cache.py, one layer): keys/values [rows, kv_heads, max_seq_len, head_dim].
Sequence b uses row cache_rows[b] and its first lengths[b] positions. Grouped-query attention:
query head h reads kv head h // (heads // kv_heads).

`decode_attention_reference` is the definition (the engine's current math: gather, mask, softmax).
`decode_attention` is the Triton kernel: one program per (sequence, kv head) serves every query
head of that kv head, so each K/V tile is read once per group; an online softmax walks the
sequence's positions in blocks (flash-decoding without the split).
"""

from __future__ import annotations

import torch

from . import triton_or_none

triton, tl = triton_or_none()


def decode_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cache_rows: torch.Tensor,
                               lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, heads, head_dim] -> [B, heads, head_dim], in float32 (float64 for float64 inputs)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // keys.shape[1]
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    for b, (row, length) in enumerate(zip(cache_rows.tolist(), lengths.tolist())):
        k = keys[row, :, :length].to(dtype).repeat_interleave(group, dim=0)  # [heads, length, head_dim]
        v = values[row, :, :length].to(dtype).repeat_interleave(group, dim=0)
        weights = torch.softmax((k @ q[b].to(dtype).unsqueeze(-1)).squeeze(-1) * scale, dim=-1)
        out[b] = (weights.unsqueeze(1) @ v).squeeze(1)
    return out


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, rows_ptr, lengths_ptr, out_ptr, scale,
                                 stride_qb, stride_qh, stride_kr, stride_kh, stride_ks, stride_ob, stride_oh,
                                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
                                 BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, DOT_FP32: tl.constexpr):
        b, kv_head = tl.program_id(0), tl.program_id(1)
        row = tl.load(rows_ptr + b).to(tl.int64)
        length = tl.load(lengths_ptr + b)
        heads = kv_head * GROUP + tl.arange(0, BLOCK_G)
        head_ok = tl.arange(0, BLOCK_G) < GROUP
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                    mask=head_ok[:, None] & dim_ok[None, :], other=0.0)
        if DOT_FP32:  # see nf4.py: the interpreter's bf16 tl.dot is wrong
            q = q.to(tl.float32)
        base = row * stride_kr + kv_head * stride_kh
        running_max = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        for start in range(0, length, BLOCK_S):
            positions = start + tl.arange(0, BLOCK_S)
            pos_ok = positions < length
            tile = base + positions[:, None] * stride_ks + dims[None, :]
            k = tl.load(k_ptr + tile, mask=pos_ok[:, None] & dim_ok[None, :], other=0.0)
            v = tl.load(v_ptr + tile, mask=pos_ok[:, None] & dim_ok[None, :], other=0.0)
            if DOT_FP32:
                k, v = k.to(tl.float32), v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_G, BLOCK_S]
            scores = tl.where(pos_ok[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            correction = tl.exp(running_max - new_max)
            p = tl.exp(scores - new_max[:, None])
            total = total * correction + tl.sum(p, axis=1)
            acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            running_max = new_max
        out = acc / total[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])


def block_s(block_d: int) -> int:
    """Positions per tile: 64 up to head_dim 64, 32 above (at 128 a 64-wide tile spills on sm_90)."""
    return 64 if block_d <= 64 else 32


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cache_rows: torch.Tensor,
                     lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """decode_attention_reference with the Triton kernel. q [B, heads, head_dim] (unit stride on
    head_dim); keys/values [rows, kv_heads, max_seq_len, head_dim] contiguous; lengths >= 1."""
    if triton is None:
        raise RuntimeError("the Triton attention kernel needs the triton package (pip install triton)")
    batch, heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    if heads % kv_heads or keys.shape[-1] != head_dim or not keys.is_contiguous() or not values.is_contiguous():
        raise ValueError(f"q {tuple(q.shape)} does not fit contiguous caches {tuple(keys.shape)}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    group = heads // kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_attention_kernel[(batch, kv_heads)](
        q, keys, values, cache_rows, lengths, out, scale, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
        keys.stride(2), out.stride(0), out.stride(1), GROUP=group, HEAD_DIM=head_dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_S=block_s(block_d),
        DOT_FP32=not q.is_cuda, **({"enable_fp_fusion": True} if q.is_cuda else {}))
    return out
