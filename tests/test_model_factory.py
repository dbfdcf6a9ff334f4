"""The checkpoint factory writes real Hugging Face directories that transformers itself loads."""

from __future__ import annotations

import json
import subprocess
import sys

from safetensors import safe_open

from server.model.factory import PRESETS


def test_make_model_cli_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "m"
    subprocess.run([sys.executable, "-m", "server.serving.main", "make-model", str(out), "--preset", "tiny-qwen2", "--seed", "3"],
                   check=True, capture_output=True)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["num_key_value_heads"] == 2
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "model.layers.0.self_attn.q_proj.bias" in f.keys()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "Which cheese is blue?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|user|>\nWhich cheese is blue?</s>\n<|assistant|>\n"
    assert tok.decode(tok("Brie is soft.")["input_ids"]) == "Brie is soft."


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    from server.model.factory import make_model

    paths = [make_model(tmp_path / str(i), "tiny", seed=s) for i, s in enumerate([5, 5, 6])]
    blobs = [(p / "model.safetensors").read_bytes() for p in paths]
    assert blobs[0] == blobs[1] != blobs[2]


def test_tied_preset_has_no_separate_lm_head(model_dirs):
    with safe_open(str(model_dirs["tiny-tied"] / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()


def test_1b_preset_has_tinyllama_shape():
    p = PRESETS["1b"]
    assert (p.hidden_size, p.num_layers, p.num_heads, p.num_kv_heads, p.intermediate_size, p.vocab_size) == (
        2048, 22, 32, 4, 5632, 32000)


def test_server_help_names_the_builtin_model_as_the_default():
    """No --model is no usage error: the server serves the built-in model (tests/test_builtin_model.py)."""
    result = subprocess.run([sys.executable, "-m", "server.serving.main", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "default: the built-in SmolLM2-135M-Instruct" in " ".join(result.stdout.split())


def test_make_model_help_lists_every_preset_and_the_default():
    from server.model.factory import PRESETS

    shown = subprocess.run([sys.executable, "-m", "server.serving.main", "make-model", "--help"], capture_output=True,
                           text=True, check=True).stdout
    text = " ".join(shown.split())
    assert all(f"{preset}," in text or f"{preset} (default" in text for preset in PRESETS), text
    assert "(default: tiny)" in text
