"""The gRPC servicers: protobuf <-> generation calls / adapter manager, and nothing else.

Generation itself (shared with the HTTP API) is server/serving/generation.py. Every error leaves through
`_abort`, which uses status.grpc_status (the one mapping), with a `retry-after` trailing metadata
entry (seconds) when a tenant's quota refused the call; anything that blocks (adapter reads,
store listings) runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time
from dataclasses import dataclass

import grpc

from protos.hotlora.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

from ..adapters.manager import AdapterManager
from ..adapters.versions import AdapterRef, AdapterStatus, AdapterVersion
from ..engine.engine import Output, TokenLogprob
from ..engine.structured import OutputFormat
from ..errors import HotloraError, InvalidRequest, PermissionDenied, Unauthenticated
from ..model.sampling import SamplingParams
from .api_keys import OpenAccess
from .generation import GenerationInput, Generations
from .status import grpc_status, retry_after_s
from .tenants import Tenant, Tenants

log = logging.getLogger(__name__)

_FINISH = {"stop": generation_pb2.FINISH_REASON_STOP, "length": generation_pb2.FINISH_REASON_LENGTH}
_TIER = {"device": adapters_pb2.TIER_DEVICE, "host": adapters_pb2.TIER_HOST, "store": adapters_pb2.TIER_STORE}


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


async def _abort(context: grpc.aio.ServicerContext, error: BaseException, logged: bool = False) -> None:
    code, message = grpc_status(error)
    if code == grpc.StatusCode.INTERNAL and not logged:
        log.error("internal error", exc_info=error)
    wait = retry_after_s(error)
    trailing = (("retry-after", str(max(1, math.ceil(wait)))),) if wait is not None else ()
    await context.abort(code, message, trailing)


class GenerationService(generation_pb2_grpc.GenerationServicer):
    """access: who may call (ApiKeys or Tenants: every call then needs metadata 'authorization:
    Bearer <API key>'); None: anyone, as the one tenant."""

    def __init__(self, generations: Generations, access=None):
        self.generations = generations
        self.access = access or OpenAccess()

    def _authorize(self, context):
        return self.access.identify(dict(context.invocation_metadata() or ()).get("authorization"))

    async def Generate(self, request, context):
        async with contextlib.aclosing(self._run(request, context)) as run:
            pieces = [piece async for piece in run]
        if not pieces:
            return generation_pb2.GenerateResponse()  # aborted: the status is already set
        samples = [self._sample(index, [p for p in pieces if p.index == index]) for index in sorted({p.index for p in pieces})]
        finals = [p for p in pieces if p.output is not None]
        first, last = samples[0], min(finals, key=lambda p: p.index)
        opening = next(p for p in pieces if p.index == 0)  # the prompt's logprobs ride on each sample's first piece
        usage = _usage(last.output)
        usage.completion_tokens = sum(len(p.output.token_ids) for p in finals)
        return generation_pb2.GenerateResponse(
            text=first.text, token_ids=first.token_ids, finish_reason=first.finish_reason, usage=usage,
            adapter=_adapter_used(last.adapter, last.output), request_id=last.request_id, logprobs=first.logprobs,
            samples=samples if len(samples) > 1 else [], prompt_token_ids=opening.prompt_token_ids or [],
            prompt_logprobs=self._logprobs(opening.prompt_logprobs or []))

    async def GenerateStream(self, request, context):
        started = set()  # samples whose first message has gone out
        # closed deterministically, so a stream grpc stops reading cancels its request at once
        async with contextlib.aclosing(self._run(request, context)) as run:
            async for piece in run:
                message = generation_pb2.GenerateStreamResponse(text=piece.text, token_ids=piece.token_ids,
                                                                request_id=piece.request_id, index=piece.index,
                                                                logprobs=self._logprobs(piece.logprobs),
                                                                prompt_token_ids=piece.prompt_token_ids or [],
                                                                prompt_logprobs=self._logprobs(piece.prompt_logprobs or []))
                if piece.index not in started or piece.output is not None:
                    message.adapter.CopyFrom(_adapter_used(piece.adapter, piece.output))
                if piece.output is not None:
                    message.finish_reason = _FINISH[piece.finish_reason]
                    message.usage.CopyFrom(_usage(piece.output))
                started.add(piece.index)
                yield message

    def _sample(self, index: int, pieces: list) -> generation_pb2.Sample:
        """One sample's pieces, whole."""
        return generation_pb2.Sample(index=index, text="".join(p.text for p in pieces),
                                     token_ids=[t for p in pieces for t in p.token_ids],
                                     finish_reason=_FINISH[pieces[-1].finish_reason],
                                     logprobs=self._logprobs([lp for p in pieces for lp in p.logprobs]))

    async def ListModels(self, request, context):
        try:
            caller = self._authorize(context)
            _decoded(request)
            models = await asyncio.to_thread(self.generations.models, caller)  # may list the store's directories
        except Exception as exc:
            await _abort(context, exc)
        else:
            return generation_pb2.ListModelsResponse(models=[
                generation_pb2.Model(id=m.id, adapter=m.adapter, version=m.version) for m in models])

    async def _run(self, request, context):
        caller = None
        try:
            caller = self._authorize(context)
            generation = _generation_input(_decoded(request), context)
        except HotloraError as exc:
            self.generations.count_refused("grpc", exc, caller)
            await _abort(context, exc)
        try:
            async with contextlib.aclosing(self.generations.run(generation, "grpc", caller)) as pieces:
                async for piece in pieces:
                    yield piece
        except (asyncio.CancelledError, GeneratorExit, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort(context, exc, logged=True)  # generations.run logged an unexpected one

    def _logprobs(self, logprobs: list[TokenLogprob]) -> list:
        if not logprobs:
            return []
        texts = self.generations.logprob_texts(logprobs)
        return [generation_pb2.TokenLogprob(
            token_id=lp.token_id, token=texts[lp.token_id], logprob=lp.logprob,
            top=[generation_pb2.TopLogprob(token_id=t, token=texts[t], logprob=v) for t, v in lp.top]) for lp in logprobs]


def _generation_input(request, context) -> GenerationInput:
    """A GenerateRequest as the protocol-neutral GenerationInput; unset fields take their defaults."""
    s = request.sampling
    which = request.WhichOneof("input")
    sampling = SamplingParams(
        temperature=s.temperature if s.HasField("temperature") else 1.0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        top_k=s.top_k if s.HasField("top_k") else 0,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        min_p=s.min_p if s.HasField("min_p") else 0.0,
        logit_bias=tuple(sorted(s.logit_bias.items())), stop_token_ids=tuple(s.stop_token_ids),
        seed=s.seed if s.HasField("seed") else None,
        ignore_eos=request.ignore_eos,
        logprobs=request.top_logprobs if request.HasField("top_logprobs") else None,
        prompt_logprobs=request.prompt_logprobs if request.HasField("prompt_logprobs") else None)
    return GenerationInput(
        prompt=request.prompt if which == "prompt" else None,
        messages=tuple({"role": m.role, "content": m.content} for m in request.messages.messages) if which == "messages" else None,
        prompt_token_ids=tuple(request.prompt_token_ids.ids) if which == "prompt_token_ids" else None,
        adapter=request.adapter, sampling=sampling,
        max_new_tokens=request.max_new_tokens if request.HasField("max_new_tokens") else None,
        stop=tuple(request.stop),
        output_format=_output_format(request.structured_output) if request.HasField("structured_output") else None,
        request_id=request.request_id or None, deadline=_deadline(context), n=request.n if request.HasField("n") else 1)


def _output_format(message) -> OutputFormat:
    which = message.WhichOneof("format")
    if which is None:
        raise InvalidRequest("structured_output: set one of json_schema, json_object, regex, lark_grammar")
    if which == "json_object":
        return OutputFormat("json_object")
    return OutputFormat({"lark_grammar": "lark"}.get(which, which), getattr(message, which))


def _usage(output: Output):
    return generation_pb2.Usage(prompt_tokens=output.prompt_tokens, completion_tokens=len(output.token_ids),
                                cached_tokens=output.cached_tokens)


def _adapter_used(version: AdapterVersion | None, output: Output | None):
    if version is None:
        return generation_pb2.AdapterUsed()
    content_hash = output.adapter_hash if output is not None else version.content_hash
    return generation_pb2.AdapterUsed(name=version.name, version=version.version, content_hash=content_hash)


class AdaptersService(adapters_pb2_grpc.AdaptersServicer):
    """Admin surface. With an admin token, every call needs `authorization: Bearer <token>`: the
    admin token (everything), or with tenants one of a tenant's admin_keys, which manages only the
    adapters its patterns match: other names are refused whether they exist or not, and
    ListAdapters shows its own."""

    def __init__(self, admin_token: str | None, generations: Generations, tenants: Tenants | None = None):
        self.admin_token = admin_token
        self.generations = generations  # for the loaded model, once there is one
        self.tenants = tenants

    async def LoadAdapter(self, request, context):
        def load(manager: AdapterManager, scope: Tenant | None):
            ref = _within(scope, AdapterRef.of(request.name, request.version or None))
            if request.path and scope is not None:  # --adapter-path-allow is the server's, not any tenant's
                raise PermissionDenied(f"tenant {scope.name!r}'s admin keys load adapters from the store, not from "
                                       "paths; loading a path needs the admin token")
            if request.path:
                loaded = manager.load_path(ref, request.path)
            elif ref.version:
                loaded = manager.pin(ref)
            else:
                loaded = manager.load(ref)
            return manager.get(AdapterRef(loaded.name, loaded.version))

        status = await self._admin(context, request, load, loads=True)
        if status is not None:
            return adapters_pb2.LoadAdapterResponse(adapter=_adapter_message(status))

    async def UnloadAdapter(self, request, context):
        def unload(manager: AdapterManager, scope: Tenant | None):
            manager.unload(_within(scope, AdapterRef.of(request.name)))
            return True

        if await self._admin(context, request, unload):
            return adapters_pb2.UnloadAdapterResponse()

    async def ListAdapters(self, request, context):
        rows = await self._admin(context, request, lambda manager, scope: [
            s for s in manager.list() if scope is None or scope.may_call(s.version.name)])
        if rows is not None:
            return adapters_pb2.ListAdaptersResponse(adapters=[_adapter_message(s) for s in rows])

    async def GetAdapter(self, request, context):
        status = await self._admin(context, request,
                                   lambda manager, scope: manager.get(_within(scope, AdapterRef.parse(request.adapter))))
        if status is not None:
            return _adapter_message(status)

    async def _admin(self, context, request, fn, loads: bool = False):
        """Check the token and the request, run fn(manager, scope) in a worker thread (the adapter
        loader's when it loads); abort with the mapped status on error. scope: the tenant whose
        admin key called (None: the admin token)."""
        try:
            scope = self._authorize(context)
            _decoded(request)
            manager = self.generations.ready().manager
            return await asyncio.get_running_loop().run_in_executor(manager.loader if loads else None, fn, manager, scope)
        except Exception as exc:
            await _abort(context, exc)

    def _authorize(self, context) -> Tenant | None:
        """None for the admin token (or no token configured); a tenant for one of its admin keys."""
        if self.admin_token is None:
            return None
        metadata = dict(context.invocation_metadata() or ())
        given = metadata.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.admin_token}".encode()):
            return None
        tenant = self.tenants.identify_admin(given) if self.tenants is not None else None
        if tenant is None:
            raise Unauthenticated("the Adapters service needs metadata 'authorization: Bearer <admin token>'")
        return tenant


def _within(scope: Tenant | None, ref: AdapterRef) -> AdapterRef:
    """ref, when the caller's admin scope covers its name; refused otherwise, whether it exists or not."""
    if scope is not None and not scope.may_call(ref.name):
        raise PermissionDenied(f"tenant {scope.name!r}'s admin keys manage adapters matching "
                               f"{list(scope.adapters)}, not {ref.name!r}")
    return ref


def _adapter_message(status: AdapterStatus):
    v = status.version
    return adapters_pb2.Adapter(
        name=v.name, version=v.version, current=status.current, rank=v.rank, target_modules=list(v.target_modules),
        tier=_TIER[status.tier], in_flight=status.in_flight, last_used_unix=status.last_used,
        content_hash=v.content_hash, source=str(v.source))


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
