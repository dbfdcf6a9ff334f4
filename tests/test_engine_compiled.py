"""EngineConfig(compile=True): the decode step runs through torch.compile. It must be the same
engine — same tokens for mixed batches, joins and seeded sampling as the eager one — and it must
compile only at start-up: serving after warm-up never triggers a recompile (on the compiled
engine's thread a recompile is turned into an error here, which fails the request that hit it)."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from server.engine.engine import Engine, EngineConfig, FinishReason, Request, SamplingParams
from tests.helpers import decode_batch, fail_on_recompile

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                       reason="torch.compile on CPU needs a C++ compiler (make test installs g++)"),
]

PROMPTS = [[5, 17, 42, 99, 7, 3, 120, 64, 11, 12, 13], [8, 200, 33], [150, 9, 12, 40, 41], [77, 78, 79, 80, 81, 82, 83]]
ADAPTERS = [None, "cheese", "wine", "bread"]
# float32 on CPU, where the fused kernels round exactly as the eager ops do (bfloat16 would not).
CAPACITY = dict(max_batch_size=4, max_seq_len=64, max_adapters=3, max_rank=16, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def engines(llama_dir, peft_adapters):
    eager = Engine.from_pretrained(llama_dir, EngineConfig(**CAPACITY))
    compiled = Engine.from_pretrained(llama_dir, EngineConfig(**CAPACITY, compile=True))
    for engine in (eager, compiled):
        for name, path in peft_adapters.items():
            engine.load_adapter(name, path)
    compiled._call_on_engine_thread(fail_on_recompile)
    yield eager, compiled
    eager.close()
    compiled.close()


def workload() -> list[Request]:
    """Every decode shape a server sees: one running row, several, with and without adapters,
    greedy and seeded sampling, requests that finish early and let others join."""
    requests = []
    for i in range(7):
        sampling = (SamplingParams(max_new_tokens=4 + 3 * i, temperature=0.0, ignore_eos=True) if i % 2 == 0 else
                    SamplingParams(max_new_tokens=4 + 3 * i, temperature=0.8, top_k=50, top_p=0.9, seed=i, ignore_eos=True))
        requests.append(Request(prompt_ids=PROMPTS[i % 4], adapter=ADAPTERS[(i + 1) % 4], sampling=sampling))
    return requests


def run(engine: Engine, requests: list[Request]) -> list:
    handles = []
    for request in requests:
        handles.append(engine.submit(request))
        time.sleep(0.005)
    return [h.result(timeout=120) for h in handles]


def test_compiled_engine_generates_what_the_eager_engine_generates(engines):
    eager, compiled = engines
    solo = [eager.generate([r])[0].token_ids for r in workload()]
    alone = [compiled.generate([r])[0].token_ids for r in workload()]
    joined = run(compiled, workload())
    assert alone == solo
    assert [o.finish_reason for o in joined] == [FinishReason.LENGTH] * len(solo)
    assert [o.token_ids for o in joined] == solo


def test_compiled_decode_logits_match_the_eager_forward_for_a_mixed_batch(engines):
    _, compiled = engines
    rows = len(ADAPTERS)

    def both():  # on the engine thread, between steps, the same inputs through both paths
        with torch.inference_mode():
            batch = decode_batch(rows)
            return compiled.runner.decode_logits(batch), compiled.runner.last_position_logits(batch)

    got, want = compiled._call_on_engine_thread(both)
    assert want.shape == (rows, compiled.spec.vocab_size)
    assert not torch.equal(want[1], want[2])  # the rows really differ by adapter
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_decode_shape_the_warm_up_missed_fails_loudly_here(engines):
    """The no-recompile check the tests above rely on is armed: a call the warm-up did not cover
    (tensors made outside inference mode) recompiles, and on the engine's thread that is an error."""
    _, compiled = engines
    with pytest.raises(torch._dynamo.exc.RecompileError):
        compiled._call_on_engine_thread(lambda: compiled.runner.decode_logits(decode_batch(2)))
