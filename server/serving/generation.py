"""One generation call, whichever protocol carried it: a request in, pieces of text out.

The gRPC service (service.py) and the OpenAI-compatible HTTP API (http_api.py) turn their requests
into a GenerationInput and the Pieces back into their own messages. Everything in between happens
here, once: size limits, tokenizing and chat templates off the event loop, sampling defaults,
grammar compilation, resolving and loading the adapter, stop strings, deadlines, cancellation when
the caller goes away, and the metrics (with a `protocol` label). The caller's tenant
(server/serving/tenants.py) decides which adapters it may see and call, its quotas
(server/serving/quotas.py) admit the request, and its usage is metered here: the tenant counters
and the usage log get the same numbers the client gets in its usage fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from ..adapters.manager import AdapterManager
from ..adapters.versions import AdapterRef, AdapterVersion
from ..config import RequestLimits
from ..engine.engine import Engine, FinishReason, Output, Request, TokenLogprob
from ..engine.structured import GrammarCompiler, OutputFormat
from ..errors import DeadlineExceeded, Draining, HotloraError, InvalidRequest, NotReady, PermissionDenied, RateLimited
from ..metrics import UNRESOLVED, Metrics
from ..model.sampling import SamplingParams
from .quotas import Quotas, Reservation
from .status import status_of
from .tenants import ANONYMOUS, Caller
from .text import TextCodec
from .usage_log import Usage, UsageLog

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class LoadedModel:
    """What generation needs once the model is loaded. Until then requests are refused with
    NotReady (the services start before the model loads, so health can say NOT_SERVING)."""

    engine: Engine
    manager: AdapterManager
    codec: TextCodec
    grammars: GrammarCompiler
    model_name: str  # the base model's name in ListModels and the HTTP API's `model`


@dataclass(frozen=True)
class GenerationInput:
    """A request as either protocol gives it. Exactly one of prompt, messages, prompt_token_ids.
    adapter: "" or the base model's name for no adapter, "name" or "name@version" for one.
    sampling.max_new_tokens is replaced by max_new_tokens, or the server's default when None."""

    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None  # {"role": ..., "content": ...}
    prompt_token_ids: tuple[int, ...] | None = None
    adapter: str = ""
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    output_format: OutputFormat | None = None
    request_id: str | None = None
    deadline: float | None = None  # time.monotonic() value
    n: int = 1  # samples of the prompt (OpenAI's n): pieces carry their sample's index


@dataclass
class Piece:
    """New text and the tokens it came from; the last piece of a call has `output` set."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]  # one per token when the request asked for logprobs
    request_id: str
    adapter: AdapterVersion | None  # the version serving the request (None: the base model)
    output: Output | None = None
    stopped_by_string: bool = False
    index: int = 0  # which of the request's n samples it continues
    # on each sample's first piece when sampling.prompt_logprobs was set: the prompt's token ids and
    # the logprobs of all but its first token (echo)
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def finish_reason(self) -> str | None:
        """"stop" (end-of-sequence, a stop string, or a complete structured output) or "length"."""
        if self.output is None:
            return None
        return "stop" if self.stopped_by_string or self.output.finish_reason == FinishReason.STOP else "length"


@dataclass(frozen=True)
class ServedModel:
    """A name a request can give as its adapter / model."""

    id: str
    adapter: str = ""   # "" for the base model
    version: str = ""


@dataclass
class _Call:
    """One call's bookkeeping for metrics and metering."""

    protocol: str
    caller: Caller = ANONYMOUS
    label: str = "base"
    code: str = "OK"
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    adapter: str = ""  # what it asked for, then the version that served it ("name@version"; "" the base model)
    request_id: str = ""
    prompt_tokens: int = 0  # once submitted
    cached_tokens: int = 0
    completion_tokens: dict[int, int] = field(default_factory=dict)  # sample index -> tokens it was given
    reservation: Reservation | None = None
    rejected_by: str | None = None  # the limit that refused it: a quota's name, or "queue"


class Generations:
    def __init__(self, metrics: Metrics, default_max_new_tokens: int, limits: RequestLimits = RequestLimits(),
                 quotas: Quotas | None = None, usage_log: UsageLog | None = None):
        self.metrics = metrics
        self.default_max_new_tokens = default_max_new_tokens
        self.limits = limits
        self.quotas = quotas or Quotas()
        self.usage_log = usage_log
        self.loaded: LoadedModel | None = None

    def ready(self) -> LoadedModel:
        if self.loaded is None:
            raise NotReady("the server is still loading the model")
        return self.loaded

    async def run(self, request: GenerationInput, protocol: str, caller: Caller = ANONYMOUS) -> AsyncIterator[Piece]:
        """Pieces as text becomes available; raises a HotloraError for anything refused. Closing
        the iterator early (the caller went away) cancels the request and frees its KV blocks."""
        call = _Call(protocol, caller, adapter=request.adapter, request_id=request.request_id or "")
        try:
            loaded = self.ready()
            ref = None if request.adapter in ("", loaded.model_name) else AdapterRef.parse(request.adapter)
            call.label = UNRESOLVED if ref else "base"
            self._check_access(loaded, caller, ref)  # before anything looks the name up
            self._check_size(request)  # cheap limits first; then the real work off the event loop
            prompt_ids, ref = await self._prompt(loaded, request, ref)
            grammar = None
            if request.output_format is not None:
                grammar = await asyncio.to_thread(loaded.grammars.compile, request.output_format)
            engine_request = Request(prompt_ids=prompt_ids, sampling=self._sampling(loaded.engine, request, len(prompt_ids)),
                                     deadline=request.deadline, request_id=request.request_id, grammar=grammar,
                                     tenant=caller.tenant.name, weight=caller.tenant.weight)
            loaded.engine.check(engine_request)  # the engine's own checks, before any adapter is loaded for it
            if not 1 <= request.n <= self.limits.max_samples:
                raise InvalidRequest(f"n: {request.n} samples; give 1 to {self.limits.max_samples}")
            # its worst case, before it queues; what it does not use is given back when it ends
            call.reservation = self.quotas.reserve(
                caller.tenant, len(prompt_ids) + engine_request.sampling.max_new_tokens * request.n)
            handles, version = await _submit(loaded.manager, ref, engine_request, request.n)
            call.label = self.metrics.adapter_label(version.name if version else None)
            call.adapter, call.request_id = version.key if version else "", handles[0].request_id
            call.prompt_tokens = len(prompt_ids)
            scored = prompt_ids if request.sampling.prompt_logprobs is not None else None
            streams = [self._stream(handle, loaded.codec.decoder(prompt_ids, list(request.stop)), version, call, i, scored)
                       for i, handle in enumerate(handles)]
            outputs = []
            # closed as soon as run is: the samples' requests are cancelled then, not when collected
            async with contextlib.aclosing(streams[0] if len(streams) == 1 else merged(streams)) as pieces:
                async for piece in pieces:
                    if piece.output is not None:
                        outputs.append(piece.output)
                        if len(outputs) == len(streams):
                            self._observe(call, outputs)
                    yield piece
        except (asyncio.CancelledError, GeneratorExit):
            call.code = "CANCELLED"
            raise
        except Exception as exc:
            call.code = status_of(exc).grpc_code.name
            call.rejected_by = _rejected_by(exc, call)
            if not isinstance(exc, HotloraError):
                log.error("internal error", exc_info=exc)
            raise
        finally:
            self.metrics.requests.labels(call.label, call.code, call.protocol).inc()
            self._meter(call)

    async def _stream(self, handle, decoder, version: AdapterVersion | None, call: _Call, index: int,
                      scored: list[int] | None) -> AsyncIterator[Piece]:
        """One sample's pieces as its text becomes available, the last with its Output. Closing
        it early (a stop string, the caller gone, a failure) cancels the sample's sequence.
        `scored`: the prompt's ids, when its logprobs go out with the first piece."""
        pending: list[int] = []
        text, done = "", 0  # done: tokens already sent in pieces
        finished = False
        try:
            async for token in handle:
                call.first_token = call.first_token or time.perf_counter()
                call.completion_tokens[index] = call.completion_tokens.get(index, 0) + 1
                pending.append(token)
                text += decoder.push([token])
                if decoder.stopped:
                    break
                if text:
                    yield _with_prompt(self._piece(text, pending, done, handle, version, index), handle, scored)
                    done += len(pending)
                    pending, text, scored = [], "", None
            finished = not decoder.stopped
        finally:
            if not finished:  # a stop string, the caller gone, or any failure: free the sequence now
                handle.cancel()
        output = await handle.aresult()
        if decoder.stopped:  # what the engine made after the stop string was never the answer
            output = replace(output, token_ids=output.token_ids[:done + len(pending)], finish_reason=FinishReason.STOP)
        elif output.finish_reason == FinishReason.DEADLINE:
            raise DeadlineExceeded(f"deadline exceeded after {len(output.token_ids)} generated tokens")
        elif output.finish_reason == FinishReason.CANCELLED:
            raise Draining("the server is shutting down and stopped this request")
        last = _with_prompt(self._piece(text + decoder.finish(), pending, done, handle, version, index), handle, scored)
        last.output, last.stopped_by_string = output, decoder.stopped
        call.completion_tokens[index] = len(output.token_ids)  # what its usage says
        if index == 0:  # the prompt's, as both protocols' usage gives it: sample 0's
            call.cached_tokens = output.cached_tokens
        yield last

    def count_refused(self, protocol: str, error: BaseException, caller: Caller | None = None) -> None:
        """A request refused before run() (it could not be parsed): counted like one run refused,
        and metered for its tenant when the caller is known (an unknown key has no tenant)."""
        code = status_of(error).grpc_code.name
        self.metrics.requests.labels(UNRESOLVED, code, protocol).inc()
        if caller is not None:
            self._meter(_Call(protocol, caller, code=code))

    def models(self, caller: Caller = ANONYMOUS) -> list[ServedModel]:
        """What `caller` may call: the base model (if its tenant may), then each of its adapters as
        "name" (its current version) and "name@version"."""
        loaded = self.ready()
        adapters = []
        for status in loaded.manager.list():
            v = status.version
            if not caller.tenant.may_call(v.name):
                continue
            if status.current:
                adapters.append(ServedModel(v.name, v.name, v.version))
            adapters.append(ServedModel(v.key, v.name, v.version))
        adapters.sort(key=lambda m: (m.adapter, m.id != m.adapter, m.id))  # each name, then its versions
        base = [ServedModel(loaded.model_name)] if caller.tenant.may_call(None) else []
        return base + adapters

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """text's token ids under the base model's tokenizer (its BOS first with add_special_tokens),
        within the prompt size limit as a prompt is."""
        self._check_size(GenerationInput(prompt=text))
        return list(self.ready().codec.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of token ids, special tokens included: what echo returns for a prompt of ids.
        Ids are checked as the engine checks a prompt's (a padded vocabulary's extra ids decode to "")."""
        loaded = self.ready()
        vocab = loaded.engine.spec.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise InvalidRequest(f"token ids must be integers in [0, {vocab})")
        return loaded.codec.tokenizer.decode([t for t in token_ids if t < len(loaded.codec.tokenizer)],
                                             skip_special_tokens=False)

    def logprob_texts(self, logprobs: list) -> dict[int, str]:
        """The text of every token these logprobs name (each chosen token and its alternatives),
        on its own, special tokens included: what both protocols show beside the numbers."""
        return self.token_texts({i for lp in logprobs for i in (lp.token_id, *(t for t, _ in lp.top))})

    def token_texts(self, ids) -> dict[int, str]:
        """Each token's text on its own, special tokens included."""
        codec = self.ready().codec
        return {i: codec.token_text(i) for i in set(ids)}

    @staticmethod
    def _piece(text: str, tokens: list[int], done: int, handle, version, index: int) -> Piece:
        """A piece of `tokens`, which follow the `done` tokens sent before; handle.logprobs holds
        (at least) one entry per token yielded so far when logprobs were asked for."""
        return Piece(text, tokens, handle.logprobs[done:done + len(tokens)], handle.request_id, version, index=index)

    def _observe(self, call: _Call, outputs: list[Output]) -> None:
        """One call's metrics, however many samples it had: its prompt once, every sample's tokens."""
        now = time.perf_counter()
        m = self.metrics
        m.request_duration.labels(call.label).observe(now - call.started)
        m.prompt_tokens.inc(outputs[0].prompt_tokens)
        generated = sum(len(o.token_ids) for o in outputs)
        m.generation_tokens.labels(call.label).inc(generated)
        if call.first_token is not None:
            m.time_to_first_token.labels(call.label).observe(call.first_token - call.started)
            steps = max(len(o.token_ids) for o in outputs)
            if steps > 1:
                m.time_per_output_token.labels(call.label).observe((now - call.first_token) / (steps - 1))

    @staticmethod
    def _check_access(loaded: LoadedModel, caller: Caller, ref: AdapterRef | None) -> None:
        """Another tenant's adapter is answered as one that does not exist, word for word."""
        if caller.tenant.may_call(ref.name if ref else None):
            return
        if ref is None:
            raise PermissionDenied(f"tenant {caller.tenant.name!r} may not call the base model {loaded.model_name!r}; "
                                   "name one of its adapters")
        raise loaded.manager.missing(ref)

    def _meter(self, call: _Call) -> None:
        """A finished call's usage: its tenant's quota settled with what it used, the tenant
        counters, and a line of the usage log, all from the same numbers."""
        completion = sum(call.completion_tokens.values())
        if call.reservation is not None:
            call.reservation.settle(call.prompt_tokens + completion)
        tenant, m = call.caller.tenant.name, self.metrics
        m.tenant_requests.labels(tenant, call.code).inc()
        m.tenant_prompt_tokens.labels(tenant).inc(call.prompt_tokens)
        m.tenant_cached_tokens.labels(tenant).inc(call.cached_tokens)
        m.tenant_completion_tokens.labels(tenant).inc(completion)
        if call.rejected_by is not None:
            m.tenant_rejections.labels(tenant, call.rejected_by).inc()
        if self.usage_log is not None:
            self.usage_log.write(Usage(tenant=tenant, key_id=call.caller.key_id, adapter=call.adapter,
                                       protocol=call.protocol, status=call.code, request_id=call.request_id,
                                       prompt_tokens=call.prompt_tokens, cached_tokens=call.cached_tokens,
                                       completion_tokens=completion, latency_s=time.perf_counter() - call.started))

    def _check_size(self, request: GenerationInput) -> None:
        limits = self.limits
        if request.messages is not None:
            if len(request.messages) > limits.max_messages:
                raise InvalidRequest(f"messages: {len(request.messages)} messages; the limit is {limits.max_messages}")
            size = sum(len(m["content"].encode()) + len(m["role"].encode()) for m in request.messages)
        else:
            size = len((request.prompt or "").encode())
        if size > limits.max_prompt_bytes:
            raise InvalidRequest(f"prompt: {size} bytes; the limit is {limits.max_prompt_bytes} (--max-prompt-bytes)")

    async def _prompt(self, loaded: LoadedModel, request: GenerationInput,
                      ref: AdapterRef | None) -> tuple[list[int], AdapterRef | None]:
        """The prompt's token ids, and the adapter to submit on. An adapter's chat is rendered with
        the template it was trained with, so the request is pinned to the version whose template
        rendered it."""
        if request.messages is None or ref is None:
            return await asyncio.to_thread(self._prompt_ids, loaded.codec, request, None), ref
        version = await _resolve(loaded.manager, ref)
        template = version.chat_template_for(loaded.codec.tokenizer.chat_template)
        return (await asyncio.to_thread(self._prompt_ids, loaded.codec, request, template),
                AdapterRef(version.name, version.version))

    @staticmethod
    def _prompt_ids(codec: TextCodec, request: GenerationInput, chat_template: str | None) -> list[int]:
        if request.prompt is not None:
            return codec.encode_prompt(request.prompt)
        if request.messages is not None:
            return codec.encode_chat(list(request.messages), chat_template)
        if request.prompt_token_ids is not None:
            if not request.prompt_token_ids:  # the field the caller sent, named as the other two are (text.py)
                raise InvalidRequest("prompt_token_ids is empty")
            return list(request.prompt_token_ids)
        raise InvalidRequest("one of prompt, messages or prompt_token_ids must be set")

    def _sampling(self, engine: Engine, request: GenerationInput, prompt_len: int) -> SamplingParams:
        """The request's sampling with its max_new_tokens: its own, else the server's default cut
        to the room the context leaves (at least 1: a prompt with no room is the engine's to refuse)."""
        max_new_tokens = request.max_new_tokens
        if max_new_tokens is None:
            max_new_tokens = max(1, min(self.default_max_new_tokens, engine.config.max_seq_len - prompt_len))
        return replace(request.sampling, max_new_tokens=max_new_tokens)


def _rejected_by(error: BaseException, call: _Call) -> str | None:
    """The limit a refusal is counted under: a quota's, or the engine's queue when it was full
    (a ResourceExhausted before the request was submitted)."""
    if isinstance(error, RateLimited):
        return error.limit
    if status_of(error).grpc_code.name == "RESOURCE_EXHAUSTED" and not call.prompt_tokens:
        return "queue"
    return None


def _with_prompt(piece: Piece, handle, scored: list[int] | None) -> Piece:
    """The piece, with the prompt and its logprobs when it is the first of a sample whose prompt
    was scored (the engine fills handle.prompt_logprobs before its first token or its end)."""
    if scored is not None:
        piece.prompt_token_ids, piece.prompt_logprobs = scored, list(handle.prompt_logprobs)
    return piece


async def _resolve(manager: AdapterManager, ref: AdapterRef) -> AdapterVersion:
    """manager.resolve: at once for a version in memory, else on the adapter loader's threads."""
    ready = manager.resolve_if_ready(ref)
    if ready is not None:
        return ready
    return await asyncio.get_running_loop().run_in_executor(manager.loader, manager.resolve, ref)


async def _submit(manager: AdapterManager, ref: AdapterRef | None, request: Request, n: int):
    """manager.submit on the adapter loader's threads when it must load a cold version. If the
    caller is cancelled meanwhile (the client went away), the requests it was submitting are
    cancelled as soon as the submit returns: nobody would read them."""
    loop = asyncio.get_running_loop()
    ready = manager.submit_if_ready(ref, request, loop, n)  # base or warm: no thread, no waiting
    if ready is not None:
        return ready
    submitting = loop.run_in_executor(manager.loader, manager.submit, ref, request, loop, n)
    try:
        return await asyncio.shield(submitting)
    except asyncio.CancelledError:
        submitting.add_done_callback(_cancel_orphans)
        raise


def _cancel_orphans(submitting: asyncio.Future) -> None:
    if not submitting.cancelled() and submitting.exception() is None:
        handles, _ = submitting.result()
        for handle in handles:
            handle.cancel()


async def merged(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """The pieces of several streams (samples, or the prompts of one HTTP request) as each comes;
    the first failure ends them all (closing a stream cancels its requests)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[Piece]) -> None:
        try:
            async for piece in stream:
                await queue.put(piece)
            await queue.put(done)
        except Exception as exc:  # handed to the reader, who raises it
            await queue.put(exc)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
