"""The fixed-shape decode step (server/runner.py), eagerly on CPU: what CUDA graphs capture on a
GPU (tests/test_engine_gpu.py) is this same padded step. Padding changes no real row's logits,
writes only into the KV cache's scratch row, and an engine decoding through it gives the tokens
of an engine decoding unpadded."""

from __future__ import annotations

import pytest
import torch

from server.engine import Engine, EngineConfig, Request, SamplingParams
from server.runner import DecodeRunner, padded_sizes

CONFIG = EngineConfig(max_batch_size=6, max_seq_len=48, max_adapters=3, max_rank=16)


@pytest.fixture(scope="module")
def engine(llama_dir, peft_adapters):
    engine = Engine.from_pretrained(llama_dir, CONFIG)
    for name, path in peft_adapters.items():
        engine.load_adapter(name, path)
    yield engine
    engine.close()


def test_padded_sizes_cover_every_batch_up_to_the_maximum():
    assert padded_sizes(6) == (1, 2, 4, 6)
    assert padded_sizes(32) == (1, 2, 4, 8, 16, 24, 32)
    assert padded_sizes(1) == (1,)


def test_padding_changes_no_row_and_writes_only_the_scratch_row(engine, peft_adapters):
    prompts = [[5, 17, 42, 99, 7, 3, 120], [8, 200, 33], [150, 9, 12, 40, 41]]
    engine.generate([Request(p, sampling=SamplingParams(max_new_tokens=2, temperature=0.0)) for p in prompts])
    slots = [engine._adapters[name].slot for name in ("cheese", "wine")]
    assert all(slots)
    step = dict(tokens=[11, 22, 33], positions=[8, 3, 5], rows=[0, 1, 2], slots=[slots[0], 0, slots[1]])

    def run():
        with torch.inference_mode():
            plain = DecodeRunner(engine.cache, CONFIG.max_batch_size, engine._decode_logits, engine.device)
            padded = DecodeRunner(engine.cache, CONFIG.max_batch_size, engine._decode_logits, engine.device, padded=True)
            want = plain.decode(**step).clone()
            keys, values = engine.cache.keys.clone(), engine.cache.values.clone()
            got = padded.decode(**step)
            return want, got, keys, values, padded.cache_rows(4).tolist()

    want, got, keys_before, values_before, rows = engine._call_on_engine_thread(run)
    assert got.shape == want.shape == (3, engine.spec.vocab_size)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    scratch = engine.cache.scratch_row
    # the same keys (up to summation order: a 4-row matmul blocks differently), nothing else touched
    torch.testing.assert_close(engine.cache.keys[:, :scratch], keys_before[:, :scratch], rtol=0, atol=1e-5)
    torch.testing.assert_close(engine.cache.values[:, :scratch], values_before[:, :scratch], rtol=0, atol=1e-5)
    assert rows == [0, 1, 2, scratch]  # 3 rows ran as 4: the padding row on the scratch row


def test_an_engine_on_the_padded_step_gives_the_unpadded_tokens(engine):
    requests = [Request([5, 17, 42, 99], adapter=a, sampling=SamplingParams(max_new_tokens=9, temperature=0.0, ignore_eos=True))
                for a in ("cheese", None, "wine", "bread", None)]
    want = [o.token_ids for o in engine.generate(requests)]

    def pad():
        plain = engine.runner
        engine.runner = DecodeRunner(engine.cache, CONFIG.max_batch_size, engine._decode_logits, engine.device, padded=True)
        return plain

    plain = engine._call_on_engine_thread(pad)
    try:
        assert [o.token_ids for o in engine.generate(requests)] == want  # 5 rows decode padded to 6
        assert [o.token_ids for o in engine.generate(requests[:3])] == want[:3]  # 3 rows padded to 4
    finally:
        engine._call_on_engine_thread(lambda: setattr(engine, "runner", plain))
