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
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

UNRESOLVED = "unresolved"

# The inference gateway's model-server protocol (kubernetes-sigs/gateway-api-inference-extension,
# docs/proposals/003-model-server-protocol): each metric the Endpoint Picker reads, by the name of
# its (pre-v1.5) flag, and the hotlora metric that answers it, with vLLM's equivalent. v1.5.0 takes
# the names in its config file instead (a core-metrics-extractor engineConfig, as
# deploy/k8s/overlays/inference-gateway gives them). Served on the HTTP port's /metrics (where the
# picker scrapes vLLM too) and on the metrics port.
PROTOCOL_METRICS = {
    "total-queued-requests-metric": "hotlora_queue_length",  # vllm:num_requests_waiting
    "total-running-requests-metric": "hotlora_running_requests",  # vllm:num_requests_running
    "kv-cache-usage-percentage-metric": "hotlora_kv_cache_usage_ratio",  # vllm:kv_cache_usage_perc
    "lora-info-metric": "hotlora_lora_requests_info",  # vllm:lora_requests_info
    "cache-info-metric": "hotlora_cache_config_info",  # vllm:cache_config_info
}
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
        # by adapter (the bounded label: its first --max-adapter-labels names, then "other"), so a slow
        # adapter shows up against the fleet; aggregate with sum by (le)
        self.request_duration = Histogram("hotlora_request_duration_seconds", "Time from receiving a request to its last "
                                          "token, by adapter.", ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("hotlora_time_to_first_token_seconds", "Time from receiving a request to its "
                                             "first token, by adapter.", ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("hotlora_time_per_output_token_seconds",
                                               "Mean time between output tokens after the first, per request, by adapter.",
                                               ["adapter"], buckets=TOKEN_BUCKETS, registry=r)
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
        # by tenant (server/serving/tenants.py): the label's values are the tenants file's names
        # ("default" without one), so the file bounds them
        self.tenant_requests = Counter("hotlora_tenant_requests", "Generation requests by tenant and outcome (the gRPC "
                                       "status code's name).", ["tenant", "code"], registry=r)
        self.tenant_prompt_tokens = Counter("hotlora_tenant_prompt_tokens", "Prompt tokens by tenant (cached ones "
                                            "included).", ["tenant"], registry=r)
        self.tenant_cached_tokens = Counter("hotlora_tenant_cached_tokens", "Prompt tokens by tenant whose keys came "
                                            "from the prefix cache.", ["tenant"], registry=r)
        self.tenant_completion_tokens = Counter("hotlora_tenant_completion_tokens", "Tokens generated, by tenant.",
                                                ["tenant"], registry=r)
        self.tenant_rejections = Counter("hotlora_tenant_rejections", "Requests refused for a limit, by tenant and "
                                         "reason: concurrent, requests_per_minute, tokens_per_minute (its quotas), "
                                         "queue (the engine's queue was full).", ["tenant", "reason"], registry=r)
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
            "hotlora_queue_length": ("Requests (samples) waiting for admission: in the engine's queue, or for their "
                                     "adapter version to be read.", "queue_length"),
            "hotlora_running_requests": ("Requests (samples) admitted: being prefilled or decoded.", "running"),
            "hotlora_kv_cache_usage_ratio": ("Fraction of the KV cache's blocks held by sequences (cached blocks "
                                             "nobody holds count as free).", "kv_cache_usage_ratio"),
        }
        for name, (doc, key) in gauges.items():
            Gauge(name, doc, registry=self.registry).set_function(lambda key=key: stats()[key])
        self.registry.register(_TierCollector(tiers))
        self.registry.register(_KVCollector(stats))

    def watch_adapters(self, activity: Callable[[], tuple[list[str], list[str]]], max_lora: int) -> None:
        """hotlora_lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}: the
        adapters held in memory and those requests wait for, as vLLM's vllm:lora_requests_info gives
        them to the inference gateway's LoRA affinity (its value: when they last changed).

        vLLM lists the adapters of its running requests; hotlora lists every adapter it holds,
        in a device slot or in the host tier, because what affinity saves is the store read: a
        held adapter's next request costs at most a copy into a slot between two steps."""
        self.registry.register(_LoraCollector(activity, max_lora))

    def watch_store(self, unreachable: Callable[[], str | None]) -> None:
        """hotlora_adapter_store_reachable: 1 while the adapter store answers (or there is none), 0
        while it cannot be reached (an object store: network, credentials, a missing bucket,
        throttling)."""
        Gauge("hotlora_adapter_store_reachable", "1 while the adapter store answers; 0 while it cannot be reached "
              "(the versions in memory keep serving).", registry=self.registry).set_function(
            lambda: 0.0 if unreachable() is not None else 1.0)

    def describe_kv_cache(self, block_size: int, num_blocks: int) -> None:
        """hotlora_cache_config_info{block_size, num_gpu_blocks} 1, as vLLM's vllm:cache_config_info
        (the gateway's prefix-cache scorer reads both)."""
        Info("hotlora_cache_config", "The KV cache's block size (tokens) and block count.",
             registry=self.registry).info({"block_size": str(block_size), "num_gpu_blocks": str(num_blocks)})

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


class _LoraCollector:
    """One series whose labels say which adapters are resident and which are waited for; its value
    is the time (unix seconds) the labels last changed, so the gateway can tell the newest."""

    LABELS = ["max_lora", "running_lora_adapters", "waiting_lora_adapters"]
    DOC = ("LoRA adapters held in memory, in a device slot or the host tier (running), and adapters requests wait for: "
           "a slot or a read from the store (waiting); comma-separated, as requests name them; max_lora: device slots. "
           "Value: when the labels last changed (unix seconds).")

    def __init__(self, activity: Callable[[], tuple[list[str], list[str]]], max_lora: int):
        self._activity = activity
        self._max_lora = max_lora
        self._lock = threading.Lock()
        self._labels: tuple[str, str, str] | None = None
        self._changed = 0.0

    def describe(self):
        return [GaugeMetricFamily("hotlora_lora_requests_info", self.DOC, labels=self.LABELS)]

    def collect(self):
        running, waiting = self._activity()
        labels = (str(self._max_lora), ",".join(running), ",".join(waiting))  # the gateway splits on "," alone
        with self._lock:
            if labels != self._labels:
                self._labels, self._changed = labels, time.time()
            changed = self._changed
        family = GaugeMetricFamily("hotlora_lora_requests_info", self.DOC, labels=self.LABELS)
        family.add_metric(list(labels), changed)
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
