"""Chunked prefill (EngineConfig(prefill_chunk_tokens=N)): a long prompt goes into the cache N
tokens per step while running sequences keep decoding. It changes nothing in the result: greedy
tokens equal those of whole-prompt prefill, on the base model and with adapters, on the torch
path and through the Triton kernels (interpreted here)."""

from __future__ import annotations

import pytest

from server.engine.engine import Engine, EngineConfig, Request, SamplingParams

LONG = [(7 * i + 3) % 500 + 5 for i in range(45)]  # 45 tokens: 6 chunks of 8, the last one short


def greedy(n):
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


def engine(model_dir, adapters, **config):
    e = Engine.from_pretrained(model_dir, EngineConfig(max_batch_size=4, max_seq_len=96, max_adapters=2, max_rank=16,
                                                       dtype="float32", **config))
    for name, path in adapters.items():
        e.load_adapter(name, path)
    return e


@pytest.mark.parametrize("kernels", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_chunked_prefill_gives_the_tokens_of_whole_prefill(llama_dir, peft_adapters, kernels):
    adapters = {k: peft_adapters[k] for k in ("cheese", "wine")}
    whole, chunked = engine(llama_dir, adapters, kernels=kernels), engine(llama_dir, adapters, kernels=kernels,
                                                                         prefill_chunk_tokens=8)
    try:
        new_tokens = 10 if kernels == "torch" else 4  # interpreted Triton: each decode step costs seconds
        requests = [Request(prompt_ids=LONG, adapter=a, sampling=greedy(new_tokens)) for a in (None, "cheese", "wine")]
        requests.append(Request(prompt_ids=LONG[:5], sampling=greedy(new_tokens)))  # short: prefilled whole either way
        want = [o.token_ids for o in whole.generate(requests)]
        assert [o.token_ids for o in chunked.generate(requests)] == want
        assert len({tuple(w) for w in want[:3]}) == 3  # the adapters change the tokens
    finally:
        whole.close()
        chunked.close()


@pytest.mark.parametrize("chunk, at_least", [(4, 10), (None, 0)], ids=["chunked", "whole"])
def test_a_running_stream_keeps_decoding_while_a_long_prompt_is_prefilled(llama_dir, chunk, at_least):
    """45 prompt tokens in chunks of 4 take 12 steps, and the running stream gets a token in each;
    whole-prompt prefill takes one step (the twin that shows the measure can tell them apart)."""
    e = engine(llama_dir, {}, prefill_chunk_tokens=chunk)
    try:
        running = e.submit(Request(prompt_ids=[5, 6, 7], sampling=greedy(80)))
        stream = iter(running)
        next(stream)  # it is decoding
        long = e.submit(Request(prompt_ids=LONG, sampling=greedy(3)))
        next(iter(long))  # the long prompt's first token: its prefill is done
        produced = 1 + running._events.qsize()  # tokens the running stream got so far (consumed + queued)
        if at_least:
            assert produced >= at_least, produced
        else:
            assert produced < 10, produced
        long.result(timeout=60)
        assert len(running.result(timeout=60).token_ids) == 80
    finally:
        e.close()
