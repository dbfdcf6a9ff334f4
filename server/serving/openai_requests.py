"""The OpenAI-compatible API's request bodies, and which fields hotlora acts on.

Every field that would change the answer is either implemented or refused with a 400 that names
it (refuse_unknown): an ignored field would hand the client a different answer from the one it
asked for. Fields that only label, store or route a request are declared and ignored
(HARMLESS_FIELDS); a field sent as null, [] or {}, or at a value that is what hotlora does anyway
(NO_OP_VALUES), is accepted. The published schema says no other fields are allowed.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..engine.structured import OutputFormat
from ..errors import InvalidRequest
from ..model.sampling import SamplingParams


# Other fields are refused (refuse_unknown), so the published schema says no others are allowed;
# the server still takes one sent as null, [] or {}: that asks for its default.
_CLOSED = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})


class _Harmless(BaseModel):
    """Fields accepted and not acted on: they label, store or route a request, never change its tokens."""

    model_config = _CLOSED

    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    parallel_tool_calls: Any = None


HARMLESS_FIELDS = frozenset(_Harmless.model_fields)


# vLLM's and OpenAI's fields that clients send at their defaults; at exactly this value each is what
# hotlora does anyway (it decodes without special tokens, always adds the generation prompt, ...)
NO_OP_VALUES = {"min_tokens": 0, "use_beam_search": False, "length_penalty": 1.0, "skip_special_tokens": True,
                "spaces_between_special_tokens": True, "include_stop_str_in_output": False, "echo": False,
                "add_generation_prompt": True, "continue_final_message": False, "return_tokens_as_token_ids": False}


def _unset(name: str, value: Any) -> bool:
    return value is None or value == [] or value == {} or (name in NO_OP_VALUES and value == NO_OP_VALUES[name])


def refuse_unknown(body: BaseModel, where: str = "") -> None:
    """InvalidRequest naming every field of `body` the server does not implement (sent with a
    value that asks for something: not null, [] or {}, nor its NO_OP_VALUES value); declared ones,
    HARMLESS_FIELDS among them, are not extra."""
    unknown = sorted(k for k, v in (body.model_extra or {}).items() if not _unset(k, v))
    if unknown:
        raise InvalidRequest(f"{where}{', '.join(unknown)}: not supported by hotlora, and ignoring "
                             f"{'it' if len(unknown) == 1 else 'them'} could change the answer")


class RequestBody(_Harmless):

    model: str
    max_tokens: int | None = None
    temperature: float | None = None  # None (or null): the default, as OpenAI's API has it
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extra fields, as vLLM names them
    repetition_penalty: float | None = None
    min_p: float | None = None
    stop_token_ids: list[int] | None = None
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
        refuse_unknown(self)
        if self.presence_penalty or self.frequency_penalty:
            raise InvalidRequest("presence_penalty and frequency_penalty are not supported; use repetition_penalty")

    def sampling(self, logprobs: int | None) -> SamplingParams:
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                 "repetition_penalty": self.repetition_penalty, "min_p": self.min_p, "seed": self.seed}
        return SamplingParams(**{k: v for k, v in given.items() if v is not None}, ignore_eos=self.ignore_eos,
                              logprobs=logprobs, stop_token_ids=tuple(self.stop_token_ids or ()),
                              logit_bias=self._logit_bias())

    def _logit_bias(self) -> tuple[tuple[int, float], ...]:
        """OpenAI's {"token id": bias} as (id, bias) pairs; the engine checks ids and ranges."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not (key.strip().isascii() and key.strip().isdigit()):
                raise InvalidRequest(f"logit_bias keys are token ids, got {key!r}")
            pairs.append((int(key), bias))
        return tuple(pairs)

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
    model_config = _CLOSED

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


class ChatCompletionBody(RequestBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionBody(RequestBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None)

    def sampling(self, logprobs: int | None) -> SamplingParams:
        """With echo, the prompt's logprobs are computed when logprobs are asked for, or when
        max_tokens is 0 (then the prompt is all there is: scoring it is the request)."""
        sampling = super().sampling(logprobs)
        if self.echo and (logprobs is not None or self.max_tokens == 0):
            sampling = replace(sampling, prompt_logprobs=logprobs or 0)
        return sampling


class TokenizeBody(BaseModel):
    """vLLM's /tokenize (the prompt form; lm-evaluation-harness's remote tokenizer sends it)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tokens: list[int]
    model: str | None = None
