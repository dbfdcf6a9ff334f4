"""The engine against transformers + bitsandbytes (+ PEFT) loading the same checkpoint directory
with BitsAndBytesConfig(nf4, double quant, float32 compute).

Tolerance: both sides multiply by the same NF4 bits through bitsandbytes, so only float32
summation order differs; logits (magnitude ~1-10) must agree to 1e-4 absolute.
"""

from __future__ import annotations

import pytest
import torch

from server.config import QuantConfig
from server.engine.engine import Engine, EngineConfig, Request, SamplingParams
from server.model.quant import DEQUANTIZE, make_base_linear, resident_bytes
from tests.helpers import reference_nf4_model, reference_peft_model

LOGIT_ATOL = 1e-4
PROMPTS = [[5, 17, 42, 99, 7, 3, 120, 64], [8, 200, 33, 71], [150, 9, 12, 40, 41, 42, 43], [77, 78]]


def engine_for(model_dir, **overrides):
    config = dict(max_batch_size=8, max_seq_len=64, max_adapters=4, max_rank=16)
    config.update(overrides)
    return Engine.from_pretrained(model_dir, EngineConfig(**config))


def greedy(n):
    return SamplingParams(max_new_tokens=n, temperature=0.0)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_rope_rotates_each_head_like_transformers(dtype, atol):
    """apply_rope's swapped-halves form against transformers' rotate_half definition, on every
    head of a [B, T, heads, head_dim] block at arbitrary positions."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from server.model.llama import apply_rope

    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 5, heads, 8, generator=generator, dtype=dtype) for heads in (6, 2))
    angles = torch.rand(2, 5, 4, generator=generator, dtype=dtype) * 100
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    got = apply_rope(torch.cat([q, k], dim=2), cos.unsqueeze(2), sin.unsqueeze(2))
    torch.testing.assert_close(got, torch.cat([want_q, want_k], dim=2), atol=atol, rtol=0)
    assert not torch.allclose(want_q, q, atol=1e-2)  # the angles really rotate


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2", "tiny-mistral", "tiny-tied"])
def test_base_model_logits_and_greedy_tokens_match_transformers(model_dirs, preset):
    model_dir = model_dirs[preset]
    engine = engine_for(model_dir)
    reference = reference_nf4_model(model_dir)
    try:
        scored = engine.score([Request(prompt_ids=p) for p in PROMPTS])
        for prompt, logits in zip(PROMPTS, scored):
            with torch.no_grad():
                want = reference(torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(logits, want, rtol=0, atol=LOGIT_ATOL)

        outputs = engine.generate([Request(prompt_ids=p, sampling=greedy(12)) for p in PROMPTS])
        for prompt, out in zip(PROMPTS, outputs):
            with torch.no_grad():
                want = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
            assert out.token_ids == want.tolist()[: len(out.token_ids)]
            assert len(out.token_ids) == 12 or out.finish_reason.value == "stop"
    finally:
        engine.close()


def test_engine_reports_nf4_weight_memory(llama_dir):
    engine = engine_for(llama_dir)
    dense = engine_for(llama_dir, quant=QuantConfig(enabled=False))
    try:
        nf4_bytes = engine.model.weight_bytes()["projections"]
        fp32_bytes = dense.model.weight_bytes()["projections"]
        # On this tiny model bitsandbytes' fixed code tables weigh as much as the 4-bit weights.
        assert nf4_bytes < fp32_bytes / 4
        # the CPU default keeps a float32 copy of every projection beside the bits, and says so
        assert engine.model.weight_bytes()["dequantized_copies"] == fp32_bytes
        assert dense.model.weight_bytes()["dequantized_copies"] == 0
    finally:
        engine.close()
        dense.close()


def test_nf4_double_quant_costs_about_4_13_bits_per_weight():
    """4 bits + one 8-bit absmax per 64 weights + one fp32 absmax per 256 of those (+ tables)."""
    layer = make_base_linear(torch.randn(1024, 512), None, QuantConfig(), DEQUANTIZE, torch.device("cpu"), torch.float32)
    bits = 8 * resident_bytes(layer) / (1024 * 512)
    assert 4.12 < bits < 4.16
    single = make_base_linear(torch.randn(1024, 512), None, QuantConfig(double_quant=False), DEQUANTIZE, torch.device("cpu"), torch.float32)
    assert 8 * resident_bytes(single) / (1024 * 512) > 4.49  # fp32 absmax per 64: +0.5 bit


@pytest.fixture(scope="module")
def adapter_engine(llama_dir, peft_adapters):
    engine = engine_for(llama_dir)
    for name, path in peft_adapters.items():
        engine.load_adapter(name, path)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def peft_reference(llama_dir, peft_adapters):
    return reference_peft_model(llama_dir, peft_adapters)


def test_each_adapter_changes_the_output_and_they_differ(adapter_engine, peft_adapters):
    prompt = PROMPTS[0]
    logits = {name: adapter_engine.score([Request(prompt_ids=prompt, adapter=name)])[0] for name in [None, *peft_adapters]}
    for name in peft_adapters:
        assert (logits[name] - logits[None]).abs().max() > 0.1, f"{name} does nothing"
    names = list(peft_adapters)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (logits[a] - logits[b]).abs().max() > 0.1, f"{a} and {b} are the same adapter"


def test_mixed_adapter_batch_matches_peft_row_by_row(adapter_engine, peft_reference, peft_adapters):
    """One engine batch holding base + every adapter, against PEFT's own mixed batch
    (adapter_names), row by row, on equal-length prompts (no padding on either side)."""
    names = [None, *peft_adapters, "wine", None]
    prompts = [PROMPTS[0][: 7], PROMPTS[2], PROMPTS[0][1:], [3, 1, 4, 1, 5, 9, 2], [2, 7, 1, 8, 2, 8, 1], [9] * 7]
    scored = adapter_engine.score([Request(prompt_ids=p, adapter=n) for p, n in zip(prompts, names)])
    with torch.no_grad():
        want = peft_reference(torch.tensor(prompts), adapter_names=[n or "__base__" for n in names]).logits
    for row, logits in enumerate(scored):
        torch.testing.assert_close(logits, want[row], rtol=0, atol=LOGIT_ATOL, msg=lambda m: f"row {row} ({names[row]}): {m}")


@pytest.mark.parametrize("preset", ["tiny-mistral", "tiny-qwen2"])
def test_an_adapter_on_the_other_architectures_matches_peft(model_dirs, preset, tmp_path):
    from tests.helpers import make_peft_adapter

    model_dir = model_dirs[preset]
    adapter = make_peft_adapter(model_dir, tmp_path / "adapter", seed=21, r=8, lora_alpha=16, target_modules="all-linear")
    engine = engine_for(model_dir)
    try:
        engine.load_adapter("a", adapter)
        scored = engine.score([Request(prompt_ids=PROMPTS[0], adapter="a"), Request(prompt_ids=PROMPTS[0])])
    finally:
        engine.close()
    assert (scored[0] - scored[1]).abs().max() > 0.1  # the adapter does something
    with torch.no_grad():
        want = reference_peft_model(model_dir, {"a": adapter})(torch.tensor([PROMPTS[0]])).logits[0]
    torch.testing.assert_close(scored[0], want, rtol=0, atol=LOGIT_ATOL)


def test_mixed_batch_greedy_generation_matches_peft_generate(adapter_engine, peft_reference, peft_adapters):
    names = [None, *peft_adapters, "cheese"]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3], PROMPTS[1][::-1]]
    outputs = adapter_engine.generate([Request(prompt_ids=p, adapter=n, sampling=greedy(10)) for p, n in zip(prompts, names)])
    for prompt, name, out in zip(prompts, names, outputs):
        with torch.no_grad():
            want = peft_reference.generate(input_ids=torch.tensor([prompt]), adapter_names=[name or "__base__"],
                                           max_new_tokens=10, do_sample=False)[0, len(prompt):]
        assert out.token_ids == want.tolist()[: len(out.token_ids)], f"adapter {name}"
        assert out.adapter == name
    assert len({tuple(o.token_ids) for o in outputs}) > 1
