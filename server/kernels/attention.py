"""Decode attention over the paged KV cache where it is: one new query token per running
sequence, attending to its own keys up to its length through its block table, without gathering
them into a copy.

Cache layout (server/model/kv_cache.py, one layer): keys/values [blocks, block_size, kv_heads,
head_dim]. Sequence b's position p is at offset p % block_size of block block_tables[b, p //
block_size]; it attends to its first lengths[b] positions. Grouped-query attention: query head h
reads kv head h // (heads // kv_heads).

`decode_attention_reference` is the definition (the engine's current math: gather, mask, softmax).
`decode_attention` is the Triton kernel: one program per (sequence, kv head) serves every query
head of that kv head, so each K/V tile is read once per group; an online softmax walks the
sequence's positions in blocks (flash-decoding without the split).
"""

from __future__ import annotations

import torch

from . import triton_or_none

triton, tl = triton_or_none()


def decode_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor,
                               lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, heads, head_dim] -> [B, heads, head_dim], in float32 (float64 for float64 inputs)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // keys.shape[2]
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    for b, (table, length) in enumerate(zip(block_tables.tolist(), lengths.tolist())):
        positions = torch.arange(length)
        blocks = torch.tensor(table)[positions // keys.shape[1]]
        k = keys[blocks, positions % keys.shape[1]].transpose(0, 1)  # [kv_heads, length, head_dim]
        v = values[blocks, positions % keys.shape[1]].transpose(0, 1)
        k = k.to(dtype).repeat_interleave(group, dim=0)  # [heads, length, head_dim]
        v = v.to(dtype).repeat_interleave(group, dim=0)
        weights = torch.softmax((k @ q[b].to(dtype).unsqueeze(-1)).squeeze(-1) * scale, dim=-1)
        out[b] = (weights.unsqueeze(1) @ v).squeeze(1)
    return out


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, out_ptr, scale,
                                 stride_qb, stride_qh, stride_tb, stride_kb, stride_ks, stride_kh, stride_ob, stride_oh,
                                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_G: tl.constexpr,
                                 BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, DOT_FP32: tl.constexpr):
        b, kv_head = tl.program_id(0), tl.program_id(1)
        length = tl.load(lengths_ptr + b)
        heads = kv_head * GROUP + tl.arange(0, BLOCK_G)
        head_ok = tl.arange(0, BLOCK_G) < GROUP
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                    mask=head_ok[:, None] & dim_ok[None, :], other=0.0)
        if DOT_FP32:  # see nf4.py: the interpreter's bf16 tl.dot is wrong
            q = q.to(tl.float32)
        head_base = kv_head * stride_kh
        running_max = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        for start in range(0, length, BLOCK_S):
            positions = start + tl.arange(0, BLOCK_S)
            pos_ok = positions < length
            blocks = tl.load(tables_ptr + b * stride_tb + positions // PAGE, mask=pos_ok, other=0).to(tl.int64)
            tile = head_base + blocks[:, None] * stride_kb + (positions % PAGE)[:, None] * stride_ks + dims[None, :]
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


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor,
                     lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """decode_attention_reference with the Triton kernel. q [B, heads, head_dim] (unit stride on
    head_dim); keys/values [blocks, block_size, kv_heads, head_dim] contiguous; block_tables [B, W]
    with unit stride on W; lengths >= 1."""
    if triton is None:
        raise RuntimeError("the Triton attention kernel needs the triton package (pip install triton)")
    batch, heads, head_dim = q.shape
    kv_heads = keys.shape[2]
    if heads % kv_heads or keys.shape[-1] != head_dim or not keys.is_contiguous() or not values.is_contiguous():
        raise ValueError(f"q {tuple(q.shape)} does not fit contiguous caches {tuple(keys.shape)}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    group = heads // kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_attention_kernel[(batch, kv_heads)](
        q, keys, values, block_tables, lengths, out, scale, q.stride(0), q.stride(1), block_tables.stride(0),
        keys.stride(0), keys.stride(1), keys.stride(2), out.stride(0), out.stride(1), GROUP=group, HEAD_DIM=head_dim,
        PAGE=keys.shape[1],
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_S=block_s(block_d),
        DOT_FP32=not q.is_cuda, **({"enable_fp_fusion": True} if q.is_cuda else {}))
    return out
