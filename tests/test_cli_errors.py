"""The command-line tools as a newcomer meets them: a missing model directory is one line and exit
status 2 (nothing is looked up on a hub), and --help shows every default from the config
dataclasses, so help and behaviour cannot drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("command", [
    ["hotlora-server", "--model", "/nonexistent/model"],
    ["trainer", "fit", "--base", "/nonexistent/model", "--data", "x.jsonl", "--name", "a", "--store", "/tmp/unused"],
    ["trainer", "publish", "/tmp", "--base", "/nonexistent/model", "--name", "a", "--store", "/tmp/unused"],
], ids=["server", "trainer fit", "trainer publish"])
def test_a_missing_model_directory_is_one_line(command):
    run = subprocess.run([str(BIN / command[0]), *command[1:]], capture_output=True, text=True, timeout=120)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and "/nonexistent/model: no such directory" in last, run.stderr[-2000:]
    assert "Traceback" not in run.stderr


def test_server_help_shows_the_config_defaults_and_the_make_model_command():
    from server.config import AdapterConfig, EngineConfig, RequestLimits, ServerConfig
    from server.serving.main import parse_args

    run = subprocess.run([str(BIN / "hotlora-server"), "--help"], capture_output=True, text=True, timeout=60)
    assert "make-model DIR" in run.stdout.split("\n\n")[0]  # in the usage lines
    for group in ("model", "adapters", "batching and KV cache", "request limits", "security", "network"):
        assert f"\n{group}:\n" in run.stdout, group  # flags grouped by topic
    text = " ".join(run.stdout.split())
    for flag, value in [("--max-adapters", EngineConfig.max_adapters), ("--max-batch-size", EngineConfig.max_batch_size),
                        ("--max-queue", EngineConfig.max_queue), ("--port", ServerConfig.port),
                        ("--store-poll-interval", AdapterConfig.poll_interval_s),
                        ("--max-prompt-bytes", RequestLimits.max_prompt_bytes)]:
        option = f"{flag} {flag[2:].upper().replace('-', '_')} "  # the flag with its metavar, in the options list
        assert f"(default: {value})" in text.split(option, 1)[1].split(" --", 1)[0], flag
    defaults = parse_args(["--model", "m"], environ={})  # what no flag means is what the dataclasses say
    assert defaults.engine == EngineConfig() and defaults.adapters == AdapterConfig() and defaults.limits == RequestLimits()
    assert (defaults.port, defaults.metrics_port, defaults.grace_period_s) == (ServerConfig.port, ServerConfig.metrics_port,
                                                                              ServerConfig.grace_period_s)
    assert (defaults.http_port, defaults.http_host, defaults.model_name) == (ServerConfig.http_port, ServerConfig.http_host, "m")


def test_trainer_fit_help_groups_its_flags_and_says_fitconfigs_defaults():
    import argparse

    from trainer.cli import build_parser
    from trainer.config import FitConfig

    parser = build_parser()
    fit = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["fit"]
    text = " ".join(fit.format_help().split())
    for group in ("model and data", "LoRA", "training", "evaluation and checkpoints", "publishing"):
        assert f" {group}: " in text, group
    for flag, value in [("--rank", FitConfig.rank), ("--dropout", FitConfig.dropout),
                        ("--max-seq-len", FitConfig.max_seq_len), ("--eval-every", FitConfig.eval_every),
                        ("--weight-decay", FitConfig.weight_decay)]:
        option = f"{flag} {flag[2:].upper().replace('-', '_')} "  # the flag with its metavar, in the options list
        assert f"(default: {value})" in text.split(option, 1)[1].split(" --", 1)[0], flag
