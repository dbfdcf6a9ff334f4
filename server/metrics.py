"""Prometheus metrics, served on their own HTTP port at /metrics.

Each server owns a CollectorRegistry (tests run several servers in one process). Gauges that
describe the engine's state are read at scrape time, not pushed from the hot path.

The `adapter` label is bounded: the first `max_adapter_labels` distinct adapter names get their
own label value, every later name is counted under "other", and the base model is "base". Only
names that resolved to an adapter become labels; a request whose adapter did not (an invalid or
unknown name) counts under "unresolved", so a client cannot use up the budget with junk names.
Versions are never labels (they would grow without bound as the trainer publishes).
"""

from __future__ import annotations

import threading
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

UNRESOLVED = "unresolved"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SLOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    def __init__(self, max_adapter_labels: int = 64, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._max_labels = max_adapter_labels
        self._labels: set[str] = set()
        self._labels_lock = threading.Lock()
        r = self.registry
        self.requests = Counter("hotlora_requests", "Generation requests by adapter, outcome (the gRPC status code's name, "
                                "whichever protocol carried it) and protocol (grpc, http).",
                                ["adapter", "code", "protocol"], registry=r)
        self.request_duration = Histogram("hotlora_request_duration_seconds", "Time from receiving a request to its last token.",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("hotlora_time_to_first_token_seconds", "Time from receiving a request to its first token.",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("hotlora_time_per_output_token_seconds",
                                               "Mean time between output tokens after the first, per request.",
                                               buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("hotlora_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("hotlora_generation_tokens", "Tokens generated, by adapter.", ["adapter"], registry=r)
        self.adapter_loads = Counter("hotlora_adapter_loads", "Adapter versions read and validated, by result (ok, rejected, error).",
                                     ["result"], registry=r)
        self.adapter_load_duration = Histogram("hotlora_adapter_load_duration_seconds", "Time to read and validate one adapter version.",
                                               buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_slot_write = Histogram("hotlora_adapter_slot_write_seconds",
                                            "Time to copy one adapter from the host tier into a device slot (issue to completion).",
                                            buckets=SLOT_BUCKETS, registry=r)
        self.adapter_miss_wait = Histogram("hotlora_adapter_miss_wait_seconds",
                                           "Submit to admission of requests whose adapter had no device slot when they were "
                                           "first up for admission (the miss penalty, queueing included).",
                                           buckets=LATENCY_BUCKETS, registry=r)
        for result in ("ok", "rejected", "error"):
            self.adapter_loads.labels(result)
        self._http = None

    def adapter_label(self, name: str | None) -> str:
        if not name:
            return "base"
        with self._labels_lock:
            if name in self._labels:
                return name
            if len(self._labels) < self._max_labels:
                self._labels.add(name)
                return name
        return "other"

    def watch_engine(self, stats: Callable[[], dict], tiers: Callable[[], dict[str, int]]) -> None:
        """Scrape-time gauges: queue, running requests, KV cache use, adapters per tier."""
        gauges = {
            "hotlora_queue_length": ("Requests waiting for admission.", "queue_length"),
            "hotlora_running_requests": ("Requests being decoded.", "running"),
            "hotlora_kv_cache_usage_ratio": ("Fraction of the KV cache's blocks in use.", "kv_cache_usage_ratio"),
        }
        for name, (doc, key) in gauges.items():
            Gauge(name, doc, registry=self.registry).set_function(lambda key=key: stats()[key])
        self.registry.register(_TierCollector(tiers))
        self.registry.register(_KVCollector(stats))

    def describe_engine(self, description: dict[str, str]) -> None:
        """hotlora_engine_info{device, dtype, nf4_path, lora_kernels, compiled, cuda_graphs} 1: how this replica
        computes, so a fleet's mixed CPU/GPU paths show up in one query."""
        Info("hotlora_engine", "How the engine computes: device, dtype, NF4 matmul path, LoRA kernels, compiled decode, CUDA graphs (on, off, failed).",
             registry=self.registry).info(dict(sorted(description.items())))

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server; returns the bound port (useful with port 0)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _TierCollector:
    def __init__(self, tiers: Callable[[], dict[str, int]]):
        self._tiers = tiers

    def describe(self):
        return [GaugeMetricFamily("hotlora_adapters_loaded", "Adapter versions by tier (device: in a LoRA slot, host: in memory, store).", labels=["tier"])]

    def collect(self):
        family = GaugeMetricFamily("hotlora_adapters_loaded", "Adapter versions by tier (device: in a LoRA slot, host: in memory, store).", labels=["tier"])
        for tier, count in self._tiers().items():
            family.add_metric([tier], count)
        yield family


class _KVCollector:
    """The paged KV cache's blocks by state, the sequences preempted when they ran out, and the
    prefix cache's prompt and hit tokens."""

    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats

    def describe(self):
        return [GaugeMetricFamily("hotlora_kv_cache_blocks", _BLOCKS, labels=["state"]),
                CounterMetricFamily("hotlora_preemptions", _PREEMPTIONS),
                CounterMetricFamily("hotlora_prefix_cache_prompt_tokens", _PROMPT_TOKENS),
                CounterMetricFamily("hotlora_prefix_cache_hit_tokens", _HIT_TOKENS)]

    def collect(self):
        stats = self._stats()
        blocks = GaugeMetricFamily("hotlora_kv_cache_blocks", _BLOCKS, labels=["state"])
        blocks.add_metric(["used"], stats["kv_blocks_used"])
        blocks.add_metric(["free"], stats["kv_blocks_free"])
        yield blocks
        yield CounterMetricFamily("hotlora_preemptions", _PREEMPTIONS, value=stats["preemptions"])
        yield CounterMetricFamily("hotlora_prefix_cache_prompt_tokens", _PROMPT_TOKENS,
                                  value=stats["prefix_cache_prompt_tokens"])
        yield CounterMetricFamily("hotlora_prefix_cache_hit_tokens", _HIT_TOKENS, value=stats["prefix_cache_hit_tokens"])


_BLOCKS = "KV cache blocks in use by sequences (used) and free."
_PREEMPTIONS = "Running sequences whose KV blocks were taken back to let older ones grow (recomputed later)."
_PROMPT_TOKENS = "Prompt tokens admitted (the prefix cache's hit rate is hit_tokens / this)."
_HIT_TOKENS = "Prompt tokens whose keys came from the prefix cache instead of being prefilled."
