"""What callers exchange with the engine: a Request in, a RequestHandle back (tokens as they come,
logprobs, cancel), an Output at the end. Token ids only; text lives in server/serving/text.py."""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum

from ..model.sampling import SamplingParams
from .structured import Grammar


class FinishReason(str, Enum):
    STOP = "stop"            # a stop token (EOS or stop_token_ids) was generated
    LENGTH = "length"        # max_new_tokens reached
    CANCELLED = "cancelled"  # the caller cancelled
    DEADLINE = "deadline"    # the request's deadline passed
    ERROR = "error"          # the engine failed while running it (logged)


@dataclass(frozen=True)
class Request:
    """prompt_ids: the full prompt (already templated). adapter: a loaded adapter's name, or None
    for the base model. deadline: time.monotonic() value after which the request is stopped."""

    prompt_ids: list[int]
    adapter: str | None = None
    sampling: SamplingParams = SamplingParams()
    deadline: float | None = None
    request_id: str | None = None
    grammar: Grammar | None = None  # the output must match it (server/engine/structured.py)
    # whose request it is, for the fair share across tenants (server/engine/scheduler.py); None: no tenants
    tenant: str | None = None
    weight: float = 1.0  # the tenant's share against the others'


@dataclass(frozen=True)
class Output:
    request_id: str
    token_ids: list[int]  # generated tokens; a stop token that ended generation is included
    finish_reason: FinishReason
    prompt_tokens: int
    adapter: str | None
    adapter_hash: str | None  # content hash of the adapter weights actually used
    cached_tokens: int = 0  # prompt tokens whose keys came from the prefix cache (not prefilled)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the most likely alternatives, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob)


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    rank: int
    target_modules: tuple[str, ...]
    content_hash: str
    source: str
    in_flight: int  # requests queued or running on it
    resident: bool  # holds a LoRA slot on the device now
    last_used: float  # time.time() of the last request that used it; 0.0 if none yet
    host_bytes: int  # what its packed image takes in the host tier


_DONE = object()


class RequestHandle:
    """What submit() returns: iterate for token ids as they are produced, result() for the
    Output, cancel() to stop (its KV blocks are freed at the next step). With sampling.logprobs set,
    logprobs[i] describes the i-th token; it is there before that token is yielded. With
    sampling.prompt_logprobs set, prompt_logprobs[i] describes prompt token i + 1 (the first has
    none); they are all there before the first token is yielded, or the result is set."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None):
        self.request_id = request_id
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob] = []
        self._loop = loop
        self._events: queue.Queue | asyncio.Queue = asyncio.Queue() if loop else queue.Queue()
        self._output: Future = Future()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def result(self, timeout: float | None = None) -> Output:
        return self._output.result(timeout)

    def done(self) -> bool:
        """True once the request has finished (its Output, or its error, is set)."""
        return self._output.done()

    def add_done_callback(self, fn) -> None:
        """fn(handle) once the request has finished (on the engine thread, or at once if it has)."""
        self._output.add_done_callback(lambda _: fn(self))

    async def aresult(self) -> Output:
        return await asyncio.wrap_future(self._output)

    def __iter__(self):
        while (event := self._events.get()) is not _DONE:
            yield event
        self._output.result()  # re-raises an engine error

    async def __aiter__(self):
        while (event := await self._events.get()) is not _DONE:
            yield event
        self._output.result()

    # The engine's side (its thread): tokens as they come, then the end.
    def emit(self, token_id: int) -> None:
        self._put(token_id)

    def complete(self, output: Output) -> None:
        self._output.set_result(output)
        self._put(_DONE)

    def fail(self, error: BaseException) -> None:
        self._output.set_exception(error)
        self._put(_DONE)

    def _put(self, event) -> None:
        if self._loop is None:
            self._events.put(event)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
