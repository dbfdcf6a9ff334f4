"""Continuous batching: requests join and leave a running batch; results never depend on who
else was in it; KV blocks are reused, never grown; cancellation and deadlines free them at once."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest

from server.engine.engine import Engine, EngineConfig, FinishReason, Request, SamplingParams
from server.errors import InvalidRequest, ResourceExhausted

PROMPTS = [[5, 17, 42, 99, 7, 3, 120, 64, 11, 12, 13], [8, 200, 33], [150, 9, 12, 40, 41], [77, 78, 79, 80, 81, 82, 83]]
ADAPTERS = [None, "cheese", "wine", "bread"]


@pytest.fixture(scope="module")
def engine(llama_dir, peft_adapters):
    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=3, max_seq_len=96, max_adapters=4, max_rank=16))
    for name, path in peft_adapters.items():
        engine.load_adapter(name, path)
    yield engine
    engine.close()


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def alone(engine, request):
    return engine.generate([request])[0].token_ids


def test_requests_joining_at_different_times_get_the_tokens_they_get_alone(engine):
    """Six requests of different lengths and adapters through 3 batch rows: some wait for a row,
    some join while others are mid-decode; each equals its solo run."""
    requests = [Request(prompt_ids=PROMPTS[i % 4], adapter=ADAPTERS[(i + 1) % 4], sampling=greedy(6 + 3 * i))
                for i in range(6)]
    solo = [alone(engine, r) for r in requests]
    handles = []
    for r in requests:
        handles.append(engine.submit(r))
        time.sleep(0.01)
    joined = [h.result(timeout=60) for h in handles]
    assert [o.token_ids for o in joined] == solo
    assert all(o.finish_reason == FinishReason.LENGTH for o in joined)
    assert engine.stats()["kv_cache_usage_ratio"] == 0.0


def test_kv_cache_is_preallocated_and_never_grows(engine):
    keys, values = engine.cache.keys, engine.cache.values
    before = (keys.data_ptr(), values.data_ptr(), keys.shape, engine.blocks.free_blocks)
    engine.generate([Request(prompt_ids=p, sampling=greedy(20)) for p in PROMPTS * 2])
    assert (engine.cache.keys.data_ptr(), engine.cache.values.data_ptr(), engine.cache.keys.shape,
            engine.blocks.free_blocks) == before


def test_streaming_yields_each_token_as_produced(engine):
    """The first token reaches the caller while the rest are still being generated, and the
    stream is the output, one token per item."""
    handle = engine.submit(Request(prompt_ids=PROMPTS[0], adapter="wine", sampling=greedy(64)))
    stream = iter(handle)
    first = next(stream)
    still_generating = not handle.done()
    streamed = [first, *stream]
    assert still_generating, "the first token was held back until the request had finished"
    assert streamed == handle.result().token_ids and len(streamed) == 64


def test_async_streaming(engine):
    async def run():
        handle = engine.submit_async(Request(prompt_ids=PROMPTS[1], adapter="cheese", sampling=greedy(5)))
        return [t async for t in handle], handle.result()

    streamed, output = asyncio.run(run())
    assert streamed == output.token_ids == alone(engine, Request(prompt_ids=PROMPTS[1], adapter="cheese", sampling=greedy(5)))


def test_cancel_frees_the_row_for_a_waiting_request(engine):
    long = [engine.submit(Request(prompt_ids=PROMPTS[0], sampling=greedy(80))) for _ in range(3)]
    waiting = engine.submit(Request(prompt_ids=PROMPTS[1], adapter="bread", sampling=greedy(4)))
    next(iter(long[0]))  # the three rows are taken and decoding
    assert not waiting.done()
    for h in long:
        h.cancel()
    assert waiting.result(timeout=30).token_ids == alone(engine, Request(prompt_ids=PROMPTS[1], adapter="bread", sampling=greedy(4)))
    assert [h.result(timeout=30).finish_reason for h in long] == [FinishReason.CANCELLED] * 3
    assert all(len(h.result().token_ids) < 80 for h in long)
    assert engine.stats()["kv_blocks_used"] == 0 and engine.blocks.free_rows == engine.blocks.rows


def test_deadline_stops_a_request_and_frees_its_row(engine):
    # 10 ms: 80 tokens once took under 50 ms on an idle machine (the tiny model decodes in ~0.5 ms)
    out = engine.generate([Request(prompt_ids=PROMPTS[0], sampling=greedy(80), deadline=time.monotonic() + 0.01)])[0]
    assert out.finish_reason == FinishReason.DEADLINE and len(out.token_ids) < 80
    assert engine.stats()["kv_blocks_used"] == 0 and engine.blocks.free_rows == engine.blocks.rows


def test_seed_reproduces_sampled_tokens_whatever_the_batch(engine):
    seeded = SamplingParams(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    request = Request(prompt_ids=PROMPTS[2], adapter="wine", sampling=seeded)
    first = alone(engine, request)
    crowd = [Request(prompt_ids=p, sampling=SamplingParams(max_new_tokens=12, temperature=1.0)) for p in PROMPTS[:2]]
    in_batch = engine.generate([crowd[0], request, crowd[1]])[1].token_ids
    other_seed = alone(engine, Request(prompt_ids=PROMPTS[2], adapter="wine",
                                       sampling=SamplingParams(max_new_tokens=12, temperature=1.5, seed=99, ignore_eos=True)))
    assert first == in_batch
    assert other_seed != first


def test_max_new_tokens_one_and_stop_tokens(engine):
    first = alone(engine, Request(prompt_ids=PROMPTS[3], sampling=greedy(1)))
    assert len(first) == 1
    out = engine.generate([Request(prompt_ids=PROMPTS[3], sampling=greedy(10, stop_token_ids=(first[0],)))])[0]
    assert out.token_ids == first and out.finish_reason == FinishReason.STOP


def test_bad_requests_are_refused_and_the_engine_keeps_serving(engine):
    bad = [
        Request(prompt_ids=[]),
        Request(prompt_ids=[1, 10**6]),
        Request(prompt_ids=PROMPTS[0], sampling=SamplingParams(max_new_tokens=0)),
        Request(prompt_ids=PROMPTS[0], sampling=SamplingParams(max_new_tokens=90)),  # > max_seq_len
        Request(prompt_ids=PROMPTS[0], sampling=SamplingParams(temperature=-1)),
        Request(prompt_ids=PROMPTS[0], sampling=SamplingParams(top_p=0)),
        Request(prompt_ids=PROMPTS[0], sampling=SamplingParams(top_p=1.5)),
    ]
    for request in bad:
        with pytest.raises(InvalidRequest):
            engine.submit(request)
    assert len(alone(engine, Request(prompt_ids=PROMPTS[0], sampling=greedy(3)))) == 3


def test_full_queue_is_refused_with_resource_exhausted(llama_dir):
    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=1, max_seq_len=64, max_queue=2,
                                                            max_queue_per_adapter=2))
    try:
        handles = []
        with pytest.raises(ResourceExhausted, match="queue is full"):
            for _ in range(10):
                handles.append(engine.submit(Request(prompt_ids=[5, 6], sampling=greedy(50))))
        assert 2 <= len(handles) <= 3  # two waiting, plus the one running if it was admitted in time
        for h in handles:
            h.cancel()
        assert all(h.result(timeout=30).finish_reason in (FinishReason.CANCELLED, FinishReason.LENGTH) for h in handles)
    finally:
        engine.close()


def test_a_flood_on_one_adapter_neither_starves_nor_locks_out_another(llama_dir, peft_adapters):
    """One row, six requests on cheese, then one on wine: admission goes round robin across
    adapters, so wine runs second-next (not after all of cheese's), and cheese alone cannot fill
    the queue: its share is bounded, wine's request is still taken."""
    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=1, max_seq_len=64, max_queue=12,
                                                            max_queue_per_adapter=6, max_adapters=2, max_rank=16))
    try:
        for name in ("cheese", "wine"):
            engine.load_adapter(name, peft_adapters[name])
        finished = []

        def submit(adapter, tokens=8):
            handle = engine.submit(Request(prompt_ids=[5, 6, 7], adapter=adapter, sampling=greedy(tokens)))
            handle.add_done_callback(lambda _: finished.append(adapter))
            return handle

        flood = [submit("cheese", tokens=60)]  # runs while the rest queue up behind it
        while engine.stats()["running"] == 0:
            time.sleep(0.001)
        flood += [submit("cheese") for _ in range(6)]
        with pytest.raises(ResourceExhausted, match="'cheese' already has 6 requests waiting"):
            submit("cheese")
        other = submit("wine")  # the queue (12) has room, and wine has its own share
        other.result(timeout=60)
        for handle in flood:
            handle.result(timeout=60)
        assert finished.index("wine") <= 2, finished  # FIFO would make it the last, 8th
    finally:
        engine.close()


def test_a_kv_budget_for_one_sequence_still_serves_many(llama_dir):
    """kv_cache_bytes that holds one max_seq_len sequence (and the scratch block): four requests
    share it, taking blocks as they grow and waiting (or being preempted) when it is full."""
    config = EngineConfig(max_batch_size=8, max_seq_len=32, kv_block_size=8)
    spec_engine = Engine.from_pretrained(llama_dir, config)
    per_block = spec_engine.cache.nbytes // (spec_engine.cache.num_blocks + 1)  # + the scratch block
    want = [alone(spec_engine, Request(prompt_ids=p, sampling=greedy(5))) for p in PROMPTS]
    spec_engine.close()
    engine = Engine.from_pretrained(llama_dir, dataclasses.replace(config, kv_cache_bytes=5 * per_block))
    try:
        assert engine.cache.num_blocks == 4
        outs = engine.generate([Request(prompt_ids=p, sampling=greedy(5)) for p in PROMPTS])
        assert [o.token_ids for o in outs] == want
        assert engine.stats()["kv_blocks_used"] == 0
    finally:
        engine.close()
    with pytest.raises(ValueError, match="holds no sequence of 32 tokens"):
        Engine.from_pretrained(llama_dir, dataclasses.replace(config, kv_cache_bytes=4 * per_block))


def test_concurrent_submitters_from_many_threads(engine):
    results = {}

    def worker(i):
        r = Request(prompt_ids=PROMPTS[i % 4], adapter=ADAPTERS[i % 4], sampling=greedy(5))
        results[i] = engine.submit(r).result(timeout=60).token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert results[i] == alone(engine, Request(prompt_ids=PROMPTS[i % 4], adapter=ADAPTERS[i % 4], sampling=greedy(5)))


@pytest.mark.parametrize("failing_call", [1, 3])  # 1: the prefill fails; 3: a later decode step fails
def test_a_failing_step_fails_only_its_requests_and_frees_their_rows(llama_dir, monkeypatch, failing_call):
    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=2, max_seq_len=64))
    try:
        calls = {"n": 0}
        real_forward = engine.model.forward

        def forward_that_fails_once(*args):
            calls["n"] += 1
            if calls["n"] == failing_call:
                raise RuntimeError("simulated device failure")
            return real_forward(*args)

        monkeypatch.setattr(engine.model, "forward", forward_that_fails_once)
        handle = engine.submit(Request(prompt_ids=PROMPTS[0], sampling=greedy(5)))
        with pytest.raises(RuntimeError, match="simulated"):
            handle.result(timeout=30)
        assert engine.stats()["kv_blocks_used"] == 0 and engine.blocks.free_rows == engine.blocks.rows
        monkeypatch.setattr(engine.model, "forward", real_forward)
        assert len(engine.generate([Request(prompt_ids=PROMPTS[1], sampling=greedy(4))])[0].token_ids) == 4
    finally:
        engine.close()


def test_a_compile_failure_names_the_error_it_caught(llama_dir, monkeypatch):
    """Not a guess about g++: the user sees what torch.compile actually raised."""
    import torch

    def broken_compile(fn, **options):
        def compiled(*args, **kwargs):
            raise OSError("cc1plus: fatal error: no space left on device")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(RuntimeError, match="OSError: cc1plus: fatal error: no space left on device") as failure:
        Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=2, max_seq_len=32, compile=True))
    assert "g++" not in str(failure.value)
