"""The gRPC Generation service on a real in-process server: mixed concurrent requests over several
adapters give the engine's own greedy tokens (which the engine tests tie to transformers + PEFT),
streaming adds up to the unary answer, and text features (chat template, stop strings) work."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from protos.hotlora.v1 import generation_pb2 as pb
from protos.hotlora.v1 import generation_pb2_grpc
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.engine.engine import Engine, Request, SamplingParams
from server.adapters.store import AdapterStore, base_fingerprint
from server.serving.text import TextCodec
from tests.helpers import RunningServer

ENGINE = EngineConfig(max_batch_size=4, max_seq_len=96, max_adapters=2, max_rank=16)
PROMPTS = ["Cheese is made from milk", "The quick brown fox", "What wine goes with Comte?", "QLoRA stores"]
ADAPTERS = ["", "cheese", "wine", "bread"]


@pytest.fixture(scope="module")
def store(llama_dir, peft_adapters, tmp_path_factory):
    store = AdapterStore(tmp_path_factory.mktemp("store"))
    for name, path in peft_adapters.items():
        store.publish(name, path, manifest={"base_fingerprint": base_fingerprint(llama_dir)})
    return store


@pytest.fixture(scope="module")
def server(llama_dir, store):
    with RunningServer(ServerConfig(model_dir=llama_dir, engine=ENGINE, adapters=AdapterConfig(store=store.root),
                                    port=0, metrics_port=0, host="127.0.0.1", metrics_host="127.0.0.1")) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


@pytest.fixture(scope="module")
def engine_alone(llama_dir, peft_adapters):
    """The reference: each request alone on a plain engine."""
    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=1, max_seq_len=96, max_adapters=3, max_rank=16))
    for name, path in peft_adapters.items():
        engine.load_adapter(name, path)
    codec = TextCodec.from_pretrained(llama_dir)

    def run(prompt: str, adapter: str, n: int) -> list[int]:
        request = Request(prompt_ids=codec.encode_prompt(prompt), adapter=adapter or None,
                          sampling=SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))
        return engine.generate([request])[0].token_ids

    yield run
    engine.close()


def greedy_request(prompt, adapter, n, **kw):
    return pb.GenerateRequest(prompt=prompt, adapter=adapter, max_new_tokens=n, ignore_eos=True,
                              sampling=pb.SamplingParameters(temperature=0.0), **kw)


def test_mixed_concurrent_requests_over_adapters_match_the_engine_alone(stub, engine_alone):
    """16 requests over the base and three adapters, through 2 slots and 4 rows at once."""
    cases = [(PROMPTS[i % 4], ADAPTERS[(i * 3) % 4], 6 + i % 5) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda c: stub.Generate(greedy_request(*c), timeout=120), cases))
    expected = {c: engine_alone(*c) for c in set(cases)}
    assert len({tuple(expected[c]) for c in cases if c[0] == PROMPTS[0]}) > 1  # adapters change the answer
    for case, response in zip(cases, responses):
        assert list(response.token_ids) == expected[case], case
        assert response.finish_reason == pb.FINISH_REASON_LENGTH
        assert response.usage.completion_tokens == case[2] and response.usage.prompt_tokens > 0
        assert response.adapter.name == case[1]
        if case[1]:
            assert response.adapter.version == "v1" and len(response.adapter.content_hash) == 64


def test_stream_pieces_add_up_to_the_unary_answer(stub):
    request = greedy_request(PROMPTS[2], "wine", 20)
    whole = stub.Generate(request, timeout=60)
    pieces = list(stub.GenerateStream(request, timeout=60))
    assert "".join(p.text for p in pieces) == whole.text and whole.text
    assert [t for p in pieces for t in p.token_ids] == list(whole.token_ids)
    assert len(pieces) > 2 and pieces[0].adapter.version == "v1"
    assert all(p.finish_reason == pb.FINISH_REASON_UNSPECIFIED for p in pieces[:-1])
    assert pieces[-1].finish_reason == pb.FINISH_REASON_LENGTH and pieces[-1].usage.completion_tokens == 20
    assert len({p.request_id for p in pieces}) == 1 and pieces[0].request_id


def test_stop_string_ends_generation_before_it(stub):
    full = stub.Generate(greedy_request(PROMPTS[0], "cheese", 30), timeout=60).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    cut = full[: full.index(stop)]
    unary = stub.Generate(greedy_request(PROMPTS[0], "cheese", 30, stop=[stop]), timeout=60)
    streamed = list(stub.GenerateStream(greedy_request(PROMPTS[0], "cheese", 30, stop=[stop]), timeout=60))
    assert unary.text == cut == "".join(p.text for p in streamed)
    assert unary.finish_reason == streamed[-1].finish_reason == pb.FINISH_REASON_STOP
    assert unary.usage.completion_tokens < 30


def test_chat_messages_are_rendered_with_the_models_chat_template(stub, llama_dir):
    messages = [pb.ChatMessage(role="user", content="Which cheese is blue?")]
    tokenizer = TextCodec.from_pretrained(llama_dir).tokenizer
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Which cheese is blue?"}],
                                             add_generation_prompt=True, tokenize=False)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    by_messages = stub.Generate(pb.GenerateRequest(messages=pb.ChatMessages(messages=messages), max_new_tokens=8,
                                                   sampling=pb.SamplingParameters(temperature=0.0)), timeout=60)
    by_ids = stub.Generate(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), max_new_tokens=8,
                                              sampling=pb.SamplingParameters(temperature=0.0)), timeout=60)
    assert by_messages.usage.prompt_tokens == len(ids) and list(by_messages.token_ids) == list(by_ids.token_ids)


def test_seeded_sampling_is_reproducible_over_the_wire(stub):
    request = pb.GenerateRequest(prompt=PROMPTS[1], adapter="bread", max_new_tokens=12, ignore_eos=True,
                                 sampling=pb.SamplingParameters(temperature=0.9, top_p=0.95, top_k=50, seed=7))
    first, second = stub.Generate(request, timeout=60), stub.Generate(request, timeout=60)
    assert list(first.token_ids) == list(second.token_ids)


def test_n_samples_over_grpc_are_the_seeded_answers_whole_or_streamed(stub):
    """n=3 with seed 7: sample i is the answer seeded 7 + i; the unary response holds them all
    (its own fields are sample 0's, its usage counts the prompt once), the stream interleaves
    them by index with each sample's finish reason on its last message."""
    def request(n=None, seed=7):
        message = pb.GenerateRequest(prompt=PROMPTS[1], adapter="bread", max_new_tokens=6, ignore_eos=True,
                                     sampling=pb.SamplingParameters(temperature=0.9, seed=seed))
        if n is not None:
            message.n = n
        return message

    alone = [stub.Generate(request(seed=7 + i), timeout=60) for i in range(3)]
    whole = stub.Generate(request(n=3), timeout=60)
    assert [s.index for s in whole.samples] == [0, 1, 2]
    assert [list(s.token_ids) for s in whole.samples] == [list(a.token_ids) for a in alone]
    assert len({tuple(a.token_ids) for a in alone}) == 3
    assert whole.text == alone[0].text and whole.usage.completion_tokens == 18
    assert whole.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert not stub.Generate(request(n=1), timeout=60).samples
    texts, finished = {}, {}
    for message in stub.GenerateStream(request(n=3), timeout=60):
        texts[message.index] = texts.get(message.index, "") + message.text
        if message.finish_reason:
            finished[message.index] = message.usage.completion_tokens
    assert [texts[i] for i in range(3)] == [a.text for a in alone] and finished == {0: 6, 1: 6, 2: 6}


def test_closing_a_generation_cancels_every_sample_at_once(server):
    """The caller going away (the generation's iterator closed after its first piece) cancels
    each sample's engine request before aclose() returns, not whenever the iterator is collected."""
    from server.serving.generation import GenerationInput

    generations = server.server.generations
    engine = generations.ready().engine

    async def close_after_first_piece():
        run = generations.run(GenerationInput(prompt=PROMPTS[0], max_new_tokens=80, n=2, sampling=SamplingParams(
            temperature=0.9, seed=1, ignore_eos=True)), "grpc")
        await anext(run)
        running = engine.scheduler.in_flight()
        await run.aclose()
        return [seq.handle.cancelled.is_set() for seq in running]

    cancelled = server.call(close_after_first_piece())
    assert cancelled == [True, True]


def test_repetition_penalty_over_grpc_gives_transformers_penalised_greedy_tokens(stub, llama_dir):
    """The penalty travels from the request to the sampler, and is the one transformers applies
    (prompt tokens included); the random model repeats itself, so the penalty changes the tokens."""
    import torch

    from tests.helpers import reference_nf4_model

    prompt = [5, 17, 42, 99, 7, 3]

    def over_grpc(**sampling) -> list[int]:
        request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=prompt), max_new_tokens=16, ignore_eos=True,
                                     sampling=pb.SamplingParameters(temperature=0.0, **sampling))
        return list(stub.Generate(request, timeout=60).token_ids)

    penalised, plain = over_grpc(repetition_penalty=1.8), over_grpc()
    assert penalised != plain
    with torch.no_grad():
        want = reference_nf4_model(llama_dir).generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                                       repetition_penalty=1.8, min_new_tokens=16)[0, len(prompt):]
    assert penalised == want.tolist()
