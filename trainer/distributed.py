"""Data-parallel `trainer fit` across processes: `torchrun --nproc-per-node N -m trainer.cli fit ...`
(or `accelerate launch`), gloo on CPU, nccl on CUDA.

Every rank holds the NF4 base and the same LoRA initialisation (the same seed). Each step's global
batch (per-rank batch x ranks x grad_accum rows) is built once, in the order one process would
use, and rank r takes its r-th slice of every batch, so each example is seen once per epoch across
ranks and N ranks x batch B train what 1 process x batch N*B does: the loss is normalised by the
global batch's target tokens and the LoRA gradients are summed across ranks before each step.
Rank 0 alone logs, checkpoints and publishes (trainer/cli.py); every rank evaluates the whole
held-out split, so all of them take the same early-stopping decision.

accelerate starts the process group from the launcher's environment; the loop stays ours (exact
packing, exact resume, loss only where an answer token is predicted), so gradients are summed
with one all-reduce of the flattened LoRA gradients rather than through a DDP wrapper, whose
forward the loop does not call. Checkpoints hold every rank's random generators, so `--resume`
with the same number of processes continues exactly; another number is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .data import Batch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def slice(self, batch: Batch) -> Batch | None:
        """This rank's rows of a global batch (None when the batch, the epoch's last, has none left)."""
        rows = batch.input_ids.shape[0]
        per_rank = -(-rows // self.world)
        start, stop = self.rank * per_rank, min(rows, (self.rank + 1) * per_rank)
        if start >= stop:
            return None
        return Batch(*(t[start:stop] for t in (batch.input_ids, batch.labels, batch.position_ids, batch.attention_mask)))

    def total(self, value: float) -> float:
        """The sum of `value` over the ranks (itself with one)."""
        if self.world == 1:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=_device())
        torch.distributed.all_reduce(tensor)
        return float(tensor.item())

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Each parameter's gradient summed over the ranks, in one all-reduce (a rank that had no
        rows this step adds zeros)."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.flatten() for p in params])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def gather(self, value) -> list:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        gathered = [None] * self.world
        torch.distributed.all_gather_object(gathered, value)
        return gathered


def start() -> Ranks:
    """This process's place in the launch: one rank of one without a launcher; with torchrun or
    accelerate launch, the process group is started (by accelerate's PartialState)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    from accelerate import PartialState

    state = PartialState(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(state.local_process_index)
    return Ranks(state.process_index, state.num_processes)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
