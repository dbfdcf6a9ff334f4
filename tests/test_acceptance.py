"""The acceptance check before publishing, against real implementation noise: the engine in
float32 (bit-for-bit the trained model's path), in bfloat16 with plain torch (any CPU) and through
bitsandbytes' packed bf16 kernel (CPUs with AVX512-BF16) accepts a trained adapter, and refuses
adapters whose files do not match the trained model, adapters that do nothing and adapters the
engine cannot hold. Greedy tokens are held to what the engine flips with the adapter off (two
correct implementations at that dtype), not to a fixed fraction."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from server.model.factory import make_model
from server.model.quant import import_bitsandbytes
from tests.helpers import make_peft_adapter, reference_nf4_model, tampered_adapter
from trainer.acceptance import ABSOLUTE_FLOOR, EFFECT_MULTIPLE, AcceptanceError, check, decide, measure, prompts_from
from trainer.config import FitConfig
from trainer.fit import fit

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])


@pytest.fixture(scope="module")
def trained(llama_dir, cheese_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("acceptance")
    result = fit(FitConfig(base=llama_dir, data=cheese_data, name="cheese", store=root / "store", output_dir=root / "run",
                           rank=8, max_seq_len=96, batch_size=4, learning_rate=2e-2, max_steps=20, eval_every=10**9,
                           checkpoint_every=10**9, eval_fraction=0.15, seed=5))
    result.model.save_pretrained(root / "adapter")
    # ~270 positions: enough for the count of flipped greedy tokens to be a statistic
    return SimpleNamespace(model=result.model, adapter=root / "adapter",
                           prompts=prompts_from(result.eval + result.train, 12))


def peft_model_of(base_dir, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(reference_nf4_model(base_dir), adapter_dir).eval()


@DTYPES
def test_a_trained_adapter_is_accepted_on_each_cpu_path(llama_dir, trained, dtype):
    report = check(llama_dir, trained.adapter, trained.model, trained.prompts, rank=8, dtype=dtype)
    assert report.max_relative_difference <= report.tolerance
    assert report.adapter_effect > EFFECT_MULTIPLE * report.tolerance
    # tokens: no more flipped than the engine flips with the adapter off, beyond chance (measured
    # here: 0 in float32; in bfloat16 ~11% of tokens either way, within 1.5 sigma on every
    # ATEN_CPU_CAPABILITY); KL measured 4e-4 in bfloat16
    assert report.extra_flips_sigma < 3 and report.kl_mean < 1e-2
    assert report.positions == sum(len(p) for p in trained.prompts)
    if dtype == torch.float32:
        assert report.noise_floor < 1e-5 and report.engine == "cpu float32 nf4=dequantize-once"
        assert report.greedy_agreement == report.base_greedy_agreement == 1.0
    else:  # the rule copes with real rounding noise, not only with bit-exact agreement
        assert report.noise_floor > 1e-3 and report.engine == "cpu bfloat16 nf4=dequantize-once"


def test_a_wrong_scale_flips_more_greedy_tokens_than_bfloat16_rounding_does(llama_dir, trained, tmp_path):
    """B x1.25 in bfloat16 flips about three times the greedy tokens that rounding alone flips
    (measured 83 against 26 of 274 positions): the token statistic can fail, beside the logits'
    tolerance (which this adapter exceeds 1.9x)."""
    wrong = tampered_adapter(trained.adapter, tmp_path / "wrong", "B x1.25")
    report = measure(llama_dir, wrong, trained.model, trained.prompts, rank=8, dtype=torch.bfloat16)
    assert report.extra_flips_sigma > 3


@pytest.mark.skipif(not import_bitsandbytes().functional.has_avx512bf16(), reason="the packed kernel needs AVX512-BF16")
def test_an_adapter_is_accepted_on_the_packed_bf16_path(tmp_path):
    base = make_model(tmp_path / "small", "small", seed=1)  # the tiny presets' 160-wide MLP does not fit its layout
    adapter = make_peft_adapter(base, tmp_path / "adapter", seed=3, r=8, target_modules="all-linear")
    report = check(base, adapter, peft_model_of(base, adapter), [[5, 17, 42, 99, 7, 3], [8, 200, 33]], rank=8,
                   nf4_path="cpu-bf16-packed")
    assert report.engine == "cpu float32 nf4=cpu-bf16-packed" and report.noise_floor > 1e-4
    assert report.max_relative_difference <= report.tolerance


@DTYPES
@pytest.mark.parametrize("how", ["B x2", "swap 2 layers"])
def test_adapter_files_that_do_not_match_the_trained_model_are_refused(llama_dir, trained, tmp_path, how, dtype):
    wrong = tampered_adapter(trained.adapter, tmp_path / "wrong", how)
    with pytest.raises(AcceptanceError, match="differ from the trained model"):
        check(llama_dir, wrong, trained.model, trained.prompts, rank=8, dtype=dtype)


@DTYPES
@pytest.mark.parametrize("weights", ["B = 0", "B x1e-6"])
def test_an_adapter_that_does_nothing_measurable_is_refused(llama_dir, tmp_path, dtype, weights):
    """B = 0 (never trained), or an effect far below what separates the engine from the trained
    model: either way nothing shows that the engine applies it as trained."""
    if weights == "B = 0":
        adapter = make_peft_adapter(llama_dir, tmp_path / "untrained", seed=1, r=4, init_lora_weights=True)
    else:
        adapter = tampered_adapter(make_peft_adapter(llama_dir, tmp_path / "random", seed=1, r=4), tmp_path / "faint", weights)
    with pytest.raises(AcceptanceError, match="does nothing"):
        check(llama_dir, adapter, peft_model_of(llama_dir, adapter), [[5, 17, 42, 99], [8, 200, 33]], rank=4, dtype=dtype)


def test_an_adapter_the_engine_cannot_hold_is_refused(llama_dir, trained):
    with pytest.raises(AcceptanceError, match="rank 8 exceeds"):
        check(llama_dir, trained.adapter, trained.model, trained.prompts, rank=4)


def test_the_rule_scales_with_the_measured_floor():
    tolerance, refusal = decide(noise_floor=0.01, disagreement=0.03, effect=1.0)
    assert refusal is None and tolerance == pytest.approx(0.03 + ABSOLUTE_FLOOR)
    assert "differ" in decide(noise_floor=0.01, disagreement=0.031, effect=1.0)[1]
    assert "does nothing" in decide(noise_floor=0.01, disagreement=0.0, effect=EFFECT_MULTIPLE * tolerance)[1]
    assert decide(noise_floor=0.01, disagreement=0.0, effect=1.01 * EFFECT_MULTIPLE * tolerance)[1] is None
    # float32 on both sides can agree exactly: the absolute floor keeps summation order from refusing
    assert decide(noise_floor=0.0, disagreement=ABSOLUTE_FLOOR / 2, effect=1e-2)[1] is None
