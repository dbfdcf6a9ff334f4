"""Prefix caching (server/engine/blocks.py): a prompt prefix computed once is reused by later
requests on the same adapter version, changes no token and no logit beyond float32 noise, and is
never reused across adapters, across the base model and an adapter, or across two versions of
one name."""

from __future__ import annotations

import dataclasses

import pytest

from server.engine.engine import Engine, EngineConfig, Request, SamplingParams

CONFIG = EngineConfig(max_batch_size=6, max_seq_len=96, max_adapters=3, max_rank=16)
SYSTEM = [(11 + 13 * i) % 250 + 1 for i in range(48)]  # three blocks of 16


def sampling(n: int = 6) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, logprobs=3)


def question(k: int, length: int) -> list[int]:
    return [(7 * k + 3 * i) % 250 + 1 for i in range(length)]


@pytest.fixture(scope="module")
def engines(llama_dir, peft_adapters):
    made = {}
    for caching in (True, False):
        engine = Engine.from_pretrained(llama_dir, dataclasses.replace(CONFIG, prefix_caching=caching))
        for name, path in peft_adapters.items():
            engine.load_adapter(name, path)
        made[caching] = engine
    yield made
    for engine in made.values():
        engine.close()


def run(engine: Engine, requests: list[Request]):
    handles = [engine.submit(r) for r in requests]
    return [(h.result(timeout=60), h.logprobs) for h in handles]


def test_a_cached_prefix_changes_no_token_and_no_logit(engines):
    """A system prompt shared by requests over mixed adapters: the first round fills the cache,
    the second hits it — with prompts that end exactly on a block boundary (48: the last block is
    computed, two are reused), one token after it (49: three reused, one token computed), and
    further on. Tokens equal the engine's without caching; logprobs agree to float32 noise."""
    cached, plain = engines[True], engines[False]
    lengths, adapters = [0, 1, 7, 20], ["cheese", None, "wine", "bread"]
    first = [Request(SYSTEM + question(k, n), a, sampling()) for k, (n, a) in enumerate(zip(lengths, adapters))]
    again = [Request(SYSTEM + question(k + 10, n), a, sampling()) for k, (n, a) in enumerate(zip(lengths, adapters))]
    for requests in (first, again):
        got, want = run(cached, requests), run(plain, requests)
        for (out, logprobs), (expected, expected_logprobs) in zip(got, want):
            assert out.token_ids == expected.token_ids
            for lp, elp in zip(logprobs, expected_logprobs):
                assert lp.logprob == pytest.approx(elp.logprob, abs=1e-4)  # measured: equal on AVX512 CPUs
                assert [t for t, _ in lp.top] == [t for t, _ in elp.top]
        assert all(expected.cached_tokens == 0 for expected, _ in want)
    assert [out.cached_tokens for out, _ in got] == [32, 48, 48, 48]  # the second round, on its own adapters


@pytest.mark.parametrize("position", [0, 15, 31], ids=["first token of block 0", "last token of block 0",
                                                        "last token of block 1"])
def test_a_prompt_one_token_off_in_a_full_block_shares_only_the_blocks_before_it(engines, position):
    """Every token of a full block is in its key: a prompt that differs from a cached one in one
    token shares the blocks before that token's and none from it on, and generates what it
    generates without the cache."""
    cached, plain = engines[True], engines[False]
    first = question(1100 + position, 40)  # blocks 0 and 1 are shareable; the third holds the last token
    second = list(first)
    second[position] = first[position] % 250 + 1
    run(cached, [Request(first, "cheese", sampling())])
    [(out, _)] = run(cached, [Request(second, "cheese", sampling())])
    [(want, _)] = run(plain, [Request(second, "cheese", sampling())])
    assert out.cached_tokens == position // 16 * 16
    assert out.token_ids == want.token_ids


def test_adapters_and_the_base_model_never_share_blocks(engines, peft_adapters):
    engine = engines[True]
    prompt = question(99, 53)  # three shareable blocks no earlier test computed

    def cached_tokens(adapter):
        return run(engine, [Request(prompt, adapter, sampling(2))])[0][0].cached_tokens

    assert cached_tokens("cheese") == 0
    assert cached_tokens("wine") == 0  # the same tokens under another adapter
    assert cached_tokens(None) == 0  # ... and under the base model
    assert [cached_tokens(a) for a in ("cheese", "wine", None)] == [48, 48, 48]  # each its own


def test_the_same_name_with_new_weights_never_hits_the_old_blocks(llama_dir, peft_adapters):
    """Replacing 'cheese' with other weights (same name, new content): the next request computes
    its prompt afresh and gets the new weights' tokens; the old content loaded under a new name
    hits the old blocks, which hold exactly its numbers."""
    engine = Engine.from_pretrained(llama_dir, CONFIG)
    fresh = Engine.from_pretrained(llama_dir, dataclasses.replace(CONFIG, prefix_caching=False))
    try:
        engine.load_adapter("cheese", peft_adapters["cheese"])
        fresh.load_adapter("cheese", peft_adapters["wine"])
        prompt = SYSTEM + question(5, 9)
        assert run(engine, [Request(prompt, "cheese", sampling())])[0][0].cached_tokens == 0
        assert run(engine, [Request(prompt, "cheese", sampling())])[0][0].cached_tokens == 48
        engine.load_adapter("cheese", peft_adapters["wine"])  # a new version under the old name
        out = run(engine, [Request(prompt, "cheese", sampling())])[0][0]
        assert out.cached_tokens == 0
        assert out.token_ids == run(fresh, [Request(prompt, "cheese", sampling())])[0][0].token_ids
        engine.load_adapter("cheese-again", peft_adapters["cheese"])  # the old content, another name
        assert run(engine, [Request(prompt, "cheese-again", sampling())])[0][0].cached_tokens == 48
    finally:
        engine.close()
        fresh.close()


def test_blocks_nobody_holds_are_evicted_when_the_pool_needs_them(llama_dir):
    """A pool of 8 blocks: a 48-token prefix leaves 3 blocks registered; other prompts then take
    every block, evicting them (oldest released first); the prefix is computed again, with the
    same tokens."""
    spec = Engine.from_pretrained(llama_dir, CONFIG)
    per_block = spec.cache.nbytes // (spec.cache.num_blocks + 1)
    spec.close()
    engine = Engine.from_pretrained(llama_dir, dataclasses.replace(CONFIG, kv_cache_bytes=9 * per_block))
    try:
        assert engine.cache.num_blocks == 8 and engine.cache.max_blocks_per_seq == 6
        prompt = SYSTEM + question(1, 4)
        first = run(engine, [Request(prompt, None, sampling())])[0][0]
        assert run(engine, [Request(prompt, None, sampling())])[0][0].cached_tokens == 48
        assert engine.stats()["kv_blocks_used"] == 0  # registered blocks nobody holds count as free
        run(engine, [Request(question(k, 80), None, sampling(2)) for k in range(2)])  # 6 blocks each
        again = run(engine, [Request(prompt, None, sampling())])[0][0]
        assert again.cached_tokens < 48 and again.token_ids == first.token_ids
    finally:
        engine.close()


def test_the_hit_rate_is_counted(engines):
    engine = engines[True]
    before = engine.stats()
    prompt = question(300, 40)  # two shareable blocks (the third holds its last token)
    run(engine, [Request(prompt, "wine", sampling(1))])
    run(engine, [Request(prompt, "wine", sampling(1))])
    after = engine.stats()
    assert after["prefix_cache_prompt_tokens"] - before["prefix_cache_prompt_tokens"] == 2 * len(prompt)
    assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] == 32


def test_a_chunked_prompt_starts_its_chunks_after_its_cached_prefix(llama_dir, engines):
    """With prefill_chunk_tokens, a long prompt whose prefix is cached is prefilled chunk by chunk
    from the end of that prefix, and generates what a whole prefill without the cache does."""
    engine = Engine.from_pretrained(llama_dir, dataclasses.replace(CONFIG, prefill_chunk_tokens=16))
    try:
        prompt = question(500, 70)
        want = run(engines[False], [Request(prompt, None, sampling())])[0][0].token_ids
        first = run(engine, [Request(prompt, None, sampling())])[0][0]
        other = prompt[:32] + question(501, 38)  # 38 tokens past the cached 32: three chunks
        again = run(engine, [Request(other, None, sampling())])[0][0]
        assert first.token_ids == want and first.cached_tokens == 0
        assert again.cached_tokens == 32
        assert again.token_ids == run(engines[False], [Request(other, None, sampling())])[0][0].token_ids
    finally:
        engine.close()


def test_samples_of_one_prompt_share_its_blocks(engines):
    """n samples (OpenAI's n): the first is prefilled, the others take its prompt's blocks from
    the cache; with a seed, sample i draws what a request seeded seed + i draws alone."""
    cached, plain = engines[True], engines[False]
    prompt = question(700, 40)  # two shareable blocks
    seeded = SamplingParams(max_new_tokens=8, temperature=0.9, seed=21, ignore_eos=True)
    handles = cached.submit_samples(Request(prompt, "bread", seeded), 3)
    outs = [h.result(timeout=60) for h in handles]
    assert [o.cached_tokens for o in outs] == [0, 32, 32]
    alone = [plain.generate([Request(prompt, "bread", dataclasses.replace(seeded, seed=21 + i))])[0].token_ids
             for i in range(3)]
    assert [o.token_ids for o in outs] == alone and len({tuple(t) for t in alone}) == 3


def test_a_cold_burst_sharing_a_prefix_computes_it_once(llama_dir):
    """Four requests sharing a new 48-token system prompt, submitted together on one adapter
    version: the first computes it, the others wait a step and take its blocks; what they
    generate is what they generate alone."""
    engine = Engine.from_pretrained(llama_dir, CONFIG)
    try:
        system = question(900, 48)
        requests = [Request(system + question(901 + k, 5), None, sampling()) for k in range(4)]
        outs = [h.result(timeout=60) for h in [engine.submit(r) for r in requests]]
        assert sorted(o.cached_tokens for o in outs) == [0, 48, 48, 48]
        for request, out in zip(requests, outs):
            assert out.token_ids == engine.generate([dataclasses.replace(request, sampling=sampling())])[0].token_ids
    finally:
        engine.close()
