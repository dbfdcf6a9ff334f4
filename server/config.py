"""Frozen configuration, parsed once at the edge (flags/env in main.py) and passed down."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_PATHS = ("auto", "dequantize-once", "dequantize", "cpu-fused", "cpu-bf16-packed", "triton")  # see server/model/quant.py
KERNELS = ("auto", "triton", "cpu", "torch")  # see server/kernels/__init__.py
# The KV pool on CPU when the sequence length is the model's: SmolLM2's 8,192 positions x 8 rows
# would take 3 GiB; this holds 2.8 of its full-length sequences, about 23,000 tokens.
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class QuantConfig:
    """How the base projections are stored. QLoRA's NF4 with double quantization by default."""

    enabled: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64


@dataclass(frozen=True)
class EngineConfig:
    """Capacity of one engine. Everything here is preallocated at start-up.

    max_batch_size: sequences in flight (decoded together) at most.
    max_seq_len: prompt + generated tokens per sequence: a per-request limit, not a reservation.
      None: the model's own limit (max_position_embeddings, or what its RoPE scaling extends it
      to; a sliding window shorter than that bounds it too), bounded by what one sequence can take
      from the KV pool. A value beyond the model's limit is refused.
    max_adapters: LoRA slots on the device (slot 0, the base model, comes on top).
    max_rank: largest LoRA rank a slot holds; smaller ranks are zero-padded (exact).
    kv_cache_bytes: memory for the paged KV cache (server/model/kv_cache.py), in blocks of
      kv_block_size tokens; sequences take blocks as they grow, so many short ones fit where few
      max_seq_len ones would. It must hold one max_seq_len sequence. None: max_batch_size
      sequences of max_seq_len (every row can be full at once; nothing is ever preempted), on
      CUDA at most kv_cache_fraction of the device memory free once the weights are loaded, and
      on CPU, when max_seq_len is the model's (None), at most DEFAULT_CPU_KV_CACHE_BYTES.
    kv_block_size: tokens per KV cache block.
    kv_cache_fraction: on CUDA without kv_cache_bytes, the share of free device memory the KV
      pool may take (the rest is left for activations, CUDA graphs and the allocator).
    prefix_caching: share the KV blocks of prompt prefixes already computed, per adapter version
      (server/engine/blocks.py); a request prefills only what follows its longest cached prefix.
    max_queue: requests waiting for admission before submit() refuses with ResourceExhausted.
    max_queue_per_adapter: requests one adapter (or the base model) may have waiting; None = half
      of max_queue, so one adapter's flood always leaves room for the others. Admission takes
      waiting requests round robin across adapters (S-LoRA style), not in global arrival order.
    max_prefill_tokens: padded prompt tokens prefilled together in one step (bounds activation
      memory; a longer single prompt is still admitted alone).
    prefill_chunk_tokens: a prompt longer than this is prefilled this many tokens per step, one
      chunk per step while the running sequences keep decoding, so a long prompt never stalls
      them for its whole prefill. None: whole prompts in one step.
    device / dtype: None picks CUDA+bfloat16 when available, else CPU+float32.
    kernels: "triton" runs LoRA (BGMV/SGMV) and NF4 through server/kernels' Triton kernels,
      "cpu" runs NF4 ("cpu-fused"), the LM head and decode attention through server/kernels'
      C kernels (CPU only; float32 sums in their own order), "torch" everything through plain
      torch and bitsandbytes, "auto" Triton on CUDA, and on CPU "cpu" wherever the C kernels can
      run the model (float32, NF4 rows of whole 32-multiple blocks, a C compiler, no compile=True),
      else "torch" (one log line says why).
      On CPU Triton works only under its interpreter (TRITON_INTERPRET=1; slow, for tests).
    nf4_path: how the NF4 base projections are multiplied (server/model/quant.py): "auto" follows
      `kernels`; "dequantize-once" keeps a copy dequantized in the compute dtype at load and
      matmuls with it, the trained model's own numbers (the CPU's with kernels="torch"; a dense copy's memory);
      "dequantize" the same numbers dequantizing on every call (no copy); "triton" reads the
      packed bits in a Triton kernel; "cpu-fused" reads them in a C kernel on CPU (float32,
      only the summation order differs from dequantize-once; auto's choice with kernels="cpu");
      "cpu-bf16-packed" opts into bitsandbytes' AVX512-BF16 kernel (CPU only,
      bfloat16 error).
    kernel_build_dir: where C kernels built on first use are kept (None: a temporary directory
      for the process).
    compile: run the decode step through torch.compile, which fuses the many small ops around
      the NF4 matmuls (norms, RoPE, LoRA masks, adds). Start-up then compiles its few variants
      (a C++ compiler must be installed on CPU); the results are the eager forward's. torch keeps
      at most 8 compiled variants per function, so serve one compiled engine per process.
    cuda_graphs: on CUDA (without compile), capture the decode step at padded batch sizes as CUDA
      graphs at start-up (server/engine/decode_step.py); if capture fails the engine logs why and decodes
      eagerly (hotlora_engine_info's cuda_graphs says "failed"). Ignored elsewhere.
    """

    max_batch_size: int = 8
    max_seq_len: int | None = None
    max_adapters: int = 4
    max_rank: int = 16
    kv_cache_bytes: int | None = None
    kv_block_size: int = 16
    kv_cache_fraction: float = 0.8
    prefix_caching: bool = True
    max_queue: int = 256
    max_queue_per_adapter: int | None = None
    max_prefill_tokens: int = 4096
    prefill_chunk_tokens: int | None = None
    device: str | None = None
    dtype: str | None = None
    quant: QuantConfig = QuantConfig()
    seed: int = 0
    kernels: str = "auto"
    nf4_path: str = "auto"
    kernel_build_dir: str | None = None
    compile: bool = False
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.kernels not in KERNELS:
            raise ValueError(f"EngineConfig.kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.nf4_path not in NF4_PATHS:
            raise ValueError(f"EngineConfig.nf4_path must be one of {NF4_PATHS}, got {self.nf4_path!r}")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 1:
            raise ValueError(f"EngineConfig.prefill_chunk_tokens must be >= 1, got {self.prefill_chunk_tokens}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"EngineConfig.kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.max_queue_per_adapter is not None and self.max_queue_per_adapter < 1:
            raise ValueError(f"EngineConfig.max_queue_per_adapter must be >= 1, got {self.max_queue_per_adapter}")
        for field in ("max_batch_size", "max_seq_len", "max_adapters", "max_rank", "max_queue", "max_prefill_tokens",
                      "kv_block_size"):
            if getattr(self, field) is not None and getattr(self, field) < 1:
                raise ValueError(f"EngineConfig.{field} must be >= 1, got {getattr(self, field)}")

    @property
    def queue_per_adapter(self) -> int:
        return self.max_queue_per_adapter or max(1, (self.max_queue + 1) // 2)

    def resolved_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return getattr(torch, self.dtype)
        return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32


@dataclass(frozen=True)
class AdapterConfig:
    """Where adapters come from and how many are kept in host memory.

    store: the adapter store: a directory, or s3://bucket/prefix (server/adapters/store.py's open_store);
      None serves only path-loaded adapters.
    s3_endpoint_url: an S3-compatible service's endpoint (None: boto3's chain, AWS_ENDPOINT_URL included).
    cache_dir / cache_bytes: where an object store's versions are kept once downloaded, and how many
      bytes they may take (least recently used removed first). A cache directory holds one store's
      versions; None: a directory per store under hotlora-adapter-cache-<uid> in the temporary directory.
    poll_interval_s: how often the store's `current` pointers are checked for new versions.
    host_cache_size: validated adapter versions held in host memory (those in device slots
      included); idle ones beyond it are dropped least-recently-used and read again from their
      source when next used.
    host_cache_bytes: the same, bounded by the bytes their packed images take (pinned memory on
      CUDA, server/lora/host_tier.py); None = only the count bounds it.
    allowed_paths: directories LoadAdapter(path=...) may read from; empty = path loads refused.
    load_workers: adapter versions read and validated at once. Loads run on threads of their own,
      so slow or huge ones never take the threads that serve other requests.
    """

    store: str | Path | None = None
    s3_endpoint_url: str | None = None
    cache_dir: Path | None = None
    cache_bytes: int | None = 8 << 30
    poll_interval_s: float = 2.0
    host_cache_size: int = 32
    host_cache_bytes: int | None = None
    allowed_paths: tuple[Path, ...] = ()
    load_workers: int = 2

    def __post_init__(self) -> None:
        if self.host_cache_size < 1 or self.poll_interval_s <= 0 or self.load_workers < 1:
            raise ValueError("AdapterConfig: host_cache_size and load_workers must be >= 1 and poll_interval_s > 0")
        if self.host_cache_bytes is not None and self.host_cache_bytes < 1:
            raise ValueError("AdapterConfig: host_cache_bytes must be >= 1")


@dataclass(frozen=True)
class RequestLimits:
    """Checked on the raw request before any work, so an oversized one costs the server nothing.
    max_prompt_bytes: UTF-8 bytes of the prompt, or of all chat messages together.
    max_messages: chat messages per request.
    max_samples: samples of one prompt a request may ask for (OpenAI's n).
    max_prompts: prompts in one /v1/completions request (a list of prompts; lm-evaluation-harness
    sends its batch so)."""

    max_prompt_bytes: int = 1 << 20
    max_messages: int = 1024
    max_samples: int = 16
    max_prompts: int = 64

    def __post_init__(self) -> None:
        if min(self.max_prompt_bytes, self.max_messages, self.max_samples, self.max_prompts) < 1:
            raise ValueError("RequestLimits: max_prompt_bytes, max_messages, max_samples and max_prompts must be >= 1")


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC server around one engine. admin_token: when set, the Adapters service requires
    `authorization: Bearer <token>`. grace_period_s: how long SIGTERM waits for running requests.
    max_adapter_labels: distinct adapter names that get their own metrics label (the rest share
    "other"), which bounds the metrics' cardinality. http_port: the OpenAI-compatible HTTP API's
    port (None: off; 0: any free port). served_model_name: the base model's name in that API's
    `model` and in ListModels ("": the model directory's name; main.py sets the built-in model's).
    api_key_file: when set, generation over HTTP and gRPC needs `Authorization: Bearer <key>`, a key
    of this file (server/serving/api_keys.py); tenants_file instead gives each customer its keys, adapters,
    quotas and share of the batch (server/serving/tenants.py); usage_log: a directory for the usage log's
    JSONL files (server/serving/usage_log.py); tls_cert/tls_key serve both protocols. model_dir: a checkpoint directory;
    main.py resolves what the user named (nothing: the built-in model; a .gguf file) into one,
    cached under model_cache, and logs where it came from."""

    model_dir: Path | None
    engine: EngineConfig = EngineConfig()
    adapters: AdapterConfig = AdapterConfig()
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9400
    tls_cert: Path | None = None
    tls_key: Path | None = None
    admin_token: str | None = None
    api_key_file: Path | None = None
    tenants_file: Path | None = None
    usage_log: Path | None = None
    grace_period_s: float = 25.0
    default_max_new_tokens: int = 256
    max_adapter_labels: int = 64
    limits: RequestLimits = RequestLimits()
    http_host: str = "0.0.0.0"
    http_port: int | None = None
    served_model_name: str = ""
    model_cache: Path | None = None

    def __post_init__(self) -> None:
        if (self.api_key_file is not None or self.tenants_file is not None) and self.admin_token is None:
            raise ValueError("ServerConfig: api_key_file and tenants_file need admin_token (the Adapters service "
                             "would be open)")
        if self.api_key_file is not None and self.tenants_file is not None:
            raise ValueError("ServerConfig: give api_key_file or tenants_file, not both (a tenant with adapters: ['*'] "
                             "and base: true is what the key file's keys are)")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_dir.name
