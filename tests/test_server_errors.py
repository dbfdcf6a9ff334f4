"""Every bad input gets its own gRPC status with a message naming the field, and the server keeps
serving: a normal request right after each one succeeds."""

from __future__ import annotations


import grpc
import pytest

from protos.hotlora.v1 import generation_pb2 as pb
from protos.hotlora.v1 import generation_pb2_grpc
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.adapters.store import AdapterStore
from tests.helpers import RunningServer, wait_until

OK = pb.GenerateRequest(prompt="Cheese is made from milk", adapter="cheese", max_new_tokens=4,
                        sampling=pb.SamplingParameters(temperature=0.0))
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def server(llama_dir, peft_adapters, tmp_path_factory):
    store = AdapterStore(tmp_path_factory.mktemp("store"))
    store.publish("cheese", peft_adapters["cheese"])
    store.publish("bread", peft_adapters["bread"])  # rank 16 > this server's max_rank 8
    config = ServerConfig(model_dir=llama_dir, host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0,
                          engine=EngineConfig(max_batch_size=2, max_seq_len=512, max_adapters=2, max_rank=8, max_queue=2,
                                             max_queue_per_adapter=2),
                          adapters=AdapterConfig(store=store.root))
    with RunningServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def still_serving(stub):
    response = stub.Generate(OK, timeout=30)
    assert response.usage.completion_tokens == 4


def request(**fields):
    merged = pb.GenerateRequest()
    merged.CopyFrom(OK)
    for name, value in fields.items():
        if name in ("sampling", "structured_output"):
            getattr(merged, name).CopyFrom(value)
        elif name == "stop":
            merged.stop.extend(value)
        else:
            setattr(merged, name, value)
    return merged


BAD_REQUESTS = {
    "no input": (lambda: pb.GenerateRequest(max_new_tokens=4), Code.INVALID_ARGUMENT, "prompt"),
    "empty prompt": (lambda: request(prompt=""), Code.INVALID_ARGUMENT, "prompt is empty"),
    "empty token ids": (lambda: pb.GenerateRequest(prompt_token_ids=pb.TokenIds(), max_new_tokens=4), Code.INVALID_ARGUMENT, "prompt_token_ids"),
    "token id outside the vocabulary": (lambda: pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, 99999]), max_new_tokens=4),
                                        Code.INVALID_ARGUMENT, "prompt_ids"),
    "zero max_new_tokens": (lambda: request(max_new_tokens=0), Code.INVALID_ARGUMENT, "max_new_tokens"),
    "negative max_new_tokens": (lambda: request(max_new_tokens=-3), Code.INVALID_ARGUMENT, "max_new_tokens"),
    "max_new_tokens beyond the context": (lambda: request(max_new_tokens=1000), Code.INVALID_ARGUMENT, "max_new_tokens"),
    "prompt longer than the context": (lambda: pb.GenerateRequest(prompt="milk " * 600), Code.INVALID_ARGUMENT, "max_seq_len"),
    "negative temperature": (lambda: request(sampling=pb.SamplingParameters(temperature=-0.5)), Code.INVALID_ARGUMENT, "temperature"),
    "top_p zero": (lambda: request(sampling=pb.SamplingParameters(top_p=0.0)), Code.INVALID_ARGUMENT, "top_p"),
    "top_p above one": (lambda: request(sampling=pb.SamplingParameters(top_p=1.5)), Code.INVALID_ARGUMENT, "top_p"),
    "bad adapter name": (lambda: request(adapter="../etc/passwd"), Code.INVALID_ARGUMENT, "adapter name"),
    "adapter name with a trailing newline": (lambda: request(adapter="cheese\n"), Code.INVALID_ARGUMENT, "adapter name"),
    "version with a trailing newline": (lambda: request(adapter="cheese@v1\n"), Code.INVALID_ARGUMENT, "adapter name"),
    "infinite temperature": (lambda: request(sampling=pb.SamplingParameters(temperature=float("inf"))),
                             Code.INVALID_ARGUMENT, "temperature must be a finite number"),
    "infinite repetition penalty": (lambda: request(sampling=pb.SamplingParameters(repetition_penalty=float("inf"))),
                                    Code.INVALID_ARGUMENT, "repetition_penalty must be a finite number"),
    "too many stop strings": (lambda: request(stop=["x"] * 9), Code.INVALID_ARGUMENT, "stop"),
    "prompt over the byte limit": (lambda: request(prompt="milk " * 220_000), Code.INVALID_ARGUMENT, "limit is 1048576"),
    "too many chat messages": (lambda: pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")] * 1025),
                                                          max_new_tokens=4), Code.INVALID_ARGUMENT, "limit is 1024"),
    "invalid JSON schema": (lambda: request(structured_output=pb.StructuredOutput(json_schema='{"type": "frobnicate"}')),
                            Code.INVALID_ARGUMENT, "frobnicate"),
    "schema that is not JSON": (lambda: request(structured_output=pb.StructuredOutput(json_schema="{oops")),
                                Code.INVALID_ARGUMENT, "not valid JSON"),
    "invalid regex": (lambda: request(structured_output=pb.StructuredOutput(regex="(unclosed")), Code.INVALID_ARGUMENT, "regex"),
    "empty structured output": (lambda: request(structured_output=pb.StructuredOutput()), Code.INVALID_ARGUMENT,
                                "structured_output"),
    "too many top logprobs": (lambda: request(top_logprobs=21), Code.INVALID_ARGUMENT, "logprobs"),
    "too many samples": (lambda: request(n=17), Code.INVALID_ARGUMENT, "n: 17 samples"),
    "no samples": (lambda: request(n=0), Code.INVALID_ARGUMENT, "n: 0 samples"),
    "unknown adapter": (lambda: request(adapter="nonexistent"), Code.NOT_FOUND, "nonexistent"),
    "unknown version": (lambda: request(adapter="cheese@v9"), Code.NOT_FOUND, "cheese@v9"),
    "incompatible adapter": (lambda: request(adapter="bread"), Code.FAILED_PRECONDITION, "max_rank 8"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_its_status_and_the_server_keeps_serving(stub, case):
    make, code, words = BAD_REQUESTS[case]
    for call in (lambda: stub.Generate(make(), timeout=30), lambda: list(stub.GenerateStream(make(), timeout=30))):
        got_code, details = status_of(call)
        assert got_code == code and words in details, (got_code, details)
    still_serving(stub)


def test_tokenizing_a_prompt_never_blocks_other_streams(stub, monkeypatch):
    """Tokenization and chat templating run off the event loop: while one request's tokenization
    is held, a whole other request is served."""
    import threading

    from server.serving.text import TextCodec

    entered, release = threading.Event(), threading.Event()
    original = TextCodec.encode_prompt

    def held(self, text, *args, **kwargs):
        if text == "HOLD":
            entered.set()
            assert release.wait(60)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(TextCodec, "encode_prompt", held)
    holding = stub.Generate.future(request(prompt="HOLD"), timeout=60)
    try:
        assert entered.wait(30)
        still_serving(stub)  # on the event loop, the held tokenization would block this until its deadline
    finally:
        release.set()
    assert holding.result(timeout=60).usage.completion_tokens == 4


def test_client_deadline_is_deadline_exceeded_and_frees_the_sequence(stub, server):
    slow = request(max_new_tokens=50, ignore_eos=True)  # ~50 decode steps: far longer than 10 ms
    code, _ = status_of(lambda: list(stub.GenerateStream(slow, timeout=0.01)))
    assert code == Code.DEADLINE_EXCEEDED
    wait_until(lambda: server.server.engine.stats()["running"] == 0)
    still_serving(stub)


def test_cancelled_stream_frees_its_sequence_at_once(stub, server):
    stream = stub.GenerateStream(request(max_new_tokens=50, ignore_eos=True), timeout=30)
    next(stream)
    stream.cancel()
    wait_until(lambda: server.server.engine.stats()["running"] == 0)
    assert server.server.engine.stats()["kv_blocks_used"] == 0
    still_serving(stub)


def test_full_queue_is_resource_exhausted(stub, server):
    """2 rows and a queue of 2: with two requests running and two waiting, the next is refused;
    the others all finish."""
    long = request(max_new_tokens=400, ignore_eos=True)
    stats = server.server.engine.stats
    streams = [stub.GenerateStream(long, timeout=60) for _ in range(2)]
    wait_until(lambda: stats()["running"] == 2)
    streams += [stub.GenerateStream(long, timeout=60) for _ in range(2)]
    wait_until(lambda: stats()["queue_length"] == 2)
    code, details = status_of(lambda: stub.Generate(long, timeout=30))
    assert code == Code.RESOURCE_EXHAUSTED and "queue is full" in details
    assert all(list(s)[-1].usage.completion_tokens == 400 for s in streams)
    still_serving(stub)



@pytest.mark.parametrize("method", ["/hotlora.v1.Generation/Generate", "/hotlora.v1.Generation/GenerateStream",
                                    "/hotlora.v1.Adapters/GetAdapter"])
@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff garbage", b"\x0a\x02\xc3\x28"], ids=["garbage", "invalid utf-8"])
def test_undecodable_requests_are_invalid_argument(server, stub, method, payload, caplog):
    """Bytes that are not the request message (b"\\x0a\\x02\\xc3\\x28": field 1, a string, holding
    invalid UTF-8) get INVALID_ARGUMENT and one log line, not UNKNOWN and a traceback."""
    import logging

    caplog.set_level(logging.INFO)
    with server.channel() as channel:
        raw = (channel.unary_unary if not method.endswith("Stream") else channel.unary_stream)(
            method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            result = raw(payload, timeout=30)
            list(result) if method.endswith("Stream") else result
    assert info.value.code() == Code.INVALID_ARGUMENT and "could not be decoded" in info.value.details()
    assert not any(r.exc_info for r in caplog.records)
    still_serving(stub)
