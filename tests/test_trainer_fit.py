"""`trainer fit` on a tiny model on CPU: the loss halves, an interrupted-and-resumed run ends with
the adapter an uninterrupted one makes, and the CLI leaves the files it promises (the acceptance
check has its own tests/test_acceptance.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import FitConfig
from trainer.fit import fit

BIN = Path(sys.executable).parent


def tiny_config(llama_dir, data, tmp_path, **overrides) -> FitConfig:
    settings = dict(base=llama_dir, data=data, name="cheese", store=tmp_path / "store", output_dir=tmp_path / "run",
                    rank=8, max_seq_len=96, batch_size=4, learning_rate=2e-2, max_steps=60, eval_every=20,
                    checkpoint_every=20, eval_fraction=0.15, seed=5)
    settings.update(overrides)
    return FitConfig(**settings)


@pytest.mark.slow
def test_loss_halves_on_tiny_data(llama_dir, cheese_data, tmp_path):
    result = fit(tiny_config(llama_dir, cheese_data, tmp_path, rank=16, max_steps=150))
    assert result.state.step == 150 and len(result.losses) == 150
    assert result.losses[-1] <= result.losses[0] / 2, result.losses
    assert result.state.eval_loss is not None and result.state.eval_loss < result.losses[0]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_with_the_same_adapter(llama_dir, cheese_data, tmp_path):
    """Dropout on, a cosine schedule and several epochs: RNG, optimizer, scheduler and data
    position all have to come back for the adapters to agree."""
    whole = tiny_config(llama_dir, cheese_data, tmp_path / "whole", max_steps=12, checkpoint_every=4, dropout=0.1,
                        keep_checkpoints=5)
    fit(whole)

    parted = replace(whole, output_dir=tmp_path / "parted" / "run")

    def crash_at_step_6(state, logs):
        if state.step == 6:
            raise Interrupt  # like Ctrl-C between checkpoints: steps 5-6 are lost and redone

    with pytest.raises(Interrupt):
        fit(parted, on_step=crash_at_step_6)
    assert sorted(p.name for p in (parted.run_dir / "checkpoints").iterdir()) == ["step-00000004"]
    resumed = fit(replace(parted, resume=True))
    assert resumed.state.step == 12

    final = lambda cfg: load_file(cfg.run_dir / "checkpoints" / "step-00000012" / "adapter.safetensors")  # noqa: E731
    a, b = final(whole), final(parted)
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    start = load_file(parted.run_dir / "checkpoints" / "step-00000004" / "adapter.safetensors")
    assert any(not torch.equal(start[k], b[k]) for k in b)  # training really went on after the resume


@pytest.fixture
def no_process_group_left():
    """fit with --fsdp and no launcher starts a one-rank process group in this process."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("fsdp", [False, True], ids=["one-process", "fsdp-one-rank"])
def test_early_stopping_keeps_the_best_evaluated_adapter_not_the_last(llama_dir, cheese_data, tmp_path, fsdp,
                                                                      no_process_group_left):
    """A learning rate high enough to overfit the 24 records: the eval loss falls, then rises
    until patience runs out. The adapter kept is the one whose checkpoint evaluated best. With
    --fsdp (one rank, in this process) the best adapter is gathered from the shards and kept on the
    whole copy of the base that the run ends with."""
    from peft import get_peft_model_state_dict

    config = tiny_config(llama_dir, cheese_data, tmp_path, learning_rate=0.1, max_steps=40, eval_every=2,
                         checkpoint_every=2, keep_checkpoints=40, early_stopping_patience=3, fsdp=fsdp)
    evaluated = {}
    result = fit(config, on_step=lambda state, logs: evaluated.update({state.step: logs["eval_loss"]} if "eval_loss" in logs else {}))
    best_step = min(evaluated, key=evaluated.get)
    assert result.state.stopped_early and best_step < result.state.step  # the last adapter is not the best one
    assert evaluated[result.state.step] > evaluated[best_step]
    assert result.adapter_step == result.state.best_step == best_step
    kept = {k: v.cpu() for k, v in get_peft_model_state_dict(result.model).items()}
    at_best = load_file(config.run_dir / "checkpoints" / f"step-{best_step:08d}" / "adapter.safetensors")
    assert kept.keys() == at_best.keys() and kept
    for key in kept:
        torch.testing.assert_close(kept[key], at_best[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_cli_fit_trains_checks_and_publishes(llama_dir, cheese_data, tmp_path):
    (tmp_path / "fit.yaml").write_text("rank: 4\nmax_steps: 8\nlearning_rate: 0.005\nmax_seq_len: 96\nbatch_size: 4\n")
    run = subprocess.run([str(BIN / "trainer"), "fit", "--base", str(llama_dir), "--data", str(cheese_data), "--name", "cheese",
                          "--store", str(tmp_path / "store"), "--config", str(tmp_path / "fit.yaml"), "--max-steps", "6",
                          "--output-dir", str(tmp_path / "run"), "--checkpoint-every", "3", "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "published cheese@v1" in run.stdout and "non-paged" in run.stderr

    version = tmp_path / "store" / "cheese" / "v1"
    assert (tmp_path / "store" / "cheese" / "current").read_text().strip() == "v1"
    assert sorted(p.name for p in version.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["hyperparameters"]["rank"] == 4 and manifest["metrics"]["steps"] == 6  # YAML, then the flag won
    for key in ["base_fingerprint", "quantization", "chat_template_sha256", "eos_token_ids", "data_sha256", "metrics",
                "acceptance", "created_at", "schema_version"]:
        assert key in manifest, key
    assert manifest["quantization"] == {"quant_type": "nf4", "double_quant": True, "blocksize": 64, "compute_dtype": "float32"}
    accepted = manifest["acceptance"]  # the calibrated figures (tests/test_acceptance.py)
    assert accepted["engine"] == "cpu float32 nf4=dequantize-once" and accepted["positions"] > accepted["prompts"] > 0
    assert accepted["max_relative_difference"] <= accepted["tolerance"] < accepted["adapter_effect"]
    assert accepted["tolerance"] >= 3 * accepted["noise_floor"] and accepted["greedy_agreement"] == 1.0
    assert 0 <= accepted["kl_mean"] <= accepted["kl_max"] < 1e-4
    for key in ["train_loss", "eval_loss", "eval_perplexity", "tokens_seen", "wall_time_s"]:
        assert manifest["metrics"][key] is not None, key
    assert json.loads((version / "adapter_config.json").read_text())["r"] == 4
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "summary.json").exists() and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_cli_refuses_unusable_data_before_training(llama_dir, tmp_path, capsys):
    """In this process (the CLI's own code; tests/test_trainer_distributed.py runs it in a launch)."""
    from trainer.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "no output"}\nnot json\n')
    assert main(["fit", "--base", str(llama_dir), "--data", str(bad), "--name", "x", "--store", str(tmp_path / "store"),
                 "--output-dir", str(tmp_path / "run")]) == 2
    said = capsys.readouterr().err
    assert "line 1:" in said and "line 2:" in said
    assert not (tmp_path / "run").exists() and not (tmp_path / "store").exists()


def test_trainer_publish_checks_and_publishes_an_adapter_made_elsewhere(llama_dir, peft_adapters, tmp_path, capsys):
    from tests.helpers import make_peft_adapter

    def publish(adapter_dir, name, base_flag="--base", store_flag="--store"):
        return subprocess.run([str(BIN / "trainer"), "publish", str(adapter_dir), base_flag, str(llama_dir), "--name", name,
                               store_flag, str(tmp_path / "store")], capture_output=True, text=True, timeout=300)

    done = publish(peft_adapters["wine"], "wine", "--model", "--adapters")  # hotlora-server's names work too
    assert done.returncode == 0 and "published wine@v1" in done.stdout, done.stderr[-2000:]
    manifest = json.loads((tmp_path / "store" / "wine" / "v1" / "manifest.json").read_text())
    assert manifest["acceptance"]["max_relative_difference"] <= manifest["acceptance"]["tolerance"]
    # made elsewhere: its template is not known, so the base's own is recorded (the trainer's default never is)
    from transformers import AutoTokenizer

    assert manifest["chat_template"] == AutoTokenizer.from_pretrained(llama_dir).chat_template

    untrained = make_peft_adapter(llama_dir, tmp_path / "untrained", seed=1, r=4, init_lora_weights=True)  # B = 0
    from trainer.cli import main  # in this process this time: the same code, without an interpreter's start-up

    capsys.readouterr()
    assert main(["publish", str(untrained), "--base", str(llama_dir), "--name", "untrained", "--store",
                 str(tmp_path / "store")]) == 2
    assert "does nothing" in capsys.readouterr().err
    assert not (tmp_path / "store" / "untrained").exists()


def test_layers_to_transform_trains_only_those_layers_and_the_engine_serves_them(llama_dir, cheese_data, tmp_path):
    """What `make demo` does on SmolLM2 (--layers-to-transform), on the tiny model's layer 1 of 2."""
    from server.engine import Engine, EngineConfig, Request
    from trainer.config import parse_layers

    assert parse_layers("22-29") == list(range(22, 30)) and parse_layers("0,2-3") == [0, 2, 3] and parse_layers("") is None
    for bad in ("x", "3-", "-1", "5-2", "1,,2"):
        with pytest.raises(ValueError, match="layers_to_transform"):
            parse_layers(bad)
    config = tiny_config(llama_dir, cheese_data, tmp_path, layers_to_transform="1", max_steps=6, gradient_checkpointing=False)
    assert config.targets() == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    result = fit(config)
    result.model.save_pretrained(tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert keys and all(".layers.1." in k for k in keys) and len(keys) == 14  # 7 projections x A, B
    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=2, max_seq_len=64, max_adapters=1, max_rank=8))
    try:
        engine.load_adapter("top", tmp_path / "adapter")
        prompt = [5, 17, 42, 99]
        served, base = engine.score([Request(prompt_ids=prompt, adapter="top"), Request(prompt_ids=prompt)])
        with torch.no_grad():
            want = result.model(input_ids=torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(served, want, rtol=0, atol=1e-4)
        assert (served - base).abs().max() > 1e-3  # six steps at lr 2e-2 moved it
    finally:
        engine.close()
