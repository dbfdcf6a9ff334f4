"""The paged KV cache (server/model/kv_cache.py, server/engine/blocks.py): sequences take blocks
as they grow, so memory holds the tokens in use; the block size never changes a token; when the
blocks run out mid-decode the newest sequence is preempted and recomputed, with the tokens it
would have generated uninterrupted; every block comes back."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from server.engine.blocks import BlockManager
from server.engine.engine import Engine, EngineConfig, Request, RequestHandle, SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.engine.slots import AdapterSlots
from server.model.kv_cache import KVCache

CONFIG = EngineConfig(max_batch_size=6, max_seq_len=64, max_adapters=3, max_rank=16)


def greedy(n: int, **more) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, **more)


def prompt(length: int, start: int = 5) -> list[int]:
    return [(start + 7 * i) % 250 + 1 for i in range(length)]


def per_block(engine: Engine) -> int:
    return engine.cache.nbytes // (engine.cache.num_blocks + 1)  # + the scratch block


@pytest.fixture(scope="module")
def reference(llama_dir, peft_adapters):
    """An engine whose pool holds every row at max_seq_len (nothing is ever preempted)."""
    engine = Engine.from_pretrained(llama_dir, CONFIG)
    for name, path in peft_adapters.items():
        engine.load_adapter(name, path)
    yield engine
    engine.close()


def test_the_block_size_changes_no_token(llama_dir, peft_adapters, reference):
    """Prompts ending just before, on and just after a block boundary (16 and 4), mixed adapters:
    blocks of 4 and of 16 give the tokens of one block per sequence (the contiguous layout), and
    their prompt logits agree to float32 noise."""
    requests = [Request(prompt(n, n), adapter, greedy(12)) for n, adapter in
                [(15, "cheese"), (16, None), (17, "wine"), (4, "bread"), (5, None), (31, "cheese")]]
    engines = {}
    try:
        for block in (4, 64):
            engines[block] = Engine.from_pretrained(llama_dir, dataclasses.replace(CONFIG, kv_block_size=block))
            for name, path in peft_adapters.items():
                engines[block].load_adapter(name, path)
        want = [o.token_ids for o in engines[64].generate(requests)]
        assert len({tuple(t) for t in want}) == len(want)  # the prompts and adapters make a difference
        for engine in (engines[4], reference):
            assert [o.token_ids for o in engine.generate(requests)] == want
            for got, expected in zip(engine.score(requests), engines[64].score(requests)):
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    finally:
        for engine in engines.values():
            engine.close()


def test_many_short_sequences_and_a_long_one_are_admitted_together():
    """A pool the size of two contiguous rows of max_seq_len (16 blocks of 16 for 128 tokens): one
    100-token prompt and six 10-token ones. The contiguous cache would run two; the paged one
    admits the long one and four short ones, keeping a spare block per sequence to grow into."""
    config = EngineConfig(max_batch_size=8, max_seq_len=128)
    cache = KVCache(1, 16, 16, 1, 4, 128, torch.device("cpu"), torch.float32)
    blocks, lock = BlockManager(cache, config.max_batch_size), threading.Condition()
    slots = AdapterSlots({}, 1, torch.device("cpu"), torch.float32, lock, on_forget=lambda name: None)
    scheduler = Scheduler(config, blocks, slots, lock)
    seqs = [Sequence(Request(prompt(n)), RequestHandle(str(i), None), None, frozenset(), 0, tokens=prompt(n))
            for i, n in enumerate([100] + [10] * 6)]
    with lock:
        for seq in seqs:
            scheduler.add([seq])
    admitted = scheduler.schedule().whole
    assert admitted == seqs[:5]
    assert [len(s.blocks) for s in admitted] == [7, 1, 1, 1, 1] and blocks.free_blocks == 5
    for seq in admitted:
        scheduler.finish(seq)
    assert blocks.free_blocks == 16 and blocks.free_rows == 8


def test_a_small_pool_serves_them_all_with_their_own_tokens(llama_dir, reference):
    """The same mix through an engine whose pool is two max_seq_len sequences: all finish, each
    with its solo tokens, and every block comes back."""
    requests = [Request(prompt(50, 3), None, greedy(10))] + [Request(prompt(6, k), None, greedy(10)) for k in range(6)]
    want = [o.token_ids for o in reference.generate(requests)]
    engine = Engine.from_pretrained(llama_dir, dataclasses.replace(CONFIG, kv_cache_bytes=9 * per_block(reference)))
    try:
        assert engine.cache.num_blocks == 8
        assert [o.token_ids for o in engine.generate(requests)] == want
        assert engine.stats()["kv_blocks_used"] == 0
    finally:
        engine.close()


def test_preemption_and_resume_give_the_uninterrupted_tokens(llama_dir, peft_adapters, reference):
    """Two 10-token prompts growing to 50 tokens (4 blocks each) in a pool of 5: the newer one is
    preempted when the older needs its third block, recomputed when blocks come back, and ends
    with the tokens it makes uninterrupted: seeded sampling (its noise is keyed by step) with a
    repetition penalty (its seen tokens are restored)."""
    sampled = SamplingParams(max_new_tokens=40, temperature=0.9, seed=7, repetition_penalty=1.3, ignore_eos=True)
    requests = [Request(prompt(10, 1), "cheese", greedy(40)), Request(prompt(10, 2), "wine", sampled)]
    want = [o.token_ids for o in reference.generate(requests)]
    engine = Engine.from_pretrained(llama_dir, dataclasses.replace(CONFIG, kv_cache_bytes=6 * per_block(reference)))
    try:
        for name, path in peft_adapters.items():
            engine.load_adapter(name, path)
        assert engine.cache.num_blocks == 5
        assert [o.token_ids for o in engine.generate(requests)] == want
        assert engine.stats()["preemptions"] >= 1
        assert engine.stats()["kv_blocks_used"] == 0 and engine.blocks.free_rows == engine.blocks.rows
    finally:
        engine.close()


def test_the_default_pool_holds_every_row_at_max_seq_len(reference):
    """Without kv_cache_bytes (on CPU; tests/test_engine_gpu.py has the CUDA twin, where free
    memory may cap it): max_batch_size sequences of max_seq_len, so nothing is ever preempted."""
    assert reference.cache.num_blocks == CONFIG.max_batch_size * reference.cache.max_blocks_per_seq
    assert reference.blocks.holds_every_row()
