"""The OpenAI-compatible HTTP API, beside gRPC in the same process, on the same engine.

    POST /v1/completions, POST /v1/chat/completions (JSON, or server-sent events with "stream")
    GET  /v1/models, GET /v1/models/{id}, GET /health, GET /metrics (where the inference gateway reads them)
    POST /tokenize, POST /detokenize, GET /tokenizer_info (vLLM's), GET /openapi.json

`model` picks the adapter as vLLM does: the base model's name for no adapter, "name" for an
adapter's current version, "name@version" for one version. The bodies and the fields hotlora acts
on are server/serving/openai_requests.py's: OpenAI's sampling fields, logit_bias and
response_format, vLLM's top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos and
structured_outputs; any other field that would change the answer is refused with a 400 naming it.
`n` asks for several samples of the prompt (they share its KV blocks). /v1/completions takes a
list of prompts (text, or token-id lists) and `echo`: the prompt comes back before the completion,
with `logprobs` covering its tokens too (the first one's is null) and `max_tokens: 0` scoring it
without generating — what lm-evaluation-harness's local-completions model sends for
log-likelihoods; /tokenize, /detokenize and /tokenizer_info let the harness tokenize with the
server's own tokenizer. Errors use OpenAI's shape, statuses from server/serving/status.py, and
/openapi.json says so. Admin operations stay on gRPC. With API keys (server/serving/api_keys.py)
or tenants (server/serving/tenants.py) every route but /health, /metrics and /openapi.json needs
`Authorization: Bearer <key>` (401 in OpenAI's shape), and a tenant sees and calls only its own
adapters; with the server's certificate it serves HTTPS. A request over a tenant's quota gets 429
with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import AdapterNotFound, InvalidRequest, Unauthenticated
from .api_keys import OpenAccess
from .generation import GenerationInput, Generations, Piece, ServedModel, merged
from .openai_requests import (ChatCompletionBody, CompletionBody, DetokenizeBody, RequestBody, TokenizeBody,
                              refuse_unknown)
from .openai_responses import ChatResponses, CompletionResponses
from .status import openai_error, retry_after_s
from .tenants import ANONYMOUS, Caller

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the app


OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json"})  # probes, Prometheus, the schema: never behind a key


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, which every refusal has (server/serving/status.py)."""

    error: ErrorDetail


_ERROR_MEANINGS = {400: "Invalid request (a bad body included)",
                   401: "No valid API key (with --api-key-file or --tenants-file)",
                   403: "The tenant may not call the base model", 404: "Unknown model or adapter",
                   422: "The adapter was refused (incompatible or invalid)",
                   429: "The queue is full, or the tenant is over a limit (see Retry-After)", 500: "Internal error",
                   503: "Loading or draining", 504: "The request's deadline passed"}


def _errors(*statuses: int) -> dict:
    """OpenAPI `responses` for these error statuses, each in OpenAI's error shape."""
    return {status: {"model": ErrorResponse, "description": _ERROR_MEANINGS[status]} for status in statuses}


_GENERATION = _errors(400, 401, 403, 404, 422, 429, 500, 503, 504)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hotlora")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0"


def _openapi(app: FastAPI) -> dict:
    """The schema FastAPI derives, made true to what the server answers: a body that does not
    parse is a 400 in OpenAI's error shape here, not FastAPI's 422 with its own body."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for item in schema["paths"].values():
            for operation in item.values():
                validation = operation["responses"].get("422", {})
                if validation.get("description") == "Validation Error":
                    del operation["responses"]["422"]
        for unused in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema


class _Identify:
    """ASGI middleware: every path but OPEN_PATHS needs a caller `access` recognises, checked from
    the headers before the app reads a byte of the body (a caller without a key cannot make it
    parse one); the routes find it in request.state.caller."""

    def __init__(self, app, access, refused):
        self.app, self.access, self.refused = app, access, refused

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            try:
                scope.setdefault("state", {})["caller"] = self.access.identify(authorization)
            except Unauthenticated as exc:
                await self.refused(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _caller(request: Request) -> Caller:
    return getattr(request.state, "caller", ANONYMOUS)


def build_app(generations: Generations, access=None) -> FastAPI:
    """access: who may call (server/serving/api_keys.py's ApiKeys or OpenAccess, or
    server/serving/tenants.py's Tenants); None: anyone, as the one tenant."""
    app = FastAPI(title="hotlora", version=_version(), docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  description="OpenAI-compatible API of hotlora-server: `model` picks the adapter.")
    app.openapi = lambda: _openapi(app)

    def error_response(error: BaseException) -> JSONResponse:
        status, body = openai_error(error)
        wait = retry_after_s(error)
        headers = {"Retry-After": str(max(1, math.ceil(wait)))} if wait is not None else None
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):  # a body that cannot be read, an unknown route
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    def unauthenticated(exc: Unauthenticated) -> JSONResponse:
        generations.count_refused("http", exc)
        response = error_response(exc)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    app.add_middleware(_Identify, access=access or OpenAccess(), refused=unauthenticated)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        generations.count_refused("http", InvalidRequest(problems), _caller(request))
        return error_response(InvalidRequest(problems))

    @app.get("/metrics", responses={200: {"content": {"text/plain": {}}, "description": "Prometheus metrics"}})
    async def metrics():  # as vLLM serves them: the inference gateway scrapes the port it routes to
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(await asyncio.to_thread(generate_latest, generations.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", responses=_errors(503))
    async def health():
        """200 while the model is loaded. An adapter store that cannot be reached is said here
        (`adapter_store`) without failing the check: the versions in memory keep serving."""
        try:
            loaded = generations.ready()
        except Exception as exc:
            return error_response(exc)
        store = loaded.manager.store
        if store is None:
            return JSONResponse({"status": "ok"})
        unreachable = store.unreachable
        return JSONResponse({"status": "ok", "adapter_store": "reachable" if unreachable is None else "unreachable",
                             **({"adapter_store_error": unreachable} if unreachable else {})})

    def model_object(model: ServedModel, base: str) -> dict:
        return {"id": model.id, "object": "model", "created": 0, "owned_by": "hotlora", "root": model.id,
                "parent": base if model.adapter else None}

    @app.get("/v1/models", responses=_errors(401, 500, 503))
    async def models(request: Request):
        try:
            served = await asyncio.to_thread(generations.models, _caller(request))
            base = generations.ready().model_name
        except Exception as exc:
            return error_response(exc)
        return {"object": "list", "data": [model_object(m, base) for m in served]}

    @app.get("/v1/models/{model_id:path}", responses=_errors(401, 404, 500, 503))
    async def model(model_id: str, request: Request):
        try:
            served = await asyncio.to_thread(generations.models, _caller(request))
            found = next((m for m in served if m.id == model_id), None)
            if found is None:
                raise AdapterNotFound(f"model {model_id!r} is neither the base model nor an adapter this server knows")
        except Exception as exc:
            return error_response(exc)
        return model_object(found, generations.ready().model_name)

    @app.post("/v1/chat/completions", responses=_GENERATION)
    async def chat_completions(body: ChatCompletionBody, request: Request):
        try:
            body.refuse_unsupported()
            if body.tools or body.tool_choice not in (None, "none", "auto"):
                raise InvalidRequest("tools and tool_choice are not supported")
            for i, message in enumerate(body.messages):
                refuse_unknown(message, f"messages[{i}].")
            if body.top_logprobs is not None and not body.logprobs:
                raise InvalidRequest("top_logprobs needs logprobs: true")
            messages = tuple({"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages))
            generation = GenerationInput(
                messages=messages, adapter=body.model,
                sampling=body.sampling((body.top_logprobs or 0) if body.logprobs else None),
                max_new_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
                stop=body.stop_strings,
                output_format=body.output_format(), request_id=request.headers.get("x-request-id"), n=body.n)
        except Exception as exc:
            generations.count_refused("http", exc, _caller(request))
            return error_response(exc)
        return await respond(ChatResponses(body, generations), [generation], body, request)

    @app.post("/v1/completions", responses=_GENERATION)
    async def completions(body: CompletionBody, request: Request):
        try:
            body.refuse_unsupported()
            if body.suffix or (body.best_of or 1) != 1:
                raise InvalidRequest("suffix and best_of are not supported")
            if body.max_tokens == 0 and not body.echo:
                raise InvalidRequest("max_tokens: 0 generates nothing; it is allowed with echo, to score the prompt")
            prompts = _prompts(body.prompt, generations.limits.max_prompts)
            request_id = request.headers.get("x-request-id")
            inputs = [GenerationInput(
                prompt=text, prompt_token_ids=token_ids, adapter=body.model, sampling=body.sampling(body.logprobs),
                max_new_tokens=body.max_tokens, stop=body.stop_strings, output_format=body.output_format(),
                request_id=request_id and (request_id if i == 0 else f"{request_id}-{i}"), n=body.n)
                for i, (text, token_ids) in enumerate(prompts)]
            echoes = await asyncio.to_thread(_echoes, generations, prompts) if body.echo else None
        except Exception as exc:
            generations.count_refused("http", exc, _caller(request))
            return error_response(exc)
        return await respond(CompletionResponses(body, generations, echoes), inputs, body, request)

    @app.post("/tokenize", responses=_errors(400, 401, 500, 503))
    async def tokenize(body: TokenizeBody):
        try:
            tokens = await asyncio.to_thread(generations.tokenize, body.prompt, body.add_special_tokens)
        except Exception as exc:
            return error_response(exc)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": generations.ready().engine.config.max_seq_len}

    @app.post("/detokenize", responses=_errors(400, 401, 500, 503))
    async def detokenize(body: DetokenizeBody):
        try:
            return {"prompt": await asyncio.to_thread(generations.detokenize, body.tokens)}
        except Exception as exc:
            return error_response(exc)

    @app.get("/tokenizer_info", responses=_errors(401, 500, 503))
    async def tokenizer_info():
        try:
            loaded = generations.ready()
        except Exception as exc:
            return error_response(exc)
        tokenizer = loaded.codec.tokenizer
        return {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
                "chat_template": tokenizer.chat_template, "model_max_length": loaded.engine.config.max_seq_len}

    async def respond(shape, inputs: list[GenerationInput], body: RequestBody, request: Request):
        """Several prompts run as separate requests, each admitted on its own (a full queue can
        refuse a later one after earlier ones started; all are then cancelled); choice i * n + j
        is prompt i's sample j, as OpenAI numbers them."""
        caller = _caller(request)
        if len(inputs) == 1:
            pieces = generations.run(inputs[0], "http", caller)
        else:
            pieces = merged([_indexed(generations.run(g, "http", caller), i * body.n) for i, g in enumerate(inputs)])
        try:  # refusals (unknown adapter, full queue) get their status; a streamed answer starts at its first piece
            if not body.stream:
                collected = await _unless_disconnected(request, _collect(pieces))
                return JSONResponse(shape.whole(collected))
            first = await _unless_disconnected(request, anext(pieces))
        except _ClientGone:
            await pieces.aclose()
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        except Exception as exc:
            return error_response(exc)
        return _ClosingStream(_events(shape, first, pieces, body.include_usage), media_type="text/event-stream")

    return app


class _ClientGone(Exception):
    pass


class _ClosingStream(StreamingResponse):
    """Closes its events however the response ends: Starlette abandons the iterator when the
    client disconnects while a chunk is being sent, and the request must not outlive it."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _collect(pieces: AsyncIterator[Piece]) -> list[Piece]:
    return [piece async for piece in pieces]  # to its end, which counts the call


async def _unless_disconnected(request: Request, awaitable, poll_s: float = 0.1):
    """Await `awaitable`, cancelling it (and so the generation) if the client disconnects first:
    a client that times out and retries must not leave its first attempt running."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise _ClientGone()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # its outcome is nobody's now; a cancel of ours still propagates


async def _events(shape, first: Piece, pieces: AsyncIterator[Piece], include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece, usage last when asked, then [DONE]. An error after
    the first byte can only be told in the stream: one {"error": ...} event."""
    try:
        yield _sse(shape.chunk(first))
        finals = [first] if first.output is not None else []
        async for piece in pieces:
            yield _sse(shape.chunk(piece))
            if piece.output is not None:
                finals.append(piece)
        if include_usage:
            yield _sse(shape.usage_chunk(finals))
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as exc:
        yield _sse(openai_error(exc)[1])
    finally:
        await pieces.aclose()  # the client went away mid-stream: cancel the request


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _prompts(prompt, most: int) -> list[tuple[str | None, tuple[int, ...] | None]]:
    """(text, None) or (None, token ids) per prompt: a string, a list of token ids, or a list of either."""
    if isinstance(prompt, str):
        return [(prompt, None)]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [(None, tuple(prompt))]
    if not prompt:
        raise InvalidRequest("prompt is empty")
    if len(prompt) > most:
        raise InvalidRequest(f"prompt: {len(prompt)} prompts; the limit is {most} (--max-prompts)")
    return [(p, None) if isinstance(p, str) else (None, tuple(p)) for p in prompt]


def _echoes(generations: Generations, prompts) -> list[str]:
    """Each prompt's text as echo returns it: as sent, or its token ids decoded."""
    return [text if text is not None else generations.detokenize(list(ids)) for text, ids in prompts]


async def _indexed(pieces: AsyncIterator[Piece], offset: int) -> AsyncIterator[Piece]:
    """One prompt's pieces, their choice index moved past the earlier prompts' choices."""
    async with contextlib.aclosing(pieces):
        async for piece in pieces:
            piece.index += offset
            yield piece


# ---------------------------------------------------------------- serving


class HttpServer:
    """uvicorn on the server's own event loop. The hotlora server owns SIGTERM (it drains the
    engine first), so uvicorn's own signal handling is switched off."""

    def __init__(self, app, host: str, port: int, tls: tuple[Path, Path] | None = None):
        self._app, self._host, self._port, self._tls = app, host, port, tls  # tls: (certificate, key)
        self._server = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0)."""
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        sock.listen(128)
        sock.setblocking(False)
        cert, key = self._tls or (None, None)
        self._server = _Server(uvicorn.Config(self._app, log_config=None, access_log=False, lifespan="off",
                                              timeout_graceful_shutdown=5, ssl_certfile=cert and str(cert),
                                              ssl_keyfile=key and str(key)))
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # re-raises why it could not start
            await asyncio.sleep(0.01)
        return sock.getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
