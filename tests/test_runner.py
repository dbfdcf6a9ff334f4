"""The fixed-shape decode step (server/engine/runner.py), eagerly on CPU: what CUDA graphs capture on a
GPU (tests/test_engine_gpu.py) is this same padded step. Padding changes no real row's logits,
writes only into the KV cache's scratch row, and an engine decoding through it gives the tokens
of an engine decoding unpadded."""

from __future__ import annotations

import pytest
import torch

from server.engine.engine import Engine, EngineConfig, Request, SamplingParams
from server.engine.runner import DecodeRunner, padded_sizes

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
    slots = [engine.slots.get(name).slot for name in ("cheese", "wine")]
    assert all(slots)
    step = dict(tokens=[11, 22, 33], positions=[8, 3, 5], rows=[0, 1, 2], slots=[slots[0], 0, slots[1]])

    def run():
        with torch.inference_mode():
            plain = DecodeRunner(engine.cache, CONFIG.max_batch_size, engine._decode_logits, engine.device, engine._seen)
            padded = DecodeRunner(engine.cache, CONFIG.max_batch_size, engine._decode_logits, engine.device, engine._seen,
                                  padded=True)
            want = plain.decode(**step)[0].clone()
            keys, values = engine.cache.keys.clone(), engine.cache.values.clone()
            got = padded.decode(**step)[0]
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
        engine.runner = DecodeRunner(engine.cache, CONFIG.max_batch_size, engine._decode_logits, engine.device, engine._seen,
                                     padded=True)
        return plain

    plain = engine._call_on_engine_thread(pad)
    try:
        assert [o.token_ids for o in engine.generate(requests)] == want  # 5 rows decode padded to 6
        assert [o.token_ids for o in engine.generate(requests[:3])] == want[:3]  # 3 rows padded to 4
    finally:
        engine._call_on_engine_thread(lambda: setattr(engine, "runner", plain))


def test_the_step_samples_what_sample_draws_from_its_logits(engine):
    """Sampling is part of the step (a CUDA graph captures it after the forward): each row's own
    parameters loaded once, steps moving on each step, a grammar's bitmask, the repetition penalty
    reading the seen table and each sampled token marked in it. Padded or not, the tokens are what
    server/model/sampling.py's sample() draws from the step's logits."""
    from server.model.sampling import SamplingBatch, sample
    from server.engine.structured import allowed_tokens, bitmask_words

    vocab = engine.spec.vocab_size
    params = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=0, repetition_penalty=1.4),
              SamplingParams(temperature=1.2, top_k=5)]
    seeds, steps = [11, 12, 13], [0, 4, 2]
    step = dict(tokens=[11, 22, 33], positions=[8, 3, 5], rows=[0, 1, 2], slots=[0, 0, 0])
    bitmask = torch.full((3, bitmask_words(vocab)), -1, dtype=torch.int32)
    bitmask[2, 2:] = 0  # the third row's grammar allows tokens 0..63 only
    rows = torch.tensor(step["rows"])

    def run(padded: bool):
        seen = torch.zeros_like(engine._seen)
        seen[1, [22, 7, 40]] = True
        runner = DecodeRunner(engine.cache, CONFIG.max_batch_size, engine._decode_logits, engine.device, seen, padded=padded)
        runner.load_sampling(params, seeds, steps)
        reference, reference_seen = SamplingBatch.build(params, seeds, steps, vocab, engine.device), seen.clone()
        drawn = []
        for _ in range(4):
            logits, tokens = runner.decode(**step, bitmask=bitmask)
            want = sample(logits, reference, reference_seen[rows], allowed_tokens(bitmask, vocab))
            assert torch.equal(tokens, want)
            reference_seen[rows, want] = True
            assert torch.equal(seen[:engine.cache.scratch_row], reference_seen[:engine.cache.scratch_row])
            drawn.append(tokens.tolist())
        return drawn

    with torch.inference_mode():
        plain, padded = engine._call_on_engine_thread(lambda: run(False)), engine._call_on_engine_thread(lambda: run(True))
    assert plain == padded
    assert all(t[2] < 64 for t in plain) and len({t[0] for t in plain}) > 1  # the grammar held; draws move on
