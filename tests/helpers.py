"""Builders shared by the tests: tiny checkpoints, PEFT adapters made by peft itself, and the
transformers + bitsandbytes + PEFT reference that the engine is checked against."""

from __future__ import annotations

from pathlib import Path

import torch

NF4_REFERENCE = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                     bnb_4bit_compute_dtype=torch.float32)


def make_peft_adapter(base_dir: Path, out_dir: Path, seed: int, **lora_kwargs) -> Path:
    """Train nothing: a LoRA with random A and B (init_lora_weights=False so B != 0), saved by
    peft's save_pretrained exactly as a real adapter would be."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    lora_kwargs.setdefault("init_lora_weights", False)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    model.save_pretrained(out_dir)
    return out_dir


def tampered_adapter(adapter: Path, out: Path, how: str) -> Path:
    """A copy of a PEFT adapter directory with its weights made wrong: "B x<factor>" scales every
    B, "swap 2 layers" swaps layers 0 and 1's q_proj A and B, "file B = 0" zeroes every B."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    path = out / "adapter_model.safetensors"
    weights = load_file(path)
    if how.startswith("B x"):
        factor = float(how.removeprefix("B x"))
        weights = {k: v * factor if "lora_B" in k else v for k, v in weights.items()}
    elif how == "file B = 0":
        weights = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()}
    elif how == "swap 2 layers":
        first = next(k for k in sorted(weights) if ".layers.0." in k and "q_proj.lora_B" in k)
        second = first.replace(".layers.0.", ".layers.1.")
        for a, b in ((first, second), (first.replace("lora_B", "lora_A"), second.replace("lora_B", "lora_A"))):
            weights[a], weights[b] = weights[b], weights[a]
    else:
        raise ValueError(how)
    save_file(weights, path)
    return out


def reference_nf4_model(base_dir: Path):
    """transformers + bitsandbytes NF4, computing as the trained model does (dequantize + matmul in
    float32) on every CPU: bitsandbytes would otherwise switch to bf16 on AVX512-BF16 CPUs."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from server.model.quant import keep_linear4bit_on_dequantize

    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=BitsAndBytesConfig(**NF4_REFERENCE), dtype=torch.float32, device_map="cpu"
    )
    assert keep_linear4bit_on_dequantize(model) > 0
    return model.eval()


def reference_peft_model(base_dir: Path, adapters: dict[str, Path]):
    """transformers (NF4) + PEFT with every adapter loaded under its name."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(reference_nf4_model(base_dir), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def assert_peft_generates_the_same(base_dir: Path, adapters: dict[str, Path], prompts: list[list[int]],
                                  names: list[str | None], outputs) -> None:
    """Each engine output's greedy tokens are what PEFT's generate gives for its prompt and
    adapter (None: the base model), and the adapters really change the tokens."""
    peft = reference_peft_model(base_dir, adapters)
    for prompt, name, out in zip(prompts, names, outputs):
        with torch.no_grad():
            want = peft.generate(input_ids=torch.tensor([prompt]), adapter_names=[name or "__base__"],
                                 max_new_tokens=len(out.token_ids), do_sample=False)[0, len(prompt):]
        assert out.token_ids == want.tolist(), f"adapter {name}"
    assert len({tuple(o.token_ids) for o in outputs}) > 1


class RunningServer:
    """A real hotlora Server on port 0 (gRPC and metrics), on its own event loop in a thread, so
    tests can use the generated synchronous stubs against it."""

    def __init__(self, config):
        import asyncio
        import threading

        from server.serving.main import Server

        self.loop = asyncio.new_event_loop()
        self.server = Server(config)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self.server.start())
        host = config.host if config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        self.target = f"{host}:{self.server.port}"

    def call(self, coroutine, timeout: float = 120):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def channel(self):
        import grpc

        return grpc.insecure_channel(self.target)

    def stop(self, grace: float = 5.0) -> None:
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def fail_on_recompile() -> None:
    """Turn a torch.compile recompile into an error. Dynamo's config is per thread: run this on the
    engine's thread (engine._call_on_engine_thread(fail_on_recompile))."""
    torch._dynamo.config.error_on_recompile = True


def decode_batch(rows: int, device: str = "cpu", block_size: int = 16):
    """A decode step of up to 4 rows at different positions, row i on LoRA slot i (row 0: base)
    and on KV block i (an idle engine's cache: the step writes each row's new key there), its
    block table padded as the engine pads them (with blocks that are masked out)."""
    from server.model.llama import ForwardBatch

    positions = torch.tensor([[9], [4], [12], [6]][:rows], device=device)
    blocks = torch.arange(rows, device=device)
    return ForwardBatch(tokens=torch.tensor([[5], [17], [42], [99]][:rows], device=device), positions=positions,
                        slots=blocks * block_size + positions[:, 0],
                        block_tables=blocks[:, None].repeat(1, 3).to(torch.int32),
                        token_slots=torch.arange(rows, device=device), prefill=False, kv_length=13)


def wait_until(condition, timeout: float = 30.0) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    import time

    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) PEM files for `localhost`, valid for a day (openssl)."""
    import subprocess

    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


class S3Server:
    """moto's S3 server in a thread, on a fixed loopback port so it can be stopped and started
    again; its buckets live in this process, so they survive a restart as a real bucket would.
    Other processes reach it over HTTP like any S3 endpoint."""

    def __init__(self):
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None
        self.start()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        self._server.stop()
        self._server = None

    def running(self) -> bool:
        return self._server is not None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def bucket(self) -> str:
        """A new empty bucket's name."""
        import uuid

        name = f"adapters-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name
