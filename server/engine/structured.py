"""Structured output: a request's answer held to a JSON schema, a regex or a Lark grammar.

llguidance (made for LLM serving) compiles the constraint against the base model's tokenizer once
per distinct constraint, before the request is admitted, so an invalid one is refused up front.
Each step, a request's matcher writes the tokens that may come next into its row of a bitmask;
the sampler masks that row's logits, so constrained and free requests, on any adapters, share one
batch. The engine sees only token-level objects (Grammar, TokenMatcher); text stays here.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..errors import InvalidRequest, Unsupported

FORMATS = ("json_schema", "json_object", "regex", "lark")
MAX_SPEC_BYTES = 64 * 1024
# Compact JSON, as OpenAI's structured outputs write it. llguidance's default allows any run of
# whitespace between tokens, which a weak model can fill forever without closing the object.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class OutputFormat:
    """What the answer must match. kind: one of FORMATS; spec: the JSON schema (as JSON text), the
    regex or the Lark grammar ("" for json_object: any JSON object)."""

    kind: str
    spec: str = ""


class Grammar:
    """A compiled, validated constraint, shared by every request that uses it: a matcher at its
    start, which each request copies (building one compiles the grammar; copying is cheap)."""

    def __init__(self, tokenizer, grammar: str):
        import llguidance

        self._start = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self._start.is_error():
            raise InvalidRequest(f"invalid output format: {self._start.get_error()}")

    def matcher(self) -> "TokenMatcher":
        return TokenMatcher(self._start.deep_copy())


class TokenMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher):
        self._matcher = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (host int32, 32 tokens per word)."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance past `token`; False if the grammar did not allow it."""
        return self._matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (its end-of-sequence was taken)."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, words] int32 bitmask (bit j of word w = token 32w+j) -> [B, vocab_size] bool."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    unpacked = (bitmask[:, :, None] >> bits) & 1
    return unpacked.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


class GrammarCompiler:
    """Compiles OutputFormats for one tokenizer, keeping the most recent ones (schemas repeat:
    an application sends the same one with every request)."""

    def __init__(self, hf_tokenizer, vocab_size: int, cache_size: int = 64):
        self._tokenizer, self.unavailable = None, ""
        try:
            import llguidance.hf
        except ImportError:  # a GPU image may lack it; everything else still serves
            self.unavailable = "structured output needs the llguidance package, which this server lacks"
        else:
            try:
                self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)
            except Exception as exc:  # a tokenizer llguidance cannot read: serve without structured output
                self.unavailable = f"structured output is unavailable for this model's tokenizer: {exc}"
        self._cache: OrderedDict[OutputFormat, Grammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self._tokenizer is not None

    def compile(self, fmt: OutputFormat) -> Grammar:
        """The Grammar for `fmt`; InvalidRequest when it is not a valid schema, regex or grammar."""
        if self._tokenizer is None:
            raise Unsupported(self.unavailable)
        with self._lock:
            if fmt in self._cache:
                self._cache.move_to_end(fmt)
                return self._cache[fmt]
        grammar = Grammar(self._tokenizer, self._validated(fmt))
        with self._lock:
            self._cache[fmt] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _validated(self, fmt: OutputFormat) -> str:
        import llguidance

        if fmt.kind not in FORMATS:
            raise InvalidRequest(f"structured output kind must be one of {FORMATS}, got {fmt.kind!r}")
        if len(fmt.spec.encode()) > MAX_SPEC_BYTES:
            raise InvalidRequest(f"the {fmt.kind} is {len(fmt.spec.encode())} bytes; the limit is {MAX_SPEC_BYTES}")
        if fmt.kind in ("regex", "lark") and not fmt.spec:
            raise InvalidRequest(f"the {fmt.kind} is empty")
        if fmt.kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(fmt.spec)
        elif fmt.kind == "lark":
            grammar = llguidance.LLMatcher.grammar_from_lark(fmt.spec)
        else:
            schema = _schema(fmt)
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        if is_error:
            raise InvalidRequest(f"invalid {fmt.kind.replace('_', ' ')}: {messages[0] if messages else 'rejected'}")
        return grammar


def _schema(fmt: OutputFormat) -> dict:
    if fmt.kind == "json_object":
        return {"type": "object"}
    try:
        schema = json.loads(fmt.spec)
    except ValueError as exc:
        raise InvalidRequest(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidRequest("the JSON schema must be a JSON object")
    return schema
