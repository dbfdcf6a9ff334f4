"""The engine chooses how NF4 weights are multiplied, whatever the CPU: bitsandbytes' own
Linear4bit would repack them and switch to bfloat16 on CPUs with AVX512-BF16 (and crash on shapes
its repacking cannot hold). These tests hold on machines with and without that feature."""

from __future__ import annotations

import pytest
import torch

from server.config import QuantConfig
from server.engine.engine import Engine, EngineConfig, Request, SamplingParams
from server.model.quant import (CPU_BF16_PACKED, DEQUANTIZE, DEQUANTIZE_ONCE, NF4Linear, choose_nf4_matmul,
                          dequantized_weight, import_bitsandbytes, is_repacked, keep_linear4bit_on_dequantize,
                          make_base_linear, resident_bytes)
from tests.helpers import reference_nf4_model

HAS_AVX512_BF16 = import_bitsandbytes().functional.has_avx512bf16()
needs_avx512_bf16 = pytest.mark.skipif(not HAS_AVX512_BF16, reason="bitsandbytes' packed kernel needs AVX512-BF16")
CPU = torch.device("cpu")


def nf4_layers(engine: Engine) -> list[NF4Linear]:
    return [m for m in engine.model.modules() if isinstance(m, NF4Linear)]


def test_engine_layers_stay_double_quantized_on_the_default_cpu_path_after_serving(llama_dir):
    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=2, max_seq_len=32))
    try:
        assert engine.describe()["nf4_path"] == "dequantize-once"
        engine.generate([Request(prompt_ids=[5, 17, 42], sampling=SamplingParams(max_new_tokens=4, temperature=0.0))])
        layers = nf4_layers(engine)
        assert len(layers) == 4 * engine.spec.num_layers  # q/k/v and gate/up stacked
        assert sum(len(layer.weights) for layer in layers) == 7 * engine.spec.num_layers
        for layer in layers:
            for weight in layer.weights:
                state = weight.quant_state
                assert not is_repacked(weight) and state.nested and state.state2 is not None
            x = torch.randn(3, state.shape[1])
            # exactly dequantize-then-matmul in float32: the trained model's numbers
            assert torch.equal(layer(x), torch.nn.functional.linear(x, dequantized_weight(layer), layer.bias))
    finally:
        engine.close()


def test_transformers_reference_layers_are_pinned_and_never_repacked(llama_dir):
    """The trainer's model and the tests' reference stay on the engine's path after eval passes
    (repacked, training would go on in bf16 without the base weight's gradient path)."""
    import bitsandbytes as bnb

    model = reference_nf4_model(llama_dir)  # pinned by keep_linear4bit_on_dequantize
    with torch.no_grad():
        model(torch.tensor([[5, 17, 42, 99]]))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(is_repacked(m.weight) for m in layers)
    assert keep_linear4bit_on_dequantize(model) == len(layers)


def test_packed_path_is_refused_where_the_cpu_cannot_run_it(monkeypatch):
    monkeypatch.setattr(import_bitsandbytes().functional, "has_avx512bf16", lambda: False)
    with pytest.raises(ValueError, match="AVX512-BF16"):
        choose_nf4_matmul("cpu-bf16-packed", CPU)
    assert choose_nf4_matmul("auto", CPU) is DEQUANTIZE_ONCE
    with pytest.raises(ValueError, match="nf4_path"):
        EngineConfig(nf4_path="fastest")


@pytest.mark.parametrize("tokens", [1, 3, 37, 300])
def test_dequantizing_once_at_load_gives_bitsandbytes_per_call_numbers_bit_for_bit(tokens):
    """The CPU default keeps a dense copy; bitsandbytes' matmul_4bit (the trained model's layers,
    with and without autograd) dequantizes on every call. Same bits, stacked projections too."""
    import bitsandbytes as bnb

    torch.manual_seed(tokens)
    weights = [torch.randn(192, 576) * 0.05, torch.randn(64, 576) * 0.02, torch.randn(64, 576) * 0.03]
    bias = torch.randn(320) * 0.1
    once = make_base_linear(weights, bias, QuantConfig(), DEQUANTIZE_ONCE, CPU, torch.float32)
    per_call = make_base_linear(weights, bias, QuantConfig(), DEQUANTIZE, CPU, torch.float32)
    for mine, theirs in zip(once.weights, per_call.weights):
        assert torch.equal(mine, theirs)  # the same NF4 bits underneath
    x = torch.randn(tokens, 576)
    with torch.no_grad():
        reference = per_call(x)
        bnb_calls = torch.cat([bnb.matmul_4bit(x, w, quant_state=w.quant_state, bias=b)
                               for w, b in zip(per_call.weights, bias.split([192, 64, 64]))], dim=-1)
        got = once(x)
    with_grad = per_call(x.clone().requires_grad_())  # what a training step computes
    assert torch.equal(got, reference) and torch.equal(got, bnb_calls) and torch.equal(got, with_grad.detach())
    # the dense copy is what it costs: 4 bytes per weight in float32, on top of the NF4 bits
    assert resident_bytes(once) - resident_bytes(per_call) == 4 * 320 * 576


@needs_avx512_bf16
def test_packed_path_computes_in_bf16_close_to_the_dequantize_path():
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 128) * 0.05, torch.randn(96) * 0.1
    exact = make_base_linear(weight, bias, QuantConfig(), DEQUANTIZE, CPU, torch.float32)
    packed = make_base_linear(weight, bias, QuantConfig(), choose_nf4_matmul("cpu-bf16-packed", CPU), CPU, torch.float32)
    assert is_repacked(packed.weights[0]) and not is_repacked(exact.weights[0])
    x = torch.randn(5, 128)
    want, got = exact(x), packed(x)
    assert got.dtype == torch.float32 and not torch.equal(got, want)  # really another kernel
    # bfloat16 keeps 8 bits of mantissa: ~3e-3 relative per dot product (measured), 2e-2 allowed
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


@needs_avx512_bf16
def test_packed_path_refuses_shapes_its_layout_cannot_hold():
    with pytest.raises(ValueError, match="dequantize path"):
        make_base_linear(torch.randn(64, 160), None, QuantConfig(), CPU_BF16_PACKED, CPU, torch.float32)
