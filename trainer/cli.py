"""`trainer`: make LoRA adapters with QLoRA and publish them to a hotlora adapter store.

    trainer fit --base DIR --data FILE.jsonl --name NAME --store STORE [--config fit.yaml] [flags]
    trainer publish PEFT_DIR --base DIR --name NAME --store STORE [--notify HOST:PORT]
    trainer gc --store STORE [--min-age 600]       # what publishes killed halfway left behind

A YAML file may set any fit setting (same names, with underscores); flags given on the command
line win. The admin token for --notify comes from --admin-token-file or HOTLORA_ADMIN_TOKEN;
--notify-tls / --notify-ca-cert reach servers that serve TLS.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("hotlora.trainer")


def _fit_parser(commands) -> None:
    from .config import OPTIMIZERS, SCHEDULES, FitConfig

    f = commands.add_parser("fit", help="train an adapter with QLoRA and publish it")

    def setting(group, name: str, *aliases: str, help: str = "", **kwargs) -> None:
        """A FitConfig setting: its flag defaults to None (the YAML file or FitConfig fills it), and
        its help says FitConfig's default, so help and behaviour cannot drift."""
        default = getattr(FitConfig, name.lstrip("-").replace("-", "_"), None)
        said = "" if default in (None, "", ()) else f" (default: {default})"
        group.add_argument(name, *aliases, help=f"{help}{said}".strip(), **kwargs)

    g = f.add_argument_group("model and data")
    g.add_argument("--config", type=Path, help="YAML file with any of the settings below")
    g.add_argument("--base", "--model", help="base model: a Hugging Face checkpoint directory or a .gguf file (default: "
                   "the built-in SmolLM2-135M-Instruct; --model: hotlora-server's name for it)")
    g.add_argument("--data", help="JSONL: instruction/context/output or messages records")
    g.add_argument("--name", help="adapter name in the store")
    g.add_argument("--store", "--adapters", help="adapter store: a directory or s3://BUCKET/PREFIX (--adapters: "
                   "hotlora-server's name for it)")
    g.add_argument("--s3-endpoint-url", help="with an s3:// store: the S3-compatible service's endpoint (default: "
                   "boto3's chain, AWS_ENDPOINT_URL included)")
    setting(g, "--max-seq-len", type=int, help="tokens per row")
    setting(g, "--packing", action=argparse.BooleanOptionalAction, default=None, help="pack examples into rows")
    setting(g, "--eval-fraction", type=float, help="held-out share of the records")

    g = f.add_argument_group("LoRA")
    setting(g, "--rank", type=int, help="LoRA rank")
    g.add_argument("--alpha", type=float, help="LoRA alpha (default: 2 x rank)")
    setting(g, "--target-modules", help="all-linear or a list, e.g. q_proj,v_proj")
    g.add_argument("--layers-to-transform", help="only these decoder layers get LoRA weights, e.g. 22-29 or 0,2,4 "
                   "(default: all); the rest stay the base model's")
    setting(g, "--dropout", type=float, help="LoRA dropout")

    g = f.add_argument_group("training")
    setting(g, "--epochs", type=float, help="passes over the training split")
    g.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    setting(g, "--learning-rate", "--lr", type=float, help="peak learning rate")
    setting(g, "--schedule", choices=SCHEDULES, help="learning-rate schedule")
    setting(g, "--warmup-ratio", type=float, help="fraction of steps warming up")
    setting(g, "--batch-size", type=int, help="rows per micro-batch (per rank in a launch)")
    setting(g, "--grad-accum", type=int, help="micro-batches per optimizer step")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="paged_adamw_32bit (the default), paged_adamw_8bit, adamw "
                   "(the default with --fsdp), sgd (momentum 0.9; its update is linear in the gradients, so runs that "
                   "sum them in another order stay within float32 noise of each other)")
    setting(g, "--weight-decay", type=float, help="decoupled weight decay")
    setting(g, "--seed", type=int, help="seed for data order, init and dropout")
    setting(g, "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
            help="recompute activations in backward, to hold less memory")
    g.add_argument("--fsdp", action="store_true", default=None, help="FSDP-QLoRA: shard the NF4 base and the LoRA "
                   "weights across the processes of a torchrun / accelerate launch, for training that does not fit "
                   "one device (the finished adapter is checked on one device holding the whole NF4 base, as served)")

    g = f.add_argument_group("evaluation and checkpoints")
    setting(g, "--eval-every", type=int, help="evaluate every N steps")
    setting(g, "--early-stopping-patience", type=int, help="evaluations without improvement before stopping; with "
            "it, the adapter saved and published is the best evaluated one, not the last (0 = off)")
    g.add_argument("--output-dir", help="checkpoints, TensorBoard logs and the final adapter (default: runs/NAME)")
    setting(g, "--checkpoint-every", type=int, help="save a resumable checkpoint every N steps")
    g.add_argument("--resume", action="store_true", default=None, help="continue from the latest checkpoint")
    g.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")

    g = f.add_argument_group("publishing")
    setting(g, "--publish", action=argparse.BooleanOptionalAction, default=None, help="publish after training")
    g.add_argument("--notify", action="append", help="HOST:PORT of a server to tell to load it (repeatable)")
    g.add_argument("--admin-token-file", type=Path, help="file with the servers' admin token, for --notify")
    g.add_argument("--notify-tls", action="store_true", help="--notify over TLS, trusting the system's authorities")
    g.add_argument("--notify-ca-cert", type=Path, help="--notify over TLS, trusting this PEM certificate (authority)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description="QLoRA adapters for hotlora.")
    parser.add_argument("--log-level", default="INFO", help="INFO; in a launch of several processes, rank 0's (the "
                        "others log errors only)")
    parser.add_argument("--model-cache", type=Path, help="where converted models are kept (default: "
                        "$HOTLORA_MODEL_CACHE, else $XDG_CACHE_HOME/hotlora/models)")
    commands = parser.add_subparsers(dest="command", required=True)
    _fit_parser(commands)
    p = commands.add_parser("publish", help="check and publish a PEFT adapter made elsewhere")
    p.add_argument("adapter_dir", type=Path, help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--base", "--model", help="the base model it was trained on: a checkpoint directory or a .gguf "
                   "file (default: the built-in SmolLM2-135M-Instruct; --model: hotlora-server's name for it)")
    p.add_argument("--name", required=True, help="adapter name in the store; the version is the next vN")
    p.add_argument("--store", "--adapters", required=True,
                   help="adapter store: a directory or s3://BUCKET/PREFIX (--adapters: hotlora-server's name for it)")
    p.add_argument("--s3-endpoint-url", help="with an s3:// store: the S3-compatible service's endpoint (default: "
                   "boto3's chain, AWS_ENDPOINT_URL included)")
    p.add_argument("--prompt", action="append", help="prompt for the acceptance check (repeatable; three defaults)")
    p.add_argument("--notify", action="append", help="HOST:PORT of servers to tell to load it (repeatable; every "
                   "address the name resolves to)")
    p.add_argument("--admin-token-file", type=Path, help="file with the servers' admin token, for --notify")
    p.add_argument("--notify-tls", action="store_true", help="--notify over TLS, trusting the system's authorities")
    p.add_argument("--notify-ca-cert", type=Path, help="--notify over TLS, trusting this PEM certificate (authority)")
    g = commands.add_parser("gc", help="remove what publishes killed halfway left in a store")
    g.add_argument("--store", "--adapters", required=True, help="adapter store: a directory or s3://BUCKET/PREFIX")
    g.add_argument("--s3-endpoint-url", help="with an s3:// store: the S3-compatible service's endpoint")
    g.add_argument("--min-age", type=float, default=600.0,
                   help="seconds a leftover must be old before it is removed (younger ones may be a publish running)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from server.model.quant import quiet_bitsandbytes

    quiet_bitsandbytes()
    args = build_parser().parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"  # of a torchrun / accelerate launch, or the one process
    logging.basicConfig(level=args.log_level.upper() if main_rank else "ERROR",  # the others would repeat it
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "gc":
        return _gc(args)
    token = args.admin_token_file.read_text().strip() if args.admin_token_file else os.environ.get("HOTLORA_ADMIN_TOKEN")
    reach = {"admin_token": token, "tls": args.notify_tls,  # how --notify reaches the servers
             "ca_cert": args.notify_ca_cert.read_bytes() if args.notify_ca_cert else None}
    from server.errors import HotloraError
    from server.model.source import ModelNotFound

    from .acceptance import AcceptanceError
    from .data import DataError

    try:
        if args.command == "fit":
            return _fit(args, reach)
        return _publish(args, reach)
    except (DataError, AcceptanceError, ModelNotFound, ValueError, HotloraError) as exc:
        # the same on every rank of a launch (data, settings, checkpoints; acceptance runs on rank 0
        # alone): said once, by rank 0; a rank that fails alone dies of something else, which its
        # traceback and torchrun's summary name
        if main_rank:
            print(f"trainer {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _fit(args, reach: dict) -> int:
    import yaml

    from . import acceptance, distributed, publish
    from .config import build, merge
    from .fit import device_and_dtype, fit

    from_file = (yaml.safe_load(args.config.read_text()) or {}) if args.config else {}
    flags = {k: v for k, v in vars(args).items()
             if k not in ("command", "config", "log_level", "admin_token_file", "no_progress", "model_cache",
                          "notify_tls", "notify_ca_cert")}
    values = merge(from_file, flags)
    values["base"] = _base_model(values.get("base"), args.model_cache)
    config = build(values)
    if config.publish:  # a bucket it cannot write is said now, not after the training
        publish.store_of(config.store, config.s3_endpoint_url or None).check_writable()
    ranks = distributed.start(config.fsdp)  # one process, or this one's rank in a torchrun / accelerate launch
    progress = _Progress(enabled=not args.no_progress and ranks.main)
    result = fit(config, on_step=progress.update if ranks.main else None, ranks=ranks)
    progress.close()
    if not ranks.main:  # rank 0 saves, checks and publishes the adapter every rank holds
        return 0
    state = result.state

    adapter_dir = config.run_dir / "adapter"
    result.model.save_pretrained(adapter_dir, safe_serialization=True)
    summary = {"steps": state.step, "train_loss": state.last_loss, "first_train_loss": state.first_loss,
               "eval_loss": state.eval_loss, "eval_perplexity": _perplexity(state.eval_loss),
               "tokens_seen": state.tokens_seen, "wall_time_s": round(state.wall_time_s, 2),
               "stopped_early": state.stopped_early, "optimizer": result.optimizer_note,
               # with early stopping the adapter saved is the best evaluated one, not the last
               "adapter_step": result.adapter_step, "best_eval_loss": None if state.best_step == 0 else state.best_eval_loss}
    (config.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"trained {config.name}: {json.dumps(summary)}")
    if not config.publish:
        print(f"adapter saved to {adapter_dir} (not published: --no-publish)")
        return 0

    prompts = acceptance.prompts_from(result.eval or result.train, config.acceptance_prompts)
    report = acceptance.check(config.base, adapter_dir, result.model, prompts, config.rank)
    from .data import file_sha256

    record = publish.manifest(config.base, result.tokenizer, device_and_dtype()[1], report, {
        "data_file": str(config.data), "data_sha256": file_sha256(config.data),
        "records": {"train": len(result.train), "eval": len(result.eval)},
        "hyperparameters": config.hyperparameters(), "metrics": summary, "trainer": "hotlora trainer fit"})
    stored = publish.publish(config.store, config.name, adapter_dir, record, config.s3_endpoint_url or None)
    print(f"published {config.name}@{stored.version} to {config.store} "
          f"(acceptance on {report.engine}: engine vs trained model {report.max_relative_difference:.1e}, "
          f"tolerance {report.tolerance:.1e}, adapter effect {report.adapter_effect:.2f}, "
          f"greedy agreement {report.greedy_agreement:.0%})")
    if config.notify:
        publish.notify(config.notify, config.name, stored.version, **reach)
    return 0


def _gc(args) -> int:
    from server.adapters.store import ObjectStoreOptions, open_store
    from server.errors import HotloraError

    try:
        removed = open_store(args.store, ObjectStoreOptions(endpoint_url=args.s3_endpoint_url)).collect_garbage(args.min_age)
    except HotloraError as exc:
        print(f"trainer gc: error: {exc}", file=sys.stderr)
        return 2
    for leftover in removed:
        print(f"removed {leftover}")
    print(f"{len(removed)} leftovers of killed publishes removed from {args.store}")
    return 0


def _publish(args, reach: dict) -> int:
    from . import publish
    from .fit import device_and_dtype

    from server.adapters.store import check_location

    check_location(args.store)  # before the acceptance check: an s3:// typo must not become a directory
    publish.store_of(args.store, args.s3_endpoint_url).check_writable()  # wrong credentials: said before any work
    prompts = args.prompt or ["Hello!", "What is this adapter for?", "Tell me something you know."]
    base = _base_model(args.base, args.model_cache)
    report, tokenizer = publish.check_foreign_adapter(base, args.adapter_dir, prompts)
    record = publish.manifest(base, tokenizer, device_and_dtype()[1], report,
                              {"source": str(args.adapter_dir), "trainer": "external (trainer publish)"})
    stored = publish.publish(args.store, args.name, args.adapter_dir, record, args.s3_endpoint_url)
    print(f"published {args.name}@{stored.version} to {args.store}")
    if args.notify:
        publish.notify(tuple(args.notify), args.name, stored.version, **reach)
    return 0


def _base_model(named: str | None, cache: Path | None) -> Path:
    """The checkpoint directory of the base model named (nothing: the built-in one; a .gguf file:
    converted once into the cache)."""
    from server.model.source import default_cache_dir, resolve

    source = resolve(named, cache or default_cache_dir())
    log.info("base model: %s", source.describe())
    return source.path


def _perplexity(loss: float | None) -> float | None:
    import math

    return None if loss is None else math.exp(min(loss, 50))


class _Progress:
    """tqdm bar with loss, learning rate and tokens/s; plain log lines with --no-progress."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def update(self, state, logs: dict) -> None:
        text = f"loss {logs['loss']:.3f} lr {logs['lr']:.2e} {logs['tokens_per_s']:.0f} tok/s"
        if "eval_loss" in logs:
            text += f" eval {logs['eval_loss']:.3f} ppl {logs['eval_perplexity']:.1f}"
        if not self.enabled:
            log.info("step %d: %s", state.step, text)
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(desc="trainer fit", unit="step", total=state.total_steps, initial=state.step - 1, dynamic_ncols=True)
        self.bar.update(1)
        self.bar.set_postfix_str(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
