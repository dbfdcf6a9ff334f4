"""Structured output and logprobs in the engine: grammars are applied per row of a mixed batch,
outputs under a schema parse and validate, and logprobs are the reference model's log-softmax.

The test model has random weights, so nothing it writes unconstrained is JSON: what parses here
parses because of the grammar mask.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

# `make test` installs these; elsewhere (a bare GPU image) this module skips instead of stopping collection
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from server.engine.engine import Engine, EngineConfig, FinishReason, Request, SamplingParams
from server.errors import InvalidRequest
from server.engine.structured import GrammarCompiler, OutputFormat, allowed_tokens
from server.serving.text import TextCodec
from tests.helpers import reference_peft_model

CHEESE_SCHEMA = {
    "type": "object",
    "properties": {"cheese": {"enum": ["comte", "brie", "roquefort"]},
                   "age_months": {"type": "integer", "minimum": 0, "maximum": 48},
                   "raw_milk": {"type": "boolean"}},
    "required": ["cheese", "age_months", "raw_milk"],
    "additionalProperties": False,
}
LOGPROB_ATOL = 2e-4  # logits agree to 1e-4 (test_engine_vs_transformers); log-softmax adds one shift


@pytest.fixture(scope="module")
def engine(llama_dir, peft_adapters):
    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=6, max_seq_len=128, max_adapters=3, max_rank=16))
    for name, path in peft_adapters.items():
        engine.load_adapter(name, path)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def codec(llama_dir):
    return TextCodec.from_pretrained(llama_dir)


@pytest.fixture(scope="module")
def grammars(codec, engine):
    return GrammarCompiler(codec.tokenizer, engine.spec.vocab_size)


def greedy(n: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kwargs)


def test_bitmask_unpacks_to_the_tokens_it_names():
    vocab = 70  # three words, the last one partly past the vocabulary
    allowed = torch.zeros(2, vocab, dtype=torch.bool)
    allowed[0, [0, 31, 32, 69]] = True
    allowed[1] = True
    words = torch.zeros(2, 3, dtype=torch.int64)
    for row, token in allowed.nonzero().tolist():
        words[row, token // 32] |= 1 << (token % 32)
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # as llguidance writes them
    assert torch.equal(allowed_tokens(bitmask, vocab), allowed)


def test_json_schema_output_parses_and_validates_in_a_batch_with_free_requests(engine, codec, grammars):
    prompt = codec.encode_prompt("Describe a cheese as JSON:")
    schema = grammars.compile(OutputFormat("json_schema", json.dumps(CHEESE_SCHEMA)))
    free = [Request(prompt, adapter="wine", sampling=greedy(10, ignore_eos=True)),
            Request(prompt, sampling=greedy(10, ignore_eos=True))]
    constrained = [Request(prompt, adapter="cheese", sampling=greedy(80), grammar=schema),
                   Request(prompt, sampling=SamplingParams(max_new_tokens=80, temperature=1.0, seed=5), grammar=schema)]
    outputs = engine.generate(free + constrained)
    for out in outputs[2:]:
        text = codec.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        assert out.finish_reason == FinishReason.STOP, text
        jsonschema.validate(json.loads(text), CHEESE_SCHEMA)
    alone = [engine.generate([r])[0].token_ids for r in free]
    assert [o.token_ids for o in outputs[:2]] == alone  # the masks touched only their own rows
    unconstrained = engine.generate([Request(prompt, adapter="cheese", sampling=greedy(20))])[0]
    with pytest.raises(ValueError):  # the same request without the grammar is not JSON
        json.loads(codec.tokenizer.decode(unconstrained.token_ids, skip_special_tokens=True))


def test_regex_output_matches(engine, codec, grammars):
    pattern = r"(comte|brie)-[0-9]{2,4}"
    grammar = grammars.compile(OutputFormat("regex", pattern))
    requests = [Request(codec.encode_prompt(p), adapter=a, sampling=SamplingParams(max_new_tokens=30, seed=s), grammar=grammar)
                for p, a, s in (("Name one", "bread", 1), ("Another", None, 2), ("And", "wine", 3))]
    for out in engine.generate(requests):
        text = codec.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        assert out.finish_reason == FinishReason.STOP and re.fullmatch(pattern, text), text


@pytest.mark.parametrize("fmt, words", [
    (OutputFormat("json_schema", "{not json"), "not valid JSON"),
    (OutputFormat("json_schema", json.dumps({"type": "frobnicate"})), "frobnicate"),
    (OutputFormat("regex", "(unclosed"), "regex"),
    (OutputFormat("lark", "start: undefined_rule"), "lark"),
    (OutputFormat("yaml", "a: 1"), "kind"),
])
def test_invalid_constraints_are_refused_before_any_work(grammars, fmt, words):
    with pytest.raises(InvalidRequest, match=f"(?i){words}"):
        grammars.compile(fmt)


@pytest.mark.parametrize("adapter, sampling", [
    ("wine", greedy(8, logprobs=5, ignore_eos=True)),
    (None, SamplingParams(max_new_tokens=8, temperature=1.3, seed=7, logprobs=3, ignore_eos=True)),
])
def test_logprobs_are_the_reference_models_log_softmax(engine, llama_dir, peft_adapters, adapter, sampling):
    prompt = [5, 17, 42, 99, 7, 3]
    handle = engine.submit(Request(prompt, adapter=adapter, sampling=sampling))
    out = handle.result()
    assert [lp.token_id for lp in handle.logprobs] == out.token_ids
    reference = reference_peft_model(llama_dir, {"wine": peft_adapters["wine"]})
    with torch.no_grad():
        if adapter is None:
            with reference.disable_adapter():
                logits = reference(torch.tensor([prompt + out.token_ids])).logits[0]
        else:
            logits = reference(torch.tensor([prompt + out.token_ids])).logits[0]
    want = logits[len(prompt) - 1:-1].log_softmax(dim=-1)
    for step, lp in enumerate(handle.logprobs):
        assert abs(lp.logprob - want[step, lp.token_id].item()) < LOGPROB_ATOL
        top_values, top_ids = want[step].topk(sampling.logprobs)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), top_values, rtol=0, atol=LOGPROB_ATOL)


def test_a_tokenizer_llguidance_cannot_read_leaves_structured_output_off_not_the_server():
    from server.errors import Unsupported
    from server.serving.status import status_of

    compiler = GrammarCompiler(object(), 512)
    assert not compiler.available
    with pytest.raises(Unsupported, match="tokenizer") as info:
        compiler.compile(OutputFormat("json_object"))
    assert status_of(info.value).http_status == 501
