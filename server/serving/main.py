"""`hotlora-server`: flags (or HOTLORA_* environment variables) -> ServerConfig -> Server -> serve.

    hotlora-server --model DIR --adapters STORE [--port 50051 --metrics-port 9400 ...]
    hotlora-server make-model DIR [--preset small]     # a seeded random-weight checkpoint

Every flag can also come from the environment: --max-batch-size from HOTLORA_MAX_BATCH_SIZE, and
so on; a flag on the command line wins. SIGTERM/SIGINT drain: health turns NOT_SERVING, new
requests get UNAVAILABLE, running ones get up to --grace-period seconds to finish.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from pathlib import Path

import grpc

from ..config import KERNELS, NF4_PATHS, AdapterConfig, EngineConfig, RequestLimits, ServerConfig
from ..adapters.store import check_location
from ..errors import InvalidRequest, UnsupportedModel
from ..model.source import BUILTIN, ModelNotFound, default_cache_dir
from .api_keys import ApiKeys
from .tenants import Tenants

log = logging.getLogger("hotlora.server")

SUBCOMMANDS = {"make-model": "server.model.factory"}
SERVICE_NAMES = ("hotlora.v1.Generation", "hotlora.v1.Adapters")
# Health names: readiness ("" and the services) is SERVING only while the model is loaded and the
# server is not draining; LIVENESS stays SERVING for as long as the process can answer, so a
# liveness probe does not kill a pod that is loading its model or draining.
LIVENESS = "liveness"


class Server:
    """The engine, the adapter manager, the gRPC services, health, reflection and metrics."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._http = None
        self._grpc: grpc.aio.Server | None = None
        self.usage_log = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from protos.hotlora.v1 import adapters_pb2, generation_pb2

        from ..adapters.manager import AdapterManager
        from ..engine.engine import Engine
        from ..metrics import Metrics
        from .generation import LoadedModel, Generations
        from .grpc_service import AdaptersService, GenerationService, add_to_server
        from ..adapters.store import base_fingerprint
        from ..engine.structured import GrammarCompiler
        from .text import TextCodec

        c = self.config
        self.metrics = Metrics(c.max_adapter_labels)
        self.health = health.aio.HealthServicer()
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        from .usage_log import UsageLog

        self.usage_log = UsageLog(c.usage_log) if c.usage_log is not None else None
        self.generations = Generations(self.metrics, c.default_max_new_tokens, c.limits, usage_log=self.usage_log)
        tenants = Tenants(c.tenants_file) if c.tenants_file is not None else None
        access = tenants or (ApiKeys(c.api_key_file) if c.api_key_file is not None else None)
        generation = GenerationService(self.generations, access)
        admin = AdaptersService(c.admin_token, self.generations, tenants)
        self._grpc = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        add_to_server(self._grpc, generation, generation_pb2.DESCRIPTOR.services_by_name["Generation"])
        add_to_server(self._grpc, admin, adapters_pb2.DESCRIPTOR.services_by_name["Adapters"])
        names = (generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
                 adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self._grpc)
        address = f"{c.host}:{c.port}"
        if c.tls_cert is not None:
            credentials = grpc.ssl_server_credentials([(c.tls_key.read_bytes(), c.tls_cert.read_bytes())])
            self.port = self._grpc.add_secure_port(address, credentials)
        else:
            self.port = self._grpc.add_insecure_port(address)
        await self._grpc.start()  # health answers NOT_SERVING, the others UNAVAILABLE, while the model loads
        self.metrics_port = self.metrics.serve(c.metrics_host, c.metrics_port)
        if c.http_port is not None:  # answers 503 too until the model is loaded
            from .http_api import HttpServer, build_app

            tls = (c.tls_cert, c.tls_key) if c.tls_cert is not None else None
            self._http = HttpServer(build_app(self.generations, access), c.http_host, c.http_port, tls)
            self.http_port = await self._http.start()

        self.engine = await asyncio.to_thread(Engine.from_pretrained, c.model_dir, c.engine)
        codec = await asyncio.to_thread(TextCodec.from_pretrained, c.model_dir)
        fingerprint = await asyncio.to_thread(base_fingerprint, c.model_dir)
        self.manager = AdapterManager(self.engine, c.adapters, self.metrics, fingerprint)
        self.metrics.watch_engine(self._stats, self.manager.tier_counts)
        self.metrics.watch_adapters(self.manager.lora_activity, c.engine.max_adapters)
        self.metrics.watch_store(lambda: self.manager.store.unreachable if self.manager.store is not None else None)
        self.metrics.describe_kv_cache(self.engine.cache.block_size, self.engine.cache.num_blocks)
        self.engine.observe_slot_write = self.metrics.adapter_slot_write.observe
        self.engine.observe_adapter_miss = self.metrics.adapter_miss_wait.observe
        self.metrics.describe_engine(self.engine.describe())
        grammars = await asyncio.to_thread(GrammarCompiler, codec.tokenizer, self.engine.spec.vocab_size)
        if not grammars.available:
            log.warning("%s: requests with structured output will be refused", grammars.unavailable)
        self.generations.loaded = LoadedModel(self.engine, self.manager, codec, grammars, c.model_name)
        self.manager.start_watching()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving gRPC on %s:%d (%s), metrics on %s:%d/metrics%s", c.host, self.port,
                 "TLS" if c.tls_cert else "plaintext", c.metrics_host, self.metrics_port,
                 f", OpenAI-compatible HTTP on {c.http_host}:{self.http_port}/v1" if self._http else "")

    def _stats(self) -> dict:
        """The engine's counts, its queue widened to the requests waiting for their adapter version
        to be read (they are queued on this replica as much as the engine's own)."""
        stats = self.engine.stats()
        stats["queue_length"] += self.manager.waiting_for_load
        return stats

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new work, let running requests finish within the grace period."""
        if self._stopped.is_set():
            return
        grace = self.config.grace_period_s if grace is None else grace
        log.info("draining (grace period %.1fs)", grace)
        if self._grpc is None:  # never started
            self._stopped.set()
            return
        from grpc_health.v1 import health_pb2

        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        engine = getattr(self, "engine", None)  # absent when stopped while the model was loading
        if engine is not None:
            await asyncio.to_thread(engine.close, False, grace)
            if engine.alive:
                log.warning("grace period over: cancelling the requests still running")
                await asyncio.to_thread(engine.close, True, 10.0)
        await self.health.enter_graceful_shutdown()
        if self._http is not None:
            await self._http.stop()
        await self._grpc.stop(1.0)
        if getattr(self, "manager", None) is not None:
            self.manager.close()
        if self.usage_log is not None:
            self.usage_log.close()  # after the last request was metered
        self.metrics.close()
        self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default, where it says something (not None, "" or False) and the help does not
    already describe it."""

    def _get_help_string(self, action):
        if action.default in (None, "", False, argparse.SUPPRESS) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(environ: dict[str, str]) -> argparse.ArgumentParser:
    """hotlora-server's flags, in groups; each defaults to its HOTLORA_<FLAG> variable in `environ`."""
    p = argparse.ArgumentParser(
        prog="hotlora-server", formatter_class=HelpFormatter,
        usage="%(prog)s [--model DIR|FILE.gguf] [--adapters STORE] [options]\n       %(prog)s make-model DIR [--preset small]",
        description="Serve one NF4 base model with per-request LoRA adapters over gRPC.",
        epilog="`hotlora-server make-model DIR --preset PRESET` writes a random-weight checkpoint to try it on "
               "(`hotlora-server make-model --help` lists the presets).")

    def flag(group, name: str, *aliases: str, **kwargs):
        env = "HOTLORA_" + name.lstrip("-").replace("-", "_").upper()
        if env in environ:
            kwargs["default"] = environ[env]
            kwargs.pop("required", None)
        kwargs["help"] = f"{kwargs.get('help', '')} [env {env}]".strip()
        group.add_argument(name, *aliases, **kwargs)

    group = p.add_argument_group("model", "the base model and how it computes")
    flag(group, "--model", type=Path,
         help="Hugging Face checkpoint directory (config.json + safetensors), or a .gguf file (converted once into "
              f"--model-cache); default: the built-in {BUILTIN.name}")
    flag(group, "--model-cache", type=Path, default=default_cache_dir(environ),
         help="where converted models are kept (default: $XDG_CACHE_HOME/hotlora/models)")
    flag(group, "--served-model-name", default=ServerConfig.served_model_name,
         help="the base model's name in the HTTP API's `model` and in ListModels (default: the model's own: the --model "
              f"directory's or file's name, or {BUILTIN.name})")
    flag(group, "--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    flag(group, "--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    flag(group, "--kernels", choices=KERNELS, default="auto",
         help="LoRA and NF4 kernels: triton (server/kernels), cpu (C kernels for NF4, the LM head and decode attention: "
              "CPU only, float32 sums in their own order, built on first use with the system's C compiler into the "
              "model cache), torch, or auto (triton on CUDA; on CPU cpu wherever the model and a C compiler allow it, "
              "else torch, saying why)")
    flag(group, "--nf4-path", choices=NF4_PATHS, default="auto",
         help="how NF4 weights are multiplied: auto (follows --kernels), dequantize-once (the trained model's numbers from "
              "a copy dequantized at load: fast, 4 bytes per weight in float32), dequantize (the same numbers, "
              "dequantized per call: no copy), "
              "triton, cpu-fused (a C kernel reads the NF4 codes in place: CPU only, float32; --kernels cpu's choice), "
              "or cpu-bf16-packed (bitsandbytes' AVX512-BF16 kernel, "
              "CPU only, bf16 error)")
    flag(group, "--compile", action="store_true", help="torch.compile the decode step (compiles at start-up; on CPU needs a C++ compiler)")
    flag(group, "--no-cuda-graphs", action="store_true", help="on CUDA, decode eagerly instead of replaying captured CUDA graphs")
    group = p.add_argument_group("adapters", "the adapter store, device slots and the host tier")
    flag(group, "--adapters", help="adapter store: a directory, or s3://BUCKET/PREFIX on S3 or an S3-compatible "
                                   "service (docs/adapters.md); omit to serve path-loaded adapters only")
    flag(group, "--s3-endpoint-url", help="with an s3:// store: the S3-compatible service's endpoint (default: boto3's "
                                          "chain, AWS_ENDPOINT_URL included)")
    flag(group, "--adapter-cache-dir", type=Path,
         help="with an s3:// store: where downloaded versions are kept, one store per directory (default: a "
              "directory per store under hotlora-adapter-cache-<uid> in the temporary directory)")
    flag(group, "--adapter-cache-bytes", type=int, default=AdapterConfig.cache_bytes,
         help="with an s3:// store: bytes the downloaded versions may take (least recently used removed first)")
    flag(group, "--max-adapters", type=int, default=EngineConfig.max_adapters, help="LoRA slots on the device")
    flag(group, "--max-rank", type=int, default=EngineConfig.max_rank, help="largest LoRA rank served")
    flag(group, "--host-cache-adapters", "--cpu-cache-adapters", type=int, default=AdapterConfig.host_cache_size,
         help="adapter versions kept in host memory, the host tier (--cpu-cache-adapters: its former name)")
    flag(group, "--host-cache-bytes", type=int,
         help="bytes of (pinned, on CUDA) host memory the adapter versions held there may take (default: no byte limit)")
    flag(group, "--adapter-load-workers", type=int, default=AdapterConfig.load_workers,
         help="adapter versions read and validated at once, on threads of their own")
    flag(group, "--store-poll-interval", type=float, default=AdapterConfig.poll_interval_s, help="seconds between checks of the store")
    flag(group, "--adapter-path-allow", type=Path, action="append", default=[], help="directory LoadAdapter(path=) may read (repeatable)")
    group = p.add_argument_group("batching and KV cache", "sequences in flight and the memory their keys and values take")
    flag(group, "--max-batch-size", type=int, default=EngineConfig.max_batch_size, help="sequences decoded together")
    flag(group, "--max-seq-len", type=int, default=EngineConfig.max_seq_len,
         help="prompt + generated tokens per sequence (default: the model's positions, cut to what one sequence can "
              "take from the KV cache; refused beyond the model's positions)")
    flag(group, "--kv-cache-bytes", type=int,
         help="memory for the paged KV cache; sequences take blocks as they grow (default: --max-batch-size "
              "sequences of --max-seq-len, on CUDA at most --kv-cache-fraction of free memory, on CPU without "
              "--max-seq-len at most 1 GiB)")
    flag(group, "--kv-block-size", type=int, default=EngineConfig.kv_block_size, help="tokens per KV cache block")
    flag(group, "--kv-cache-fraction", type=float, default=EngineConfig.kv_cache_fraction,
         help="on CUDA without --kv-cache-bytes: the share of free device memory the KV cache may take")
    flag(group, "--no-prefix-caching", action="store_true",
         help="do not share the KV blocks of prompt prefixes already computed (shared per adapter version by default)")
    flag(group, "--prefill-chunk-tokens", type=int,
         help="prefill prompts longer than this in chunks of it, one per step, so running streams keep going")
    flag(group, "--max-queue", type=int, default=EngineConfig.max_queue, help="waiting requests before RESOURCE_EXHAUSTED")
    flag(group, "--max-queue-per-adapter", type=int,
         help="waiting requests one adapter (or the base model) may have (default: half of --max-queue)")
    group = p.add_argument_group("request limits", "what one request may ask for, and its defaults")
    flag(group, "--default-max-new-tokens", type=int, default=ServerConfig.default_max_new_tokens, help="when a request sets none")
    flag(group, "--max-prompt-bytes", type=int, default=RequestLimits.max_prompt_bytes,
         help="largest prompt (or all chat messages) in UTF-8 bytes, refused before tokenizing")
    flag(group, "--max-messages", type=int, default=RequestLimits.max_messages, help="most chat messages in one request")
    flag(group, "--max-samples", type=int, default=RequestLimits.max_samples,
         help="most samples of one prompt a request may ask for (OpenAI's n, gRPC's n)")
    flag(group, "--max-prompts", type=int, default=RequestLimits.max_prompts,
         help="most prompts in one /v1/completions request (a list of prompts, as lm-evaluation-harness batches)")
    flag(group, "--seed", type=int, default=0, help="seed for requests that set none")
    group = p.add_argument_group("security", "TLS, API keys and the admin token (docs/security.md)")
    flag(group, "--tls-cert", type=Path, help="PEM certificate chain; with --tls-key serves TLS (gRPC and the HTTP API)")
    flag(group, "--tls-key", type=Path, help="PEM private key")
    flag(group, "--api-key-file", type=Path,
         help="file of API keys, one per line, re-read when it changes: generation over HTTP and gRPC then needs "
              "'Authorization: Bearer <key>' (health and metrics stay open; admin calls keep the admin token)")
    flag(group, "--admin-token-file", type=Path, help="file holding the bearer token the Adapters service requires")
    flag(group, "--tenants-file", type=Path,
         help="YAML file of tenants (docs/tenants.md), re-read when it changes: each its keys, the adapters it may "
              "see and call, its limits and its share of the batch (instead of --api-key-file; needs "
              "--admin-token-file)")
    flag(group, "--usage-log", type=Path,
         help="directory for the usage log: one JSON line per finished request (tenant, key id, adapter, tokens, "
              "latency, status), fsynced in batches, a new file every 64 MiB")
    group = p.add_argument_group("network", "where gRPC, the HTTP API and the metrics listen")
    flag(group, "--host", default="0.0.0.0", help="bind address of gRPC, and of metrics and the HTTP API unless "
                                          "--metrics-host/--http-host say otherwise")
    flag(group, "--port", type=int, default=50051, help="gRPC port (0 = any free port)")
    flag(group, "--http-host", help="OpenAI-compatible HTTP API bind address (default: --host)")
    flag(group, "--http-port", type=int,
         help="serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models) on this "
              "port beside gRPC (0 = any free port; default: off)")
    flag(group, "--metrics-host", help="metrics bind address (default: --host)")
    flag(group, "--metrics-port", type=int, default=9400, help="Prometheus /metrics port (0 = any free port)")
    group = p.add_argument_group("operations", "draining, metrics labels, logs")
    flag(group, "--grace-period", type=float, default=ServerConfig.grace_period_s, help="seconds SIGTERM waits for running requests")
    flag(group, "--max-adapter-labels", type=int, default=ServerConfig.max_adapter_labels, help="adapter names with their own metrics label")
    flag(group, "--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    return p


def parse_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    environ = os.environ if environ is None else environ
    p = build_parser(environ)
    a = p.parse_args(argv)

    if (a.tls_cert is None) != (a.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    for given, name in ((a.api_key_file, "--api-key-file"), (a.tenants_file, "--tenants-file")):
        if given is not None and a.admin_token_file is None:
            p.error(f"{name} needs --admin-token-file too: with keys on generation, the Adapters service "
                    "(load, pin, unload) must not be open to anyone")
    if a.api_key_file is not None and a.tenants_file is not None:
        p.error("give --api-key-file or --tenants-file, not both: in a tenants file, the key file's keys are a tenant "
                "with adapters: ['*'] and base: true")
    try:
        if a.api_key_file is not None:
            ApiKeys(Path(a.api_key_file))
        if a.tenants_file is not None:
            Tenants(Path(a.tenants_file))  # a bad file is refused here, with the line at fault
    except ValueError as exc:
        p.error(str(exc))
    token = None
    if a.admin_token_file is not None:
        token = Path(a.admin_token_file).read_text().strip()
        if not token:
            p.error(f"--admin-token-file {a.admin_token_file} is empty")
    allowed = a.adapter_path_allow if isinstance(a.adapter_path_allow, list) else [Path(a.adapter_path_allow)]
    num = lambda value, kind=int: None if value is None else kind(value)  # noqa: E731  env values are strings
    compile_decode = _flag_value(p, "HOTLORA_COMPILE", a.compile)
    no_cuda_graphs = _flag_value(p, "HOTLORA_NO_CUDA_GRAPHS", a.no_cuda_graphs)
    no_prefix_caching = _flag_value(p, "HOTLORA_NO_PREFIX_CACHING", a.no_prefix_caching)
    try:
        engine = EngineConfig(max_batch_size=num(a.max_batch_size), max_seq_len=num(a.max_seq_len),
                              max_adapters=num(a.max_adapters), max_rank=num(a.max_rank), max_queue=num(a.max_queue),
                              max_queue_per_adapter=num(a.max_queue_per_adapter),
                              prefill_chunk_tokens=num(a.prefill_chunk_tokens),
                              kv_cache_bytes=num(a.kv_cache_bytes), kv_block_size=num(a.kv_block_size),
                              kv_cache_fraction=num(a.kv_cache_fraction, float), device=a.device, dtype=a.dtype, seed=num(a.seed),
                              kernels=a.kernels, nf4_path=a.nf4_path, compile=compile_decode,
                              cuda_graphs=not no_cuda_graphs, prefix_caching=not no_prefix_caching)
        limits = RequestLimits(max_prompt_bytes=num(a.max_prompt_bytes), max_messages=num(a.max_messages),
                               max_samples=num(a.max_samples), max_prompts=num(a.max_prompts))
        adapters = AdapterConfig(store=check_location(a.adapters) if a.adapters else None,
                                 s3_endpoint_url=a.s3_endpoint_url or None,
                                 cache_dir=a.adapter_cache_dir and Path(a.adapter_cache_dir),
                                 cache_bytes=num(a.adapter_cache_bytes), allowed_paths=tuple(Path(x) for x in allowed),
                                 host_cache_size=num(a.host_cache_adapters), host_cache_bytes=num(a.host_cache_bytes),
                                 load_workers=num(a.adapter_load_workers),
                                 poll_interval_s=num(a.store_poll_interval, float))
    except (ValueError, InvalidRequest) as exc:
        p.error(str(exc))
    logging.basicConfig(level=str(a.log_level).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return ServerConfig(
        model_dir=Path(a.model) if a.model else None, model_cache=Path(a.model_cache), engine=engine,
        adapters=adapters, host=a.host, port=num(a.port),
        metrics_host=a.metrics_host or a.host, metrics_port=num(a.metrics_port), tls_cert=a.tls_cert and Path(a.tls_cert),
        tls_key=a.tls_key and Path(a.tls_key), admin_token=token,
        api_key_file=a.api_key_file and Path(a.api_key_file), tenants_file=a.tenants_file and Path(a.tenants_file),
        usage_log=a.usage_log and Path(a.usage_log), grace_period_s=num(a.grace_period, float),
        default_max_new_tokens=num(a.default_max_new_tokens), max_adapter_labels=num(a.max_adapter_labels),
        limits=limits, http_host=a.http_host or a.host, http_port=num(a.http_port), served_model_name=a.served_model_name)


def _flag_value(parser: argparse.ArgumentParser, env: str, value) -> bool:
    """A store_true flag, or its environment variable's words."""
    if isinstance(value, str) and value.lower() not in TRUE_WORDS + FALSE_WORDS:
        parser.error(f"{env}={value!r}: use one of {TRUE_WORDS + FALSE_WORDS}")
    return value is True or str(value).lower() in TRUE_WORDS


async def serve(config: ServerConfig) -> None:
    server = Server(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    await server.start()
    # What start-up built (model, tokenizer, grammars, the imported libraries: hundreds of thousands
    # of objects) lives as long as the process; frozen, the collector's full passes stop walking it
    # between decode steps (~2% of a CPU step's time in profiles).
    gc.freeze()
    http = f", http port {server.http_port}" if server.http_port is not None else ""
    print(f"hotlora-server ready: grpc port {server.port}, metrics port {server.metrics_port}{http}", flush=True)
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    from ..model.quant import quiet_bitsandbytes

    quiet_bitsandbytes()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
        return 0
    config = parse_args(argv)
    try:  # one line on failure; nothing here ever looks a model up on a hub
        config = with_model_resolved(config)
        check_sequence_length(config)
    except (ModelNotFound, UnsupportedModel) as exc:
        print(f"hotlora-server: error: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(config))
    return 0


def with_model_resolved(config: ServerConfig) -> ServerConfig:
    """The config with model_dir a checkpoint directory: the built-in model or a .gguf file is
    converted into the cache on first use. The served name defaults to the model's own. C kernels
    (--kernels cpu) are built into the same cache, in .kernels/, unless the engine names a place."""
    from dataclasses import replace

    from ..model.source import resolve

    cache = config.model_cache or default_cache_dir()
    source = resolve(config.model_dir, cache)
    log.info("model: %s", source.describe())
    engine = config.engine
    if engine.kernel_build_dir is None:
        engine = replace(engine, kernel_build_dir=str(Path(cache) / ".kernels"))
    return replace(config, model_dir=source.path, served_model_name=config.served_model_name or source.name,
                   engine=engine)


def check_sequence_length(config: ServerConfig) -> None:
    """A --max-seq-len beyond the model's positions is refused (UnsupportedModel) before anything
    starts, from the model's config alone."""
    from transformers import AutoConfig

    from ..model.llama import sequence_limit

    sequence_limit(AutoConfig.from_pretrained(config.model_dir, local_files_only=True), config.engine.max_seq_len)


if __name__ == "__main__":
    sys.exit(main())
