"""`trainer fit` data-parallel on CPU: torchrun with 2 processes (gloo). 2 ranks x batch 4 train
what 1 process x batch 8 does (losses and gradient norms per step equal, LoRA weights within
float32 all-reduce noise); each example is seen once per epoch across ranks; rank 0 alone publishes, once; a rank
killed mid-run fails the launch and publishes nothing, and that run, resumed, ends with the adapter
an uninterrupted one makes (resuming it with 1 process is refused); an error every rank meets is
said once. FSDP-QLoRA (--fsdp, launched by accelerate) trains what one unsharded process does
too, and its checkpoints resume exactly.

The comparisons across launches train with SGD (momentum 0.9): its update is linear in the
gradients, so summing them in another order (ranks, reduce-scatter, another CPU's kernels) moves
the weights by float32 noise. Adam divides by sqrt(v), which turns the noise in a gradient near
zero into a whole step of either sign (k_proj's A on AVX-512, at 1e-3); and being blind to the
gradients' scale, it would hide a gradient reduced twice. The gradient norm per step, logged
before clipping, shows that too."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server.adapters.store import AdapterStore
from trainer.data import IGNORE, Batch, epoch_batches
from trainer.distributed import Ranks

BIN = Path(sys.executable).parent


def fit_command(processes: int, llama_dir, data, out: Path, store: Path, *flags: str) -> list[str]:
    launcher = ([str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={processes}", "-m", "trainer"]
                if processes > 1 else [sys.executable, "-m", "trainer"])
    return [*launcher, "fit", "--base", str(llama_dir), "--data", str(data), "--name", "cheese", "--store", str(store),
            "--output-dir", str(out), "--rank", "8", "--max-seq-len", "96", "--learning-rate", "0.02", "--dropout", "0",
            "--eval-fraction", "0.15", "--seed", "5", "--no-progress", *flags]


def accelerate_fit_command(llama_dir, data, out: Path, store: Path, *flags: str) -> list[str]:
    """2 processes through `accelerate launch` (its torchrun launcher, which --multi_gpu names, on CPU too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = fit_command(2, llama_dir, data, out, store, *flags)
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
            *torchrun[torchrun.index("-m"):]]


def run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun gives each rank, for the single process too
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def tensorboard_losses(run_dir: Path, tag: str = "train/loss") -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


@pytest.mark.slow
def test_two_ranks_of_batch_4_train_what_one_process_of_batch_8_does_and_only_rank_0_publishes(
        llama_dir, cheese_data, tmp_path):
    from peft import get_peft_model_state_dict

    from trainer.config import FitConfig
    from trainer.fit import fit

    two = run(fit_command(2, llama_dir, cheese_data, tmp_path / "two", tmp_path / "store", "--batch-size", "4",
                          "--max-steps", "6", "--eval-every", "3", "--checkpoint-every", "3", "--optimizer", "sgd"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "global batch 8 rows = 4 per rank x 2 ranks x 1 accumulated" in two.stderr
    one = fit(FitConfig(base=llama_dir, data=cheese_data, name="cheese", store=tmp_path / "unused",  # in this process
                        output_dir=tmp_path / "one", rank=8, max_seq_len=96, learning_rate=0.02, dropout=0.0,
                        eval_fraction=0.15, seed=5, batch_size=8, max_steps=6, eval_every=3, checkpoint_every=3,
                        optimizer="sgd"))

    assert len(one.losses) == 6 and tensorboard_losses(tmp_path / "two") == pytest.approx(one.losses, rel=1e-4)
    norms = tensorboard_losses(tmp_path / "one", "train/grad_norm")  # a rank's gradient dropped or summed twice shows
    assert len(norms) == 6 and tensorboard_losses(tmp_path / "two", "train/grad_norm") == pytest.approx(norms, rel=1e-4)
    evaluated = tensorboard_losses(tmp_path / "one", "eval/loss")  # each rank scored half of the held-out split
    assert len(evaluated) == 2 and tensorboard_losses(tmp_path / "two", "eval/loss") == pytest.approx(evaluated, rel=1e-4)
    a = {k: v.cpu() for k, v in get_peft_model_state_dict(one.model).items()}
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    worst = max(((b[k] - a[k]).abs().max() / a[k].abs().max()).item() for k in a)
    print(f"largest difference, relative to the tensor's largest weight: {worst:.1e}")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    assert list(AdapterStore(tmp_path / "store").versions("cheese")) == ["v1"]  # published once
    assert two.stdout.count("published cheese@v1") == 1


@pytest.mark.slow
def test_fsdp_two_ranks_train_what_one_unsharded_process_does_and_resume_exactly(llama_dir, cheese_data, tmp_path):
    """--fsdp shards the NF4 base and the LoRA weights (FSDP2) across 2 ranks launched by
    accelerate; with 2 micro-batches a step (reduced once, in the last one's backward), the losses
    and the adapter are those of one unsharded process of the global batch.
    Its step-3 checkpoint, resumed by a torchrun launch, ends with the same adapter; resuming it
    without --fsdp is refused."""
    from trainer.config import FitConfig
    from trainer.fit import fit

    flags = ["--batch-size", "4", "--grad-accum", "2", "--max-steps", "6", "--eval-every", "3", "--checkpoint-every", "3",
             "--fsdp", "--optimizer", "sgd"]
    sharded = run(accelerate_fit_command(llama_dir, cheese_data, tmp_path / "sharded", tmp_path / "store", *flags))
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "global batch 16 rows = 4 per rank x 2 ranks x 2 accumulated" in sharded.stderr
    settings = dict(base=llama_dir, data=cheese_data, name="cheese", store=tmp_path / "unused", rank=8, max_seq_len=96,
                    learning_rate=0.02, dropout=0.0, eval_fraction=0.15, seed=5, max_steps=6, eval_every=3,
                    checkpoint_every=3, grad_accum=2, optimizer="sgd")
    one = fit(FitConfig(output_dir=tmp_path / "one", batch_size=8, **settings))
    assert len(one.losses) == 6 and tensorboard_losses(tmp_path / "sharded") == pytest.approx(one.losses, rel=1e-4)
    assert tensorboard_losses(tmp_path / "sharded", "eval/loss") == pytest.approx(
        tensorboard_losses(tmp_path / "one", "eval/loss"), rel=1e-4)
    norms = tensorboard_losses(tmp_path / "one", "train/grad_norm")
    assert len(norms) == 6 and tensorboard_losses(tmp_path / "sharded", "train/grad_norm") == pytest.approx(norms, rel=1e-4)
    a = load_file(tmp_path / "one" / "checkpoints" / "step-00000006" / "adapter.safetensors")
    b = load_file(tmp_path / "sharded" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    worst = max(((b[k] - a[k]).abs().max() / a[k].abs().max()).item() for k in a)
    print(f"largest difference, relative to the tensor's largest weight: {worst:.1e}")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    assert list(AdapterStore(tmp_path / "store").versions("cheese")) == ["v1"]
    assert sharded.stdout.count("published cheese@v1") == 1

    parted = tmp_path / "parted"
    shutil.copytree(tmp_path / "sharded" / "checkpoints" / "step-00000003", parted / "checkpoints" / "step-00000003")
    with pytest.raises(ValueError, match="written with --fsdp"):  # in this process: unsharded
        fit(FitConfig(output_dir=parted, batch_size=4, resume=True, **settings))
    resumed = run(fit_command(2, llama_dir, cheese_data, parted, tmp_path / "store", *flags, "--resume", "--no-publish"))
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    c = load_file(parted / "adapter" / "adapter_model.safetensors")
    for key in b:
        torch.testing.assert_close(c[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.gpu
def test_fsdp_on_one_gpu_trains_and_resumes_exactly(llama_dir, cheese_data, tmp_path):
    """The CUDA twin of the FSDP test above (`make gpu-check` runs it): one rank in this process,
    the base loaded into CPU memory and its shards moved to the GPU by fully_shard (the NF4
    quantization state with them), bfloat16 compute, a checkpoint gathered and resumed exactly, the
    whole copy for the acceptance check on the GPU. Its first loss is an unsharded run's (LoRA's B
    starts at zero, so the LoRA initialisation, drawn on the CPU here and on the GPU there, does
    not enter it)."""
    from trainer.config import FitConfig
    from trainer.fit import fit

    settings = dict(base=llama_dir, data=cheese_data, name="cheese", store=tmp_path / "store", rank=8, max_seq_len=96,
                    learning_rate=0.02, dropout=0.1, eval_fraction=0.15, seed=5, batch_size=4, max_steps=6,
                    eval_every=3, checkpoint_every=3, fsdp=True)
    try:
        whole = fit(FitConfig(output_dir=tmp_path / "whole", **settings))
        assert next(whole.model.parameters()).is_cuda and whole.losses[-1] < whole.losses[0]
        unsharded = fit(FitConfig(output_dir=tmp_path / "unsharded", **{**settings, "fsdp": False, "max_steps": 1,
                                                                        "optimizer": "adamw"}))
        assert whole.losses[0] == pytest.approx(unsharded.losses[0], rel=1e-3)
        parted = tmp_path / "parted"
        shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-00000003", parted / "checkpoints" / "step-00000003")
        resumed = fit(FitConfig(output_dir=parted, resume=True, **settings))
        assert resumed.losses == pytest.approx(whole.losses[3:], rel=1e-3)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    a = load_file(tmp_path / "whole" / "checkpoints" / "step-00000006" / "adapter.safetensors")
    b = load_file(parted / "checkpoints" / "step-00000006" / "adapter.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5, msg=key)


def test_fsdp_takes_torch_adamw_and_refuses_bitsandbytes_optimizers(llama_dir, cheese_data, tmp_path):
    from trainer.config import FitConfig

    settings = dict(base=llama_dir, data=cheese_data, name="cheese", store=tmp_path)
    assert FitConfig(**settings).optimizer == "paged_adamw_32bit"
    assert FitConfig(**settings, fsdp=True).optimizer == "adamw"
    with pytest.raises(ValueError, match="use --optimizer adamw"):  # they cannot update sharded tensors
        FitConfig(**settings, fsdp=True, optimizer="paged_adamw_8bit")


def test_an_error_every_rank_meets_fails_the_launch_and_is_said_once(llama_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "no output"}\n')
    launch = run(fit_command(2, llama_dir, bad, tmp_path / "run", tmp_path / "store"))
    assert launch.returncode != 0, launch.stderr[-3000:]
    assert launch.stderr.count("trainer fit: error:") == 1 and launch.stderr.count("skipped line 1") == 1
    assert not (tmp_path / "store").exists()


def test_each_example_is_seen_once_per_epoch_across_ranks(llama_dir, cheese_data):
    from transformers import AutoTokenizer

    from trainer.data import load_examples

    examples = load_examples(cheese_data, AutoTokenizer.from_pretrained(llama_dir), 96)
    for world, packing in ((2, False), (3, True)):
        batches = epoch_batches(examples, 4 * world, 96, packing, 5, 0, 0)
        seen = []
        for rank in range(world):
            for batch in batches:
                mine = Ranks(rank, world).slice(batch)
                scored = (mine.labels[:, 1:] != IGNORE).any(dim=1)  # a rank left without rows runs one scoring nothing
                seen += [tuple(row[row != 0].tolist()) for row in mine.input_ids[scored]]
        whole = [tuple(row[row != 0].tolist()) for batch in batches for row in batch.input_ids]
        assert sorted(seen) == sorted(whole) and len(seen) == len(whole)  # every row once, none twice
    three_rows = Batch(*(t[:3] for t in (batches[0].input_ids, batches[0].labels, batches[0].position_ids,
                                         batches[0].attention_mask)))
    idle = Ranks(3, 4).slice(three_rows)  # ranks 0-2 take a row each; rank 3 still runs a forward, of nothing
    assert idle.input_ids.shape == (1, 2) and idle.attention_mask.shape[-2:] == (2, 2) and idle.target_tokens == 0


@pytest.mark.slow
def test_a_rank_killed_mid_run_fails_the_launch_unpublished_and_the_run_resumed_ends_as_an_uninterrupted_one(
        llama_dir, cheese_data, tmp_path):
    """Rank 1 is killed as soon as the step-4 checkpoint exists: the launch fails and nothing is
    published. Resumed, with dropout on (each rank's random generator has to come back), it ends
    with the adapter an uninterrupted run makes; resuming it with 1 process is refused."""
    flags = ["--batch-size", "4", "--max-steps", "12", "--checkpoint-every", "4", "--eval-every", "12", "--dropout", "0.1"]
    whole = run(fit_command(2, llama_dir, cheese_data, tmp_path / "whole", tmp_path / "unused", *flags, "--no-publish"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    parted, store = tmp_path / "parted", tmp_path / "store"
    launch = subprocess.Popen(fit_command(2, llama_dir, cheese_data, parted, store, *flags), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        victim = None
        while victim is None and time.monotonic() < deadline:
            victim = next((pid for pid in _children(launch.pid) if _environ(pid).get("RANK") == "1"), None)
            time.sleep(0.05)
        while not (parted / "checkpoints" / "step-00000004").exists() and time.monotonic() < deadline:
            assert launch.poll() is None, launch.stdout.read()[-3000:]
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        launch.wait(120)
    finally:
        if launch.poll() is None:
            _kill_launch(launch)
    assert launch.returncode != 0
    assert not (parted / "checkpoints" / "step-00000012").exists() and not AdapterStore(store).versions("cheese")
    with pytest.raises(ValueError, match="written by 2 processes"):  # in this process: 1 rank
        from trainer.config import FitConfig
        from trainer.fit import fit

        fit(FitConfig(base=llama_dir, data=cheese_data, name="cheese", store=store, output_dir=parted,
                      rank=8, max_seq_len=96, eval_fraction=0.15, seed=5, batch_size=4, max_steps=12, resume=True))
    resumed = run(fit_command(2, llama_dir, cheese_data, parted, store, *flags, "--no-publish", "--resume"))
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    assert "step-00000012" not in resumed.stderr
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(parted / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)


def _kill_launch(launch: subprocess.Popen) -> None:
    """torchrun and its ranks (which it starts in sessions of their own), all at once."""
    for pid in [*_children(launch.pid), launch.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launch.wait(30)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
