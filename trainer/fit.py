"""QLoRA training: NF4 double-quantized base (transformers + bitsandbytes), LoRA (peft), paged
AdamW (bitsandbytes; torch AdamW with --fsdp), gradient checkpointing; eval perplexity, checkpoints
with exact resume, TensorBoard logs and a progress bar; data-parallel or FSDP across processes
(trainer/distributed.py). `fit` returns the trained PEFT model and what was measured; publishing
is trainer/publish.py's job.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from server.model.quant import import_bitsandbytes, keep_linear4bit_on_dequantize

from . import checkpoint, distributed
from .distributed import Ranks
from .config import FitConfig
from .data import IGNORE, Batch, Example, epoch_batches, load_examples, split

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything about progress that a resumed run needs besides tensors (JSON-able)."""

    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    best_eval_loss: float = math.inf
    best_step: int = 0  # the step of the best evaluation (its adapter is kept in run_dir/best.safetensors)
    evals_without_improvement: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    eval_loss: float | None = None
    wall_time_s: float = 0.0
    stopped_early: bool = False
    world_size: int = 1  # processes of the run that wrote it: a resume needs as many
    fsdp: bool = False  # whether it was sharded (the optimizer state is stored differently)


@dataclass
class FitResult:
    model: object  # the PEFT model, in eval mode (rank 0's whole copy after an FSDP run; None on the other ranks)
    tokenizer: object
    state: TrainState
    train: list[Example]
    eval: list[Example]
    total_steps: int
    optimizer_note: str
    losses: list[float] = field(default_factory=list)
    adapter_step: int = 0  # the step whose adapter `model` holds: the best evaluated one with early stopping


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():  # this rank's GPU (trainer/distributed.py sets it)
        return torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    return torch.device("cpu"), torch.float32  # bf16 is 10-60x slower on CPUs without AVX512-BF16


def load_base(base: Path, dtype: torch.dtype, device: torch.device, shardable: bool = False):
    """The NF4 double-quantized base, its layers pinned to the serving engine's NF4 path (see
    server.model.quant.keep_linear4bit_on_dequantize: otherwise an eval pass on an AVX512-BF16 CPU
    repacks them, and training after it computes in bf16 without the base weight's gradient path).
    shardable: for FSDP, the packed NF4 weights stored in the compute dtype (so they shard like
    the other tensors) and loaded into CPU memory, from where each rank's shard goes to its device."""
    import_bitsandbytes()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    storage = {"bnb_4bit_quant_storage": dtype} if shardable else {}
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype, **storage)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=dtype,
                                                 device_map={"": "cpu" if shardable else str(device)})
    keep_linear4bit_on_dequantize(model)
    return model


def peft_model(config: FitConfig, dtype: torch.dtype, device: torch.device, shardable: bool = False):
    """The NF4 base prepared for k-bit training, with fresh LoRA weights (drawn from the current
    random state)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = load_base(config.base, dtype, device, shardable)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.dropout,
                      target_modules=config.targets(), layers_to_transform=config.layers(),
                      task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, lora)


class ResponseLoss(torch.nn.Module):
    """Summed next-token cross entropy over the response tokens of a batch. Logits are made only
    at the positions that predict a response token: the LM head over a 49k vocabulary at every
    position of a chat row would cost more than the decoder layers it sits on. A module of its
    own because FSDP's root must be what the loop calls (its hooks gather the root's shards)."""

    def __init__(self, model):
        super().__init__()
        self.model = model  # PEFT-wrapped or not
        self.causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model

    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.causal_lm.model.layers

    def forward(self, batch: Batch) -> torch.Tensor:
        hidden = self.causal_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      position_ids=batch.position_ids, use_cache=False).last_hidden_state
        targets = batch.labels[:, 1:]
        scored = targets != IGNORE
        logits = self.causal_lm.lm_head(hidden[:, :-1][scored])
        return torch.nn.functional.cross_entropy(logits.float(), targets[scored], reduction="sum")


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> tuple[torch.optim.Optimizer, str]:
    bnb = import_bitsandbytes()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), "torch AdamW"
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay), "torch SGD, momentum 0.9"
    cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    optimizer = cls(params, lr=lr, weight_decay=weight_decay)
    if not torch.cuda.is_available():
        # bitsandbytes repeats this at construction and at the first step; the note below says it once
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        note = f"{name}: bitsandbytes pages optimizer state only on CUDA; on this CPU it runs non-paged"
        log.warning(note)
        return optimizer, note
    return optimizer, f"{name} (bitsandbytes, paged)"


def fit(config: FitConfig, on_step: Callable[[TrainState, dict], None] | None = None,
        ranks: Ranks | None = None) -> FitResult:
    """Train; `on_step(state, logs)` is called after every optimizer step (and checkpoint).
    ranks: this process's place in a data-parallel or FSDP launch (trainer/distributed.py;
    default: the launcher's environment, or one process). Rank 0 alone writes TensorBoard,
    checkpoints and the best adapter."""
    # peft's prepare_model_for_kbit_training calls transformers APIs that transformers 5 deprecates;
    # nothing a user of trainer fit can change.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
    from peft import set_peft_model_state_dict
    from transformers import AutoTokenizer, get_scheduler

    ranks = ranks or distributed.start(config.fsdp)
    device, dtype = device_and_dtype()
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(config.base, local_files_only=True)
    examples = load_examples(config.data, tokenizer, config.max_seq_len)  # fails before any training
    train, held_out = split(examples, config.eval_fraction, config.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    model = peft_model(config, dtype, device, shardable=ranks.sharded)
    if ranks.world > 1:  # the same LoRA initialisation on every rank (above); from here, each its own dropout masks
        torch.manual_seed(config.seed * 1_000_003 + ranks.rank)
    checkpoints = config.run_dir / "checkpoints"
    saved = checkpoint.to_resume(checkpoints, ranks) if config.resume else None
    if saved is not None:  # the weights go in before FSDP shards them
        set_peft_model_state_dict(model, saved.adapter)
    loss_of = ranks.prepare(ResponseLoss(model))

    global_batch = config.batch_size * ranks.world  # rows per forward across ranks; each rank takes its slice
    batches_per_epoch = len(epoch_batches(train, global_batch, config.max_seq_len, config.packing, config.seed, 0, pad_id))
    steps_per_epoch = max(1, batches_per_epoch // config.grad_accum)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, optimizer_note = make_optimizer(config.optimizer, params, config.learning_rate, config.weight_decay)
    scheduler = get_scheduler(config.schedule, optimizer, num_warmup_steps=int(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)

    state = TrainState()
    best = config.run_dir / "best.safetensors"
    if saved is not None:
        ranks.load_optimizer_state(loss_of, optimizer, saved.optimizer_state)
        scheduler.load_state_dict(saved.scheduler_state)
        saved.restore_rng()
        state = TrainState(**saved.state)
        log.info("resumed from %s (step %d of %d)", saved.path, state.step, total_steps)

    if ranks.world > 1:
        log.info("rank %d of %d; global batch %d rows = %d per rank x %d ranks x %d accumulated", ranks.rank,
                 ranks.world, global_batch * config.grad_accum, config.batch_size, ranks.world, config.grad_accum)
    writer = _tensorboard(config.run_dir / "tensorboard") if ranks.main else _NoWriter()
    started = time.perf_counter() - state.wall_time_s
    losses: list[float] = []
    epoch_cache: dict[int, list[Batch]] = {}

    def next_batch() -> Batch:
        while True:
            if state.epoch not in epoch_cache:
                epoch_cache.clear()
                epoch_cache[state.epoch] = epoch_batches(train, global_batch, config.max_seq_len, config.packing,
                                                         config.seed, state.epoch, pad_id)
            batches = epoch_cache[state.epoch]
            if state.batch_in_epoch < len(batches):
                state.batch_in_epoch += 1
                return batches[state.batch_in_epoch - 1]
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    state.total_steps, state.world_size, state.fsdp = total_steps, ranks.world, ranks.sharded
    try:
        loss_of.train()
        while state.step < total_steps and not state.stopped_early:
            window = [ranks.slice(next_batch()) for _ in range(config.grad_accum)]
            targets = ranks.total(sum(b.target_tokens for b in window))  # the global batch's: the loss's denominator
            tick = time.perf_counter()
            step_loss = _backward(loss_of, window, targets, device, ranks)
            ranks.sum_gradients(params)
            step_loss = ranks.total(step_loss)
            grad_norm = _full(torch.nn.utils.clip_grad_norm_(params, 1.0))  # before clipping
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            tokens = int(ranks.total(sum(int(b.input_ids.numel()) for b in window if b.target_tokens)))  # not idle rows
            state.tokens_seen += tokens
            state.last_loss = step_loss / max(targets, 1)
            state.first_loss = state.first_loss if state.first_loss is not None else state.last_loss
            losses.append(state.last_loss)
            logs = {"loss": state.last_loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens / (time.perf_counter() - tick)}
            if state.step % config.eval_every == 0 or state.step == total_steps:
                state.eval_loss = evaluate(loss_of, held_out, config, pad_id, device, ranks) if held_out else None
                if state.eval_loss is not None:
                    logs.update(eval_loss=state.eval_loss, eval_perplexity=math.exp(min(state.eval_loss, 50)))
                    if _early_stopping(state, config) and config.early_stopping_patience:  # alike on every rank
                        weights = ranks.adapter_weights(model)
                        if ranks.main:
                            checkpoint.save_adapter(best, weights, state.step)
                loss_of.train()
            state.wall_time_s = time.perf_counter() - started
            for key, value in logs.items():
                writer.add_scalar(f"train/{key}" if not key.startswith("eval") else f"eval/{key[5:]}", value, state.step)
            checkpoint_now = state.step % config.checkpoint_every == 0 or state.step == total_steps or state.stopped_early
            if checkpoint_now:  # gathered on every rank: with FSDP each holds a shard
                rngs = ranks.gather(checkpoint.rng_state())  # every rank's, for an exact resume
                weights, optimizer_state = ranks.adapter_weights(model), ranks.optimizer_state(loss_of, optimizer)
                if ranks.main:
                    checkpoint.save(checkpoints, state.step, weights, optimizer_state, scheduler, state.__dict__, rngs)
                    checkpoint.prune(checkpoints, config.keep_checkpoints)
            if on_step is not None:
                on_step(state, logs)
    finally:
        writer.close()
    if ranks.sharded:  # rank 0 puts the adapter on its own copy of the base, once the shards are freed
        weights = ranks.adapter_weights(model)
        del model, loss_of, optimizer, scheduler, params, saved
        model = _whole_copy(weights, config, dtype, device) if ranks.main else None
    adapter_step = state.step
    if config.early_stopping_patience and state.best_step and state.best_step != state.step and ranks.main:
        # what early stopping is for: the adapter that evaluated best
        if checkpoint.load_adapter(best, model, state.best_step):
            log.info("keeping the adapter of step %d (eval loss %.4f), the best evaluated, over step %d's (eval "
                     "loss %s)", state.best_step, state.best_eval_loss, state.step,
                     "not evaluated" if state.eval_loss is None else f"{state.eval_loss:.4f}")
            adapter_step = state.best_step
        else:
            log.warning("the best evaluated adapter (step %d) was not saved in %s (early stopping was off then); "
                        "keeping the last one (step %d)", state.best_step, best, state.step)
    if model is not None:
        model.eval()
    return FitResult(model, tokenizer, state, train, held_out, total_steps, optimizer_note, losses, adapter_step)


def _whole_copy(weights: dict[str, torch.Tensor], config: FitConfig, dtype: torch.dtype, device: torch.device):
    """After an FSDP run, the trained adapter on one whole copy of the base: what the acceptance
    check (which runs the base on one device, as a server does) and saving use."""
    import gc

    from peft import set_peft_model_state_dict

    gc.collect()  # the sharded model's reference cycles (FSDP state <-> modules)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    model = peft_model(config, dtype, device)
    set_peft_model_state_dict(model, weights)
    return model


def _full(norm: torch.Tensor) -> float:
    """A gradient norm as a number; with FSDP it is a DTensor, alike on every rank."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _backward(loss_of: ResponseLoss, window: list[Batch], targets: float, device, ranks: Ranks) -> float:
    """Backward through each micro-batch of a step; returns their summed loss. A function of its
    own so the last graph (which holds FSDP's shards) is freed when it returns."""
    step_loss = 0.0
    for i, batch in enumerate(window):
        ranks.reduce_in_backward(loss_of, now=i == len(window) - 1)
        loss_sum = loss_of(batch.to(device))
        (loss_sum / max(targets, 1)).backward()
        step_loss += loss_sum.item()
    return step_loss


@torch.no_grad()
def evaluate(loss_of: ResponseLoss, examples: list[Example], config: FitConfig, pad_id: int, device,
             ranks: Ranks = Ranks()) -> float:
    """Mean response-token loss on the eval split (unpacked, fixed order), each rank scoring its
    slice of every batch. The sum across ranks is one all-reduce, whose result every rank gets
    alike, so all of them take the same early-stopping decision (and make the same collectives)."""
    loss_of.eval()
    total, count = 0.0, 0
    for batch in epoch_batches(examples, config.batch_size * ranks.world, config.max_seq_len, False, 0, 0, pad_id):
        total += loss_of(ranks.slice(batch).to(device)).item()
        count += batch.target_tokens
    return ranks.total(total) / max(count, 1)


def _early_stopping(state: TrainState, config: FitConfig) -> bool:
    """Whether this evaluation is the best so far; stops the run after `patience` that are not."""
    if state.eval_loss < state.best_eval_loss - 1e-4:
        state.best_eval_loss, state.best_step, state.evals_without_improvement = state.eval_loss, state.step, 0
        return True
    else:
        state.evals_without_improvement += 1
        if config.early_stopping_patience and state.evals_without_improvement >= config.early_stopping_patience:
            log.info("early stopping: eval loss has not improved for %d evaluations", state.evals_without_improvement)
            state.stopped_early = True
        return False


class _NoWriter:
    """What ranks other than 0 write TensorBoard events with."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _tensorboard(directory: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(directory))
