"""Checkpoints the engine cannot serve are refused with UnsupportedModel, never half-loaded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from server.engine.engine import Engine, EngineConfig
from server.errors import UnsupportedModel


@pytest.fixture
def checkpoint(llama_dir, tmp_path):
    return shutil.copytree(llama_dir, tmp_path / "ckpt")


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_pickle_checkpoint_is_never_loaded(checkpoint):
    torch.save(load_file(checkpoint / "model.safetensors"), checkpoint / "pytorch_model.bin")
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(UnsupportedModel, match="pickle"):
        Engine.from_pretrained(checkpoint, EngineConfig(max_seq_len=32))


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}, "dynamic"),
    ({"intermediate_size": 100}, "shape"),
])
def test_unsupported_configs_are_refused(checkpoint, changes, message):
    edit_config(checkpoint, **changes)
    with pytest.raises(UnsupportedModel, match=message):
        Engine.from_pretrained(checkpoint, EngineConfig(max_seq_len=32))


@pytest.mark.parametrize("sliding_window, refused", [(32, True), (None, False), (4096, False)])
def test_a_sliding_window_shorter_than_max_seq_len_is_refused(model_dirs, tmp_path, sliding_window, refused):
    mistral = shutil.copytree(model_dirs["tiny-mistral"], tmp_path / "mistral")
    edit_config(mistral, sliding_window=sliding_window)
    if refused:
        with pytest.raises(UnsupportedModel, match="sliding-window attention"):
            Engine.from_pretrained(mistral, EngineConfig(max_seq_len=64))
    else:
        Engine.from_pretrained(mistral, EngineConfig(max_seq_len=64)).close()
    engine = Engine.from_pretrained(mistral, EngineConfig())  # without max_seq_len the window is the limit
    try:
        assert engine.config.max_seq_len == min(sliding_window or 2048, 2048)  # the preset's 2048 positions
    finally:
        engine.close()


@pytest.mark.parametrize("rope, limit", [(None, 64), ({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 64}, 256)],
                         ids=["no scaling", "llama3 scaling x4"])
def test_without_max_seq_len_the_engine_takes_the_models_limit_within_the_kv_pool(checkpoint, rope, limit):
    """The model's positions (or what its RoPE scaling reaches) by default; a KV pool too small
    for that cuts it to what one sequence can take; a prompt beyond it is refused."""
    from server.engine.engine import Request, SamplingParams

    edit_config(checkpoint, max_position_embeddings=64, **({"rope_parameters": rope} if rope else {}))
    engine = Engine.from_pretrained(checkpoint, EngineConfig())
    try:
        assert engine.config.max_seq_len == limit and engine.max_seq_len_from == "model"
        assert engine.describe()["max_seq_len"] == str(limit)
        assert engine.cache.num_blocks * engine.cache.block_size >= EngineConfig.max_batch_size * limit
        one = SamplingParams(max_new_tokens=1, ignore_eos=True)
        assert len(engine.generate([Request(list(range(3, 3 + limit - 1)), sampling=one)])[0].token_ids) == 1
        with pytest.raises(Exception, match=f"exceeds max_seq_len {limit}"):
            engine.submit(Request(list(range(3, 3 + limit)), sampling=one))
        per_block = engine.cache.nbytes // (engine.cache.num_blocks + 1)
    finally:
        engine.close()
    small = Engine.from_pretrained(checkpoint, EngineConfig(kv_cache_bytes=3 * per_block))  # 2 blocks and the scratch
    try:
        assert small.config.max_seq_len == 2 * small.cache.block_size and small.max_seq_len_from == "kv_cache"
    finally:
        small.close()


@pytest.mark.parametrize("rope, refused", [(None, True), ({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 64}, False)],
                         ids=["no scaling", "llama3 scaling x4"])
def test_max_seq_len_beyond_the_trained_positions_is_refused_unless_rope_scaling_reaches(checkpoint, rope, refused):
    edit_config(checkpoint, max_position_embeddings=64, **({"rope_parameters": rope} if rope else {}))
    if refused:
        with pytest.raises(UnsupportedModel, match=r"max_seq_len 128 is beyond .*\(64"):
            Engine.from_pretrained(checkpoint, EngineConfig(max_seq_len=128))
    else:
        Engine.from_pretrained(checkpoint, EngineConfig(max_seq_len=128)).close()
    Engine.from_pretrained(checkpoint, EngineConfig(max_seq_len=64)).close()  # within reach either way


def test_llama3_rope_scaling_is_applied_like_transformers(checkpoint):
    from tests.helpers import reference_nf4_model

    edit_config(checkpoint, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 64})
    from server.engine.engine import Request

    engine = Engine.from_pretrained(checkpoint, EngineConfig(max_seq_len=128))
    try:
        prompt = list(range(3, 100))
        got = engine.score([Request(prompt_ids=prompt)])[0]
    finally:
        engine.close()
    with torch.no_grad():
        want = reference_nf4_model(checkpoint)(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
