"""Continuous batching over token ids, with a different LoRA adapter per request.

The engine owns one thread that does all model work. Each turn of its loop:

  1. runs queued commands (adapter slot writes, scoring) — between steps, never during one;
  2. retires cancelled and expired requests, freeing their KV rows at once;
  3. admits the waiting requests the scheduler picks (server/engine/scheduler.py: round robin across
     adapters, within the batch, KV rows, prefill budget and adapter slots) and prefills them
     together (right-padded), or one chunk of a long prompt;
  4. decodes one token for every running request — whatever adapter each one uses — in one batch,
     through the fixed-shape runner (server/engine/runner.py: CUDA graphs on CUDA), then samples.

Callers get tokens through per-request handles (server/engine/requests.py: blocking iteration, or
`async for` when the handle was made with submit_async). The engine knows nothing of text or
protobuf. The only host sync in a step is reading the sampled tokens once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import torch

from ..config import EngineConfig
from ..errors import AdapterNotFound, Draining, InvalidRequest, ResourceExhausted
from ..lora.peft_files import AdapterWeights, read_peft_adapter, validate_adapter_name
from ..model.kv_cache import KVCache
from ..model.llama import ForwardBatch, Transformer, load_model
from ..model.quant import TRITON_GEMV_MAX_TOKENS
from ..model.sampling import SamplingBatch, SamplingParams, sample, token_logprobs
from .requests import AdapterInfo, FinishReason, Output, Request, RequestHandle, TokenLogprob
from .runner import DecodeRunner
from .scheduler import LoadedAdapter, Scheduler, Sequence
from .slots import AdapterSlots
from .structured import allowed_tokens, bitmask_words

__all__ = ["Engine", "EngineConfig", "Request", "SamplingParams", "Output", "FinishReason", "RequestHandle", "TokenLogprob",
           "AdapterInfo"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _explain_compile_failure():
    try:
        yield
    except Exception as exc:  # inductor's errors run to pages; lead with the cause it caught
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RuntimeError(f"EngineConfig(compile=True) could not compile the decode step: {type(exc).__name__}: "
                           f"{cause[:500]} (serve without --compile to run it eagerly)") from exc


class Engine:
    def __init__(self, model: Transformer, config: EngineConfig):
        self.model = model
        self.config = config
        self.spec = model.spec
        self.device, self.dtype = model.device, model.dtype
        spec = model.spec
        rows = config.max_batch_size
        if config.kv_cache_bytes is not None:
            per_row = KVCache.bytes_per_row(spec.num_layers, spec.num_kv_heads, config.max_seq_len, spec.head_dim, self.dtype)
            rows = min(rows, config.kv_cache_bytes // per_row - 1)  # the cache's scratch row comes on top
            if rows < 1:
                raise ValueError(f"kv_cache_bytes={config.kv_cache_bytes} holds no sequence of {config.max_seq_len} tokens ({per_row} bytes each)")
        self.cache = KVCache(spec.num_layers, rows, spec.num_kv_heads, config.max_seq_len, spec.head_dim, self.device, self.dtype)
        # tokens each KV row has seen (prompt and output), for the repetition penalty; the last row
        # is the cache's scratch row, where the padding rows of a fixed-shape step mark theirs
        self._seen = torch.zeros(rows + 1, spec.vocab_size, dtype=torch.bool, device=self.device)
        # grammar masks are written on the host, then copied to the device with the step
        self._bitmask = torch.empty(rows, bitmask_words(spec.vocab_size), dtype=torch.int32,
                                    pin_memory=self.device.type == "cuda")
        self._decode_logits = self._last_position_logits
        if config.compile and model.kernels.lora.name == "triton" and self.device.type != "cuda":
            raise ValueError("compile=True with the Triton kernels needs CUDA (their CPU interpreter cannot be compiled)")
        if config.compile:
            self._decode_logits = self._compiled_decode()
        # captured at max_seq_len, the torch attention would gather whole cache rows every step
        graphs = (config.cuda_graphs and self.device.type == "cuda" and not config.compile
                  and model.kernels.decode_attention.name == "triton")
        with torch.inference_mode():  # the runner's buffers are written only inside steps, in inference mode
            self.runner = DecodeRunner(self.cache, rows, self._decode_logits, self.device, self._seen, padded=graphs)
            self._graphs = "off"
            if graphs:
                try:
                    self.runner.capture()
                    self._graphs = "on"
                except Exception:  # serve eagerly rather than not at all; describe() and the log say so
                    log.exception("capturing the decode step as CUDA graphs failed; decoding eagerly")
                    self.runner = DecodeRunner(self.cache, rows, self._decode_logits, self.device, self._seen)
                    self._graphs = "failed"
        # hooks the server points at its metrics: seconds per slot write, and how long a request
        # whose adapter had no slot waited from submit to admission
        self.observe_slot_write: Callable[[float], None] = lambda seconds: None
        self.observe_adapter_miss: Callable[[float], None] = lambda seconds: None
        self.scheduler = Scheduler(config)
        self._seeds = random.Random(config.seed)
        self._ids = itertools.count()

        self._lock = threading.Condition()
        self.slots = AdapterSlots(model.lora_pools(), config.max_adapters, self.device, self.dtype, self._lock,
                                  on_forget=self.scheduler.forget)
        self._pending: deque[Sequence] = deque()
        self._commands: list[tuple[Callable[[], object], Future]] = []
        self._running: list[Sequence] = []
        self._prefilling: deque[Sequence] = deque()  # admitted, prompt going in chunk by chunk
        self._sampling_stale = True  # the runner's sampling parameters are not self._running's
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="hotlora-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: EngineConfig = EngineConfig()) -> "Engine":
        model, _ = load_model(model_dir, config)
        engine = cls(model, config)
        sizes = {k: f"{v / 2**20:.1f} MiB" for k, v in model.weight_bytes().items()}
        log.info("loaded %s (%s): weights %s, KV cache %.1f MiB for %d sequences x %d tokens", model_dir,
                 ", ".join(f"{k} {v}" for k, v in engine.describe().items()), sizes, engine.cache.nbytes / 2**20,
                 engine.cache.rows, config.max_seq_len)
        return engine

    def describe(self) -> dict[str, str]:
        """How this engine computes (logged at start-up, exported as hotlora_engine_info)."""
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "nf4_path": self.model.kernels.nf4_path, "lora_kernels": self.model.kernels.lora.name,
                "compiled": str(self.config.compile).lower(), "cuda_graphs": self._graphs}

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

    def adapters(self) -> list[AdapterInfo]:
        return self.slots.infos()

    # ---------------------------------------------------------------- requests

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request. With `loop`, the handle is iterated with `async for` on that loop."""
        self._validate(request)
        return self._enqueue(request, loop)

    def submit_async(self, request: Request) -> RequestHandle:
        """Like submit(), for asyncio callers: iterate the handle with `async for`."""
        return self.submit(request, loop=asyncio.get_running_loop())

    def generate(self, requests: list[Request]) -> list[Output]:
        """Run requests together (they share decode steps) and wait for all of them. All are
        checked before any is queued, so one bad request leaves nothing running."""
        for request in requests:
            self._validate(request)
        handles = [self._enqueue(r, None) for r in requests]
        return [h.result() for h in handles]

    def _validate(self, request: Request) -> None:
        request.sampling.validate()
        ids = request.prompt_ids
        if not ids:
            raise InvalidRequest("prompt_ids is empty")
        if any((not isinstance(t, int)) or t < 0 or t >= self.spec.vocab_size for t in ids):
            raise InvalidRequest(f"prompt_ids must be integers in [0, {self.spec.vocab_size})")
        total = len(ids) + request.sampling.max_new_tokens
        if total > self.config.max_seq_len:
            raise InvalidRequest(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({request.sampling.max_new_tokens}) = {total} "
                f"exceeds max_seq_len {self.config.max_seq_len}"
            )

    def _enqueue(self, request: Request, loop) -> RequestHandle:
        """Queue a request that _validate has passed."""
        request_id = request.request_id or f"req-{next(self._ids)}"
        handle = RequestHandle(request_id, loop)
        sampling = request.sampling
        stop_ids = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop_ids.update(self.spec.eos_token_ids)
        matcher = request.grammar.matcher() if request.grammar is not None else None  # before any lock
        seed = sampling.seed if sampling.seed is not None else self._seeds.getrandbits(64)
        with self._lock:
            if self._closing:
                raise Draining("the engine is shutting down")
            if len(self._pending) >= self.config.max_queue:
                raise ResourceExhausted(f"request queue is full ({self.config.max_queue} waiting)")
            adapter = None
            if request.adapter:
                adapter = self.slots.get(request.adapter)
                if adapter is None:
                    raise AdapterNotFound(f"adapter {request.adapter!r} is not loaded")
            waiting = sum(1 for s in self._pending if s.adapter is adapter)
            if waiting >= self.config.queue_per_adapter:
                raise ResourceExhausted(f"{'adapter ' + repr(adapter.name) if adapter else 'the base model'} already has "
                                        f"{waiting} requests waiting (max_queue_per_adapter)")
            if adapter is not None:
                adapter.refs += 1
                adapter.last_used = time.time()
            seq = Sequence(request, handle, adapter, frozenset(stop_ids), seed, matcher, tokens=list(request.prompt_ids))
            self._pending.append(seq)
            self._lock.notify()
        return handle

    def score(self, requests: list[Request]) -> list[torch.Tensor]:
        """Logits [len(prompt), vocab] for every position of every prompt, computed as one mixed
        batch (each row with its own adapter) — the same forward that prefill uses."""
        for request in requests:
            self._validate(request)
        return self._call_on_engine_thread(lambda: self._score(requests))

    def _score(self, requests: list[Request]) -> list[torch.Tensor]:
        seqs = []
        with self._lock:
            for r in requests:
                adapter = self.slots.get(r.adapter) if r.adapter else None
                if r.adapter and adapter is None:
                    raise AdapterNotFound(f"adapter {r.adapter!r} is not loaded")
                seqs.append(Sequence(r, RequestHandle("score", None), adapter, frozenset(), None, tokens=list(r.prompt_ids)))
        if len(seqs) > self.cache.free_rows:
            raise ResourceExhausted(f"scoring {len(seqs)} prompts needs as many free KV rows ({self.cache.free_rows} free)")
        adapters = list({id(s.adapter): s.adapter for s in seqs if s.adapter}.values())
        pinned = []
        try:
            for adapter in adapters:
                if not self.slots.make_resident(adapter, evict=True):
                    raise ResourceExhausted(f"scoring needs {len(adapters)} adapters in slots at once; "
                                            f"{len(pinned)} of {self.config.max_adapters} slots could be had")
                adapter.active += 1
                pinned.append(adapter)
            for s in seqs:
                s.row = self.cache.allocate_row()
            self.slots.wait_for_writes(seqs)
            hidden, lengths = self._prefill_forward(seqs)
            logits = self.model.logits(hidden)
            return [logits[i, :n].cpu() for i, n in enumerate(lengths)]
        finally:
            for adapter in pinned:
                adapter.active -= 1
            for s in seqs:
                if s.row >= 0:
                    self.cache.release_row(s.row)

    # ---------------------------------------------------------------- lifecycle

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {
                "queue_length": len(self._pending),
                "running": len(self._running) + len(self._prefilling),
                "kv_cache_usage_ratio": self.cache.usage_ratio(),
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
                for seq in [*self._pending, *self._prefilling, *self._running]:
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
                while not (self._pending or self._prefilling or self._running or self._commands or self._closing):
                    self._lock.wait()
                if self._closing and not (self._pending or self._prefilling or self._running or self._commands):
                    return
                commands, self._commands = self._commands, []
            for fn, future in commands:
                try:
                    future.set_result(fn())
                except BaseException as exc:  # reported to the caller that queued it
                    future.set_exception(exc)
            with torch.inference_mode():
                self._retire_stopped()
                self._admit_and_prefill()
                if self._prefilling:  # one chunk per step: the running sequences still decode below
                    chunked = self._prefilling[0]
                    self._guarded([chunked], lambda: self._prefill_chunk(chunked))
                if self._running:
                    self._guarded(list(self._running), self._decode_step)
            for seconds in self.slots.writer.completed_seconds():
                self.observe_slot_write(seconds)

    def _guarded(self, seqs: list[Sequence], step: Callable[[], None]) -> None:
        """Run a step; if it fails, fail exactly the sequences in it (rows and adapters released)
        and keep serving everyone else."""
        try:
            step()
        except Exception as exc:
            log.exception("engine step failed; failing its %d requests", len(seqs))
            for seq in seqs:
                if not seq.handle._output.done():
                    self._finish(seq, FinishReason.ERROR, error=exc)

    def _retire_stopped(self) -> None:
        now = time.monotonic()
        with self._lock:
            stopped = [(s, reason) for s in self._pending if (reason := self._stop_reason(s, now))]
            for seq, _ in stopped:
                self._pending.remove(seq)
        stopped += [(s, reason) for s in [*self._prefilling, *self._running] if (reason := self._stop_reason(s, now))]
        for seq, reason in stopped:
            self._finish(seq, reason)

    @staticmethod
    def _stop_reason(seq: Sequence, now: float) -> FinishReason | None:
        if seq.handle.cancelled.is_set():
            return FinishReason.CANCELLED
        if seq.request.deadline is not None and now > seq.request.deadline:
            return FinishReason.DEADLINE
        return None

    def _admit_and_prefill(self) -> None:
        """Admit what the scheduler picks (server/engine/scheduler.py) and prefill the whole prompts together."""
        with self._lock:
            candidates = self.scheduler.order(self._pending)
            resident = self.slots.resident()  # a copy: unload_adapter may change the registry meanwhile
        admission = self.scheduler.admit(candidates, self._running, self._prefilling, self.cache.free_rows,
                                         resident, self._resident_for_admission, self._take)
        self._prefilling.extend(admission.chunked)
        if admission.whole:
            self._guarded(admission.whole, lambda: self._prefill(admission.whole))

    def _resident_for_admission(self, adapter: LoadedAdapter) -> bool:
        """slots.make_resident for the scheduler. A slot write that fails (a device error) fails
        the requests waiting on that adapter, not the engine thread."""
        try:
            return self.slots.make_resident(adapter, evict=True)
        except Exception as exc:
            log.exception("writing adapter %s into a slot failed; failing the requests waiting for it", adapter.name)
            with self._lock:
                self.slots.evict(adapter)
                failed = [s for s in self._pending if s.adapter is adapter]
                for seq in failed:
                    self._pending.remove(seq)
            for seq in failed:
                self._finish(seq, FinishReason.ERROR, error=exc)
            return False

    def _take(self, seq: Sequence) -> bool:
        """Move an admitted sequence from the queue onto a KV row; False if it was cancelled."""
        with self._lock:
            if seq.handle.cancelled.is_set() or seq not in self._pending:
                return False
            self._pending.remove(seq)
        seq.row = self.cache.allocate_row()
        if seq.missed:
            self.observe_adapter_miss(time.monotonic() - seq.submitted)
        if seq.adapter is not None:
            seq.adapter.active += 1
        return True

    def _prefill(self, admitted: list[Sequence]) -> None:
        self.slots.wait_for_writes(admitted)
        for seq in admitted:
            self._seen[seq.row].zero_()
            self._seen[seq.row, torch.tensor(seq.tokens, device=self.device)] = True
        hidden, lengths = self._prefill_forward(admitted)
        last = hidden[torch.arange(len(admitted), device=self.device), torch.tensor(lengths, device=self.device) - 1]
        self._running.extend(admitted)
        self._sampling_stale = True
        self._sample(admitted, self.model.logits(last), self._sampling_batch(admitted))

    def _prefill_chunk(self, seq: Sequence) -> None:
        """The next prefill_chunk_tokens of seq's prompt into the cache: its queries attend to the
        chunks before (in the cache) and causally within the chunk. After the last chunk the
        first token is sampled and the sequence joins the running batch."""
        start = seq.prefilled
        self.slots.wait_for_writes([seq])
        if start == 0:
            self._seen[seq.row].zero_()
            self._seen[seq.row, torch.tensor(seq.tokens, device=self.device)] = True
        stop = min(start + self.config.prefill_chunk_tokens, len(seq.tokens))
        batch = ForwardBatch(
            tokens=torch.tensor([seq.tokens[start:stop]], device=self.device),
            positions=torch.arange(start, stop, device=self.device)[None, :],
            cache_rows=torch.tensor([seq.row], device=self.device),
            token_slots=torch.full((stop - start,), seq.slot, device=self.device) if seq.slot else None,
            prefill=False,  # attends through the cache, like a decode step of several tokens
            kv_length=stop,
        )
        hidden = self.model(batch, self.cache)
        seq.prefilled = stop
        if stop < len(seq.tokens):
            return
        self._prefilling.popleft()
        self._running.append(seq)
        self._sampling_stale = True
        self._sample([seq], self.model.logits(hidden[:, -1]), self._sampling_batch([seq]))

    def _prefill_forward(self, seqs: list[Sequence]) -> tuple[torch.Tensor, list[int]]:
        lengths = [len(s.tokens) for s in seqs]
        width = max(lengths)
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, : lengths[i]] = torch.tensor(s.tokens)
        slots = [s.slot for s in seqs]
        token_slots = None
        if any(slots):
            token_slots = torch.tensor(slots, device=self.device).repeat_interleave(width)
        batch = ForwardBatch(
            tokens=tokens.to(self.device),
            positions=torch.arange(width, device=self.device).expand(len(seqs), width),
            cache_rows=torch.tensor([s.row for s in seqs], device=self.device),
            token_slots=token_slots,
            prefill=True,
            kv_length=width,
        )
        return self.model(batch, self.cache), lengths

    def _decode_step(self) -> None:
        running = list(self._running)
        if self._sampling_stale:
            self.runner.load_sampling([s.request.sampling for s in running], [s.seed for s in running],
                                      [len(s.generated) for s in running])
            self._sampling_stale = False
        logits, tokens = self.runner.decode([s.tokens[-1] for s in running], [len(s.tokens) - 1 for s in running],
                                            [s.row for s in running], [s.slot for s in running],
                                            self._grammar_bitmask(running))
        top_n = self.runner.top_logprobs
        logprobs = token_logprobs(logits, tokens, top_n) if top_n is not None else None
        self._accept_tokens(running, tokens.tolist(), logprobs)  # the step's one host sync

    def _last_position_logits(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model.logits(self.model(batch, self.cache)[:, -1])

    def _compiled_decode(self) -> Callable[[ForwardBatch], torch.Tensor]:
        """torch.compile of the decode forward, warmed up on every variant a step can hit, so no
        request waits for a compile: with and without adapters, for one row and for several (the
        batch size and KV length stay symbolic; torch specializes a size of 1). Warm-up writes
        into free KV rows, whose contents are never read before being overwritten."""
        # The cache's shapes are fixed for the engine's life; static, they cannot be mistaken
        # for (and guarded equal to) the batch size.
        torch._dynamo.mark_static(self.cache.keys)
        torch._dynamo.mark_static(self.cache.values)
        compiled = torch.compile(self._last_position_logits, dynamic=True)
        sizes = [1] + ([3] if self.cache.rows >= 3 else [2] if self.cache.rows == 2 else [])
        if self.cache.rows > TRITON_GEMV_MAX_TOKENS:  # the Triton NF4 path switches kernels above it
            sizes.append(self.cache.rows)
        with torch.inference_mode(), _explain_compile_failure():
            for rows in sizes:
                for slots in (None, torch.zeros(rows, dtype=torch.long, device=self.device)):
                    kv_length = min(7, self.config.max_seq_len)  # unlike the sizes, so not guarded equal to one
                    compiled(ForwardBatch(
                        tokens=torch.zeros(rows, 1, dtype=torch.long, device=self.device),
                        positions=torch.full((rows, 1), kv_length - 1, device=self.device),
                        cache_rows=torch.arange(rows, device=self.device), token_slots=slots,
                        prefill=False, kv_length=kv_length))
        return compiled

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        return SamplingBatch.build([s.request.sampling for s in seqs], [s.seed for s in seqs],
                                   [len(s.generated) for s in seqs], self.spec.vocab_size, self.device)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, sampling: SamplingBatch) -> None:
        """Choose each prefilled sequence's first token from its row of logits and hand it over
        (decode steps sample inside the runner's step)."""
        rows = torch.tensor([s.row for s in seqs], device=self.device)
        bitmask = self._grammar_bitmask(seqs)
        allowed = None if bitmask is None else allowed_tokens(bitmask.to(self.device, non_blocking=True), self.spec.vocab_size)
        tokens = sample(logits, sampling, self._seen[rows] if sampling.flags.use_penalty else None, allowed)
        logprobs = token_logprobs(logits, tokens, sampling.top_logprobs) if sampling.top_logprobs is not None else None
        self._seen[rows, tokens] = True
        self._accept_tokens(seqs, tokens.tolist(), logprobs)  # the step's one host sync

    def _grammar_bitmask(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Host int32 [len(seqs), words]: the tokens each sequence's grammar allows next (all on
        free rows); None when no sequence has a grammar."""
        if all(s.matcher is None for s in seqs):
            return None
        bitmask = self._bitmask[: len(seqs)]
        bitmask.fill_(-1)
        for i, seq in enumerate(seqs):
            if seq.matcher is not None:
                seq.matcher.fill_bitmask(self._bitmask, i)
        return bitmask

    def _accept_tokens(self, seqs: list[Sequence], tokens: list[int], logprobs: tuple[torch.Tensor, ...] | None) -> None:
        if logprobs is not None:
            chosen, top_ids, top_values = (t.tolist() for t in logprobs)
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            seq.tokens.append(token)
            seq.generated.append(token)
            wanted = seq.request.sampling.logprobs
            if wanted is not None:
                top = tuple(zip(top_ids[i][:wanted], top_values[i][:wanted]))
                seq.handle.logprobs.append(TokenLogprob(token, chosen[i], top))
            seq.handle._push(token)
            if seq.matcher is not None and not seq.matcher.accept(token):
                self._finish(seq, FinishReason.ERROR, error=RuntimeError(
                    f"the grammar refused token {token} it had allowed: {seq.matcher.error}"))
            elif token in seq.stop_ids or seq.matcher is not None and seq.matcher.finished:
                self._finish(seq, FinishReason.STOP)
            elif len(seq.generated) >= seq.request.sampling.max_new_tokens:
                self._finish(seq, FinishReason.LENGTH)

    def _finish(self, seq: Sequence, reason: FinishReason, error: BaseException | None = None) -> None:
        if seq in self._running:
            self._running.remove(seq)
            self._sampling_stale = True
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        if seq.row >= 0:
            self.cache.release_row(seq.row)
            seq.row = -1
            if seq.adapter is not None:
                seq.adapter.active -= 1
        self.slots.release(seq.adapter)
        adapter = seq.adapter
        output = Output(
            request_id=seq.handle.request_id,
            token_ids=list(seq.generated),
            finish_reason=reason,
            prompt_tokens=len(seq.request.prompt_ids),
            adapter=adapter.name if adapter else None,
            adapter_hash=adapter.weights.content_hash if adapter else None,
        )
        seq.handle._finish(output if error is None else None, error)
