"""The whole engine through the Triton kernels (EngineConfig(kernels="triton"): BGMV/SGMV LoRA and
the NF4 kernel), under Triton's interpreter on CPU: greedy generation of a mixed-adapter batch gives
the tokens of the torch path and of transformers + PEFT, and the logits agree."""

from __future__ import annotations

import pytest
import torch

from server.engine.engine import Engine, EngineConfig, Request, SamplingParams
from tests.helpers import assert_peft_generates_the_same

PROMPTS = [[5, 17, 42, 99, 7, 3], [8, 200, 33], [150, 9, 12, 40, 41], [77, 78, 79, 80]]


def engine(model_dir, adapters, kernels):
    # float32 on CUDA too (compiled kernels there, interpreted here): the comparison is exact-ish
    e = Engine.from_pretrained(model_dir, EngineConfig(max_batch_size=4, max_seq_len=32, max_adapters=2, max_rank=8,
                                                       kernels=kernels, dtype="float32"))
    for name, path in adapters.items():
        e.load_adapter(name, path)
    return e


@pytest.mark.slow
def test_engine_on_triton_kernels_generates_what_the_torch_path_and_peft_do(aligned_model):
    model_dir, adapters = aligned_model
    names = [None, "cheese", "wine", "wine"]
    triton_engine, torch_engine = engine(model_dir, adapters, "triton"), engine(model_dir, adapters, "torch")
    try:
        assert triton_engine.describe()["nf4_path"] == "triton" and triton_engine.describe()["lora_kernels"] == "triton"
        requests = [Request(prompt_ids=p, adapter=n, sampling=SamplingParams(max_new_tokens=6, temperature=0.0))
                    for p, n in zip(PROMPTS, names)]
        got = triton_engine.generate(requests)
        assert [o.token_ids for o in got] == [o.token_ids for o in torch_engine.generate(requests)]
        scored = triton_engine.score([Request(prompt_ids=p, adapter=n) for p, n in zip(PROMPTS, names)])
        want = torch_engine.score([Request(prompt_ids=p, adapter=n) for p, n in zip(PROMPTS, names)])
        for a, b in zip(scored, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    finally:
        triton_engine.close()
        torch_engine.close()

    assert_peft_generates_the_same(model_dir, adapters, PROMPTS, names, got)


def test_triton_kernels_are_refused_on_cpu_outside_the_interpreter(monkeypatch):
    import triton

    from server.kernels import resolve

    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve("triton", torch.device("cpu"))
    assert resolve("auto", torch.device("cpu")) == "torch"
