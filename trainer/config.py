"""`trainer fit` settings: one frozen dataclass, filled from defaults < YAML file < flags."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from server.config import TARGET_MODULES

OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw", "sgd")
TORCH_OPTIMIZERS = ("adamw", "sgd")  # update DTensors, so they work with --fsdp
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


@dataclass(frozen=True)
class FitConfig:
    base: Path
    data: Path
    name: str
    store: str  # a directory or s3://bucket/prefix (server/adapters/store.py's open_store)
    rank: int = 16
    alpha: float | None = None  # None = 2 * rank
    target_modules: str = "all-linear"  # or a comma-separated list: q_proj,v_proj
    layers_to_transform: str = ""  # "" = every layer; "22-29" or "0,2,4": only these (peft's layers_to_transform)
    dropout: float = 0.05
    epochs: float = 3.0
    max_steps: int = 0  # > 0 overrides epochs
    learning_rate: float = 2e-4
    schedule: str = "cosine"
    warmup_ratio: float = 0.05
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 512
    packing: bool = True
    eval_fraction: float = 0.1
    eval_every: int = 50  # optimizer steps; the run also evaluates at its end
    early_stopping_patience: int = 0  # evaluations without improvement before stopping (then the best evaluated adapter is kept); 0 = off
    optimizer: str = ""  # "" = paged_adamw_32bit, or adamw with fsdp (bitsandbytes cannot update sharded tensors); sgd: momentum 0.9
    weight_decay: float = 0.0
    seed: int = 42
    output_dir: Path | None = None  # None = runs/<name>
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    gradient_checkpointing: bool = True
    fsdp: bool = False  # shard the NF4 base and the LoRA weights across the launch's processes (FSDP2)
    notify: tuple[str, ...] = ()  # HOST:PORT of servers to ask to load the new version
    s3_endpoint_url: str = ""  # with an s3:// store: the S3-compatible service ("": boto3's chain, AWS_ENDPOINT_URL)
    publish: bool = True
    acceptance_prompts: int = 4

    def __post_init__(self) -> None:
        if not self.optimizer:
            object.__setattr__(self, "optimizer", "adamw" if self.fsdp else "paged_adamw_32bit")
        if self.fsdp and self.optimizer not in TORCH_OPTIMIZERS:
            raise ValueError(f"--optimizer {self.optimizer}: with --fsdp the optimizer updates sharded tensors "
                             "(DTensors), which bitsandbytes' optimizers cannot; use --optimizer adamw (the default "
                             "with --fsdp; the LoRA state it keeps is sharded too) or sgd")
        checks = {
            "rank": self.rank >= 1, "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1,
            "max_seq_len": self.max_seq_len >= 8, "learning_rate": self.learning_rate > 0,
            "epochs": self.epochs > 0 or self.max_steps > 0, "dropout": 0 <= self.dropout < 1,
            "eval_fraction": 0 <= self.eval_fraction < 1, "eval_every": self.eval_every >= 1,
            "checkpoint_every": self.checkpoint_every >= 1, "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "optimizer": self.optimizer in OPTIMIZERS, "schedule": self.schedule in SCHEDULES,
            "keep_checkpoints": self.keep_checkpoints >= 1,
        }
        parse_layers(self.layers_to_transform)  # raises on a malformed spec before anything loads
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid trainer settings: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")
        from server.adapters.store import check_location
        from server.errors import InvalidRequest

        try:
            check_location(self.store)  # before training, not after: an s3:// typo must not become a directory
        except InvalidRequest as exc:
            raise ValueError(f"--store {exc}") from None
        if not Path(self.base).is_dir():  # one line, not transformers' hub lookup of a "repo id"
            raise ValueError(f"--base {self.base}: no such directory (a Hugging Face checkpoint directory)")

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank

    @property
    def run_dir(self) -> Path:
        return self.output_dir or Path("runs") / self.name

    def layers(self) -> list[int] | None:
        """The decoder layers that get LoRA weights, or None for all."""
        return parse_layers(self.layers_to_transform)

    def targets(self) -> str | list[str]:
        if self.target_modules != "all-linear":
            return [m.strip() for m in self.target_modules.split(",")]
        # peft takes layers_to_transform only with named modules; these are all of a Llama's linears
        return "all-linear" if self.layers() is None else list(TARGET_MODULES)

    def hyperparameters(self) -> dict:
        """What the manifest records (paths and run plumbing left out)."""
        skip = {"base", "data", "name", "store", "s3_endpoint_url", "output_dir", "resume", "notify", "publish"}
        record = {k: v for k, v in asdict(self).items() if k not in skip}
        record["alpha"] = self.lora_alpha
        return record


def parse_layers(spec: str) -> list[int] | None:
    """"22-29" / "0,2,4" / "0-3,8" -> sorted layer indices; "" -> None (every layer)."""
    if not str(spec).strip():
        return None
    layers: set[int] = set()
    for part in str(spec).split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ValueError(f"layers_to_transform {spec!r}: use indices and ascending ranges such as 22-29 or 0,2,4")
        layers.update(range(int(match[1]), int(match[2] or match[1]) + 1))
    return sorted(layers)


def merge(defaults_from_yaml: dict, flags: dict) -> dict:
    """Flags that were given win over the YAML file; unknown YAML keys are an error."""
    known = {f.name for f in fields(FitConfig)}
    unknown = set(defaults_from_yaml) - known
    if unknown:
        raise ValueError(f"unknown settings in the config file: {sorted(unknown)}")
    merged = dict(defaults_from_yaml)
    merged.update({k: v for k, v in flags.items() if v is not None})
    return merged


def build(values: dict) -> FitConfig:
    kinds = {f.name: f.type for f in fields(FitConfig)}
    converted = {}
    for key, value in values.items():
        kind = str(kinds[key])
        if value is None:
            converted[key] = None
        elif "Path" in kind:
            converted[key] = Path(value)
        elif "tuple" in kind:
            converted[key] = tuple(value) if isinstance(value, (list, tuple)) else tuple(str(value).split(","))
        elif "bool" in kind:
            converted[key] = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        elif kind == "int":
            converted[key] = int(value)
        elif "float" in kind:
            converted[key] = float(value)
        else:
            converted[key] = value
    missing = [k for k in ("base", "data", "name", "store") if k not in converted]
    if missing:
        raise ValueError(f"missing required settings: {', '.join('--' + m for m in missing)}")
    return FitConfig(**converted)


__all__ = ["FitConfig", "OPTIMIZERS", "SCHEDULES", "merge", "build", "parse_layers"]
