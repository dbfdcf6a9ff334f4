"""The OpenAI-compatible HTTP API, beside gRPC in the same process, on the same engine.

    POST /v1/completions, POST /v1/chat/completions (JSON, or server-sent events with "stream")
    GET  /v1/models, GET /v1/models/{id}, GET /health

`model` picks the adapter as vLLM does: the base model's name for no adapter, "name" for an
adapter's current version, "name@version" for one version. Structured output comes from
`response_format` (json_object, json_schema) or vLLM's `structured_outputs` ({"json"|"regex"|
"grammar": ...}); vLLM's extra sampling fields top_k, repetition_penalty and ignore_eos are
accepted too; `n` asks for several samples of the prompt (they share its KV blocks). What hotlora
cannot do (penalties, logit_bias, echo, tools) is refused with
400, never silently ignored. Errors use OpenAI's shape, statuses from server/serving/status.py. Admin
operations stay on gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine.structured import OutputFormat
from ..errors import AdapterNotFound, InvalidRequest
from ..model.sampling import SamplingParams
from .generation import GenerationInput, Generations, Piece, ServedModel
from .status import openai_error

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None  # None (or null): the default, as OpenAI's API has it
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extra fields, as vLLM names them
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        if self.presence_penalty or self.frequency_penalty:
            raise InvalidRequest("presence_penalty and frequency_penalty are not supported; use repetition_penalty")
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported")

    def sampling(self, logprobs: int | None) -> SamplingParams:
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                 "repetition_penalty": self.repetition_penalty, "seed": self.seed}
        return SamplingParams(**{k: v for k, v in given.items() if v is not None}, ignore_eos=self.ignore_eos,
                              logprobs=logprobs)

    def output_format(self) -> OutputFormat | None:
        if self.response_format is not None and self.structured_outputs is not None:
            raise InvalidRequest("set response_format or structured_outputs, not both")
        if self.structured_outputs is not None:
            given = {k: v for k, v in self.structured_outputs.items() if v is not None}
            if len(given) != 1 or next(iter(given)) not in ("json", "regex", "grammar"):
                raise InvalidRequest("structured_outputs takes exactly one of json, regex, grammar")
            kind, spec = next(iter(given.items()))
            if kind == "json":
                return OutputFormat("json_schema", spec if isinstance(spec, str) else json.dumps(spec))
            return OutputFormat("regex" if kind == "regex" else "lark", str(spec))
        kind = (self.response_format or {}).get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return OutputFormat("json_object")
        if kind == "json_schema":
            schema = (self.response_format.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise InvalidRequest("response_format.json_schema.schema must be a JSON schema object")
            return OutputFormat("json_schema", json.dumps(schema))
        raise InvalidRequest(f"response_format.type must be text, json_object or json_schema, got {kind!r}")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self, index: int) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"messages[{index}].content: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionBody(_Body):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None)


# ---------------------------------------------------------------- the app


def build_app(generations: Generations) -> FastAPI:
    app = FastAPI(title="hotlora", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(error: BaseException) -> JSONResponse:
        status, body = openai_error(error)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        generations.count_refused("http", InvalidRequest(problems))
        return error_response(InvalidRequest(problems))

    @app.get("/health")
    async def health():
        try:
            generations.ready()
        except Exception as exc:
            return error_response(exc)
        return JSONResponse({"status": "ok"})

    def model_object(model: ServedModel, base: str) -> dict:
        return {"id": model.id, "object": "model", "created": 0, "owned_by": "hotlora", "root": model.id,
                "parent": base if model.adapter else None}

    @app.get("/v1/models")
    async def models():
        try:
            served = await asyncio.to_thread(generations.models)
        except Exception as exc:
            return error_response(exc)
        return {"object": "list", "data": [model_object(m, served[0].id) for m in served]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        try:
            served = await asyncio.to_thread(generations.models)
            found = next((m for m in served if m.id == model_id), None)
            if found is None:
                raise AdapterNotFound(f"model {model_id!r} is neither the base model nor an adapter this server knows")
        except Exception as exc:
            return error_response(exc)
        return model_object(found, served[0].id)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody, request: Request):
        try:
            body.refuse_unsupported()
            if body.tools:
                raise InvalidRequest("tools are not supported")
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
            generations.count_refused("http", exc)
            return error_response(exc)
        return await respond(_ChatResponses(body, generations), generation, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        try:
            body.refuse_unsupported()
            if body.echo or body.suffix or (body.best_of or 1) != 1:
                raise InvalidRequest("echo, suffix and best_of are not supported")
            prompt, token_ids = _one_prompt(body.prompt)
            generation = GenerationInput(
                prompt=prompt, prompt_token_ids=token_ids, adapter=body.model, sampling=body.sampling(body.logprobs),
                max_new_tokens=body.max_tokens, stop=body.stop_strings, output_format=body.output_format(),
                request_id=request.headers.get("x-request-id"), n=body.n)
        except Exception as exc:
            generations.count_refused("http", exc)
            return error_response(exc)
        return await respond(_CompletionResponses(body, generations), generation, body, request)

    async def respond(shape, generation: GenerationInput, body: _Body, request: Request):
        pieces = generations.run(generation, "http")
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


def _one_prompt(prompt) -> tuple[str | None, tuple[int, ...] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if prompt and all(isinstance(p, int) for p in prompt):
        return None, tuple(prompt)
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0], None
    raise InvalidRequest("prompt: one prompt per request (a string or a list of token ids)")


def _usage(finals: list[Piece]) -> dict:
    """One request's usage from its samples' last pieces: the prompt once (and the cached tokens
    of the sample that computed it), every sample's completion tokens."""
    first = min(finals, key=lambda p: p.index).output
    prompt, completion = first.prompt_tokens, sum(len(p.output.token_ids) for p in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": first.cached_tokens}}


class _Responses:
    """How one endpoint writes pieces: whole (collected) or as stream chunks."""

    object_whole = object_chunk = id_prefix = ""

    def __init__(self, body: _Body, generations: Generations):
        self.body = body
        self.generations = generations
        self.created = int(time.time())
        self.text_offsets: dict[int, int] = {}  # sample -> its next token's offset in its text (completions' logprobs)
        self.started: set[int] = set()  # samples whose first chunk has gone out

    def _envelope(self, piece: Piece, obj: str, choices: list) -> dict:
        return {"id": f"{self.id_prefix}-{piece.request_id}", "object": obj, "created": self.created,
                "model": self.body.model, "choices": choices}

    def whole(self, pieces: list[Piece]) -> dict:
        choices, finals = [], []
        for index in sorted({p.index for p in pieces}):
            own = [p for p in pieces if p.index == index]
            last = own[-1]
            merged = Piece("".join(p.text for p in own), [t for p in own for t in p.token_ids],
                           [lp for p in own for lp in p.logprobs], last.request_id, last.adapter, index=index)
            choices.append(self._choice(merged, last.finish_reason, whole=True))
            finals.append(last)
        return {**self._envelope(finals[0], self.object_whole, choices), "usage": _usage(finals)}

    def chunk(self, piece: Piece) -> dict:
        first = piece.index not in self.started
        self.started.add(piece.index)
        return self._envelope(piece, self.object_chunk, [self._choice(piece, piece.finish_reason, first=first)])

    def usage_chunk(self, finals: list[Piece]) -> dict:
        return {**self._envelope(finals[0], self.object_chunk, []), "usage": _usage(finals)}

    def _texts(self, piece: Piece) -> dict[int, str]:
        return self.generations.logprob_texts(piece.logprobs)


class _ChatResponses(_Responses):
    object_whole, object_chunk, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def _choice(self, piece: Piece, finish_reason: str | None, whole: bool = False, first: bool = False) -> dict:
        if whole:
            content = {"message": {"role": "assistant", "content": piece.text}}
        else:
            content = {"delta": {"role": "assistant", "content": piece.text} if first else {"content": piece.text}}
        return {"index": piece.index, **content, "logprobs": self._logprobs(piece), "finish_reason": finish_reason}

    def _logprobs(self, piece: Piece) -> dict | None:
        if not self.body.logprobs:
            return None
        texts = self._texts(piece)
        entry = lambda token_id, logprob: {"token": texts[token_id], "logprob": logprob,  # noqa: E731
                                           "bytes": list(texts[token_id].encode())}
        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in piece.logprobs]}


class _CompletionResponses(_Responses):
    object_whole = object_chunk = "text_completion"
    id_prefix = "cmpl"

    def _choice(self, piece: Piece, finish_reason: str | None, whole: bool = False, first: bool = False) -> dict:
        return {"index": piece.index, "text": piece.text, "logprobs": self._logprobs(piece), "finish_reason": finish_reason}

    def _logprobs(self, piece: Piece) -> dict | None:
        if self.body.logprobs is None:
            return None
        texts = self._texts(piece)
        offsets = []
        for lp in piece.logprobs:
            offsets.append(self.text_offsets.get(piece.index, 0))
            self.text_offsets[piece.index] = offsets[-1] + len(texts[lp.token_id])
        return {"tokens": [texts[lp.token_id] for lp in piece.logprobs],
                "token_logprobs": [lp.logprob for lp in piece.logprobs],
                "top_logprobs": [{texts[t]: v for t, v in lp.top} for lp in piece.logprobs],
                "text_offset": offsets}


# ---------------------------------------------------------------- serving


class HttpServer:
    """uvicorn on the server's own event loop. The hotlora server owns SIGTERM (it drains the
    engine first), so uvicorn's own signal handling is switched off."""

    def __init__(self, app, host: str, port: int):
        self._app, self._host, self._port = app, host, port
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
        self._server = _Server(uvicorn.Config(self._app, log_config=None, access_log=False, lifespan="off",
                                              timeout_graceful_shutdown=5))
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
