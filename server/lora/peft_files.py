"""Reading and validating PEFT LoRA adapter directories.

`read_peft_adapter` turns a directory written by peft's `save_pretrained` (adapter_config.json +
adapter_model.safetensors) into host tensors ready to copy into LoRA slots, or refuses it with a
typed error saying why. Everything is checked before anything touches a slot, so a refused
adapter leaves no trace. Pickle files (.bin/.pt) are never opened.

A file is judged before its tensors are read: its size against the largest LoRA this base model
and max_rank allow, then its safetensors header (every tensor's name, dtype, shape and offsets).
A file that fails costs the server a stat and a few kilobytes, whatever it claims to hold, on
every replica that watches the store.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..config import TARGET_MODULES
from ..errors import AdapterNotFound, IncompatibleAdapter, InvalidRequest

# scale·‖A‖·‖B‖ bounds the spectral norm of the update s·B·A. Trained LoRAs stay in the 1-100s
# (the tests' random adapters ~150); past 1e4 the update swamps the base weights and overflows
# half precision: an adapter with finite but huge weights once generated token 0 forever.
MAX_UPDATE_NORM = 1e4
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # fullmatch: "$" would let "name\n" through
_LORA_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)\.weight$"
)
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # what LoRA weights can be stored as
MAX_HEADER_BYTES = 1 << 20  # a LoRA tensor's header entry is ~150 bytes: thousands of tensors fit
MAX_CONFIG_BYTES = 1 << 20


class ModelShape(Protocol):
    """What reading an adapter needs of the base model (server.model.llama.ModelSpec is one)."""

    num_layers: int

    def projection_shapes(self) -> dict[str, tuple[int, int]]: ...


@dataclass(frozen=True)
class ModuleLoRA:
    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r]
    scale: float


@dataclass(frozen=True)
class AdapterWeights:
    """A validated adapter, on the host, keyed by (layer index, module name)."""

    modules: dict[tuple[int, str], ModuleLoRA]
    rank: int
    target_modules: tuple[str, ...]
    content_hash: str  # sha256 of adapter_config.json + adapter_model.safetensors
    source: str


def validate_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or ".." in name:
        raise InvalidRequest(
            f"adapter name {name!r} is invalid: use 1-128 of [A-Za-z0-9._-], starting with a letter or digit"
        )
    return name


def read_peft_adapter(path: str | Path, spec: ModelShape, max_rank: int) -> AdapterWeights:
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterNotFound(f"no adapter directory at {directory}")
    config = _read_config(directory)
    weights_file = directory / "adapter_model.safetensors"
    if not weights_file.exists():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        if pickles:
            raise IncompatibleAdapter(
                f"{directory} has {pickles} but no adapter_model.safetensors: pickle files are never loaded, "
                "re-save the adapter with safe_serialization=True"
            )
        raise IncompatibleAdapter(f"{directory} has no adapter_model.safetensors")
    raw_config = (directory / "adapter_config.json").read_bytes()
    raw_weights = _read_judged(weights_file, spec, max_rank)
    tensors = _parse_safetensors(raw_weights, weights_file)
    modules = _collect_modules(tensors, config, spec, max_rank, directory)
    digest = hashlib.sha256(raw_config + b"\0" + raw_weights).hexdigest()
    return AdapterWeights(
        modules=modules,
        rank=max(m.lora_a.shape[0] for m in modules.values()),
        target_modules=tuple(sorted({name for _, name in modules}, key=TARGET_MODULES.index)),
        content_hash=digest,
        source=str(directory),
    )


def largest_adapter_bytes(spec: ModelShape, max_rank: int) -> int:
    """The most bytes a valid adapter_model.safetensors can take for this base model: every module
    of every layer at max_rank, in the widest dtype, with the largest header."""
    per_layer = sum(in_features + out_features for in_features, out_features in spec.projection_shapes().values())
    return 8 + MAX_HEADER_BYTES + spec.num_layers * per_layer * max_rank * max(_DTYPE_BYTES.values())


def _read_judged(weights_file: Path, spec: ModelShape, max_rank: int) -> bytes:
    """The safetensors file's bytes, read only once its size and header say it holds LoRA weights
    for this base model and nothing else. The header is judged first (every tensor named for a
    supported module, a float dtype, the base model's shape at a rank <= max_rank); then exactly
    the bytes it declares are read, from the same open file, so a pipe or a file that grows
    meanwhile is never read past them."""
    with weights_file.open("rb") as f:
        status = os.fstat(f.fileno())
        regular = stat.S_ISREG(status.st_mode)  # a pipe has no size to judge: its header bounds the read
        size = status.st_size
        largest = largest_adapter_bytes(spec, max_rank)
        if regular and size > largest:
            raise IncompatibleAdapter(f"{weights_file} is {size:,} bytes: more than any LoRA of this base model at "
                                      f"rank <= {max_rank} takes ({largest:,}); it was not read")
        prefix = _read_exactly(f, 8, weights_file)
        length = int.from_bytes(prefix, "little")
        if not 2 <= length <= (min(MAX_HEADER_BYTES, size - 8) if regular else MAX_HEADER_BYTES):
            raise IncompatibleAdapter(f"{weights_file} is not a readable safetensors file (header length {length})")
        raw_header = _read_exactly(f, length, weights_file)
        data_bytes = _judge_header(raw_header, weights_file, spec, max_rank)
        if regular and size != 8 + length + data_bytes:
            raise IncompatibleAdapter(f"{weights_file} is not a readable safetensors file ({size:,} bytes where its "
                                      f"header declares {8 + length + data_bytes:,})")
        return prefix + raw_header + _read_exactly(f, data_bytes, weights_file)


def _judge_header(raw_header: bytes, weights_file: Path, spec: ModelShape, max_rank: int) -> int:
    """The bytes of tensor data the header declares, once every tensor in it is one this base
    model's LoRA takes; IncompatibleAdapter otherwise."""
    try:
        header = json.loads(raw_header)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IncompatibleAdapter(f"{weights_file} is not a readable safetensors file (header: {exc})") from None
    if not isinstance(header, dict):
        raise IncompatibleAdapter(f"{weights_file} is not a readable safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    shapes, data_bytes = spec.projection_shapes(), 0
    unexpected = []
    for key, entry in header.items():
        found = _module_of(key, spec)
        if found is None:
            unexpected.append(key)
            continue
        _, module, which = found
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise IncompatibleAdapter(f"{key}: dtype {dtype!r} is not one LoRA weights are stored in "
                                      f"({', '.join(_DTYPE_BYTES)})")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        in_features, out_features = shapes[module]
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int for d in shape)):
            raise IncompatibleAdapter(f"{key}: LoRA weights must be 2-D matrices, the header says shape {shape!r}")
        rank = shape[0] if which == "A" else shape[1]
        if shape != ([rank, in_features] if which == "A" else [out_features, rank]):
            raise IncompatibleAdapter(f"{key}: shape {tuple(shape)} does not fit the base model (expected "
                                      f"{'A[r, %d]' % in_features if which == 'A' else 'B[%d, r]' % out_features})")
        if not 1 <= rank <= max_rank:
            raise IncompatibleAdapter(f"{key}: rank {rank} exceeds this server's max_rank {max_rank}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] and offsets[1] - offsets[0] == shape[0] * shape[1] * _DTYPE_BYTES[entry["dtype"]]):
            raise IncompatibleAdapter(f"{key}: its data offsets {offsets!r} do not fit its shape")
        data_bytes = max(data_bytes, offsets[1])
    if unexpected:
        raise _unexpected(unexpected)
    return data_bytes


def _read_exactly(f, count: int, weights_file: Path) -> bytes:
    raw = f.read(count)
    if len(raw) != count:
        raise IncompatibleAdapter(f"{weights_file} is not a readable safetensors file (truncated: {len(raw):,} of "
                                  f"{count:,} bytes)")
    return raw


def _module_of(key: str, spec: ModelShape) -> tuple[int, str, str] | None:
    """(layer, module, "A" or "B") of a LoRA tensor name; None for any other name."""
    match = _LORA_KEY.match(key)
    if match is None:
        return None
    layer, block, module, which = int(match[1]), match[2], match[3], match[4]
    if module not in TARGET_MODULES or (block == "self_attn") != (module in _ATTENTION):
        return None
    if layer >= spec.num_layers:
        raise IncompatibleAdapter(f"{key}: layer {layer} does not exist (base model has {spec.num_layers} layers)")
    return layer, module, which


def _unexpected(keys: list[str]) -> IncompatibleAdapter:
    shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    return IncompatibleAdapter(
        f"adapter has {len(keys)} tensors that map to no supported LoRA module ({shown}); "
        f"supported: lora_A/lora_B of {', '.join(TARGET_MODULES)} in the decoder layers")


def _read_config(directory: Path) -> dict:
    config_file = directory / "adapter_config.json"
    if not config_file.exists():
        raise IncompatibleAdapter(f"{directory} has no adapter_config.json")
    if config_file.stat().st_size > MAX_CONFIG_BYTES:
        raise IncompatibleAdapter(f"{config_file} is larger than {MAX_CONFIG_BYTES:,} bytes; it was not read")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IncompatibleAdapter(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise IncompatibleAdapter(f"{config_file} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise IncompatibleAdapter(f"peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    if config.get("use_dora"):
        raise IncompatibleAdapter("DoRA adapters (use_dora=true) are not supported: their magnitude vectors cannot be applied")
    if config.get("modules_to_save"):
        raise IncompatibleAdapter(
            f"modules_to_save={config['modules_to_save']} replaces base weights, which a shared base model cannot do"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise IncompatibleAdapter("adapters that train biases (bias != 'none' or lora_bias) are not supported")
    return config


def _parse_safetensors(raw: bytes, where: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(raw)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise IncompatibleAdapter(f"{where} is not a readable safetensors file ({exc})") from None


def _collect_modules(tensors: dict[str, torch.Tensor], config: dict, spec: ModelShape, max_rank: int,
                     directory: Path) -> dict[tuple[int, str], ModuleLoRA]:
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():  # every name maps to a module: _judge_header refused the file otherwise
        layer, module, which = _module_of(key, spec)
        pairs.setdefault((layer, module), {})[which] = tensor
    if not pairs:
        raise IncompatibleAdapter(f"{directory} contains no LoRA weights")

    shapes = spec.projection_shapes()
    modules = {}
    for (layer, module), ab in sorted(pairs.items()):
        where = f"layer {layer} {module}"
        if set(ab) != {"A", "B"}:
            raise IncompatibleAdapter(f"{where}: lora_{'B' if 'A' in ab else 'A'}.weight is missing")
        lora_a, lora_b = ab["A"], ab["B"]
        in_features, out_features = shapes[module]
        if lora_a.ndim != 2 or lora_b.ndim != 2:
            raise IncompatibleAdapter(f"{where}: LoRA weights must be 2-D matrices")
        rank = lora_a.shape[0]
        if tuple(lora_a.shape) != (rank, in_features) or tuple(lora_b.shape) != (out_features, rank):
            raise IncompatibleAdapter(
                f"{where}: shapes A{tuple(lora_a.shape)} B{tuple(lora_b.shape)} do not fit the base model "
                f"(expected A[r, {in_features}] and B[{out_features}, r])"
            )
        if rank > max_rank:
            raise IncompatibleAdapter(f"{where}: rank {rank} exceeds this server's max_rank {max_rank}")
        if not (torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()):
            raise IncompatibleAdapter(f"{where}: weights contain NaN or infinity")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, layer, module, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        if not math.isfinite(scale):
            raise IncompatibleAdapter(f"{where}: lora_alpha {alpha!r} gives a non-finite scale")
        bound = scale * torch.linalg.norm(lora_a.double()).item() * torch.linalg.norm(lora_b.double()).item()
        if not bound <= MAX_UPDATE_NORM:
            raise IncompatibleAdapter(f"{where}: weights too large: the update's norm may reach {bound:.1e} "
                                      f"(limit {MAX_UPDATE_NORM:.0e}); its outputs would overflow")
        # Kept in float32 on the host: the slot write folds the scale in before casting to the compute dtype.
        modules[(layer, module)] = ModuleLoRA(lora_a.float().contiguous(), lora_b.float().contiguous(), float(scale))
    return modules


def _pattern_value(patterns: dict, layer: int, module: str, default):
    """PEFT's alpha_pattern: a key matches when it is a suffix (or regex) of the module's path."""
    path = f"model.layers.{layer}.{'self_attn' if module in _ATTENTION else 'mlp'}.{module}"
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default
