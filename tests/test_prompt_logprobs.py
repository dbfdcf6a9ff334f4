"""Prompt logprobs in the engine (what echo and lm-evaluation-harness read): each prompt token's
logprob comes from prefill's own forward, through the request's adapter, and equals the reference
model's log-softmax over the same tokens — for the base, for a mixed batch of adapters, chunk by
chunk, and past a prompt the prefix cache already holds."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from server.engine.engine import Engine, EngineConfig, FinishReason, Request, SamplingParams
from server.errors import InvalidRequest
from tests.helpers import reference_peft_model

LOGPROB_ATOL = 2e-4  # as tests/test_structured_output.py: logits to 1e-4, log-softmax adds one shift
PROMPTS = {None: [5, 17, 42, 99, 7, 3, 250, 11, 64], "cheese": [9, 8, 7, 6, 5, 4, 3, 2, 1, 30, 31],
           "wine": [100, 200, 300, 400, 12, 13, 14], "bread": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]}


@pytest.fixture(scope="module")
def reference(llama_dir, peft_adapters):
    return reference_peft_model(llama_dir, peft_adapters)


@pytest.fixture(scope="module")
def engine(llama_dir, peft_adapters):
    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=6, max_seq_len=128, max_adapters=3,
                                                            max_rank=16, kv_block_size=4))
    for name, path in peft_adapters.items():
        engine.load_adapter(name, path)
    yield engine
    engine.close()


def scoring(top: int = 3, new_tokens: int = 0) -> SamplingParams:
    return SamplingParams(max_new_tokens=new_tokens, temperature=0.0, prompt_logprobs=top)


def reference_prompt_logprobs(reference, adapter: str | None, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row i is the log-softmax that scores prompt token i + 1."""
    with torch.no_grad():
        if adapter is None:
            with reference.disable_adapter():
                logits = reference(torch.tensor([prompt])).logits[0]
        else:
            reference.set_adapter(adapter)
            logits = reference(torch.tensor([prompt])).logits[0]
    return logits[:-1].float().log_softmax(dim=-1)


def assert_matches_reference(got, want: torch.Tensor, prompt: list[int], top: int) -> None:
    assert [lp.token_id for lp in got] == prompt[1:]
    chosen = torch.tensor([lp.logprob for lp in got])
    torch.testing.assert_close(chosen, want[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])],
                               rtol=0, atol=LOGPROB_ATOL)
    for position, lp in enumerate(got):
        values, ids = want[position].topk(top)
        assert [t for t, _ in lp.top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), values, rtol=0, atol=LOGPROB_ATOL)


def test_a_mixed_batch_scores_each_prompt_through_its_own_adapter(engine, reference):
    handles = {adapter: engine.submit(Request(prompt, adapter=adapter, sampling=scoring()))
               for adapter, prompt in PROMPTS.items()}
    results = {adapter: (h.result(timeout=60), h.prompt_logprobs) for adapter, h in handles.items()}
    for adapter, (output, got) in results.items():
        assert output.token_ids == [] and output.finish_reason == FinishReason.LENGTH  # scored, nothing generated
        want = reference_prompt_logprobs(reference, adapter, PROMPTS[adapter])
        assert_matches_reference(got, want, PROMPTS[adapter], top=3)
    # the adapters change the numbers: a prompt scored without its adapter would not pass above
    base = reference_prompt_logprobs(reference, None, PROMPTS["wine"])
    assert (base - reference_prompt_logprobs(reference, "wine", PROMPTS["wine"])).abs().max() > 10 * LOGPROB_ATOL


def test_prompt_logprobs_come_before_the_tokens_generated_after_them(engine, reference):
    prompt = PROMPTS["cheese"]
    handle = engine.submit(Request(prompt, adapter="cheese", sampling=scoring(top=1, new_tokens=4)))
    first = next(iter(handle))
    assert len(handle.prompt_logprobs) == len(prompt) - 1  # there before the first token was handed over
    output = handle.result(timeout=60)
    assert output.token_ids[0] == first and len(output.token_ids) == 4
    assert_matches_reference(handle.prompt_logprobs, reference_prompt_logprobs(reference, "cheese", prompt), prompt, 1)


def test_a_long_prompt_prefilled_chunk_by_chunk_is_scored_whole(llama_dir, peft_adapters, reference):
    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=2, max_seq_len=128, max_adapters=1,
                                                            max_rank=16, prefill_chunk_tokens=4, kv_block_size=4))
    try:
        engine.load_adapter("bread", peft_adapters["bread"])
        prompt = PROMPTS["bread"] + [77, 78, 79]  # 16 tokens: four chunks
        handle = engine.submit(Request(prompt, adapter="bread", sampling=scoring()))
        handle.result(timeout=60)
    finally:
        engine.close()
    assert_matches_reference(handle.prompt_logprobs, reference_prompt_logprobs(reference, "bread", prompt), prompt, 3)


def test_a_prompt_the_prefix_cache_holds_is_still_scored_at_every_position(engine, reference):
    prompt = [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72]
    warm = engine.submit(Request(prompt, sampling=SamplingParams(max_new_tokens=1, temperature=0.0)))
    warm.result(timeout=60)
    again = engine.submit(Request(prompt, sampling=SamplingParams(max_new_tokens=1, temperature=0.0)))
    assert again.result(timeout=60).cached_tokens > 0  # the prompt's blocks are cached
    scored = engine.submit(Request(prompt, sampling=scoring()))
    assert scored.result(timeout=60).cached_tokens == 0  # every position computed, not taken from the cache
    assert_matches_reference(scored.prompt_logprobs, reference_prompt_logprobs(reference, None, prompt), prompt, 3)


def test_no_new_tokens_is_only_allowed_when_the_prompt_is_scored(engine):
    with pytest.raises(InvalidRequest, match="max_new_tokens must be >= 1"):
        engine.submit(Request([1, 2, 3], sampling=SamplingParams(max_new_tokens=0)))
    with pytest.raises(InvalidRequest, match="prompt_logprobs"):
        engine.submit(Request([1, 2, 3], sampling=SamplingParams(max_new_tokens=0, prompt_logprobs=21)))


def test_samples_of_one_prompt_share_the_logprobs_sample_0_computed(engine, reference):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]  # three full blocks of 4 the other samples take from the cache
    handles = engine.submit_samples(Request(prompt, adapter="wine", sampling=scoring(top=2, new_tokens=3)), n=3)
    outputs = [h.result(timeout=60) for h in handles]
    assert [o.cached_tokens for o in outputs] == [0, 12, 12]  # the prompt computed once, by sample 0
    assert all(h.prompt_logprobs is handles[0].prompt_logprobs for h in handles)
    assert_matches_reference(handles[0].prompt_logprobs, reference_prompt_logprobs(reference, "wine", prompt), prompt, 2)


def test_a_preempted_request_keeps_the_prompt_logprobs_of_its_first_prefill(llama_dir, peft_adapters, engine, reference):
    """Two 10-token prompts growing to 50 tokens (4 blocks of 16 each) in a pool of 5: the newer is
    preempted and recomputed from its blocks' tokens; its prompt logprobs are neither lost nor
    counted twice, and its tokens are those it makes uninterrupted."""
    from server.model.kv_cache import KVCache

    spec = engine.spec
    per_block = KVCache.bytes_per_block(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim, engine.dtype)
    requests = [Request(PROMPTS["bread"][:10], "cheese", scoring(top=1, new_tokens=40)),
                Request(PROMPTS[None] + [1], "wine", scoring(top=1, new_tokens=40))]
    requests = [replace(r, sampling=replace(r.sampling, ignore_eos=True)) for r in requests]
    want = [o.token_ids for o in engine.generate(requests)]
    small = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=6, max_seq_len=64, max_adapters=3, max_rank=16,
                                                           kv_cache_bytes=6 * per_block))
    try:
        for name in ("cheese", "wine"):
            small.load_adapter(name, peft_adapters[name])
        handles = [small.submit(r) for r in requests]
        assert [h.result(timeout=120).token_ids for h in handles] == want
        assert small.stats()["preemptions"] >= 1
    finally:
        small.close()
    for request, handle in zip(requests, handles):
        prompt = request.prompt_ids
        assert_matches_reference(handle.prompt_logprobs, reference_prompt_logprobs(reference, request.adapter, prompt),
                                 prompt, 1)
