"""The product's loop end to end: a server already running on an empty store; `trainer fit`
publishes an adapter and notifies it; the server serves it with no restart, and its greedy answer
equals the trained PEFT model's own greedy answer (transformers + peft on the same NF4 base)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clients import Client, NotFound
from server.config import AdapterConfig, EngineConfig, ServerConfig
from tests.helpers import RunningServer
from trainer.demo.make_dataset import write as write_dataset

BIN = Path(sys.executable).parent
QUESTION = [{"role": "user", "content": "Where does Brie come from?"}]


@pytest.mark.slow
def test_server_serves_what_trainer_fit_just_published(llama_dir, tmp_path):
    data = tmp_path / "cheese.jsonl"
    write_dataset(data)
    data.write_text("\n".join(data.read_text().splitlines()[:30]) + "\n")
    store = tmp_path / "store"
    store.mkdir()
    config = ServerConfig(model_dir=llama_dir, host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0,
                          engine=EngineConfig(max_batch_size=2, max_seq_len=128, max_adapters=2, max_rank=16),
                          adapters=AdapterConfig(store=store, poll_interval_s=0.2))
    with RunningServer(config) as server, Client(server.target) as client:
        with pytest.raises(NotFound):
            client.generate(QUESTION, adapter="cheese", max_new_tokens=4)
        port = server.server.port

        fit = subprocess.run([str(BIN / "trainer"), "fit", "--base", str(llama_dir), "--data", str(data), "--name", "cheese",
                              "--store", str(store), "--output-dir", str(tmp_path / "run"), "--max-steps", "15", "--rank", "8",
                              "--learning-rate", "0.02", "--max-seq-len", "96", "--batch-size", "4", "--notify", server.target,
                              "--no-progress"], capture_output=True, text=True, timeout=300)
        assert fit.returncode == 0, fit.stderr[-3000:]
        assert "now serves cheese@v1" in fit.stderr

        served = client.generate(QUESTION, adapter="cheese", max_new_tokens=20, temperature=0.0)
        assert served.adapter_version == "v1" and server.server.port == port  # the same server, never restarted
        base = client.generate(QUESTION, max_new_tokens=20, temperature=0.0)

    # Both stop at EOS (and include it) or after 20 tokens.
    assert served.token_ids == peft_greedy(llama_dir, tmp_path / "run" / "adapter", 20)
    assert served.token_ids != base.token_ids


def peft_greedy(base_dir, adapter_dir, n):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tests.helpers import reference_nf4_model

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    model = PeftModel.from_pretrained(reference_nf4_model(base_dir), adapter_dir).eval()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


