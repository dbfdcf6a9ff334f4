"""Training checkpoints that resume exactly: adapter, optimizer, scheduler, RNG and data position.

Everything is stored as safetensors (tensors) + JSON (the rest), never pickle, and written into a
temporary directory that is renamed into place, so a run killed while saving leaves the previous
checkpoint as the latest one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_PREFIX = "step-"
log = logging.getLogger(__name__)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random generators (what dropout draws from)."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def save(directory: Path, step: int, adapter: dict[str, torch.Tensor], optimizer_state: dict, scheduler, state: dict,
         rng_by_rank: list[dict[str, torch.Tensor]] | None = None) -> Path:
    """Write checkpoint `step` under directory/ and return its path. adapter: the LoRA weights
    (peft's names); optimizer_state: the optimizer's whole state_dict; rng_by_rank: every rank's
    rng_state() in a data-parallel run (default: this process's)."""
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    save_file(adapter, staging / "adapter.safetensors")
    tensors, rest = _flatten(optimizer_state)
    save_file(tensors, staging / "optimizer.safetensors")
    ranks = rng_by_rank or [rng_state()]  # rank 0's under their own names, as one process writes them
    save_file({(f"rank{r}." if r else "") + k: v for r, rng in enumerate(ranks) for k, v in rng.items()},
              staging / "rng.safetensors")
    record = {"step": step, "optimizer": rest, "scheduler": scheduler.state_dict(), "state": state}
    (staging / "trainer_state.json").write_text(json.dumps(record, indent=1))
    final = directory / f"{_PREFIX}{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)
    return final


def save_adapter(path: Path, adapter: dict[str, torch.Tensor], step: int) -> None:
    """The adapter's weights alone, at `path` (a .safetensors file, which records `step`),
    replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".tmp-{path.name}")
    save_file(adapter, staging, metadata={"step": str(step)})
    os.replace(staging, path)


def load_adapter(path: Path, model, step: int) -> bool:
    """Load the adapter saved at `path` when it is step `step`'s; False (nothing loaded) when
    there is none, or it is another step's (a run resumed from before it was saved)."""
    from peft import set_peft_model_state_dict
    from safetensors import safe_open

    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("step") != str(step):
            return False
    set_peft_model_state_dict(model, load_file(path))
    return True


def latest(directory: Path) -> Path | None:
    found = sorted(p for p in directory.glob(f"{_PREFIX}*") if (p / "trainer_state.json").exists()) if directory.is_dir() else []
    return found[-1] if found else None


@dataclass
class Saved:
    """A checkpoint as read back, to be put into the live objects one part at a time (the adapter
    before FSDP shards the model, the optimizer state after the optimizer exists)."""

    path: Path
    adapter: dict[str, torch.Tensor]
    optimizer_state: dict
    scheduler_state: dict
    state: dict  # the trainer state (TrainState's fields)
    rng: dict[str, torch.Tensor]  # this rank's random generators

    def restore_rng(self) -> None:
        torch.set_rng_state(self.rng["cpu"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all([self.rng[f"cuda{i}"] for i in range(torch.cuda.device_count())
                                          if f"cuda{i}" in self.rng])


def to_resume(directory: Path, ranks) -> Saved | None:
    """The latest checkpoint under directory/, read for this rank of `ranks` (trainer/distributed.py);
    None when there is none. Refused when another kind of launch wrote it."""
    found = latest(directory)
    if found is None:
        log.warning("--resume: no checkpoint in %s; starting from step 0", directory)
        return None
    state = json.loads((found / "trainer_state.json").read_text())["state"]
    world, fsdp = state.get("world_size", 1), state.get("fsdp", False)
    if fsdp != ranks.sharded:  # the optimizer state is keyed differently
        raise ValueError(f"--resume: {found} was written {'with' if fsdp else 'without'} --fsdp; resume it the same way")
    if world != ranks.world:  # each rank's data slice and random draws would change
        raise ValueError(f"--resume: {found} was written by {world} processes; resume it with {world} "
                         f"(this launch has {ranks.world})")
    return read(found, ranks.rank)


def read(path: Path, rank: int = 0) -> Saved:
    """Checkpoint `path`, with the random generators of `rank`."""
    record = json.loads((path / "trainer_state.json").read_text())
    prefix = f"rank{rank}." if rank else ""
    rng = {k.removeprefix(prefix): v for k, v in load_file(path / "rng.safetensors").items()
           if k.startswith(prefix) and (rank or not k.startswith("rank"))}
    if "cpu" not in rng:
        raise ValueError(f"--resume: {path} holds no random state for rank {rank}: it was written by "
                         f"{record['state'].get('world_size', 1)} processes; resume it with as many")
    return Saved(path, load_file(path / "adapter.safetensors"),
                 _unflatten(load_file(path / "optimizer.safetensors"), record["optimizer"]), record["scheduler"],
                 record["state"], rng)


def prune(directory: Path, keep: int) -> None:
    for old in sorted(directory.glob(f"{_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _flatten(tree, prefix: str = "") -> tuple[dict[str, torch.Tensor], object]:
    """Split a nested optimizer state into {path: tensor} and a JSON skeleton that points at them."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, path):
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {"__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(node.items())]}
        if isinstance(node, (list, tuple)):
            return {"__tuple__" if isinstance(node, tuple) else "__list__": [walk(v, f"{path}.{i}") for i, v in enumerate(node)]}
        return node

    return tensors, walk(tree, prefix or "root")


def _unflatten(tensors: dict[str, torch.Tensor], skeleton):
    def walk(node):
        if isinstance(node, dict):
            if "__tensor__" in node:
                return tensors[node["__tensor__"]]
            if "__dict__" in node:
                return {walk(k): walk(v) for k, v in node["__dict__"]}
            if "__tuple__" in node:
                return tuple(walk(v) for v in node["__tuple__"])
            if "__list__" in node:
                return [walk(v) for v in node["__list__"]]
        return node

    return walk(skeleton)
