"""`trainer fit` against a plain transformers Trainer + PEFT QLoRA run: same base model, data,
LoRA settings, optimizer (bitsandbytes paged AdamW), gradient checkpointing, batch size and
epochs, in one run. Each side runs in its own process so peak memory is its own. `trainer fit`
also runs data-parallel: N processes (torchrun, gloo, one thread each) of batch B/N, the same
global batch as one process of batch B; its memory column is the largest rank's. And FSDP-QLoRA
(`--fsdp`: the base and LoRA weights sharded across the same processes, with torch AdamW, since
bitsandbytes' optimizers cannot update sharded tensors); on one GPU that is a one-process FSDP
run, which still goes through every FSDP step.

Reported: training tokens/s (real tokens, padding excluded, over the training loop's wall time)
and peak memory (GPU: torch.cuda.max_memory_allocated; CPU: the process's max RSS). The data is
the demo's cheese dataset: short, variable-length records, where packing pays.

    python bench/train_bench.py [--preset small|1b] [--epochs 2] [--max-seq-len 256] [--processes N] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import record  # noqa: E402


def worker_hotlora(args) -> dict:
    from trainer.config import FitConfig
    from trainer.fit import fit

    config = FitConfig(base=args.model, data=args.data, name="bench", store=args.out / "store", output_dir=args.out / "hotlora",
                       rank=16, max_seq_len=args.max_seq_len, batch_size=args.batch_size, epochs=args.epochs,
                       eval_fraction=0.0, checkpoint_every=10**9, learning_rate=2e-4, packing=args.packing, seed=0,
                       fsdp=args.fsdp)
    result = fit(config)
    real = sum(len(e.input_ids) for e in result.train) * args.epochs
    return {"seconds": result.state.wall_time_s, "real_tokens": real, "steps": result.state.step,
            "rank": int(os.environ.get("RANK", "0"))}


def worker_hf(args) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from trainer.data import load_examples
    from trainer.fit import device_and_dtype, load_base

    device, dtype = device_and_dtype()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    examples = load_examples(args.data, tokenizer, args.max_seq_len)
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)} for e in examples]
    model = prepare_model_for_kbit_training(load_base(args.model, dtype, device), use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    training = TrainingArguments(output_dir=str(args.out / "hf"), per_device_train_batch_size=args.batch_size,
                                 num_train_epochs=args.epochs, learning_rate=2e-4, optim="paged_adamw_32bit",
                                 gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                                 bf16=device.type == "cuda", use_cpu=device.type == "cpu", save_strategy="no",
                                 report_to=[], logging_steps=10**9, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "real_tokens": sum(len(r["input_ids"]) for r in rows) * args.epochs,
            "steps": trainer.state.global_step}


def peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(which: str, args, packing: bool = False, batch_size: int | None = None, processes: int = 1,
               fsdp: bool = False) -> dict:
    """One run's figures; with several processes, rank 0's time and the largest rank's memory."""
    launcher = ([str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc-per-node={processes}"]
                if processes > 1 else [sys.executable])
    command = [*launcher, __file__, "--worker", which, "--model", str(args.model), "--data", str(args.data),
               "--out", str(args.out), "--epochs", str(args.epochs), "--max-seq-len", str(args.max_seq_len),
               "--batch-size", str(batch_size or args.batch_size), "--packing" if packing else "--no-packing",
               *(["--fsdp"] if fsdp else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{which} worker failed:\n{done.stderr[-4000:]}")
    ranks = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{\"")]  # not Trainer's dict
    first = next(r for r in ranks if r.get("rank", 0) == 0)
    return {**first, "peak_memory_bytes": max(r["peak_memory_bytes"] for r in ranks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=["hotlora", "hf"])
    p.add_argument("--preset", default="small")
    p.add_argument("--model", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--packed-batch-size", type=int, default=3,
                   help="rows per step when packing: 3 x 128 tokens is about the tokens of 8 padded cheese records")
    p.add_argument("--processes", type=int, help="processes of the data-parallel and FSDP runs (2 on a CPU; on CUDA "
                   "one per GPU)")
    p.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)  # a worker's setting
    p.add_argument("--record", action="store_true", help="add the table to its section of bench/RESULTS.md")
    args = p.parse_args()
    from server.model.quant import quiet_bitsandbytes

    quiet_bitsandbytes()
    if args.worker:
        result = (worker_hotlora if args.worker == "hotlora" else worker_hf)(args)
        print(json.dumps({**result, "peak_memory_bytes": peak_memory_bytes()}))
        return

    import torch

    from bench.engine_bench import machine
    from server.model.factory import make_model
    from trainer.demo.make_dataset import write

    with tempfile.TemporaryDirectory(prefix="hotlora-train-bench-") as tmp:
        tmp = Path(tmp)
        args.out, args.data = tmp, tmp / "cheese.jsonl"
        write(args.data)
        corpus = "\n".join(" ".join(json.loads(line).values()) for line in args.data.read_text().splitlines())
        args.model = args.model or make_model(tmp / "base", args.preset, seed=0, corpus=corpus)
        runs = {"transformers Trainer + PEFT": run_worker("hf", args),
                "hotlora trainer fit (no packing)": run_worker("hotlora", args),
                f"hotlora trainer fit (packing, {args.batch_size} rows)": run_worker("hotlora", args, packing=True),
                f"hotlora trainer fit (packing, {args.packed_batch_size} rows ~ same tokens/step)":
                    run_worker("hotlora", args, packing=True, batch_size=args.packed_batch_size)}
        processes = args.processes or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
        if args.batch_size % processes == 0:
            per_rank = args.batch_size // processes
            if processes > 1:
                runs[f"hotlora trainer fit (no packing), {processes} processes x batch {per_rank}"] = run_worker(
                    "hotlora", args, batch_size=per_rank, processes=processes)
            runs[f"hotlora trainer fit (no packing), --fsdp, {processes} process{'es' if processes > 1 else ''} x batch "
                 f"{per_rank}, torch AdamW"] = run_worker("hotlora", args, batch_size=per_rank, processes=processes, fsdp=True)
    peer = runs["transformers Trainer + PEFT"]
    lines = [f"machine: {machine()}; preset {args.preset}, {args.epochs:g} epochs of the cheese dataset, batch "
             f"{args.batch_size}, max_seq_len {args.max_seq_len}, rank 16 all-linear, paged_adamw_32bit, gradient checkpointing",
             "", "| run | steps | tokens/s | vs peer | peak memory MiB | vs peer |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in runs.items():
        rate = r["real_tokens"] / r["seconds"]
        peer_rate = peer["real_tokens"] / peer["seconds"]
        lines.append(f"| {name} | {r['steps']} | {rate:,.0f} | {rate / peer_rate:.2f}x | "
                     f"{r['peak_memory_bytes'] / 2**20:,.0f} | {r['peak_memory_bytes'] / peer['peak_memory_bytes']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        record("train_bench.py", f"### train_bench, {time.strftime('%Y-%m-%d')}\n\n{table}")


if __name__ == "__main__":
    main()
