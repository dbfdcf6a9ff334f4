"""Python clients for hotlora-server: `Client` (blocking) and `AsyncClient` (asyncio).

    client = Client("localhost:50051")
    result = client.generate("Which cheese is blue?", adapter="cheese", max_new_tokens=64)
    print(result.text, result.finish_reason, result.usage, result.adapter_version)
    for piece in client.stream("Tell me about Brie", adapter="cheese"):
        print(piece.text, end="", flush=True)

Errors come back as HotloraClientError subclasses carrying the gRPC status code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Sequence

import grpc

from protos.hotlora.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

_FINISH = {generation_pb2.FINISH_REASON_STOP: "stop", generation_pb2.FINISH_REASON_LENGTH: "length"}
_TIER = {adapters_pb2.TIER_DEVICE: "device", adapters_pb2.TIER_HOST: "host", adapters_pb2.TIER_STORE: "store"}


class HotloraClientError(Exception):
    """A failed call; `.code` is the grpc.StatusCode, str() the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class InvalidArgument(HotloraClientError): ...
class NotFound(HotloraClientError): ...
class FailedPrecondition(HotloraClientError): ...
class ResourceExhausted(HotloraClientError): ...
class Unavailable(HotloraClientError): ...
class DeadlineExceeded(HotloraClientError): ...
class PermissionDenied(HotloraClientError): ...
class Unauthenticated(HotloraClientError): ...


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition, grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable, grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied, grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def _error(exc: grpc.RpcError) -> HotloraClientError:
    code = exc.code()
    return _ERRORS.get(code, HotloraClientError)(code, exc.details() or code.name)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens the server took from its prefix cache


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's logprob and the most likely alternatives: (token id, text, logprob)."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    usage: Usage
    adapter: str  # "" for the base model
    adapter_version: str
    adapter_hash: str
    request_id: str
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token with top_logprobs set
    samples: list[SampleResult] = field(default_factory=list)  # with n > 1, every sample (text etc. above: sample 0's)
    # with prompt_logprobs set: the prompt's ids, and the logprobs of prompt_token_ids[1:]
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class SampleResult:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class StreamPiece:
    text: str
    token_ids: list[int]
    finish_reason: str | None  # set on the last piece (of each sample)
    usage: Usage | None  # set on the last piece (of each sample)
    adapter_version: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    index: int = 0  # which sample it continues (n > 1)
    prompt_token_ids: list[int] = field(default_factory=list)  # on each sample's first piece, with prompt_logprobs
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class ModelInfo:
    id: str  # what to pass as `adapter`: the base model's name, "name" or "name@version"
    adapter: str  # "" for the base model
    version: str


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    version: str
    current: bool
    rank: int
    target_modules: list[str]
    tier: str  # "device" | "host" | "store"
    in_flight: int
    last_used_unix: float
    content_hash: str
    source: str


def build_request(prompt: str | Sequence[dict] | Sequence[int], adapter: str = "", *, max_new_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                  seed: int | None = None, repetition_penalty: float | None = None, stop: Sequence[str] = (),
                  ignore_eos: bool = False, top_logprobs: int | None = None, json_schema: dict | str | None = None,
                  json_object: bool = False, regex: str | None = None, lark_grammar: str | None = None,
                  n: int | None = None, prompt_logprobs: int | None = None, min_p: float | None = None,
                  logit_bias: dict[int, float] | None = None,
                  stop_token_ids: Sequence[int] = ()) -> generation_pb2.GenerateRequest:
    """prompt: text, a list of chat messages ({"role", "content"}), or a list of token ids.
    top_logprobs: return each token's logprob and this many alternatives. json_schema (a dict or
    JSON text), json_object, regex, lark_grammar: hold the output to it (at most one). n: that
    many samples of the prompt (sample i seeded seed + i). prompt_logprobs: the logprob of every
    prompt token after the first, with this many alternatives (max_new_tokens=0: score only).
    min_p, logit_bias ({token id: bias}), stop_token_ids: as OpenAI's and vLLM's."""
    request = generation_pb2.GenerateRequest(adapter=adapter, stop=list(stop), ignore_eos=ignore_eos)
    if n is not None:
        request.n = n
    if prompt_logprobs is not None:
        request.prompt_logprobs = prompt_logprobs
    if top_logprobs is not None:
        request.top_logprobs = top_logprobs
    if json_schema is not None:
        request.structured_output.json_schema = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
    if json_object:
        request.structured_output.json_object = True
    if regex is not None:
        request.structured_output.regex = regex
    if lark_grammar is not None:
        request.structured_output.lark_grammar = lark_grammar
    if isinstance(prompt, str):
        request.prompt = prompt
    elif prompt and isinstance(prompt[0], dict):
        request.messages.messages.extend(generation_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)
    else:
        request.prompt_token_ids.ids.extend(prompt)
    if max_new_tokens is not None:
        request.max_new_tokens = max_new_tokens
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed,
                "repetition_penalty": repetition_penalty, "min_p": min_p}
    for name, value in sampling.items():
        if value is not None:
            setattr(request.sampling, name, value)
    request.sampling.logit_bias.update(logit_bias or {})
    request.sampling.stop_token_ids.extend(stop_token_ids)
    return request


def _logprobs(messages) -> list[TokenLogprob]:
    return [TokenLogprob(m.token_id, m.token, m.logprob, [(t.token_id, t.token, t.logprob) for t in m.top])
            for m in messages]


def _result(response) -> GenerationResult:
    usage = Usage(response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.cached_tokens)
    samples = [SampleResult(s.index, s.text, list(s.token_ids), _FINISH.get(s.finish_reason, ""), _logprobs(s.logprobs))
               for s in response.samples]
    return GenerationResult(response.text, list(response.token_ids), _FINISH.get(response.finish_reason, ""), usage,
                            response.adapter.name, response.adapter.version, response.adapter.content_hash,
                            response.request_id, _logprobs(response.logprobs), samples,
                            list(response.prompt_token_ids), _logprobs(response.prompt_logprobs))


def _piece(message) -> StreamPiece:
    last = message.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
    usage = Usage(message.usage.prompt_tokens, message.usage.completion_tokens, message.usage.cached_tokens) if last else None
    return StreamPiece(message.text, list(message.token_ids), _FINISH.get(message.finish_reason) if last else None,
                       usage, message.adapter.version, _logprobs(message.logprobs), message.index,
                       list(message.prompt_token_ids), _logprobs(message.prompt_logprobs))


def _adapter(message) -> AdapterInfo:
    return AdapterInfo(message.name, message.version, message.current, message.rank, list(message.target_modules),
                       _TIER.get(message.tier, "unknown"), message.in_flight, message.last_used_unix,
                       message.content_hash, message.source)


def _open_channel(target: str, tls: bool, root_certificates: bytes | None, server_name: str | None, aio: bool):
    module = grpc.aio if aio else grpc
    if tls or root_certificates is not None:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        return module.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options=options)
    return module.insecure_channel(target)


def _bearer(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


class Client:
    """Blocking client. api_key is sent (as a bearer token) on Generation calls, admin_token on
    Adapters calls. tls with root_certificates (PEM) trusts that CA; tls alone, the system's.
    server_name: the name the certificate must carry, when the target is an address."""

    def __init__(self, target: str = "localhost:50051", *, admin_token: str | None = None, api_key: str | None = None,
                 tls: bool = False, root_certificates: bytes | None = None, server_name: str | None = None,
                 timeout: float | None = 600.0):
        self._channel = _open_channel(target, tls, root_certificates, server_name, aio=False)
        self._generation = generation_pb2_grpc.GenerationStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdaptersStub(self._channel)
        self._admin, self._key = _bearer(admin_token), _bearer(api_key)
        self.timeout = timeout

    def generate(self, prompt, adapter: str = "", **options) -> GenerationResult:
        try:
            return _result(self._generation.Generate(build_request(prompt, adapter, **options), metadata=self._key,
                                                           timeout=self.timeout))
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def stream(self, prompt, adapter: str = "", **options) -> Iterator[StreamPiece]:
        call = self._generation.GenerateStream(build_request(prompt, adapter, **options), metadata=self._key,
                                               timeout=self.timeout)
        try:
            for message in call:
                yield _piece(message)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            call.cancel()  # a caller that stops iterating frees the server's sequence

    def models(self) -> list[ModelInfo]:
        """What `adapter` can name: the base model first (when the caller's tenant may call it), then every
        adapter it may call (no admin token needed)."""
        try:
            reply = self._generation.ListModels(generation_pb2.ListModelsRequest(), metadata=self._key,
                                                    timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return [ModelInfo(m.id, m.adapter, m.version) for m in reply.models]

    def load_adapter(self, name: str, version: str = "", path: str = "") -> AdapterInfo:
        return _adapter(self._admin_call(self._adapters.LoadAdapter,
                                         adapters_pb2.LoadAdapterRequest(name=name, version=version, path=path)).adapter)

    def unload_adapter(self, name: str) -> None:
        self._admin_call(self._adapters.UnloadAdapter, adapters_pb2.UnloadAdapterRequest(name=name))

    def list_adapters(self) -> list[AdapterInfo]:
        return [_adapter(a) for a in self._admin_call(self._adapters.ListAdapters, adapters_pb2.ListAdaptersRequest()).adapters]

    def get_adapter(self, adapter: str) -> AdapterInfo:
        return _adapter(self._admin_call(self._adapters.GetAdapter, adapters_pb2.GetAdapterRequest(adapter=adapter)))

    def _admin_call(self, method, request):
        try:
            return method(request, metadata=self._admin, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def health(self, service: str = "") -> str:
        """The server's grpc.health.v1 status for `service` ("" = the server as a whole):
        "SERVING" once the model is loaded, "NOT_SERVING" while loading or draining."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = health_pb2_grpc.HealthStub(self._channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                     timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient:
    """asyncio client with the same methods as Client (awaitable; stream() is an async iterator)."""

    def __init__(self, target: str = "localhost:50051", *, admin_token: str | None = None, api_key: str | None = None,
                 tls: bool = False, root_certificates: bytes | None = None, server_name: str | None = None,
                 timeout: float | None = 600.0):
        self._channel = _open_channel(target, tls, root_certificates, server_name, aio=True)
        self._generation = generation_pb2_grpc.GenerationStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdaptersStub(self._channel)
        self._admin, self._key = _bearer(admin_token), _bearer(api_key)
        self.timeout = timeout

    async def generate(self, prompt, adapter: str = "", **options) -> GenerationResult:
        try:
            return _result(await self._generation.Generate(build_request(prompt, adapter, **options), metadata=self._key,
                                                           timeout=self.timeout))
        except grpc.RpcError as exc:
            raise _error(exc) from None

    async def stream(self, prompt, adapter: str = "", **options) -> AsyncIterator[StreamPiece]:
        call = self._generation.GenerateStream(build_request(prompt, adapter, **options), metadata=self._key,
                                               timeout=self.timeout)
        try:
            async for message in call:
                yield _piece(message)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            call.cancel()

    async def models(self) -> list[ModelInfo]:
        try:
            reply = await self._generation.ListModels(generation_pb2.ListModelsRequest(), metadata=self._key,
                                                    timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return [ModelInfo(m.id, m.adapter, m.version) for m in reply.models]

    async def load_adapter(self, name: str, version: str = "", path: str = "") -> AdapterInfo:
        response = await self._admin_call(self._adapters.LoadAdapter,
                                          adapters_pb2.LoadAdapterRequest(name=name, version=version, path=path))
        return _adapter(response.adapter)

    async def unload_adapter(self, name: str) -> None:
        await self._admin_call(self._adapters.UnloadAdapter, adapters_pb2.UnloadAdapterRequest(name=name))

    async def list_adapters(self) -> list[AdapterInfo]:
        response = await self._admin_call(self._adapters.ListAdapters, adapters_pb2.ListAdaptersRequest())
        return [_adapter(a) for a in response.adapters]

    async def get_adapter(self, adapter: str) -> AdapterInfo:
        return _adapter(await self._admin_call(self._adapters.GetAdapter, adapters_pb2.GetAdapterRequest(adapter=adapter)))

    async def _admin_call(self, method, request):
        try:
            return await method(request, metadata=self._admin, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
