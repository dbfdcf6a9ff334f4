"""Device LoRA slots are a cache: more adapters than slots are served correctly, idle ones are
evicted least-recently-used, and a request for a cold adapter is never starved by steady traffic
on warm ones (see Scheduler.admit for the policy, server/engine/slots.py for the slots)."""

from __future__ import annotations

import threading

import pytest

from server.engine.engine import Engine, EngineConfig, Request, SamplingParams

PROMPTS = [[5, 17, 42, 99, 7], [8, 200, 33], [150, 9, 12, 40, 41, 3]]
NAMES = ["cheese", "wine", "bread"]


def greedy(n):
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def expected(llama_dir, peft_adapters):
    """Each (prompt, adapter) run alone on an engine with a slot for every adapter."""
    roomy = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=4, max_seq_len=64, max_adapters=3, max_rank=16))
    for name in NAMES:
        roomy.load_adapter(name, peft_adapters[name])
    results = {(p, n): roomy.generate([Request(prompt_ids=PROMPTS[p], adapter=n, sampling=greedy(12))])[0].token_ids
               for p in range(3) for n in NAMES}
    roomy.close()
    assert len({tuple(v) for v in results.values()}) == len(results)  # the adapters really differ
    return results


def one_slot_engine(llama_dir, peft_adapters):
    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=4, max_seq_len=64, max_adapters=1, max_rank=16))
    for name in NAMES:
        engine.load_adapter(name, peft_adapters[name])
    return engine


def test_three_adapters_round_robin_through_one_slot_are_all_correct(llama_dir, peft_adapters, expected):
    engine = one_slot_engine(llama_dir, peft_adapters)
    try:
        assert sum(a.resident for a in engine.adapters()) == 1
        cases = [(i % 3, NAMES[i % 3]) for i in range(9)]
        handles = [engine.submit(Request(prompt_ids=PROMPTS[p], adapter=n, sampling=greedy(12))) for p, n in cases]
        for (p, n), handle in zip(cases, handles):
            assert handle.result(timeout=120).token_ids == expected[(p, n)]
        assert engine.stats()["free_adapter_slots"] == 0 and sum(a.resident for a in engine.adapters()) == 1
        assert all(a.in_flight == 0 for a in engine.adapters())
    finally:
        engine.close()


def test_idle_adapters_are_evicted_least_recently_used_first(llama_dir, peft_adapters):
    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=2, max_seq_len=64, max_adapters=2, max_rank=16))
    try:
        for name in NAMES:
            engine.load_adapter(name, peft_adapters[name])  # bread finds no free slot
        resident = lambda: {a.name for a in engine.adapters() if a.resident}  # noqa: E731
        assert resident() == {"cheese", "wine"}
        engine.generate([Request(prompt_ids=PROMPTS[0], adapter="cheese", sampling=greedy(2))])
        engine.generate([Request(prompt_ids=PROMPTS[0], adapter="bread", sampling=greedy(2))])
        assert resident() == {"cheese", "bread"}  # wine was used least recently
    finally:
        engine.close()


def test_a_cold_adapter_is_not_starved_by_steady_traffic_on_a_warm_one(llama_dir, peft_adapters, expected):
    """One slot, four rows. A feeder keeps eight 'cheese' requests in flight, more than the rows,
    so some always wait; a 'wine' request must still be served. (Without the victim rule in
    Scheduler.schedule, cheese holds the slot forever and this times out.)"""
    engine = one_slot_engine(llama_dir, peft_adapters)
    stop = threading.Event()
    in_flight = threading.Semaphore(8)
    warm_results = []

    def feeder():
        while not stop.is_set():
            if in_flight.acquire(timeout=0.1):
                handle = engine.submit(Request(prompt_ids=PROMPTS[0], adapter="cheese", sampling=greedy(12)))
                threading.Thread(target=lambda h=handle: (warm_results.append(h.result().token_ids), in_flight.release())).start()

    thread = threading.Thread(target=feeder)
    thread.start()
    try:
        while len(warm_results) < 3:  # the warm flow is established
            threading.Event().wait(0.01)
        cold = engine.submit(Request(prompt_ids=PROMPTS[1], adapter="wine", sampling=greedy(12)))
        assert cold.result(timeout=120).token_ids == expected[(1, "wine")]
        served_before = len(warm_results)
    finally:
        stop.set()
        thread.join()
    engine.close(cancel_running=False)
    assert served_before >= 3 and all(r == expected[(0, "cheese")] for r in warm_results)
