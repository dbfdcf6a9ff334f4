"""A chat is served with exactly the token ids the adapter was trained on: one function
(server.serving.text.chat_prompt_ids) encodes the prompt for the trainer and the server, whatever the
tokenizer does with BOS, and an adapter's chats are rendered with the template it was trained
with, which its store version carries."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from clients import Client, InvalidArgument
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.model.factory import BOS, build_tokenizer
from server.serving.text import TextCodec, special_prefix
from tests.helpers import RunningServer
from trainer.data import DEFAULT_CHAT_TEMPLATE, encode

QUESTION = [{"role": "user", "content": "Where does Brie come from?"}]
ANSWER = {"role": "assistant", "content": "Brie comes from Ile-de-France."}
LLAMA2_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }} "
                   "[/INST]{% else %} {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def reloaded(tokenizer, where: Path):
    """As a user gets it: saved and read back (a BOS-adding tokenizer then says add_bos_token=False
    while its post-processor still adds BOS)."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(where)
    return AutoTokenizer.from_pretrained(where)


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
    """Llama-2 style: the tokenizer adds BOS by itself, and the chat template does not write it
    (TinyLlama-Chat's case)."""
    tokenizer = build_tokenizer(512)
    tokenizer.add_bos_token = True
    tokenizer.chat_template = LLAMA2_TEMPLATE
    return reloaded(tokenizer, tmp_path_factory.mktemp("bos-tokenizer"))


def prompt_part(messages, tokenizer) -> list[int]:
    ids, labels = encode(messages + [ANSWER], tokenizer)
    return ids[:labels.index(next(label for label in labels if label != -100))]


def test_a_bos_adding_tokenizer_gets_one_bos_on_both_sides(bos_tokenizer):
    bos = bos_tokenizer.convert_tokens_to_ids(BOS)
    assert special_prefix(bos_tokenizer) == [bos]
    served = TextCodec(bos_tokenizer).encode_chat(QUESTION)
    assert served == prompt_part(QUESTION, bos_tokenizer)
    assert served[0] == bos and served.count(bos) == 1


def test_a_template_that_writes_bos_itself_gets_no_second_one(bos_tokenizer):
    template = "{{ bos_token }}" + LLAMA2_TEMPLATE
    bos = bos_tokenizer.convert_tokens_to_ids(BOS)
    served = TextCodec(bos_tokenizer).encode_chat(QUESTION, chat_template=template)
    assert served[0] == bos and served.count(bos) == 1
    bos_tokenizer_copy = type(bos_tokenizer).from_pretrained(bos_tokenizer.name_or_path)
    bos_tokenizer_copy.chat_template = template
    assert served == prompt_part(QUESTION, bos_tokenizer_copy)


def test_smollm2_chatml_prompts_get_no_bos_and_agree(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert special_prefix(tokenizer) == []
    for messages in (QUESTION, [{"role": "system", "content": "You are Pavlos."}, *QUESTION]):
        served = TextCodec(tokenizer).encode_chat(messages)
        assert served == prompt_part(messages, tokenizer)
        assert tokenizer.decode(served).startswith("<|im_start|>system\n")


@pytest.mark.slow
def test_chat_over_grpc_on_smollm2_is_served_on_the_ids_the_trainer_trains_on(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    trained_on = prompt_part(QUESTION, AutoTokenizer.from_pretrained(smollm2_dir))
    config = ServerConfig(model_dir=smollm2_dir, host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0,
                          engine=EngineConfig(max_batch_size=2, max_seq_len=96, max_adapters=1, max_rank=8))
    with RunningServer(config) as server, Client(server.target) as client:
        chat = client.generate(QUESTION, max_new_tokens=6, temperature=0.0)
        by_ids = client.generate(trained_on, max_new_tokens=6, temperature=0.0)
    assert chat.usage.prompt_tokens == len(trained_on)
    assert chat.token_ids == by_ids.token_ids and len(chat.token_ids) == 6


@pytest.fixture(scope="module")
def templateless_base(llama_dir, tmp_path_factory):
    """The tiny model without a chat template: the trainer falls back to its default."""
    base = tmp_path_factory.mktemp("templateless") / "base"
    shutil.copytree(llama_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    return base


@pytest.mark.slow
def test_an_adapter_trained_with_the_default_template_is_served_with_it(templateless_base, cheese_data, tmp_path):
    from transformers import AutoTokenizer

    from trainer.cli import main  # in this process: the CLI's code (test_trainer_fit runs it as a command)

    store = tmp_path / "store"
    assert main(["fit", "--base", str(templateless_base), "--data", str(cheese_data), "--name", "cheese", "--store",
                 str(store), "--output-dir", str(tmp_path / "run"), "--max-steps", "6", "--rank", "4", "--learning-rate",
                 "0.02", "--max-seq-len", "96", "--batch-size", "4", "--no-progress"]) == 0
    manifest = json.loads((store / "cheese" / "v1" / "manifest.json").read_text())
    assert manifest["chat_template"] == DEFAULT_CHAT_TEMPLATE
    assert manifest["chat_template_sha256"] == hashlib.sha256(DEFAULT_CHAT_TEMPLATE.encode()).hexdigest()

    tokenizer = AutoTokenizer.from_pretrained(templateless_base)
    assert not tokenizer.chat_template
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # what the trainer rendered the data with
    trained_on = prompt_part(QUESTION, tokenizer)
    config = ServerConfig(model_dir=templateless_base, host="127.0.0.1", port=0, metrics_host="127.0.0.1",
                          metrics_port=0, engine=EngineConfig(max_batch_size=2, max_seq_len=96, max_adapters=1, max_rank=8),
                          adapters=AdapterConfig(store=store))
    with RunningServer(config) as server, Client(server.target) as client:
        with pytest.raises(InvalidArgument, match="no chat template"):
            client.generate(QUESTION, max_new_tokens=2)  # the base model has none
        chat = client.generate(QUESTION, adapter="cheese", max_new_tokens=4, temperature=0.0)
        by_ids = client.generate(trained_on, adapter="cheese", max_new_tokens=4, temperature=0.0)
    assert chat.adapter_version == "v1" and chat.usage.prompt_tokens == len(trained_on)
    assert chat.token_ids == by_ids.token_ids


def test_a_version_whose_template_is_only_hashed_is_served_only_when_it_is_the_bases(llama_dir, peft_adapters, tmp_path):
    from server.adapters.store import AdapterStore

    base_template = TextCodec.from_pretrained(llama_dir).tokenizer.chat_template
    store = AdapterStore(tmp_path / "store")
    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()  # noqa: E731  manifests of earlier trainers
    store.publish("same", peft_adapters["cheese"], manifest={"chat_template_sha256": digest(base_template)})
    store.publish("other", peft_adapters["cheese"], manifest={"chat_template_sha256": digest(DEFAULT_CHAT_TEMPLATE)})
    store.publish("carried", peft_adapters["cheese"], manifest={"chat_template_sha256": digest(DEFAULT_CHAT_TEMPLATE),
                                                                "chat_template": DEFAULT_CHAT_TEMPLATE})
    store.publish("forged", peft_adapters["cheese"], manifest={"chat_template_sha256": digest(base_template),
                                                               "chat_template": DEFAULT_CHAT_TEMPLATE})
    config = ServerConfig(model_dir=llama_dir, host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0,
                          engine=EngineConfig(max_batch_size=2, max_seq_len=96, max_adapters=2, max_rank=8),
                          adapters=AdapterConfig(store=store.root))
    codec = TextCodec.from_pretrained(llama_dir)
    with RunningServer(config) as server, Client(server.target) as client:
        same = client.generate(QUESTION, adapter="same", max_new_tokens=1)
        assert same.usage.prompt_tokens == len(codec.encode_chat(QUESTION))
        with pytest.raises(InvalidArgument, match="chat template other than the base model's"):
            client.generate(QUESTION, adapter="other", max_new_tokens=1)
        assert client.generate("Where does Brie come from?", adapter="other", max_new_tokens=1).usage.prompt_tokens > 0
        carried = client.generate(QUESTION, adapter="carried", max_new_tokens=1)
        assert carried.usage.prompt_tokens == len(codec.encode_chat(QUESTION, DEFAULT_CHAT_TEMPLATE))
        assert carried.usage.prompt_tokens != same.usage.prompt_tokens  # really another template
        with pytest.raises(Exception, match="does not match its chat_template_sha256"):
            client.generate(QUESTION, adapter="forged", max_new_tokens=1)
