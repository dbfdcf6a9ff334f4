"""Text <-> tokens at the service edge: prompts, chat templates, streaming detokenization, stop strings.

The engine works on token ids only; everything about text lives here, on top of the base model's
own tokenizer (transformers' AutoTokenizer on the checkpoint directory, local files only).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidRequest

MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 256


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer itself puts before any text: BOS for Llama-2-style tokenizers
    (whatever their `add_bos_token` attribute says after a save and load), nothing for ChatML ones."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return list(full[:start])
    return []


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]], chat_template: str | None = None,
                    prefix: list[int] | None = None) -> list[int]:
    """A chat's prompt as the server serves it and the trainer trains on it: the template
    (`chat_template`, else the tokenizer's) renders the messages and the generation prompt; the
    text is tokenized without special tokens, and the tokenizer's own prefix (BOS) goes first
    unless the template already wrote it. `prefix`: special_prefix(tokenizer), when known."""
    text = tokenizer.apply_chat_template(messages, chat_template=chat_template, add_generation_prompt=True,
                                         tokenize=False)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    prefix = special_prefix(tokenizer) if prefix is None else prefix
    return ids if ids[:len(prefix)] == prefix else prefix + ids


class TextCodec:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._prefix = special_prefix(tokenizer)
        self._token_texts: dict[int, str] = {}  # at most the vocabulary: logprobs name the same tokens again and again

    def token_text(self, token_id: int) -> str:
        """One token's text on its own, special tokens included (what logprobs show beside the numbers)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "TextCodec":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(model_dir, local_files_only=True))

    def encode_prompt(self, prompt: str) -> list[int]:
        if not prompt:
            raise InvalidRequest("prompt is empty")
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]], chat_template: str | None = None) -> list[int]:
        """`chat_template`: the one an adapter was trained with; None: the base model's."""
        if not messages:
            raise InvalidRequest("messages is empty")
        if not (chat_template or self.tokenizer.chat_template):
            raise InvalidRequest("this model has no chat template: send `prompt` text or `prompt_token_ids` instead")
        for i, message in enumerate(messages):
            if not message["role"]:
                raise InvalidRequest(f"messages[{i}].role is empty")
        return chat_prompt_ids(self.tokenizer, messages, chat_template, self._prefix)

    def decoder(self, prompt_ids: list[int], stop: list[str]) -> "IncrementalDecoder":
        return IncrementalDecoder(self.tokenizer, prompt_ids, validate_stop(stop))


def validate_stop(stop: list[str]) -> list[str]:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    for i, s in enumerate(stop):
        if not 1 <= len(s) <= MAX_STOP_LENGTH:
            raise InvalidRequest(f"stop[{i}] must be 1-{MAX_STOP_LENGTH} characters long")
    return list(stop)


class IncrementalDecoder:
    """Turns a stream of token ids into a stream of text pieces.

    Each new token is decoded together with a few tokens before it (so tokenizers that drop a
    leading space, or tokens that end mid-character, come out right) and only whole characters
    are released. Text that could be the start of a stop string is held back until it is known
    not to be one; when a stop string completes, `stopped` turns true and the text before it is
    all that is ever released.
    """

    _CONTEXT = 6  # tokens decoded before the new ones

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-self._CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)
        self._stop = stop
        self.text = ""  # all text decoded so far (before any stop string)
        self._released = 0
        self.stopped = False

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the text that can be released now."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        decode = lambda ids: self._tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before = decode(self._ids[self._prefix:self._read])
        after = decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
        self._check_stop()
        return self._release(self._holdback())

    def finish(self) -> str:
        """The text still held back, once generation has ended."""
        return self._release(0)

    def _check_stop(self) -> None:
        window = max(0, self._released - MAX_STOP_LENGTH)
        hits = [i for s in self._stop if (i := self.text.find(s, window)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _holdback(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        if self.stopped:
            return 0
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _release(self, hold: int) -> str:
        end = max(self._released, len(self.text) - hold)
        piece = self.text[self._released:end]
        self._released = end
        return piece
