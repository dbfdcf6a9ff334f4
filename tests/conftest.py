from __future__ import annotations

import os

import pytest
import torch

# Without CUDA, Triton kernels run under Triton's interpreter on CPU tensors; it is chosen when a
# kernel is defined, so this must be set before any module with kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from server.model.factory import make_model
from tests.helpers import make_peft_adapter


def pytest_collection_modifyitems(config, items):
    # Files with slow tests first, each file's tests kept together: `make test` hands whole files to
    # its workers (pytest-xdist, --dist loadfile), and a long file started last would run alone at the end.
    slow_files = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within a file stays
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (its CPU twin runs here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """One checkpoint per supported shape: Llama with GQA, Qwen2 with q/k/v bias, Mistral, tied embeddings."""
    root = tmp_path_factory.mktemp("models")
    return {preset: make_model(root / preset, preset, seed=1) for preset in ("tiny", "tiny-qwen2", "tiny-mistral", "tiny-tied")}


@pytest.fixture(scope="session")
def llama_dir(model_dirs):
    return model_dirs["tiny"]


@pytest.fixture(scope="session")
def peft_adapters(llama_dir, tmp_path_factory):
    """Three adapters that differ in rank, target modules and scaling (plain, rank_pattern and
    alpha_pattern, rsLoRA). Names avoid substrings of 'lora_' (peft warns about those)."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "cheese": make_peft_adapter(llama_dir, root / "cheese", seed=11, r=4, lora_alpha=8,
                                    target_modules=["q_proj", "v_proj"]),
        "wine": make_peft_adapter(llama_dir, root / "wine", seed=12, r=8, lora_alpha=16, target_modules="all-linear",
                                  rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 6}),
        "bread": make_peft_adapter(llama_dir, root / "bread", seed=13, r=16, lora_alpha=16, use_rslora=True,
                                   target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"]),
    }


@pytest.fixture(scope="session")
def cheese_and_wine_store(peft_adapters, tmp_path_factory):
    """An adapter store with cheese@v1 and wine@v1 (tests that change a store make their own)."""
    from server.adapters.store import AdapterStore

    store = AdapterStore(tmp_path_factory.mktemp("store"))
    for name in ("cheese", "wine"):
        store.publish(name, peft_adapters[name])
    return store


@pytest.fixture(scope="session")
def aligned_model(tmp_path_factory):
    """The "tiny-aligned" Llama (every projection input whole 64-weight NF4 blocks, what the NF4
    kernels read) and two adapters that differ in rank and target modules: (model_dir, adapters)."""
    root = tmp_path_factory.mktemp("aligned")
    model_dir = make_model(root / "model", "tiny-aligned", seed=1)
    adapters = {
        "cheese": make_peft_adapter(model_dir, root / "cheese", seed=11, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "wine": make_peft_adapter(model_dir, root / "wine", seed=12, r=8, lora_alpha=16, target_modules="all-linear",
                                  rank_pattern={"down_proj": 2}),
    }
    return model_dir, adapters


@pytest.fixture(scope="session")
def cheese_data(tmp_path_factory):
    """A slice of the demo's cheese dataset (JSONL); small, so a training run takes seconds."""
    from trainer.demo.make_dataset import write

    path = tmp_path_factory.mktemp("data") / "cheese.jsonl"
    write(path)
    lines = path.read_text().splitlines()[:24]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def smollm2_dir():
    """The built-in SmolLM2-135M-Instruct as a user gets it: the installed wheel's GGUF converted
    into the model cache (once per machine; HOTLORA_MODEL_CACHE moves it)."""
    from server.model.source import default_cache_dir, resolve

    return resolve(None, default_cache_dir()).path


@pytest.fixture(scope="session")
def s3():
    """A real S3-protocol server (moto's) on loopback, with test credentials in the environment
    (boto3's standard chain reads them, in this process and in the ones it starts)."""
    pytest.importorskip("moto.server")
    import logging

    from tests.helpers import S3Server

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = S3Server()
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
