"""Data-parallel `trainer fit` across processes: `torchrun --nproc-per-node N -m trainer fit ...`
(or `accelerate launch`), gloo on CPU, nccl on CUDA.

Every rank holds the NF4 base and the same LoRA initialisation (the same seed). Each step's global
batch (per-rank batch x ranks x grad_accum rows) is built once, in the order one process would
use, and rank r takes its r-th slice of every batch, so each example is seen once per epoch across
ranks and N ranks x batch B train what 1 process x batch N*B does: the loss is normalised by the
global batch's target tokens and the LoRA gradients are summed across ranks before each step.
Rank 0 alone logs, checkpoints and publishes (trainer/cli.py); each rank scores its slice of the
held-out split and one all-reduce sums them, so every rank has the same eval loss and takes the
same early-stopping decision.

accelerate starts the process group from the launcher's environment; the loop stays ours (exact
packing, exact resume, loss only where an answer token is predicted), so gradients are summed
with one all-reduce of the flattened LoRA gradients rather than through a DDP wrapper, whose
forward the loop does not call. Checkpoints hold every rank's random generators, so `--resume`
with the same number of processes continues exactly; another number is refused.

FSDP-QLoRA (`--fsdp`, ShardedRanks) shards the NF4 base and the LoRA weights across the ranks
instead of copying them: torch's FSDP2 `fully_shard` on every decoder layer and on the loss module
(the root, which holds the embeddings, the final norm and the LM head), with bitsandbytes storing
the packed NF4 weights in the compute dtype (`bnb_4bit_quant_storage`) so they shard like any
tensor, as in PEFT's FSDP-QLoRA guide. The data slicing, the loss normalisation and the rank-0
duties are the same; FSDP's reduce-scatter sums the gradients (divide factor 1) where the
all-reduce did, and the adapter and optimizer state are gathered whole for checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .data import IGNORE, Batch


@dataclass(frozen=True)
class Ranks:
    """Data-parallel: every rank holds the whole model."""

    rank: int = 0
    world: int = 1
    sharded = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def slice(self, batch: Batch) -> Batch:
        """This rank's rows of a global batch. When the batch (an epoch's last) has none left for
        this rank, a row of two tokens that scores nothing: every rank runs as many forwards and
        backwards, which FSDP's collectives need, and it adds nothing to the gradients."""
        rows = batch.input_ids.shape[0]
        per_rank = -(-rows // self.world)
        start, stop = self.rank * per_rank, min(rows, (self.rank + 1) * per_rank)
        if start >= stop:
            return Batch(batch.input_ids[:1, :2], torch.full_like(batch.labels[:1, :2], IGNORE),
                         batch.position_ids[:1, :2], batch.attention_mask[:1, :, :2, :2])
        return Batch(*(t[start:stop] for t in (batch.input_ids, batch.labels, batch.position_ids, batch.attention_mask)))

    def prepare(self, loss: torch.nn.Module) -> torch.nn.Module:
        """The loss module (trainer/fit.py ResponseLoss) as this kind of launch trains it."""
        return loss

    def total(self, value: float) -> float:
        """The sum of `value` over the ranks (itself with one)."""
        if self.world == 1:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=_device())
        torch.distributed.all_reduce(tensor)
        return float(tensor.item())

    def reduce_in_backward(self, loss: torch.nn.Module, now: bool) -> None:
        """Whether the next backward reduces the gradients across ranks (FSDP does it in backward;
        off for all but a step's last micro-batch, whose backward reduces what they accumulated)."""

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

    def adapter_weights(self, model) -> dict[str, torch.Tensor]:
        """The whole LoRA state (peft's names), on the CPU; every rank must call it."""
        from peft import get_peft_model_state_dict

        return {k: _whole(v).detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}

    def optimizer_state(self, loss: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's whole state, as a checkpoint stores it; every rank must call it."""
        return optimizer.state_dict()

    def load_optimizer_state(self, loss: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def gather(self, value) -> list:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        gathered = [None] * self.world
        torch.distributed.all_gather_object(gathered, value)
        return gathered


class ShardedRanks(Ranks):
    """FSDP-QLoRA: the base and the LoRA weights are sharded across the ranks (FSDP2)."""

    sharded = True

    def prepare(self, loss: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        mesh = init_device_mesh(_device().type, (self.world,))
        for layer in loss.decoder_layers():
            fully_shard(layer, mesh=mesh)
        fully_shard(loss, mesh=mesh)  # the root: embeddings, final norm, LM head
        for module in loss.modules():
            if isinstance(module, FSDPModule):
                # summed, as Ranks.sum_gradients does: the loss is already divided by the global
                # batch's target tokens. A plain SUM, because gloo has no pre-multiplied one.
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        return loss

    def reduce_in_backward(self, loss: torch.nn.Module, now: bool) -> None:
        loss.set_requires_gradient_sync(now)  # on the root and, recursively, every layer

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Nothing to do: FSDP's reduce-scatter summed each shard's gradient in backward."""

    def optimizer_state(self, loss: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Keyed by parameter name, whole tensors, on rank 0 (empty on the others)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(loss, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, loss: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(loss, optimizer, state, options=StateDictOptions(full_state_dict=True))


def start(sharded: bool = False) -> Ranks:
    """This process's place in the launch: one rank of one without a launcher; with torchrun or
    accelerate launch, the process group is started (by accelerate's PartialState). sharded: FSDP,
    which needs a process group even for one process (a one-device FSDP run, as `make gpu-check`
    makes: the same code path as N)."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if not sharded:
            return Ranks()
        if torch.cuda.is_available():  # before the group: NCCL binds to the current device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not torch.distributed.is_initialized():  # in-process: no launcher, no port
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
        return ShardedRanks(0, 1)
    from accelerate import PartialState

    state = PartialState(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(state.local_process_index)
    return (ShardedRanks if sharded else Ranks)(state.process_index, state.num_processes)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter gathered whole; a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
