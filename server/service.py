"""The gRPC servicers: protobuf <-> engine / adapter manager, and nothing else.

Every error leaves through `_abort`, which uses errors.grpc_status (the one mapping); anything
that blocks (adapter reads, submits that may load an adapter) runs in a worker thread, never on
the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field

import grpc

from protos.hotlora.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

from .adapters import AdapterManager, AdapterStatus, AdapterVersion
from .config import RequestLimits
from .engine import Engine, FinishReason, Output, Request
from .errors import DeadlineExceeded, Draining, HotloraError, InvalidRequest, NotReady, Unauthenticated, grpc_status
from .metrics import UNRESOLVED, Metrics
from .sampling import SamplingParams
from .text import TextCodec

log = logging.getLogger(__name__)

_FINISH = {FinishReason.STOP: generation_pb2.FINISH_REASON_STOP, FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH}
_TIER = {"gpu": adapters_pb2.TIER_GPU, "cpu": adapters_pb2.TIER_CPU, "store": adapters_pb2.TIER_STORE}


@dataclass(frozen=True)
class Undecodable:
    """What a servicer receives instead of a request whose bytes are not its message (garbage,
    invalid UTF-8 in a string field): it answers INVALID_ARGUMENT. Left to grpc, a decode error
    was UNKNOWN plus a traceback in the log per request."""

    message: str
    reason: str

    def error(self) -> InvalidRequest:
        log.warning("a %s request could not be decoded: %s", self.message, self.reason)
        return InvalidRequest(f"the request could not be decoded as {self.message}: {self.reason}")


def add_to_server(server: grpc.aio.Server, servicer, service) -> None:
    """Register `servicer` for the protobuf service descriptor `service`, as the generated
    add_*_to_server would, but decoding requests leniently (see Undecodable)."""
    from google.protobuf import message_factory

    handlers = {}
    for method in service.methods:
        message_class = message_factory.GetMessageClass(method.input_type)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=_lenient(message_class),
                                     response_serializer=message_factory.GetMessageClass(method.output_type).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _lenient(message_class):
    from google.protobuf.message import DecodeError

    def decode(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Undecodable(message_class.DESCRIPTOR.full_name, str(exc))

    return decode


def _decoded(request):
    if isinstance(request, Undecodable):
        raise request.error()
    return request


async def _abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    code, message = grpc_status(error)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error", exc_info=error)
    await context.abort(code, message)


@dataclass
class _Piece:
    text: str
    token_ids: list[int]
    request_id: str
    output: Output | None = None  # set on the last piece
    stopped_by_string: bool = False


@dataclass
class _Call:
    """One generation call's bookkeeping for metrics."""

    label: str = "base"
    code: grpc.StatusCode = grpc.StatusCode.OK
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None


@dataclass(frozen=True)
class Backend:
    """What the services need once the model is loaded. Until then they answer UNAVAILABLE (the
    services are registered before the model loads, so health can say NOT_SERVING meanwhile)."""

    engine: Engine
    manager: AdapterManager
    codec: TextCodec


class _NeedsBackend:
    backend: Backend | None = None

    def _ready(self) -> Backend:
        if self.backend is None:
            raise NotReady("the server is still loading the model")
        return self.backend


class GenerationService(_NeedsBackend, generation_pb2_grpc.GenerationServicer):
    def __init__(self, metrics: Metrics, default_max_new_tokens: int, limits: RequestLimits = RequestLimits()):
        self.metrics = metrics
        self.default_max_new_tokens = default_max_new_tokens
        self.limits = limits

    async def Generate(self, request, context):
        text, token_ids, last, version = [], [], None, None
        async for piece, version in self._run(request, context):
            text.append(piece.text)
            token_ids += piece.token_ids
            last = piece
        if last is None:
            return generation_pb2.GenerateResponse()  # aborted: the status is already set
        return generation_pb2.GenerateResponse(
            text="".join(text), token_ids=token_ids, finish_reason=self._finish(last), usage=self._usage(last.output),
            adapter=self._adapter_used(version, last.output), request_id=last.output.request_id)

    async def GenerateStream(self, request, context):
        first = True
        async for piece, version in self._run(request, context):
            message = generation_pb2.GenerateStreamResponse(text=piece.text, token_ids=piece.token_ids)
            if first or piece.output is not None:
                message.adapter.CopyFrom(self._adapter_used(version, piece.output))
            if piece.output is not None:
                message.finish_reason = self._finish(piece)
                message.usage.CopyFrom(self._usage(piece.output))
            message.request_id = piece.request_id
            first = False
            yield message

    async def _run(self, request, context):
        """Yields (piece, adapter version) as text becomes available; the last piece has .output."""
        call = _Call()
        try:
            request = _decoded(request)
            call.label = UNRESOLVED if request.adapter else "base"
            backend = self._ready()
            self._check_size(request)  # cheap limits first; then the real work off the event loop
            prompt_ids = await asyncio.to_thread(self._prompt_ids, backend.codec, request)
            engine_request = Request(prompt_ids=prompt_ids, sampling=self._sampling(backend.engine, request, len(prompt_ids)),
                                     deadline=_deadline(context), request_id=request.request_id or None)
            decoder = backend.codec.decoder(prompt_ids, list(request.stop))
            handle, version = await _submit(backend.manager, request.adapter, engine_request)
            call.label = self.metrics.adapter_label(version.name if version else None)
            pending: list[int] = []
            text = ""
            try:
                async for token in handle:
                    call.first_token = call.first_token or time.perf_counter()
                    pending.append(token)
                    text += decoder.push([token])
                    if decoder.stopped:
                        handle.cancel()
                        break
                    if text:
                        yield _Piece(text, pending, handle.request_id), version
                        pending, text = [], ""
                output = await handle.aresult()
            except (asyncio.CancelledError, GeneratorExit):
                # the client went away (a cancel, or the stream closed while grpc waited to send):
                # free the sequence now
                handle.cancel()
                call.code = grpc.StatusCode.CANCELLED
                raise
            if output.finish_reason == FinishReason.DEADLINE:
                raise DeadlineExceeded(f"deadline exceeded after {len(output.token_ids)} generated tokens")
            if output.finish_reason == FinishReason.CANCELLED and not decoder.stopped:
                raise Draining("the server is shutting down and stopped this request")
            self._observe(call, output)
            yield _Piece(text + decoder.finish(), pending, handle.request_id, output, decoder.stopped), version
        except HotloraError as exc:
            call.code = exc.grpc_code
            await _abort(context, exc)
        except (asyncio.CancelledError, GeneratorExit, grpc.aio.AbortError):
            raise
        except Exception as exc:
            call.code = grpc.StatusCode.INTERNAL
            await _abort(context, exc)
        finally:
            self.metrics.requests.labels(call.label, call.code.name).inc()

    def _observe(self, call: _Call, output: Output) -> None:
        now = time.perf_counter()
        m = self.metrics
        m.request_duration.observe(now - call.started)
        m.prompt_tokens.inc(output.prompt_tokens)
        m.generation_tokens.labels(call.label).inc(len(output.token_ids))
        if call.first_token is not None:
            m.time_to_first_token.observe(call.first_token - call.started)
            if len(output.token_ids) > 1:
                m.time_per_output_token.observe((now - call.first_token) / (len(output.token_ids) - 1))

    def _check_size(self, request) -> None:
        limits = self.limits
        if request.WhichOneof("input") == "messages":
            messages = request.messages.messages
            if len(messages) > limits.max_messages:
                raise InvalidRequest(f"messages: {len(messages)} messages; the limit is {limits.max_messages}")
            size = sum(len(m.content.encode()) + len(m.role.encode()) for m in messages)
        else:
            size = len(request.prompt.encode())
        if size > limits.max_prompt_bytes:
            raise InvalidRequest(f"prompt: {size} bytes; the limit is {limits.max_prompt_bytes} (--max-prompt-bytes)")

    @staticmethod
    def _prompt_ids(codec: TextCodec, request) -> list[int]:
        which = request.WhichOneof("input")
        if which == "prompt":
            return codec.encode_prompt(request.prompt)
        if which == "messages":
            return codec.encode_chat([{"role": m.role, "content": m.content} for m in request.messages.messages])
        if which == "prompt_token_ids":
            if not request.prompt_token_ids.ids:
                raise InvalidRequest("prompt_token_ids is empty")
            return list(request.prompt_token_ids.ids)
        raise InvalidRequest("one of prompt, messages or prompt_token_ids must be set")

    def _sampling(self, engine: Engine, request, prompt_len: int) -> SamplingParams:
        s = request.sampling
        room = engine.config.max_seq_len - prompt_len
        if request.HasField("max_new_tokens"):
            max_new_tokens = request.max_new_tokens
        elif room < 1:
            raise InvalidRequest(f"prompt ({prompt_len} tokens) does not fit the context (max_seq_len "
                                 f"{engine.config.max_seq_len}) with room for one new token")
        else:
            max_new_tokens = min(self.default_max_new_tokens, room)
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=s.temperature if s.HasField("temperature") else 1.0,
            top_p=s.top_p if s.HasField("top_p") else 1.0,
            top_k=s.top_k if s.HasField("top_k") else 0,
            repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
            seed=s.seed if s.HasField("seed") else None,
            ignore_eos=request.ignore_eos,
        )
        params.validate()
        return params

    @staticmethod
    def _finish(piece: _Piece) -> int:
        return generation_pb2.FINISH_REASON_STOP if piece.stopped_by_string else _FINISH[piece.output.finish_reason]

    @staticmethod
    def _usage(output: Output):
        return generation_pb2.Usage(prompt_tokens=output.prompt_tokens, completion_tokens=len(output.token_ids))

    @staticmethod
    def _adapter_used(version: AdapterVersion | None, output: Output | None):
        if version is None:
            return generation_pb2.AdapterUsed()
        content_hash = output.adapter_hash if output is not None else version.content_hash
        return generation_pb2.AdapterUsed(name=version.name, version=version.version, content_hash=content_hash)


class AdaptersService(_NeedsBackend, adapters_pb2_grpc.AdaptersServicer):
    """Admin surface. With an admin token, every call needs `authorization: Bearer <token>`."""

    def __init__(self, admin_token: str | None):
        self.admin_token = admin_token

    async def LoadAdapter(self, request, context):
        def load(manager: AdapterManager):
            if request.path:
                loaded = manager.load_path(request.name, request.path)
            elif request.version:
                loaded = manager.pin(request.name, request.version)
            else:
                loaded = manager.load(request.name)
            return manager.get(loaded.key)

        status = await self._admin(context, request, load, loads=True)
        if status is not None:
            return adapters_pb2.LoadAdapterResponse(adapter=_adapter_message(status))

    async def UnloadAdapter(self, request, context):
        if await self._admin(context, request, lambda manager: manager.unload(request.name) or True):
            return adapters_pb2.UnloadAdapterResponse()

    async def ListAdapters(self, request, context):
        rows = await self._admin(context, request, lambda manager: manager.list())
        if rows is not None:
            return adapters_pb2.ListAdaptersResponse(adapters=[_adapter_message(s) for s in rows])

    async def GetAdapter(self, request, context):
        status = await self._admin(context, request, lambda manager: manager.get(request.adapter))
        if status is not None:
            return _adapter_message(status)

    async def _admin(self, context, request, fn, loads: bool = False):
        """Check the token and the request, run fn(manager) in a worker thread (the adapter
        loader's when it loads); abort with the mapped status on error."""
        try:
            self._authorize(context)
            _decoded(request)
            manager = self._ready().manager
            return await asyncio.get_running_loop().run_in_executor(manager.loader if loads else None, fn, manager)
        except Exception as exc:
            await _abort(context, exc)

    def _authorize(self, context) -> None:
        if self.admin_token is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        given = metadata.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.admin_token}".encode()):
            raise Unauthenticated("the Adapters service needs metadata 'authorization: Bearer <admin token>'")


def _adapter_message(status: AdapterStatus):
    v = status.version
    return adapters_pb2.Adapter(
        name=v.name, version=v.version, current=status.current, rank=v.rank, target_modules=list(v.target_modules),
        tier=_TIER[status.tier], in_flight=status.in_flight, last_used_unix=status.last_used,
        content_hash=v.content_hash, source=str(v.source))


async def _submit(manager: AdapterManager, ref: str, request: Request):
    """manager.submit on the adapter loader's threads when it must load a cold version. If the caller is cancelled
    meanwhile (the client went away), the request it was submitting is cancelled as soon as the
    submit returns: nobody would read it."""
    loop = asyncio.get_running_loop()
    ready = manager.submit_if_ready(ref, request, loop)  # base or warm: no thread, no waiting
    if ready is not None:
        return ready
    submitting = loop.run_in_executor(manager.loader, manager.submit, ref, request, loop)
    try:
        return await asyncio.shield(submitting)
    except asyncio.CancelledError:
        submitting.add_done_callback(_cancel_orphan)
        raise


def _cancel_orphan(submitting: asyncio.Future) -> None:
    if not submitting.cancelled() and submitting.exception() is None:
        handle, _ = submitting.result()
        handle.cancel()


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
