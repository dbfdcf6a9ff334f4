"""Evaluating adapters where they are served: /v1/completions with `echo` and prompt logprobs, the
same over gRPC and the CLI, vLLM's tokenizer endpoints, and lm-evaluation-harness's
local-completions model run against a real server on a multiple-choice task kept in the tests.

Every number is checked against transformers + PEFT on the same NF4 model and adapters."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")  # `make test` installs these; a bare GPU image skips
pytest.importorskip("fastapi")

from clients import cli
from clients.client import Client
from server.adapters.store import AdapterStore, base_fingerprint
from server.config import AdapterConfig, EngineConfig, ServerConfig
from tests.helpers import RunningServer, reference_peft_model
from tests.test_prompt_logprobs import LOGPROB_ATOL, reference_prompt_logprobs

BASE = "tiny-base"
TASK_DIR = Path(__file__).parent / "eval_task"
PROMPTS = {BASE: [5, 17, 42, 99, 7, 3, 250, 11], "cheese": [9, 8, 7, 6, 5, 4, 3, 2, 1, 30], "wine": [100, 200, 300, 12, 13]}


@pytest.fixture(scope="module")
def server(llama_dir, peft_adapters, tmp_path_factory):
    store = AdapterStore(tmp_path_factory.mktemp("store"))
    for name in ("cheese", "wine"):
        store.publish(name, peft_adapters[name], manifest={"base_fingerprint": base_fingerprint(llama_dir)})
    config = ServerConfig(model_dir=llama_dir, engine=EngineConfig(max_batch_size=4, max_seq_len=128, max_adapters=2,
                                                                   max_rank=16),
                          adapters=AdapterConfig(store=store.root), port=0, metrics_port=0, host="127.0.0.1",
                          metrics_host="127.0.0.1", http_host="127.0.0.1", http_port=0, served_model_name=BASE)
    with RunningServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def base_url(server):
    return f"http://127.0.0.1:{server.server.http_port}"


@pytest.fixture(scope="module")
def http(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(llama_dir, peft_adapters):
    return reference_peft_model(llama_dir, {"cheese": peft_adapters["cheese"], "wine": peft_adapters["wine"]})


def reference_scores(reference, model: str, prompt: list[int]) -> torch.Tensor:
    return reference_prompt_logprobs(reference, None if model == BASE else model, prompt)


def test_echo_scores_the_prompt_of_each_request_in_a_mixed_batch_with_its_adapter(http, reference):
    def score(model):  # at once, so the server batches the three prompts together
        return http.completions.create(model=model, prompt=PROMPTS[model], max_tokens=0, echo=True, logprobs=2)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = dict(zip(PROMPTS, pool.map(score, PROMPTS)))
    for model, reply in replies.items():
        prompt, choice = PROMPTS[model], replies[model].choices[0]
        logprobs = choice.logprobs
        assert choice.finish_reason == "length" and reply.usage.completion_tokens == 0  # scored, nothing generated
        assert len(logprobs.tokens) == len(prompt) and logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        want = reference_scores(reference, model, prompt)
        got = torch.tensor(logprobs.token_logprobs[1:])
        torch.testing.assert_close(got, want[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])], rtol=0,
                                   atol=LOGPROB_ATOL)
        for position, top in enumerate(logprobs.top_logprobs[1:]):
            assert len(top) == 2 and max(top.values()) == pytest.approx(want[position].max().item(), abs=LOGPROB_ATOL)
    assert replies["cheese"].choices[0].logprobs.token_logprobs != \
        http.completions.create(model=BASE, prompt=PROMPTS["cheese"], max_tokens=0, echo=True,
                                logprobs=0).choices[0].logprobs.token_logprobs  # the adapter is what changes them


def test_echo_returns_the_prompt_then_the_completion_with_logprobs_over_both(http):
    prompt = "Cheese is made from"
    plain = http.completions.create(model="cheese", prompt=prompt, max_tokens=5, temperature=0, logprobs=1,
                                    extra_body={"ignore_eos": True})
    echoed = http.completions.create(model="cheese", prompt=prompt, max_tokens=5, temperature=0, logprobs=1, echo=True,
                                     extra_body={"ignore_eos": True})
    choice, generated = echoed.choices[0], plain.choices[0]
    assert choice.text == prompt + generated.text
    prompt_tokens = echoed.usage.prompt_tokens
    lp = choice.logprobs
    assert len(lp.tokens) == prompt_tokens + 5 and lp.token_logprobs[0] is None
    assert lp.tokens[prompt_tokens:] == generated.logprobs.tokens  # the generated tokens follow the prompt's
    assert lp.token_logprobs[prompt_tokens:] == pytest.approx(generated.logprobs.token_logprobs, abs=1e-6)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert lp.text_offset[prompt_tokens] == sum(len(t) for t in lp.tokens[:prompt_tokens])
    streamed = list(http.completions.create(model="cheese", prompt=prompt, max_tokens=5, temperature=0, logprobs=1,
                                            echo=True, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert [t for c in streamed for t in c.choices[0].logprobs.token_logprobs] == pytest.approx(lp.token_logprobs)
    without_logprobs = http.completions.create(model="cheese", prompt=prompt, max_tokens=5, temperature=0, echo=True,
                                               extra_body={"ignore_eos": True})
    assert without_logprobs.choices[0].text == choice.text and without_logprobs.choices[0].logprobs is None


def test_a_list_of_prompts_answers_each_in_order_as_it_would_alone(http):
    prompts = [PROMPTS["cheese"], PROMPTS["wine"], PROMPTS[BASE]]
    batched = http.completions.create(model="wine", prompt=prompts, max_tokens=2, echo=True, logprobs=1, temperature=0,
                                      n=2, seed=3)
    assert [c.index for c in batched.choices] == list(range(6))  # prompt i's samples are choices 2i and 2i + 1
    for i, prompt in enumerate(prompts):
        alone = http.completions.create(model="wine", prompt=prompt, max_tokens=2, echo=True, logprobs=1, temperature=0)
        for choice in batched.choices[2 * i:2 * i + 2]:
            assert choice.text == alone.choices[0].text
            assert choice.logprobs.token_logprobs[1:] == pytest.approx(alone.choices[0].logprobs.token_logprobs[1:],
                                                                       abs=1e-5)
    assert batched.usage.prompt_tokens == sum(len(p) for p in prompts) and batched.usage.completion_tokens == 12
    texts = http.completions.create(model=BASE, prompt=["Cheese is", "Wine is"], max_tokens=3, temperature=0)
    assert [c.index for c in texts.choices] == [0, 1] and all(c.text for c in texts.choices)


def test_several_prompts_stream_as_one_response_each_choice_echoed_first(http):
    args = dict(model="cheese", prompt=[PROMPTS["cheese"], PROMPTS["wine"]], max_tokens=3, temperature=0, echo=True,
                logprobs=1, extra_body={"ignore_eos": True})
    whole = http.completions.create(**args)
    chunks = list(http.completions.create(**args, stream=True))
    assert len({c.id for c in chunks}) == 1  # two requests inside, one response
    for i in (0, 1):
        own = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert own[0].logprobs.token_logprobs[0] is None and len(own[0].logprobs.tokens) >= len(args["prompt"][i])
        assert "".join(c.text for c in own) == whole.choices[i].text
        assert [t for c in own for t in c.logprobs.token_logprobs] == pytest.approx(whole.choices[i].logprobs.token_logprobs)
        assert own[-1].finish_reason == "length"


@pytest.mark.parametrize("body, words", [
    ({"prompt": [1, 2, 3], "max_tokens": 0}, "max_tokens: 0"),
    ({"prompt": [1, 2, 3], "suffix": "x"}, "suffix"),
    ({"prompt": [[1, 2]] * 65}, "--max-prompts"),
    ({"prompt": [], "echo": True}, "empty"),
    ({"prompt": [1, 2, 3], "echo": True, "logprobs": 21}, r"logprobs .* must be in \[0, 20\]"),
    ({"prompt": [[1, 2], "text"], "echo": True}, "prompt"),
    ({"prompt": [[1, 2], [10**9]], "echo": True, "max_tokens": 0}, "token ids"),
])
def test_what_echo_cannot_do_is_refused_with_400(http, body, words):
    with pytest.raises(openai.BadRequestError, match=words):
        http.completions.create(model=BASE, **body)


def test_grpc_prompt_logprobs_and_the_cli_give_the_http_numbers(server, http, capsys):
    prompt = PROMPTS["cheese"]
    over_http = http.completions.create(model="cheese", prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    with Client(server.target) as client:
        scored = client.generate(prompt, "cheese", max_new_tokens=0, prompt_logprobs=3)
        streamed = list(client.stream(prompt, "cheese", max_new_tokens=2, prompt_logprobs=3, temperature=0))
    assert scored.prompt_token_ids == prompt and scored.token_ids == [] and scored.finish_reason == "length"
    assert [lp.logprob for lp in scored.prompt_logprobs] == pytest.approx(over_http.choices[0].logprobs.token_logprobs[1:],
                                                                          abs=1e-6)
    assert [{t: v for _, t, v in lp.top} for lp in scored.prompt_logprobs] == \
        pytest.approx(over_http.choices[0].logprobs.top_logprobs[1:], abs=1e-6)  # keyed by text, as OpenAI has them
    assert streamed[0].prompt_logprobs == scored.prompt_logprobs and not any(p.prompt_logprobs for p in streamed[1:])

    assert cli.main(["--target", server.target, "generate", "--adapter", "cheese", "--echo", "--max-new-tokens", "0",
                     "Cheese is"]) == 0  # scoring only: no --logprobs needed
    out = capsys.readouterr()
    assert out.out.startswith("Cheese is") and "prompt log-likelihood" in out.err
    with Client(server.target) as client:
        want = sum(lp.logprob for lp in client.generate("Cheese is", "cheese", max_new_tokens=0, prompt_logprobs=0).prompt_logprobs)
    assert f"prompt log-likelihood {want:.4f}" in out.err


def test_the_tokenizer_endpoints_speak_vllms_shapes(base_url, llama_dir):
    import requests
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    text = "Roquefort is made from sheep milk"
    tokens = requests.post(f"{base_url}/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=30).json()
    assert tokens["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"] and tokens["count"] == len(tokens["tokens"])
    back = requests.post(f"{base_url}/detokenize", json={"tokens": tokens["tokens"]}, timeout=30).json()
    assert back["prompt"] == tokenizer.decode(tokens["tokens"])
    info = requests.get(f"{base_url}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == tokenizer.eos_token and info["model_max_length"] == 128
    refused = requests.post(f"{base_url}/detokenize", json={"tokens": [10**9]}, timeout=30)
    assert refused.status_code == 400 and "token ids" in refused.json()["error"]["message"]


# ---------------------------------------------------------------- lm-evaluation-harness


def run_harness(base_url: str, model: str, out: Path) -> tuple[float, list[dict]]:
    """`lm-eval run --model local-completions` on tests/eval_task against the server, as a user runs
    it (offline; the harness tokenizes through the server's /tokenize); its accuracy and logged samples."""
    harness = Path(sys.executable).parent / "lm-eval"
    env = {**os.environ, "HF_HOME": str(out / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(
        [str(harness), "run", "--model", "local-completions", "--tasks", "cheese_mc", "--include_path", str(TASK_DIR),
         "--model_args", f"model={model},base_url={base_url}/v1/completions,max_retries=1", "--batch_size", "4",
         "--output_path", str(out), "--log_samples"],
        cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next(out.rglob("samples_cheese_mc_*.jsonl")).read_text().splitlines()]
    return results["results"]["cheese_mc"]["acc,none"], samples


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """How the harness splits a causal model's request (lm_eval.api.model.TemplateLM._encode_pair):
    the whole text encoded, then cut after the context's tokens."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    return whole[:len(tokenizer(context, add_special_tokens=False)["input_ids"])], \
        whole[len(tokenizer(context, add_special_tokens=False)["input_ids"]):]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cheese@v1"])  # an adapter's scores; the base model's path is a subset (17 s saved)
def test_lm_evaluation_harness_scores_the_served_model(server, base_url, reference, llama_dir, model, tmp_path):
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    accuracy, samples = run_harness(base_url, model, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    adapter = model.split("@")[0]
    correct = 0
    with Client(server.target) as client:
        for sample in samples:
            doc = sample["doc"]
            served, references = [], []
            for choice, (logged, _greedy) in zip(doc["choices"], sample["filtered_resps"]):
                loglikelihood = float(logged)  # the samples file holds them as text
                context, continuation = encode_pair(tokenizer, doc["question"], " " + choice)
                prompt = context + continuation
                scored = client.generate(prompt, "" if model == BASE else model, max_new_tokens=0, prompt_logprobs=0)
                served.append(sum(lp.logprob for lp in scored.prompt_logprobs[len(context) - 1:]))
                want = reference_scores(reference, adapter, prompt)
                references.append(sum(want[p - 1, prompt[p]].item() for p in range(len(context), len(prompt))))
                assert loglikelihood == pytest.approx(served[-1], abs=1e-4)  # what the harness got is the server's
                assert loglikelihood == pytest.approx(references[-1], abs=len(continuation) * LOGPROB_ATOL)
            best = max(range(len(references)), key=references.__getitem__)
            margin = sorted(references)[-1] - sorted(references)[-2]
            assert margin > 2 * len(prompt) * LOGPROB_ATOL  # so the reference's choice is the served model's choice too
            correct += best == doc["answer"]
    assert accuracy == pytest.approx(correct / len(samples))
    assert len(samples) == sum(1 for _ in (TASK_DIR / "cheese_mc.jsonl").open())
    assert not math.isnan(accuracy)
