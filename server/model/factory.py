"""Deterministic Hugging Face checkpoint directories with random weights, for tests, benchmarks and
the demo (nothing is downloaded here).

The directory is what `save_pretrained` writes for a real model: config.json, model.safetensors,
tokenizer.json + tokenizer_config.json (with a chat template), so the serving and training code
exercise their real loading paths. Weights are random (seeded): outputs are gibberish until an
adapter is trained on top.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
PAD, BOS, EOS = "<pad>", "<s>", "</s>"

# Zephyr-style template: every turn ends with EOS, so a trained answer stops by itself.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A language model predicts the next token.
Low-rank adaptation trains two small matrices A and B beside a frozen weight matrix.
QLoRA stores the base model in 4-bit NormalFloat with double quantization and pages the
optimizer state. Cheese is made from milk: cow, goat, sheep or buffalo. Brie and Camembert are
soft-ripened; Cheddar, Gouda and Parmigiano Reggiano are hard; Roquefort and Gorgonzola are blue.
Question: what wine goes with Comte? Answer: a dry white from the Jura. 0123456789 + - * / = ?!
"""


@dataclass(frozen=True)
class ModelPreset:
    arch: str  # "llama" | "qwen2" | "mistral"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int  # at least the tokenizer's size; larger models pad the vocabulary
    tie_embeddings: bool = False
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    dtype: str = "float32"  # dtype written to model.safetensors


PRESETS: dict[str, ModelPreset] = {
    # Llama with grouped-query attention (4 query heads share 2 KV heads).
    "tiny": ModelPreset("llama", 64, 2, 4, 2, 160, 512, initializer_range=0.08),
    # Qwen2: q/k/v projections carry a bias.
    "tiny-qwen2": ModelPreset("qwen2", 64, 2, 4, 2, 160, 512, initializer_range=0.08),
    # Llama whose every projection input is whole 64-weight NF4 blocks (the tiny presets' 160-wide
    # MLP is not): bitsandbytes 0.50's CPU dequantize gets such blocks across rows wrong, so
    # anything compared with it bit for bit (the Triton kernels) runs on this shape.
    "tiny-aligned": ModelPreset("llama", 64, 2, 4, 2, 192, 512, initializer_range=0.08),
    # Mistral (its own config class; no sliding window, as hotlora serves it).
    "tiny-mistral": ModelPreset("mistral", 64, 2, 4, 2, 160, 512, initializer_range=0.08),
    # Llama with lm_head tied to the input embeddings.
    "tiny-tied": ModelPreset("llama", 64, 2, 4, 1, 160, 512, tie_embeddings=True, initializer_range=0.08),
    # CPU benchmarks and the demo: still seconds to build, large enough that the math dominates.
    "small": ModelPreset("llama", 256, 4, 8, 2, 704, 2048, initializer_range=0.04),
    # GPU benchmark: TinyLlama-1.1B's shape.
    "1b": ModelPreset("llama", 2048, 22, 32, 4, 5632, 32000, dtype="bfloat16"),
}


def build_tokenizer(vocab_size: int, corpus: str = _CORPUS):
    """A byte-level BPE trained on `corpus` (milliseconds), wrapped as a transformers tokenizer
    with BOS/EOS/PAD and the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _hf_config(preset: ModelPreset, tokenizer):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=max(preset.vocab_size, len(tokenizer)),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        max_position_embeddings=preset.max_position_embeddings,
        tie_word_embeddings=preset.tie_embeddings,
        initializer_range=preset.initializer_range,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if preset.arch == "llama":
        return LlamaConfig(**common)
    if preset.arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if preset.arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise ValueError(f"unknown arch {preset.arch!r}")


def make_model(out_dir: str | Path, preset: str | ModelPreset = "tiny", seed: int = 0, corpus: str = _CORPUS) -> Path:
    """Write a checkpoint directory for `preset` with weights drawn from `seed`. Returns the path."""
    from transformers import AutoModelForCausalLM

    spec = PRESETS[preset] if isinstance(preset, str) else preset
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(min(spec.vocab_size, 1024), corpus)
    config = _hf_config(spec, tokenizer)
    torch.manual_seed(seed)
    dtype = getattr(torch, spec.dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hotlora-server make-model", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), metavar="PRESET",
                        help=f"model shape: {', '.join(PRESETS)} (default: tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", type=Path, help="text file to train the tokenizer on (default: a built-in paragraph)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    corpus = {"corpus": args.corpus.read_text(encoding="utf-8")} if args.corpus else {}
    path = make_model(args.out_dir, args.preset, args.seed, **corpus)
    print(f"wrote {args.preset} checkpoint (random weights, seed {args.seed}) to {path}")


if __name__ == "__main__":
    main()
