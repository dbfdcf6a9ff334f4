"""Continuous batching over token ids, with a different LoRA adapter per request.

`Engine` is the facade: it takes requests (checking the engine's own invariants), runs the step
loop on its one thread, and hands each sequence's tokens to its caller. Its parts:

  - server/engine/scheduler.py: the waiting, prefilling and running queues, and who is admitted
    each step (round robin across adapters, within the batch, KV blocks, prefill budget and slots);
  - server/engine/runner.py: prefill, the decode step (fixed shapes, CUDA graphs on CUDA) and
    sampling, on the sequences the scheduler picked;
  - server/engine/slots.py: the registered adapters and the device slots they hold;
  - server/engine/sequence.py: a request's state while it runs.

Each turn of the loop:

  1. runs queued commands (adapter slot writes, scoring) — between steps, never during one;
  2. finishes cancelled and expired requests, freeing their KV blocks at once;
  3. admits what the scheduler picks and prefills it together (right-padded), or one chunk of a
     long prompt;
  4. decodes one token for every running request — whatever adapter each one uses — in one batch.

Callers get tokens through per-request handles (server/engine/requests.py: blocking iteration, or
`async for` when the handle was made with submit_async). The engine knows nothing of text or
protobuf. The only host sync in a step is reading the sampled tokens once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ..config import EngineConfig
from ..errors import AdapterNotFound, Draining, InvalidRequest
from ..lora.peft_files import AdapterWeights, read_peft_adapter, validate_adapter_name
from ..model.kv_cache import KVCache
from ..model.llama import Transformer, load_model
from ..model.sampling import SamplingParams
from .requests import AdapterInfo, FinishReason, Output, Request, RequestHandle, TokenLogprob
from .blocks import BlockManager, pool_blocks
from .host_memory import keep_freed_host_memory
from .runner import ModelRunner, Sampled
from .scheduler import Scheduler
from .sequence import Sequence
from .slots import AdapterSlots, LoadedAdapter

__all__ = ["Engine", "EngineConfig", "Request", "SamplingParams", "Output", "FinishReason", "RequestHandle", "TokenLogprob",
           "AdapterInfo"]

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model: Transformer, config: EngineConfig):
        self.model = model
        self.spec = model.spec
        self.device, self.dtype = model.device, model.dtype
        if self.device.type == "cpu":
            keep_freed_host_memory()
        spec = model.spec
        per_block = KVCache.bytes_per_block(spec.num_layers, config.kv_block_size, spec.num_kv_heads, spec.head_dim,
                                            self.dtype)
        num_blocks, max_seq_len = pool_blocks(config, per_block, self.device, model.max_positions)
        # which limit is in force: the flag's, the model's positions, or one sequence's share of the KV pool
        self.max_seq_len_from = ("config" if config.max_seq_len is not None else
                                 "model" if max_seq_len == model.max_positions else "kv_cache")
        self.config = config = replace(config, max_seq_len=max_seq_len)
        self.cache = KVCache(spec.num_layers, num_blocks, config.kv_block_size, spec.num_kv_heads, spec.head_dim, config.max_seq_len,
                             self.device, self.dtype)
        self.blocks = BlockManager(self.cache, config.max_batch_size, config.prefix_caching)
        self.runner = ModelRunner(model, self.cache, self.blocks, config)
        # hooks the server points at its metrics: seconds per slot write, and how long a request
        # whose adapter had no slot waited from submit to admission
        self.observe_slot_write: Callable[[float], None] = lambda seconds: None
        self.observe_adapter_miss: Callable[[float], None] = lambda seconds: None
        self._seeds = random.Random(config.seed)
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self.slots = AdapterSlots(model.lora_pools(), config.max_adapters, self.device, self.dtype, self._lock,
                                  on_forget=lambda name: self.scheduler.forget(name))
        self.scheduler = Scheduler(config, self.blocks, self.slots, self._lock)
        self._commands: list[tuple[Callable[[], object], Future]] = []
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="hotlora-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: EngineConfig = EngineConfig()) -> "Engine":
        model, _ = load_model(model_dir, config)
        engine = cls(model, config)
        sizes = {k: f"{v / 2**20:.1f} MiB" for k, v in model.weight_bytes().items()}
        log.info("loaded %s (%s): weights %s, KV cache %.1f MiB: %d blocks of %d tokens (%d tokens) for up to %d "
                 "sequences of at most %d tokens (max_seq_len from the %s; the model has %d positions)", model_dir,
                 ", ".join(f"{k} {v}" for k, v in engine.describe().items()), sizes, engine.cache.nbytes / 2**20,
                 engine.cache.num_blocks, engine.cache.block_size, engine.cache.num_blocks * engine.cache.block_size,
                 config.max_batch_size, engine.config.max_seq_len, engine.max_seq_len_from, model.max_positions)
        return engine

    def describe(self) -> dict[str, str]:
        """How this engine computes (logged at start-up, exported as hotlora_engine_info)."""
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "nf4_path": self.model.kernels.nf4_path, "lora_kernels": self.model.kernels.lora.name,
                "compiled": str(self.config.compile).lower(), "cuda_graphs": self.runner.graphs,
                "max_seq_len": str(self.config.max_seq_len), "max_seq_len_from": self.max_seq_len_from}

    # ---------------------------------------------------------------- adapters

    def load_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Validate a PEFT adapter directory (in the caller's thread) and register it under `name`."""
        validate_adapter_name(name)
        weights = read_peft_adapter(path, self.spec, self.config.max_rank)
        return self.install_adapter(name, weights)

    def install_adapter(self, name: str, weights: AdapterWeights) -> AdapterInfo:
        """Register validated host weights under `name`, copying them into a slot now if one is
        free (otherwise the first request that needs them gets one). Registering an existing name
        replaces it: requests already queued or running keep the weights they started with. The
        weights are packed for the device here, in the caller's thread, not the engine's."""
        entry = self.slots.register(name, weights)
        self._call_on_engine_thread(lambda: self.slots.make_resident(entry, evict=False))
        return self.slots.info(entry)

    def unload_adapter(self, name: str) -> None:
        """New requests can no longer use `name`; queued and running ones finish on it."""
        self.slots.unregister(name)

    def has_adapter(self, name: str) -> bool:
        """Whether `name` is registered: new requests can use it."""
        with self._lock:
            return self.slots.get(name) is not None

    def adapters(self) -> list[AdapterInfo]:
        return self.slots.infos()

    def adapter_activity(self) -> tuple[list[str], list[str]]:
        """The adapters registered (in a device slot or ready in host memory to be copied into one
        between two steps), and those whose queued requests wait for a slot, by registry name, in
        one snapshot: the inference gateway's running / waiting LoRA adapters."""
        with self._lock:
            resident = sorted(self.slots.names())
            waiting = sorted({s.adapter.name for s in self.scheduler.waiting if s.adapter is not None and s.adapter.slot == 0})
        return resident, waiting

    # ---------------------------------------------------------------- requests

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request. With `loop`, the handle is iterated with `async for` on that loop."""
        self.check(request)
        return self._enqueue([request], loop)[0]

    def submit_async(self, request: Request) -> RequestHandle:
        """Like submit(), for asyncio callers: iterate the handle with `async for`."""
        return self.submit(request, loop=asyncio.get_running_loop())

    def generate(self, requests: list[Request]) -> list[Output]:
        """Run requests together (they share decode steps) and wait for all of them. All are
        checked before any is queued, so one bad request leaves nothing running."""
        for request in requests:
            self.check(request)
        with self._lock:  # all queued before the engine's next step looks: they are admitted together
            handles = [self._enqueue([r], None)[0] for r in requests]
        return [h.result() for h in handles]

    def check(self, request: Request) -> None:
        """InvalidRequest unless the engine can run `request`: its sampling parameters, token ids
        in the vocabulary, prompt + max_new_tokens within max_seq_len. (Whether its adapter is
        loaded is known only when it is queued.)"""
        request.sampling.validate()
        ids = request.prompt_ids
        if not ids:
            raise InvalidRequest("prompt_ids is empty")
        if any((not isinstance(t, int)) or t < 0 or t >= self.spec.vocab_size for t in ids):
            raise InvalidRequest(f"prompt_ids must be integers in [0, {self.spec.vocab_size})")
        named = [("stop_token_ids", t) for t in request.sampling.stop_token_ids]
        named += [("logit_bias", t) for t, _ in request.sampling.logit_bias]
        for field, t in named:
            if not isinstance(t, int) or not 0 <= t < self.spec.vocab_size:
                raise InvalidRequest(f"{field}: token {t!r} is not in the vocabulary [0, {self.spec.vocab_size})")
        total = len(ids) + request.sampling.max_new_tokens
        if total > self.config.max_seq_len:
            raise InvalidRequest(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({request.sampling.max_new_tokens}) = {total} "
                f"exceeds max_seq_len {self.config.max_seq_len}"
            )

    def submit_samples(self, request: Request, n: int, loop: asyncio.AbstractEventLoop | None = None
                       ) -> list[RequestHandle]:
        """n samples of one prompt (OpenAI's `n`), queued together: sample i draws with seed + i
        when the request has a seed. The first is prefilled; the others wait a step for it and take
        its prompt's blocks from the prefix cache (each computes only the block holding the prompt's
        last token), as any requests sharing a prefix do (Scheduler.schedule). With
        sampling.prompt_logprobs, sample 0 computes them and every handle holds that one list; no
        sample is admitted before sample 0, so it is filled before any sample's first token."""
        if not isinstance(n, int) or n < 1:
            raise InvalidRequest(f"n must be an integer >= 1, got {n!r}")
        self.check(request)
        request = replace(request, request_id=request.request_id or f"req-{next(self._ids)}")  # one id for all
        seed = request.sampling.seed
        samples = [request if seed is None else replace(request, sampling=replace(request.sampling, seed=(seed + i) % 2**64))
                   for i in range(n)]
        # the prompt's logprobs are sample 0's to compute; the others take its blocks and share its list
        samples[1:] = [replace(r, sampling=replace(r.sampling, prompt_logprobs=None)) for r in samples[1:]]
        handles = self._enqueue(samples, loop)
        for handle in handles[1:]:
            handle.prompt_logprobs = handles[0].prompt_logprobs
        return handles

    def _enqueue(self, requests: list[Request], loop) -> list[RequestHandle]:
        """Queue requests on one adapter that check() has passed, all or none."""
        seqs = [self._sequence(r, loop) for r in requests]
        with self._lock:
            if self._closing:
                raise Draining("the engine is shutting down")
            adapter = self._adapter(requests[0])
            for seq in seqs:
                seq.adapter = adapter
            self.scheduler.add(seqs)
            self._lock.notify()
        return [s.handle for s in seqs]

    def _sequence(self, request: Request, loop) -> Sequence:
        request_id = request.request_id or f"req-{next(self._ids)}"
        sampling = request.sampling
        stop_ids = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop_ids.update(self.spec.eos_token_ids)
        matcher = request.grammar.matcher() if request.grammar is not None else None  # before any lock
        seed = sampling.seed if sampling.seed is not None else self._seeds.getrandbits(64)
        return Sequence(request, RequestHandle(request_id, loop), None, frozenset(stop_ids), seed, matcher,
                        tokens=list(request.prompt_ids))

    def _adapter(self, request: Request) -> LoadedAdapter | None:  # holds the lock
        if not request.adapter:
            return None
        adapter = self.slots.get(request.adapter)
        if adapter is None:
            raise AdapterNotFound(f"adapter {request.adapter!r} is not loaded")
        return adapter

    def score(self, requests: list[Request]) -> list[torch.Tensor]:
        """Logits [len(prompt), vocab] for every position of every prompt, computed as one mixed
        batch (each row with its own adapter) — the same forward that prefill uses."""
        for request in requests:
            self.check(request)
        return self._call_on_engine_thread(lambda: self._score(requests))

    def _score(self, requests: list[Request]) -> list[torch.Tensor]:
        with self._lock:
            seqs = [Sequence(r, RequestHandle("score", None), self._adapter(r), frozenset(), None, tokens=list(r.prompt_ids))
                    for r in requests]
        with self.scheduler.reserved(seqs):
            return self.runner.score(seqs)

    # ---------------------------------------------------------------- lifecycle

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {
                "queue_length": len(self.scheduler.waiting),
                "running": len(self.scheduler.running) + len(self.scheduler.prefilling) + len(self.scheduler.admitted),
                "kv_cache_usage_ratio": self.blocks.usage_ratio(),
                "kv_blocks_used": self.blocks.used_blocks,
                "kv_blocks_free": self.blocks.free_blocks,
                "preemptions": self.scheduler.preemptions,
                "prefix_cache_prompt_tokens": self.blocks.prompt_tokens,
                "prefix_cache_hit_tokens": self.blocks.cached_tokens,
                "free_adapter_slots": self.slots.free,
            }

    @property
    def alive(self) -> bool:
        """False once close() has finished every request and the engine thread has exited."""
        return self._thread.is_alive()

    def close(self, cancel_running: bool = True, timeout: float | None = 30.0) -> None:
        """Stop taking requests; cancel (or, with cancel_running=False, finish) what is in flight."""
        with self._lock:
            self._closing = True
            if cancel_running:
                for seq in self.scheduler.in_flight():
                    seq.handle.cancel()
            self._lock.notify()
        self._thread.join(timeout)

    def _call_on_engine_thread(self, fn: Callable[[], object]):
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            return fn()
        future: Future = Future()
        with self._lock:
            self._commands.append((fn, future))
            self._lock.notify()
        return future.result()

    # ---------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self.scheduler.has_work() or self._commands or self._closing):
                    self._lock.wait()
                if self._closing and not (self.scheduler.has_work() or self._commands):
                    return
                commands, self._commands = self._commands, []
            for fn, future in commands:
                try:
                    future.set_result(fn())
                except BaseException as exc:  # reported to the caller that queued it
                    future.set_exception(exc)
            with torch.inference_mode():
                self._step()
            for seconds in self.slots.writer.completed_seconds():
                self.observe_slot_write(seconds)

    def _step(self) -> None:
        scheduler = self.scheduler
        for seq, reason in scheduler.stopped(time.monotonic()):
            self._finish(seq, reason)
        admission = scheduler.schedule()
        for seq, error in admission.failed:
            self._finish(seq, FinishReason.ERROR, error=error)
        now = time.monotonic()
        for seq in admission.whole + admission.chunked:
            if seq.missed and not seq.preempted:  # a readmission's wait is not a slot miss
                self.observe_adapter_miss(now - seq.submitted)
        if admission.whole:
            self._guarded(admission.whole, lambda: self._started(admission.whole, self.runner.prefill(admission.whole)))
        if scheduler.prefilling:  # one chunk per step: the running sequences still decode below
            chunked = scheduler.prefilling[0]
            self._guarded([chunked], lambda: self._prefill_chunk(chunked))
        running = scheduler.decodable() if scheduler.running else []
        if running:
            self._guarded(running, lambda: self._accept(running, self.runner.decode(running)))

    def _prefill_chunk(self, seq: Sequence) -> None:
        sampled = self.runner.prefill_chunk(seq)
        if sampled is not None:
            self._started([seq], sampled)

    def _started(self, seqs: list[Sequence], first: Sampled) -> None:
        """Prefilled: the prompt's logprobs go to the caller before any token; a request that only
        scores its prompt (max_new_tokens 0) ends here."""
        self.scheduler.start(seqs)
        for seq in seqs:
            if seq.prompt_logprobs and not seq.preempted:  # in place: n samples' handles share the list
                seq.handle.prompt_logprobs.extend(seq.prompt_logprobs)
        generating = [i for i, s in enumerate(seqs) if s.request.sampling.max_new_tokens > 0]
        for seq in seqs:
            if seq.request.sampling.max_new_tokens == 0:
                self._finish(seq, FinishReason.LENGTH)
        if len(generating) < len(seqs):
            seqs, first = [seqs[i] for i in generating], first.rows(generating)
        self._accept(seqs, first)

    def _guarded(self, seqs: list[Sequence], step: Callable[[], None]) -> None:
        """Run a step; if it fails, fail exactly the sequences in it (rows and adapters released)
        and keep serving everyone else."""
        try:
            step()
        except Exception as exc:
            log.exception("engine step failed; failing its %d requests", len(seqs))
            for seq in seqs:
                if not seq.handle.done():
                    self._finish(seq, FinishReason.ERROR, error=exc)

    def _accept(self, seqs: list[Sequence], sampled: Sampled) -> None:
        """Hand each sequence its new token; finish those it stops."""
        for i, (seq, token) in enumerate(zip(seqs, sampled.tokens)):
            seq.tokens.append(token)
            seq.generated.append(token)
            wanted = seq.request.sampling.logprobs
            if wanted is not None:
                chosen, top_ids, top_values = sampled.logprobs
                seq.handle.logprobs.append(TokenLogprob(token, chosen[i], tuple(zip(top_ids[i][:wanted], top_values[i][:wanted]))))
            seq.handle.emit(token)
            if seq.matcher is not None and not seq.matcher.accept(token):
                self._finish(seq, FinishReason.ERROR, error=RuntimeError(
                    f"the grammar refused token {token} it had allowed: {seq.matcher.error}"))
            elif token in seq.stop_ids or seq.matcher is not None and seq.matcher.finished:
                self._finish(seq, FinishReason.STOP)
            elif len(seq.generated) >= seq.request.sampling.max_new_tokens:
                self._finish(seq, FinishReason.LENGTH)

    def _finish(self, seq: Sequence, reason: FinishReason, error: BaseException | None = None) -> None:
        self.scheduler.finish(seq)
        if error is not None:
            seq.handle.fail(error)
            return
        adapter = seq.adapter
        seq.handle.complete(Output(
            request_id=seq.handle.request_id,
            token_ids=list(seq.generated),
            finish_reason=reason,
            prompt_tokens=len(seq.request.prompt_ids),
            cached_tokens=seq.cached_tokens,
            adapter=adapter.name if adapter else None,
            adapter_hash=adapter.weights.content_hash if adapter else None,
        ))
