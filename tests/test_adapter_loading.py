"""Loading PEFT adapters into slots: every way an adapter can be wrong is refused with a typed
error before any slot is touched, and the engine keeps serving. Replace/unload keep running
requests on the weights they started with."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.engine.engine import Engine, EngineConfig, FinishReason, Request, SamplingParams
from server.errors import AdapterNotFound, IncompatibleAdapter, InvalidRequest
from tests.helpers import make_peft_adapter

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = [5, 17, 42, 99, 7]


@pytest.fixture
def engine(llama_dir):
    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=4, max_seq_len=128, max_adapters=2, max_rank=8))
    yield engine
    engine.close()


def copy_adapter(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_weights(adapter_dir, fn):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def edit_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def first_key(tensors, part):
    return next(k for k in sorted(tensors) if part in k)


def corrupt_cases():
    def pickle_only(d):
        (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")

    def truncated(d):
        path = d / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[:-100])

    def nan(d):
        edit_weights(d, lambda t: t[first_key(t, "lora_B")].__setitem__((0, 0), float("nan")))

    def wrong_shape(d):
        edit_weights(d, lambda t: t.__setitem__(first_key(t, "q_proj.lora_A"), torch.randn(4, 63)))

    def missing_b(d):
        edit_weights(d, lambda t: t.pop(first_key(t, "lora_B")))

    def unmappable_keys(d):  # keys from another architecture: must not silently act as the base model
        edit_weights(d, lambda t: [t.__setitem__(k.replace("model.layers", "transformer.h"), t.pop(k)) for k in list(t)])

    def embedding_lora(d):
        edit_weights(d, lambda t: t.__setitem__("base_model.model.model.embed_tokens.lora_embedding_A", torch.zeros(4, 8)))

    def extra_layer(d):
        edit_weights(d, lambda t: t.__setitem__(first_key(t, "lora_A").replace("layers.0", "layers.9"), torch.zeros(4, 64)))

    def odd_header(d):  # a header that parses as JSON but is no safetensors header LoRA weights have
        path = d / "adapter_model.safetensors"
        raw = path.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + length])
        header[first_key(header, "lora_A")]["dtype"] = ["F32"]  # unhashable: must still be a refusal
        encoded = json.dumps(header).encode()
        path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + length:])

    return {
        "pickle_only": (pickle_only, "pickle"),
        "odd_header": (odd_header, "dtype"),
        "truncated": (truncated, "safetensors"),
        "nan": (nan, "NaN"),
        "wrong_shape": (wrong_shape, "does not fit the base model"),
        "missing_b": (missing_b, "missing"),
        "unmappable_keys": (unmappable_keys, "map to no supported"),
        "embedding_lora": (embedding_lora, "map to no supported"),
        "extra_layer": (extra_layer, "layer 9 does not exist"),
        "dora": (lambda d: edit_config(d, use_dora=True), "DoRA"),
        "modules_to_save": (lambda d: edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
        "trained_bias": (lambda d: edit_config(d, bias="all"), "biases"),
        "not_lora": (lambda d: edit_config(d, peft_type="IA3"), "IA3"),
        "bad_json": (lambda d: (d / "adapter_config.json").write_text("{not json"), "JSON"),
    }


@pytest.mark.parametrize("case", sorted(corrupt_cases()))
def test_bad_adapter_is_refused_and_leaves_no_trace(engine, peft_adapters, tmp_path, case):
    corrupt, message = corrupt_cases()[case]
    before = engine.generate([Request(prompt_ids=PROMPT, sampling=GREEDY)])[0].token_ids
    pools_before = [pool.lora_a.clone() for pool in engine.slots.pools.values()][:3]
    slots_before = engine.stats()["free_adapter_slots"]

    bad = copy_adapter(peft_adapters["cheese"], tmp_path / "bad")
    corrupt(bad)
    with pytest.raises(IncompatibleAdapter, match=message):
        engine.load_adapter("bad", bad)

    assert engine.adapters() == [] and engine.stats()["free_adapter_slots"] == slots_before
    assert all(torch.equal(a, pool.lora_a) for a, pool in zip(pools_before, engine.slots.pools.values()))
    with pytest.raises(AdapterNotFound):
        engine.submit(Request(prompt_ids=PROMPT, adapter="bad"))
    assert engine.generate([Request(prompt_ids=PROMPT, sampling=GREEDY)])[0].token_ids == before


def test_rank_above_max_rank_is_refused(engine, peft_adapters):
    with pytest.raises(IncompatibleAdapter, match="rank 16 exceeds this server's max_rank 8"):
        engine.load_adapter("bread", peft_adapters["bread"])


def test_missing_directory_and_bad_names(engine, peft_adapters, tmp_path):
    with pytest.raises(AdapterNotFound):
        engine.load_adapter("ghost", tmp_path / "nothing-here")
    for name in ["../escape", "a/b", "", ".hidden", "x" * 200]:
        with pytest.raises(InvalidRequest, match="adapter name"):
            engine.load_adapter(name, peft_adapters["cheese"])


def test_unload_forgets_the_name_and_a_reload_under_another_name_has_the_same_hash(engine, peft_adapters):
    engine.load_adapter("cheese", peft_adapters["cheese"])
    engine.load_adapter("wine", peft_adapters["wine"])
    engine.unload_adapter("wine")
    with pytest.raises(AdapterNotFound):
        engine.unload_adapter("wine")
    info = engine.load_adapter("cheese2", peft_adapters["cheese"])
    assert info.rank == 4 and info.target_modules == ("q_proj", "v_proj") and info.resident
    assert info.content_hash == next(a for a in engine.adapters() if a.name == "cheese").content_hash


def test_replacing_an_adapter_keeps_running_requests_on_their_version(engine, llama_dir, peft_adapters, tmp_path):
    v2 = make_peft_adapter(llama_dir, tmp_path / "cheese-v2", seed=99, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    engine.load_adapter("cheese", peft_adapters["cheese"])
    long = SamplingParams(max_new_tokens=60, temperature=0.0, ignore_eos=True)
    v1_alone = engine.generate([Request(prompt_ids=PROMPT, adapter="cheese", sampling=long)])[0]

    running = engine.submit(Request(prompt_ids=PROMPT, adapter="cheese", sampling=long))
    stream = iter(running)
    next(stream)  # decoding on v1
    v2_info = engine.load_adapter("cheese", v2)
    after = engine.generate([Request(prompt_ids=PROMPT, adapter="cheese", sampling=long)])[0]
    finished = running.result(timeout=60)

    assert finished.token_ids == v1_alone.token_ids and finished.adapter_hash == v1_alone.adapter_hash
    assert after.adapter_hash == v2_info.content_hash != v1_alone.adapter_hash
    assert after.token_ids != v1_alone.token_ids
    assert engine.stats()["free_adapter_slots"] == 1  # v1's slot came back when its last user finished


def test_unloading_an_adapter_in_use_lets_the_request_finish(engine, peft_adapters):
    engine.load_adapter("wine", peft_adapters["wine"])
    long = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    expected = engine.generate([Request(prompt_ids=PROMPT, adapter="wine", sampling=long)])[0].token_ids
    running = engine.submit(Request(prompt_ids=PROMPT, adapter="wine", sampling=long))
    next(iter(running))
    engine.unload_adapter("wine")
    with pytest.raises(AdapterNotFound):
        engine.submit(Request(prompt_ids=PROMPT, adapter="wine"))
    out = running.result(timeout=60)
    assert out.token_ids == expected and out.finish_reason == FinishReason.LENGTH
    assert engine.stats()["free_adapter_slots"] == 2
