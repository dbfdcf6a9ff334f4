"""The batched LoRA math against a float64 plain-torch reference, token by token."""

from __future__ import annotations

import pytest
import torch

from server.lora.peft_files import ModuleLoRA
from server.config import QuantConfig
from server.lora.layers import (LoRABatch, LoRALinear, LoRAPool, TorchLoRA, TritonLoRA, lora_delta_reference,
                         lora_delta_stacked, slot_mask)
from server.model.quant import DEQUANTIZE, dequantized_weight, make_base_linear

IN, OUT, MAX_RANK, SLOTS = 64, 48, 8, 4
RANKS = {1: 2, 2: 8, 3: 5}  # slot -> rank; 2 and 5 are zero-padded up to MAX_RANK
SCALES = {1: 2.0, 2: 0.5, 3: 3.0}


@pytest.fixture
def adapters():
    g = torch.Generator().manual_seed(0)
    return {s: (torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g)) for s, r in RANKS.items()}


@pytest.fixture
def pool(adapters):
    pool = LoRAPool(SLOTS, MAX_RANK, IN, {"q_proj": OUT}, torch.device("cpu"), torch.float32)
    for slot, (a, b) in adapters.items():
        pool.write_slot(slot, {"q_proj": ModuleLoRA(a, b, SCALES[slot])})
    return pool


def float64_delta(x, token_slots, adapters):
    """For each token alone: s·(x·Aᵀ)·Bᵀ in float64 with the unpadded matrices; slot 0 adds 0."""
    rows = []
    for t, slot in enumerate(token_slots.tolist()):
        if slot == 0:
            rows.append(torch.zeros(OUT, dtype=torch.float64))
            continue
        a, b = adapters[slot]
        rows.append(SCALES[slot] * (x[t].double() @ a.double().T) @ b.double().T)
    return torch.stack(rows)


@pytest.mark.parametrize("implementation", ["reference", "stacked"])
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_mixed_slots_match_float64_reference(pool, adapters, num_tokens, implementation):
    g = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, IN, generator=g)
    token_slots = torch.randint(0, SLOTS, (num_tokens,), generator=g)
    token_slots[0] = 0
    if implementation == "reference":
        got = lora_delta_reference(x, token_slots, pool.lora_a, pool.scaled_b_t)
    else:
        got = lora_delta_stacked(x, slot_mask(token_slots, SLOTS, x.dtype), pool.lora_a, pool.scaled_b_t)
    want = float64_delta(x, token_slots, adapters)
    assert got.dtype == torch.float32 and got.shape == (num_tokens, OUT)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


KERNELS = pytest.mark.parametrize("kernels", [TorchLoRA(), TritonLoRA()], ids=["torch", "triton"])


def delta(pool, x, batch: LoRABatch) -> torch.Tensor:
    return batch.kernels.add(torch.zeros(x.shape[0], pool.scaled_b_t.shape[-1]), x, pool, batch.prepared)


@KERNELS
@pytest.mark.parametrize("rows, per_row", [(7, 1), (3, 5)], ids=["decode", "prefill"])
def test_engine_kernels_match_float64_reference(pool, adapters, kernels, rows, per_row):
    """What the engine runs: one token per row (decode; BGMV for Triton) or rows of prompt tokens
    on one slot each (prefill; SGMV), mixed slots and ranks, slot 0 among them."""
    g = torch.Generator().manual_seed(rows)
    row_slots = torch.tensor([0, 1, 2, 3, 2, 0, 3][:rows])
    token_slots = row_slots.repeat_interleave(per_row)
    x = torch.randn(rows * per_row, IN, generator=g)
    got = delta(pool, x, LoRABatch(token_slots, rows, SLOTS, x.dtype, kernels))
    torch.testing.assert_close(got.double(), float64_delta(x, token_slots, adapters), rtol=1e-5, atol=1e-4)


@KERNELS
def test_slot_zero_adds_exactly_nothing(pool, kernels):
    x = torch.randn(5, IN)
    base_only = LoRABatch(torch.zeros(5, dtype=torch.long), 5, SLOTS, x.dtype, kernels)
    for got in (lora_delta_reference(x, base_only.token_slots, pool.lora_a, pool.scaled_b_t), delta(pool, x, base_only)):
        assert torch.equal(got, torch.zeros_like(got))


def test_padded_rank_is_exact(adapters):
    """A rank-2 adapter in an r_max=8 slot gives the result of an r_max=2 pool: the padded terms
    are exact zeros, only float32 summation order (GEMM width) differs."""
    a, b = adapters[1]
    padded = LoRAPool(2, MAX_RANK, IN, {"q_proj": OUT}, torch.device("cpu"), torch.float32)
    exact = LoRAPool(2, 2, IN, {"q_proj": OUT}, torch.device("cpu"), torch.float32)
    padded.write_slot(1, {"q_proj": ModuleLoRA(a, b, 2.0)})
    exact.write_slot(1, {"q_proj": ModuleLoRA(a, b, 2.0)})
    x, slots = torch.randn(3, IN), LoRABatch(torch.ones(3, dtype=torch.long), 3, 2, torch.float32)
    assert not torch.equal(delta(padded, x, slots), torch.zeros(3, OUT))
    torch.testing.assert_close(delta(padded, x, slots), delta(exact, x, slots), rtol=1e-5, atol=1e-5)


def test_rewriting_a_slot_leaves_no_trace_of_the_old_adapter(pool, adapters):
    """Hot swap is a copy_ into a slot: a smaller adapter must not inherit the old one's rows."""
    small_a, small_b = adapters[1]
    pool.write_slot(2, {"q_proj": ModuleLoRA(small_a, small_b, 1.0)})  # slot 2 held a rank-8 adapter
    assert torch.count_nonzero(pool.lora_a[2, 2:]) == 0 and torch.count_nonzero(pool.scaled_b_t[2, 2:]) == 0
    assert pool.slot_ranks[2] == 2  # the kernels read rows up to it, and no further
    pool.write_slot(2, {})
    assert torch.count_nonzero(pool.lora_a[2]) == 0 and torch.count_nonzero(pool.scaled_b_t[2]) == 0
    assert pool.slot_ranks[2] == 0
    with pytest.raises(ValueError):
        pool.write_slot(0, {"q_proj": ModuleLoRA(small_a, small_b, 1.0)})
    with pytest.raises(ValueError, match="k_proj"):
        pool.write_slot(1, {"k_proj": ModuleLoRA(small_a, small_b, 1.0)})


# q/k/v as one pool: 48 + 16 + 16 outputs. Slot 1 targets all three at rank 8; slot 2 only q and v
# (k's slice stays zero) with ranks 3 and 6 (v's alpha_pattern scale differs); slot 3 only k.
FUSED = {"q_proj": 48, "k_proj": 16, "v_proj": 16}
FUSED_ADAPTERS = {1: {"q_proj": (8, 2.0), "k_proj": (8, 2.0), "v_proj": (8, 2.0)},
                  2: {"q_proj": (3, 0.5), "v_proj": (6, 4.0)}, 3: {"k_proj": (5, 1.0)}}


@pytest.fixture
def fused():
    g = torch.Generator().manual_seed(7)
    adapters = {slot: {name: ModuleLoRA(torch.randn(r, IN, generator=g), torch.randn(FUSED[name], r, generator=g), scale)
                       for name, (r, scale) in modules.items()} for slot, modules in FUSED_ADAPTERS.items()}
    pool = LoRAPool(SLOTS, MAX_RANK, IN, FUSED, torch.device("cpu"), torch.float32)
    for slot, modules in adapters.items():
        pool.write_slot(slot, modules)
    return pool, adapters


def float64_fused_delta(x, token_slots, adapters):
    """Each target module on its own, then side by side: what separate q, k, v pools would add."""
    rows = []
    for t, slot in enumerate(token_slots.tolist()):
        parts = []
        for name, out in FUSED.items():
            m = adapters.get(slot, {}).get(name)
            parts.append(torch.zeros(out, dtype=torch.float64) if m is None else
                         m.scale * (x[t].double() @ m.lora_a.double().T) @ m.lora_b.double().T)
        rows.append(torch.cat(parts))
    return torch.stack(rows)


@KERNELS
@pytest.mark.parametrize("rows, per_row", [(7, 1), (3, 5)], ids=["decode", "prefill"])
def test_projections_sharing_a_pool_each_get_their_own_adapter(fused, kernels, rows, per_row):
    pool, adapters = fused
    assert pool.slot_ranks.tolist() == [0, 8, 6, 5]
    g = torch.Generator().manual_seed(rows)
    token_slots = torch.tensor([0, 1, 2, 3, 2, 0, 3][:rows]).repeat_interleave(per_row)
    x = torch.randn(rows * per_row, IN, generator=g)
    want = float64_fused_delta(x, token_slots, adapters)
    assert want[token_slots == 2][:, 48:64].abs().max() == 0 and want[token_slots == 2][:, 64:].abs().max() > 0
    got = delta(pool, x, LoRABatch(token_slots, rows, SLOTS, x.dtype, kernels))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    reference = lora_delta_reference(x, token_slots, pool.lora_a, pool.scaled_b_t, pool.starts)
    torch.testing.assert_close(reference.double(), want, rtol=1e-5, atol=1e-4)


def test_lora_linear_on_nf4_base_matches_float64(pool, adapters):
    """y = x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ with W0 the double-dequantized NF4 weight, per token."""
    torch.manual_seed(3)
    weight, bias = torch.randn(OUT, IN) * 0.1, torch.randn(OUT) * 0.1
    base = make_base_linear(weight, bias, QuantConfig(), DEQUANTIZE, torch.device("cpu"), torch.float32)
    w0 = dequantized_weight(base).double()
    assert not torch.equal(w0.float(), weight)  # really quantized
    # NF4's widest gap (0.72..1.0 of a block's absmax) bounds the rounding error at 0.14·absmax.
    assert (w0 - weight.double()).abs().max() <= 0.15 * weight.abs().max()
    layer = LoRALinear(base, pool)
    x = torch.randn(6, IN)
    token_slots = torch.tensor([0, 1, 2, 3, 2, 0])
    want = x.double() @ w0.T + bias.double() + float64_delta(x, token_slots, adapters)
    got = layer(x, LoRABatch(token_slots, len(token_slots), SLOTS, x.dtype))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer(x, None).double(), x.double() @ w0.T + bias.double(), rtol=1e-5, atol=1e-4)
