"""The OpenAI-compatible HTTP API, spoken to by the official `openai` client against a real server
on port 0, next to the gRPC client on the same server: the same greedy request gives the same
tokens over both, `model` picks the adapter, streaming adds up to the whole answer, structured
output validates, logprobs match gRPC's, and errors come back in OpenAI's shape."""

from __future__ import annotations

import json
import re

import urllib.error
import urllib.request

import pytest

# `make test` installs these; elsewhere (a bare GPU image) this module skips instead of stopping collection
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from clients.client import Client
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.adapters.store import AdapterStore, base_fingerprint
from tests.helpers import RunningServer
from tests.test_structured_output import CHEESE_SCHEMA

ENGINE = EngineConfig(max_batch_size=4, max_seq_len=128, max_adapters=2, max_rank=16)
BASE = "tiny-base"
CHAT = [{"role": "user", "content": "Which wine goes with Comte?"}]
FIXED_LENGTH = {"ignore_eos": True}  # vLLM's extra field: every answer is max_tokens long


@pytest.fixture(scope="module")
def server(llama_dir, peft_adapters, tmp_path_factory):
    store = AdapterStore(tmp_path_factory.mktemp("store"))
    for name in ("cheese", "wine"):
        store.publish(name, peft_adapters[name], manifest={"base_fingerprint": base_fingerprint(llama_dir)})
    config = ServerConfig(model_dir=llama_dir, engine=ENGINE, adapters=AdapterConfig(store=store.root), port=0,
                          metrics_port=0, host="127.0.0.1", metrics_host="127.0.0.1", http_host="127.0.0.1",
                          http_port=0, served_model_name=BASE)
    with RunningServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def grpc_client(server):
    with Client(server.target) as client:
        yield client


def test_models_lists_the_base_model_and_every_adapter_version(http, grpc_client):
    ids = [m.id for m in http.models.list().data]
    assert ids == [BASE, "cheese", "cheese@v1", "wine", "wine@v1"]  # each name (its current version), then its versions
    assert http.models.retrieve("wine@v1").parent == BASE and http.models.retrieve(BASE).parent is None
    with pytest.raises(openai.NotFoundError):
        http.models.retrieve("camembert")
    assert [m.id for m in grpc_client.models()] == ids


@pytest.mark.parametrize("model", [BASE, "cheese", "wine@v1"])
def test_chat_completion_gives_the_grpc_answer_for_the_same_adapter(http, grpc_client, model):
    reply = http.chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0, logprobs=True,
                                         extra_body=FIXED_LENGTH)
    adapter = "" if model == BASE else model
    want = grpc_client.generate(CHAT, adapter, max_new_tokens=10, temperature=0, ignore_eos=True, top_logprobs=0)
    choice = reply.choices[0]
    assert choice.message.content == want.text and choice.finish_reason == "length"
    assert [t.token for t in choice.logprobs.content] == [t.token for t in want.logprobs]  # the same tokens
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (want.usage.prompt_tokens, 10)
    assert reply.model == model


def test_a_repeated_prompt_reports_its_cached_tokens_on_both_protocols(http, grpc_client):
    """The second time a prompt is sent on one adapter, its full blocks (16 tokens each, all but
    the one holding its last token) come from the prefix cache, and both protocols say so."""
    chat = [{"role": "system", "content": "You pair cheese with wine, briefly and well. " * 2},
            {"role": "user", "content": "Which wine goes with Comte?"}]
    first, second = (http.chat.completions.create(model="wine", messages=chat, max_tokens=2, extra_body=FIXED_LENGTH)
                     for _ in range(2))
    prompt_tokens = second.usage.prompt_tokens
    assert prompt_tokens > 32 and first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == (prompt_tokens - 1) // 16 * 16
    assert grpc_client.generate(chat, "wine", max_new_tokens=2).usage.cached_tokens == (prompt_tokens - 1) // 16 * 16
    assert grpc_client.generate(chat, "cheese", max_new_tokens=2).usage.cached_tokens == 0  # another adapter's


def test_n_samples_are_the_seeded_answers_in_order_whole_or_streamed(http, grpc_client):
    """n=3 with a seed: choice i is what gRPC gives for seed + i; the streamed choices arrive
    interleaved, each opening with the assistant role, and add up to the same texts; usage counts
    the prompt once and every sample's tokens."""
    sampled = dict(model="cheese", messages=CHAT, n=3, max_tokens=6, temperature=0.9, seed=11, extra_body=FIXED_LENGTH)
    reply = http.chat.completions.create(**sampled)
    texts = [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    want = [grpc_client.generate(CHAT, "cheese", max_new_tokens=6, temperature=0.9, seed=11 + i, ignore_eos=True)
            for i in range(3)]
    assert texts == [w.text for w in want] and len(set(texts)) == 3
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (want[0].usage.prompt_tokens, 18)
    streamed, roles = {}, {}
    for chunk in http.chat.completions.create(**sampled, stream=True):
        for choice in chunk.choices:
            roles.setdefault(choice.index, choice.delta.role)
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts and set(roles.values()) == {"assistant"}


def test_model_picks_the_adapter(http):
    answers = {model: http.chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0,
                                                   extra_body=FIXED_LENGTH).choices[0].message.content
               for model in (BASE, "cheese", "wine")}
    assert len(set(answers.values())) == 3, answers


def test_streamed_chat_adds_up_to_the_whole_answer(http):
    whole = http.chat.completions.create(model="cheese", messages=CHAT, max_tokens=12, temperature=0,
                                         extra_body=FIXED_LENGTH)
    chunks = list(http.chat.completions.create(model="cheese", messages=CHAT, max_tokens=12, temperature=0, stream=True,
                                               stream_options={"include_usage": True}, extra_body=FIXED_LENGTH))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_completions_plain_and_streamed_with_stop_and_seed(http, grpc_client):
    args = dict(model="wine@v1", prompt="Cheese is made from", max_tokens=16, temperature=0.9, seed=3)
    whole = http.completions.create(**args)
    streamed = "".join(c.choices[0].text for c in http.completions.create(**args, stream=True))
    assert streamed == whole.choices[0].text
    assert whole.choices[0].text == grpc_client.generate("Cheese is made from", "wine@v1", max_new_tokens=16,
                                                         temperature=0.9, seed=3).text
    stop = re.findall("[A-Za-z]{3,}", whole.choices[0].text)[-1]  # a word of the answer, not its start
    cut = http.completions.create(**args, stop=[stop])
    assert cut.choices[0].text == whole.choices[0].text[:whole.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and whole.choices[0].finish_reason == "length"


def test_completions_accept_token_ids_and_return_logprobs(http, grpc_client):
    reply = http.completions.create(model="cheese", prompt=[5, 17, 42, 99], max_tokens=6, temperature=0, logprobs=3,
                                    extra_body=FIXED_LENGTH)
    want = grpc_client.generate([5, 17, 42, 99], "cheese", max_new_tokens=6, temperature=0, ignore_eos=True,
                                top_logprobs=3)
    logprobs = reply.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx([t.logprob for t in want.logprobs], abs=1e-6)
    assert [list(top) for top in logprobs.top_logprobs] == [[token for _, token, _ in t.top] for t in want.logprobs]
    assert logprobs.text_offset[0] == 0 and all(lp <= 0 for lp in logprobs.token_logprobs)


def test_chat_json_schema_output_validates(http):
    for model in (BASE, "cheese"):
        reply = http.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "A cheese, as JSON"}], max_tokens=80, temperature=0.8,
            seed=11, response_format={"type": "json_schema", "json_schema": {"name": "cheese", "schema": CHEESE_SCHEMA}})
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), CHEESE_SCHEMA)


def test_grpc_regex_and_json_object_outputs(grpc_client):
    pattern = r"[A-Z][a-z]{2,6} [0-9]{1,3}"
    result = grpc_client.generate("Cheese and age:", "wine", max_new_tokens=20, seed=4, regex=pattern)
    assert result.finish_reason == "stop" and re.fullmatch(pattern, result.text), result.text
    result = grpc_client.generate("Anything:", "cheese", max_new_tokens=60, temperature=0, json_object=True)
    assert result.finish_reason == "stop" and isinstance(json.loads(result.text), dict), result.text


@pytest.mark.parametrize("call, status, words", [
    (lambda c: c.chat.completions.create(model="camembert", messages=CHAT), 404, "camembert"),
    (lambda c: c.chat.completions.create(model=BASE, messages=CHAT, temperature=-1), 400, "temperature"),
    (lambda c: c.chat.completions.create(model=BASE, messages=CHAT, n=17), 400, "n: 17 samples"),
    (lambda c: c.completions.create(model=BASE, prompt="x", n=0), 400, "n: 0 samples"),
    (lambda c: c.chat.completions.create(model=BASE, messages=[]), 400, "messages"),
    (lambda c: c.completions.create(model=BASE, prompt="x", extra_body={"structured_outputs": {"regex": "(a"}}), 400, "regex"),
    (lambda c: c.chat.completions.create(model=BASE, messages=CHAT, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}), 400, "frobnicate"),
    (lambda c: c.chat.completions.create(model=BASE, messages=CHAT, top_logprobs=2), 400, "logprobs"),
])
def test_errors_come_back_in_openai_shape(http, call, status, words):
    with pytest.raises(openai.APIStatusError) as info:
        call(http)
    assert info.value.status_code == status
    error = info.value.body
    assert re.search(words, error["message"], re.IGNORECASE) and error["type"], error


@pytest.mark.parametrize("extra, named", [
    ({"min_tokens": 5}, "min_tokens"),
    ({"skip_special_tokens": False, "echo": True}, "echo, skip_special_tokens"),  # not their no-op values
    ({"reasoning_effort": "high", "prediction": {"type": "content", "content": "x"}}, "prediction, reasoning_effort"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "hi", "name": "Ann"}]}, r"messages\[0\]\.name"),
    ({"temprature": 0.5}, "temprature"),  # a typo is refused too: it would have been ignored
])
def test_fields_that_would_change_the_answer_are_refused_by_name(http, extra, named):
    with pytest.raises(openai.BadRequestError) as info:
        http.chat.completions.create(model=BASE, messages=CHAT, max_tokens=4, extra_body=extra)
    assert re.search(named, info.value.body["message"]), info.value.body


def test_harmless_and_null_fields_are_accepted_and_change_nothing(http):
    args = dict(model="cheese", messages=CHAT, max_tokens=8, temperature=0.8, seed=5)
    plain = http.chat.completions.create(**args).choices[0].message.content
    labelled = http.chat.completions.create(
        **args, user="u-17", metadata={"team": "cheese"}, store=False, service_tier="auto",
        extra_body={"prompt_cache_key": "k", "safety_identifier": "s", "parallel_tool_calls": True,
                    "min_tokens": None, "audio": None, "modalities": [], "tool_choice": "none",
                    "use_beam_search": False, "skip_special_tokens": True, "echo": False})
    assert labelled.choices[0].message.content == plain


def test_logit_bias_min_p_and_stop_token_ids_do_what_they_say(server, http, grpc_client):
    prompt = [5, 17, 42, 99]
    greedy = grpc_client.generate(prompt, "cheese", max_new_tokens=6, temperature=0, ignore_eos=True).token_ids
    forced = next(t for t in range(3, 500) if t not in greedy)

    def completion(**extra):
        return http.completions.create(model="cheese", prompt=prompt, max_tokens=6, logprobs=0,
                                       extra_body={"ignore_eos": True, **extra.pop("extra_body", {})}, **extra)

    def texts(reply) -> list[str]:  # the answer's tokens, as text
        return reply.choices[0].logprobs.tokens

    greedy_texts = texts(completion(temperature=0))
    # +100 makes one token win every step; -100 on each greedy token makes greedy pick others
    _, forced_text = post(f"http://127.0.0.1:{server.server.http_port}/detokenize", json.dumps({"tokens": [forced]}).encode())
    assert texts(completion(temperature=0, logit_bias={str(forced): 100})) == [forced_text["prompt"]] * 6
    banned = texts(completion(temperature=0, logit_bias={str(t): -100 for t in set(greedy)}))
    assert len(banned) == 6 and not set(banned) & set(greedy_texts)
    # min_p 1 keeps only the most likely token: a hot, seeded sample becomes the greedy answer
    assert texts(completion(temperature=5.0, seed=1, extra_body={"min_p": 1.0})) == greedy_texts
    assert texts(completion(temperature=5.0, seed=1)) != greedy_texts
    # a stop token id ends the answer where greedy generates it
    stopped = completion(temperature=0, extra_body={"stop_token_ids": [greedy[2]], "ignore_eos": False})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens <= 3
    # gRPC takes the same three
    fixed = dict(max_new_tokens=6, ignore_eos=True)
    assert grpc_client.generate(prompt, "cheese", temperature=0, logit_bias={forced: 100}, **fixed).token_ids == [forced] * 6
    assert grpc_client.generate(prompt, "cheese", temperature=5.0, seed=1, min_p=1.0, **fixed).token_ids == greedy
    stopped = grpc_client.generate(prompt, "cheese", max_new_tokens=6, temperature=0, stop_token_ids=[greedy[2]])
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) <= 3
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        http.completions.create(model="cheese", prompt=prompt, max_tokens=2, logit_bias={"999999": 5})
    with pytest.raises(openai.BadRequestError, match="token ids"):  # a digit, but not one int() reads
        http.completions.create(model="cheese", prompt=prompt, max_tokens=2, logit_bias={"\u00b2": 5})
    with pytest.raises(openai.BadRequestError, match="min_p"):
        http.completions.create(model="cheese", prompt=prompt, max_tokens=2, extra_body={"min_p": 2})


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_malformed_body_is_a_400_in_openai_shape(server):
    url = f"http://127.0.0.1:{server.server.http_port}/v1/chat/completions"
    status, body = post(url, json.dumps({"model": BASE, "messages": "not a list"}).encode())
    assert status == 400 and "messages" in body["error"]["message"]
    status, body = post(url, b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


def test_requests_are_counted_by_protocol(server, http, grpc_client):
    def count(protocol: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=30) as reply:
            text = reply.read().decode()
        match = re.search(rf'^hotlora_requests_total{{adapter="cheese",code="OK",protocol="{protocol}"}} (\S+)$', text, re.M)
        return float(match[1]) if match else 0.0

    before = count("http"), count("grpc")
    http.completions.create(model="cheese", prompt="Brie", max_tokens=2)
    grpc_client.generate("Brie", "cheese", max_new_tokens=2)
    grpc_client.generate("Brie", "cheese", max_new_tokens=2)
    assert (count("http") - before[0], count("grpc") - before[1]) == (1, 2)


@pytest.fixture(scope="module")
def long_server(llama_dir):
    """Room for 2,000-token answers, which take seconds here: long enough to see a drop."""
    config = ServerConfig(model_dir=llama_dir, engine=EngineConfig(max_batch_size=2, max_seq_len=2048), port=0,
                          metrics_port=0, host="127.0.0.1", metrics_host="127.0.0.1", http_host="127.0.0.1", http_port=0)
    with RunningServer(config) as running:
        yield running


def send_raw(server, body: dict):
    import socket

    payload = json.dumps(body).encode()
    client = socket.create_connection(("127.0.0.1", server.server.http_port))
    client.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return client


def idle(server) -> bool:
    stats = server.server.engine.stats()
    return stats["running"] == 0 and stats["queue_length"] == 0


def wait_for(condition, timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


LONG = {"model": "tiny", "prompt": "Cheese", "max_tokens": 2000, "ignore_eos": True}


def test_a_client_that_goes_away_cancels_its_request(long_server):
    """Four requests for 2,000 tokens on a 2-row engine (two running, two queued), their
    connections closed: the engine is idle within a second, not after the answers' seconds."""
    import time

    clients = [send_raw(long_server, LONG) for _ in range(4)]
    assert wait_for(lambda: long_server.server.engine.stats()["running"] == 2, timeout=30)
    for client in clients:
        client.close()
    started = time.monotonic()
    assert wait_for(lambda: idle(long_server), timeout=30) and time.monotonic() - started < 1.5


def test_a_stream_whose_client_goes_away_is_cancelled(long_server):
    """Two streams that have started (their headers come with the first piece), then dropped."""
    import time

    clients = [send_raw(long_server, {**LONG, "stream": True}) for _ in range(2)]
    for client in clients:
        assert b"text/event-stream" in client.recv(65536)
    for client in clients:
        client.close()
    started = time.monotonic()
    assert wait_for(lambda: idle(long_server), timeout=30) and time.monotonic() - started < 1.5


def test_streamed_logprobs_add_up_to_the_whole_answers(http):
    args = dict(model="wine", prompt="Cheese is made from", max_tokens=12, temperature=0, logprobs=2,
                extra_body=FIXED_LENGTH)
    whole = http.completions.create(**args).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in http.completions.create(**args, stream=True) if c.choices[0].logprobs]
    assert [t for c in chunks for t in c.tokens] == whole.tokens
    assert [o for c in chunks for o in c.text_offset] == whole.text_offset  # offsets run on across chunks
    assert whole.text_offset == [sum(len(t) for t in whole.tokens[:i]) for i in range(len(whole.tokens))]


def test_the_base_models_name_is_the_base_model_over_grpc_too(grpc_client):
    by_name = grpc_client.generate("Brie is", BASE, max_new_tokens=6, temperature=0, ignore_eos=True)
    unnamed = grpc_client.generate("Brie is", "", max_new_tokens=6, temperature=0, ignore_eos=True)
    assert by_name.token_ids == unnamed.token_ids and by_name.adapter == ""
