"""A compact Llama-family decoder (Llama 2/3, Mistral, Qwen2) loaded from a Hugging Face
checkpoint directory: GQA, RoPE (with transformers' scaling variants, llama3 included), RMSNorm,
SwiGLU, optional q/k/v (and o, MLP) biases, tied embeddings.

Every projection is a LoRALinear (NF4 base + adapter pool); projections that read the same input
run as one (q/k/v, gate/up: PROJECTION_GROUPS), their outputs split after. Norms are in the compute
dtype; embeddings and lm_head too, or in the checkpoint's own dtype where the kernels' LM head reads
it exactly (Kernels.lm_head_storage: the C kernels' bfloat16). The forward works on a padded [B, T] batch of token ids; the engine decides
what the rows are (a prefill of new prompts, or one decode token per running sequence).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EngineConfig
from ..errors import UnsupportedModel
from ..kernels import resolve as resolve_kernels
from ..kernels.cpu_kernels import CHUNK, DENSE_WEIGHT_DTYPES, KernelBuildError
from ..kernels.cpu_kernels import load as load_cpu_kernels
from ..lora.layers import CPULoRA, LoRABatch, LoRAKernels, LoRALinear, LoRAPool, TorchLoRA, TritonLoRA
from .attention import CPUDecodeAttention, DecodeAttention, TorchDecodeAttention, TritonDecodeAttention
from .decode_layers import CPUDecodeLayers, torch_layers
from .kv_cache import KVCache
from .quant import (NF4Matmul, choose_nf4_matmul, dequantized_copy_bytes, make_base_linear, repacked_copy_bytes,
                    resident_bytes)

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Target modules that read the same input, computed as one: one stacked NF4 weight (one launch on
# the Triton path) and one LoRA pool (one shrink for all of them).
PROJECTION_GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                     "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a checkpoint, read once from its config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_embeddings: bool
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf_config(cls, config) -> "ModelSpec":
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(f"model_type {config.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
        qwen2 = config.model_type == "qwen2"
        attention_bias = bool(getattr(config, "attention_bias", False))
        eos = config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        num_heads = config.num_attention_heads
        return cls(
            model_type=config.model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            rms_norm_eps=config.rms_norm_eps,
            qkv_bias=qwen2 or attention_bias,
            o_bias=attention_bias and not qwen2,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
        )

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA target module."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        return {
            "q_proj": (h, self.num_heads * d), "k_proj": (h, self.num_kv_heads * d),
            "v_proj": (h, self.num_kv_heads * d), "o_proj": (self.num_heads * d, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }


def rope_tables(config, head_dim: int, max_positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_positions, head_dim] in float32, computed by transformers' own RoPE
    initialisers so scaled variants (linear, llama3, yarn) match the reference exactly."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0}
    rope_type = params.get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise UnsupportedModel(f"rope_type {rope_type!r} changes with sequence length and is not supported")
    if rope_type == "default":
        exponent = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        inv_freq, attention_scaling = 1.0 / (params["rope_theta"] ** exponent), 1.0
    else:
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq.float())
    angles = torch.cat([freqs, freqs], dim=-1)
    return (angles.cos() * attention_scaling).to(device), (angles.sin() * attention_scaling).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., head_dim] rotated to its positions: x·cos + rotate_half(x)·sin, rotate_half(x) being
    (-x₂, x₁) for x's halves (x₁, x₂), as in transformers. Computed as one multiply and one
    multiply-add over the half-swapped (x₂, x₁), the minus sign moved onto the sine's first half:
    3 passes instead of 5, which on a CPU prefill is most of RoPE's time."""
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return torch.addcmul(x * cos, swapped, signed_sin)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as the reference implementation does, then scale in x's dtype.
        # x·rsqrt(mean(x²) + eps) with mean(x²) from one norm pass and the products in place: a
        # CPU prefill reads its activations from beyond L2, so passes over them are its cost.
        h = x.float()
        mean_square = torch.linalg.vector_norm(h, dim=-1, keepdim=True).square_().div_(h.shape[-1])
        return torch.mul(h, mean_square.add_(self.eps).rsqrt_()).to(x.dtype).mul_(self.weight)


@dataclass
class ForwardBatch:
    """One forward pass, built by the engine's runner.

    tokens/positions: [B, T]. slots: [B*T] the flat KV-cache slot each token's keys are written to
    (block * block_size + offset; padding tokens: the scratch slot). block_tables: [B, W] the
    blocks each row reads, in order (entries past its length: the scratch block). token_slots:
    [B*T] adapter slot per token, or None when no row has an adapter. prefill=True: the rows are
    fresh right-padded prompts (attend causally among themselves); False: each token attends to
    its row's cache up to its own position, with kv_length (a host int) the longest span needed.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    block_tables: torch.Tensor
    token_slots: torch.Tensor | None
    prefill: bool
    kv_length: int


@dataclass(frozen=True)
class Kernels:
    """How the model computes, chosen once at load (EngineConfig.kernels and nf4_path)."""

    nf4_path: str  # server/model/quant.py's NF4Matmul in use, or "unquantized"
    lora: LoRAKernels
    decode_attention: DecodeAttention
    lm_head_matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # hidden, weight -> hidden·weightᵀ
    layers: Callable  # server/model/decode_layers.py: how a forward runs the decoder layers
    # Storage dtypes the LM head matmul reads besides the compute dtype, widening exactly: a
    # checkpoint's embeddings/head stored in one of them stay so (half the bytes a decode step reads
    # for the head, the same numbers).
    lm_head_storage: tuple[torch.dtype, ...] = ()


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, projections: dict[str, LoRALinear], input_norm: RMSNorm, post_norm: RMSNorm,
                 decode_attention: DecodeAttention):
        super().__init__()
        self.spec = spec
        self.decode_attention = decode_attention
        self.proj = nn.ModuleDict(projections)
        self.rotated_heads = spec.num_heads + spec.num_kv_heads
        self.input_norm = input_norm
        self.post_norm = post_norm

    def forward(self, x: torch.Tensor, batch: ForwardBatch, lora: LoRABatch | None, cos: torch.Tensor,
                sin: torch.Tensor, decode_context: torch.Tensor | None, cache: KVCache, layer: int) -> torch.Tensor:
        bsz, seq, hidden = x.shape
        spec, p = self.spec, self.proj
        h = self.input_norm(x).view(bsz * seq, hidden)
        qkv = p["qkv_proj"](h, lora).reshape(bsz, seq, -1, spec.head_dim)  # heads: q's, then k's, then v's
        roped = apply_rope(qkv[:, :, :self.rotated_heads], cos, sin)  # q's and k's heads together
        q = roped[:, :, :spec.num_heads].transpose(1, 2)
        k = roped[:, :, spec.num_heads:].transpose(1, 2)
        v = qkv[:, :, self.rotated_heads:].transpose(1, 2)
        cache.write(layer, batch.slots, k, v)
        if batch.prefill:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            attn = self.decode_attention(q, cache, layer, batch.block_tables, batch.kv_length, decode_context)
        attn = attn.transpose(1, 2).reshape(bsz * seq, spec.num_heads * spec.head_dim)
        x = x + p["o_proj"](attn, lora).view(bsz, seq, hidden)

        h = self.post_norm(x).view(bsz * seq, hidden)
        gate, up = p["gate_up_proj"](h, lora).split(spec.intermediate_size, dim=-1)
        mlp = F.silu(gate).mul_(up)
        return x + p["down_proj"](mlp, lora).view(bsz, seq, hidden)


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec, embed: torch.Tensor, layers: list[DecoderLayer], norm: RMSNorm,
                 lm_head: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kernels: Kernels):
        super().__init__()
        self.spec = spec
        self.compute_dtype = norm.weight.dtype  # embed/lm_head may be stored narrower (Kernels.lm_head_storage)
        self.kernels = kernels
        self.embed = nn.Parameter(embed, requires_grad=False)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = nn.Parameter(lm_head, requires_grad=False) if lm_head is not embed else self.embed
        self.register_buffer("rope_cos", rope[0], persistent=False)
        self.register_buffer("rope_sin", rope[1], persistent=False)

    @property
    def max_positions(self) -> int:
        """The longest sequence it is built for (its RoPE tables' length)."""
        return self.rope_cos.shape[0]

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def num_lora_slots(self) -> int:
        return self.layers[0].proj["qkv_proj"].pool.num_slots

    def lora_pools(self) -> dict[tuple[int, str], LoRAPool]:
        """(layer, projection group) -> its pool; pool.slices names the target modules it holds."""
        return {(i, name): proj.pool for i, layer in enumerate(self.layers) for name, proj in layer.proj.items()}

    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden]; `logits()` turns selected ones into logits."""
        x = F.embedding(batch.tokens, self.embed).to(self.compute_dtype)
        cos = self.rope_cos[batch.positions].unsqueeze(2).to(x.dtype)  # [B, T, 1, head_dim]: one angle for all heads
        sin = self.rope_sin[batch.positions].unsqueeze(2).to(x.dtype)
        decode_context = None if batch.prefill else self.kernels.decode_attention.prepare(batch.positions, batch.kv_length)
        lora = None
        if batch.token_slots is not None:
            lora = LoRABatch(batch.token_slots, batch.tokens.shape[0], self.num_lora_slots, x.dtype, self.kernels.lora)
        return self.norm(self.kernels.layers(self, x, batch, lora, cos, sin, decode_context, cache))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.kernels.lm_head_matmul(hidden, self.lm_head).float()

    def weight_bytes(self) -> dict[str, int]:
        """Resident bytes: the (quantized) projections, their dequantized copies (the
        dequantize-once path) or repacked ones (cpu-fused), everything else, and the LoRA pools."""
        bases = [proj.base for layer in self.layers for proj in layer.proj.values()]
        copies = sum(dequantized_copy_bytes(base) for base in bases)
        repacked = sum(repacked_copy_bytes(base) for base in bases)
        projections = sum(resident_bytes(base) for base in bases) - copies - repacked
        pools = sum(resident_bytes(pool) for pool in self.lora_pools().values())
        dense = self.embed.numel() * self.embed.element_size()
        if self.lm_head is not self.embed:
            dense += self.lm_head.numel() * self.lm_head.element_size()
        dense += sum(resident_bytes(layer.input_norm) + resident_bytes(layer.post_norm) for layer in self.layers)
        dense += resident_bytes(self.norm)
        return {"projections": projections, "dequantized_copies": copies, "repacked_copies": repacked, "dense": dense,
                "lora_pools": pools}


class _CheckpointReader:
    """Tensors of a safetensors checkpoint (single file or sharded index). Never reads pickles."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (model_dir / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
            hint = f" (found {pickles}: pickle checkpoints are never loaded; convert them to safetensors)" if pickles else ""
            raise UnsupportedModel(f"no model.safetensors in {model_dir}{hint}")
        self._handles = [safe_open(str(model_dir / name), framework="pt") for name in files]
        self._where = {key: h for h in self._handles for key in h.keys()}

    def has(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise UnsupportedModel(f"checkpoint has no tensor {key!r}")
        return self._where[key].get_tensor(key)


# What a checkpoint that states no position limit is served with, unless --max-seq-len says more.
UNSTATED_POSITIONS = 2048


def sequence_limit(hf_config, max_seq_len: int | None) -> int:
    """The longest sequence the model is built for: `max_seq_len` when given (refused beyond the
    model's positions or its sliding window), else the model's own limit."""
    reach = _position_reach(hf_config)
    sliding = getattr(hf_config, "sliding_window", None)
    if sliding is None or not getattr(hf_config, "use_sliding_window", True):
        sliding = None
    if max_seq_len is None:
        return min(limit for limit in (reach or UNSTATED_POSITIONS, sliding) if limit is not None)
    if sliding is not None and sliding < max_seq_len:
        raise UnsupportedModel(f"sliding-window attention ({sliding}) shorter than max_seq_len {max_seq_len} is not "
                               "supported; lower --max-seq-len (or leave it out: the window is then the limit)")
    if reach is not None and max_seq_len > reach:
        raise UnsupportedModel(f"max_seq_len {max_seq_len} is beyond the positions this model was trained for "
                               f"({reach}: max_position_embeddings, or what its RoPE scaling extends it to); "
                               f"lower --max-seq-len, or leave it out to use the model's {reach}")
    return max_seq_len


def _position_reach(hf_config) -> int | None:
    """The longest sequence the checkpoint's positions cover: max_position_embeddings, or its RoPE
    scaling's factor x original_max_position_embeddings when that is more (None: not stated)."""
    reach = getattr(hf_config, "max_position_embeddings", None)
    params = getattr(hf_config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default" and params.get("factor") and params.get("original_max_position_embeddings"):
        scaled = int(params["factor"] * params["original_max_position_embeddings"])
        reach = scaled if reach is None else max(reach, scaled)
    return reach


def choose_kernels(config: EngineConfig, device: torch.device, spec: ModelSpec) -> tuple[Kernels, NF4Matmul]:
    """EngineConfig.kernels and nf4_path → how the model computes on `device`, and its NF4Matmul.
    "auto" on a CPU is the C kernels wherever they can run this model, else torch (one log line
    says why)."""
    build_dir = Path(config.kernel_build_dir) if config.kernel_build_dir else None
    if config.kernels == "auto" and device.type == "cpu":
        why_not = cpu_kernels_refusal(config, spec, build_dir)
        if why_not:
            log.info("kernels: torch, not the C kernels: %s", why_not)
        config = replace(config, kernels="torch" if why_not else "cpu")
    kernels = resolve_kernels(config.kernels, device)
    nf4_matmul = choose_nf4_matmul(config.nf4_path, device, kernels, config.quant, build_dir)
    nf4_path = nf4_matmul.name if config.quant.enabled else "unquantized"
    if kernels == "triton":
        return Kernels(nf4_path, TritonLoRA(), TritonDecodeAttention(), F.linear, torch_layers), nf4_matmul
    if kernels == "cpu":
        if nf4_path != "cpu-fused":
            raise ValueError(f"kernels='cpu' reads NF4 weights in place (nf4 path cpu-fused, its auto choice, with "
                             f"quantization enabled), not {nf4_path}")
        library = load_cpu_kernels(build_dir)
        return Kernels(nf4_path, CPULoRA(library), CPUDecodeAttention(library), library.dense_linear,
                       CPUDecodeLayers(library), DENSE_WEIGHT_DTYPES), nf4_matmul
    return Kernels(nf4_path, TorchLoRA(), TorchDecodeAttention(), F.linear, torch_layers), nf4_matmul


def cpu_kernels_refusal(config: EngineConfig, spec: ModelSpec, build_dir: Path | None) -> str | None:
    """Why the C kernels (server/kernels/cpu_kernels.c) cannot run this model as configured, or
    None when they can (they are then built, once per build directory)."""
    quant = config.quant
    if config.resolved_dtype() != torch.float32:
        return f"they compute in float32, not {config.resolved_dtype()}"
    if not (quant.enabled and quant.quant_type == "nf4") or config.nf4_path not in ("auto", "cpu-fused"):
        return f"they read NF4 weights in place, and the NF4 path asked for is {config.nf4_path}"
    if config.compile:
        return "compile=True fuses the torch layers, which they replace"
    inputs = {spec.hidden_size, spec.num_heads * spec.head_dim, spec.intermediate_size}
    if quant.blocksize % CHUNK or any(n % quant.blocksize for n in inputs):
        return (f"they read rows of whole NF4 blocks of a multiple of {CHUNK} weights; this model's projection inputs "
                f"{sorted(inputs)} are not whole blocks of {quant.blocksize}")
    try:
        load_cpu_kernels(build_dir)
    except KernelBuildError as exc:
        return str(exc)
    return None


def load_model(model_dir: str | Path, config: EngineConfig) -> tuple[Transformer, object]:
    """Build the serving model from a Hugging Face checkpoint directory. Each projection is
    quantized as it is read, so peak host memory stays near one layer beyond the result."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    hf_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    spec = ModelSpec.from_hf_config(hf_config)
    positions = sequence_limit(hf_config, config.max_seq_len)
    device, dtype = config.resolved_device(), config.resolved_dtype()
    chosen, nf4_matmul = choose_kernels(config, device, spec)
    reader = _CheckpointReader(model_dir)
    shapes = spec.projection_shapes()
    num_slots = config.max_adapters + 1
    has_bias = {"q_proj": spec.qkv_bias, "k_proj": spec.qkv_bias, "v_proj": spec.qkv_bias, "o_proj": spec.o_bias,
                "gate_proj": spec.mlp_bias, "up_proj": spec.mlp_bias, "down_proj": spec.mlp_bias}

    layers = []
    for i in range(spec.num_layers):
        projections = {}
        for group, members in PROJECTION_GROUPS.items():
            weights, biases = [], []
            for name in members:
                prefix = f"model.layers.{i}.{'self_attn' if name in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{name}"
                weight = reader.get(f"{prefix}.weight")
                in_features, out_features = shapes[name]
                if tuple(weight.shape) != (out_features, in_features):
                    raise UnsupportedModel(f"{prefix}.weight has shape {tuple(weight.shape)}, config implies {(out_features, in_features)}")
                weights.append(weight)
                if has_bias[name]:
                    biases.append(reader.get(f"{prefix}.bias"))
            base = make_base_linear(weights, torch.cat(biases) if biases else None, config.quant, nf4_matmul, device, dtype)
            pool = LoRAPool(num_slots, config.max_rank, shapes[members[0]][0], {name: shapes[name][1] for name in members},
                            device, dtype)
            projections[group] = LoRALinear(base, pool)
        norms = [RMSNorm(reader.get(f"model.layers.{i}.{n}.weight").to(device, dtype), spec.rms_norm_eps)
                 for n in ("input_layernorm", "post_attention_layernorm")]
        layers.append(DecoderLayer(spec, projections, *norms, chosen.decode_attention))

    def dense(stored: torch.Tensor) -> torch.Tensor:
        kept = stored.dtype if stored.dtype in chosen.lm_head_storage else dtype
        return stored.to(device, kept).contiguous()

    embed = dense(reader.get("model.embed_tokens.weight"))
    if spec.tie_embeddings or not reader.has("lm_head.weight"):
        lm_head = embed
    else:
        lm_head = dense(reader.get("lm_head.weight"))
    norm = RMSNorm(reader.get("model.norm.weight").to(device, dtype), spec.rms_norm_eps)
    rope = rope_tables(hf_config, spec.head_dim, positions, device)
    model = Transformer(spec, embed, layers, norm, lm_head, rope, chosen).eval()
    return model, hf_config
