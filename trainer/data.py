"""Training data: JSONL records -> chat-templated token ids with labels on the response only ->
(optionally packed) batches in a reproducible order.

A record is either the lecture's instruction format
    {"instruction": "...", "context": "... (optional)", "output": "..."}
or a chat
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ..., {"role": "assistant", ...}]}
Both are rendered with the base model's chat template (DEFAULT_CHAT_TEMPLATE when it has none);
the loss covers only the final assistant turn, which ends with EOS so a trained adapter stops by
itself. Packing puts several examples in one row with a block-diagonal causal mask and positions
restarting at 0, so packed and unpacked examples see exactly the same attention.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from server.serving.text import chat_prompt_ids, special_prefix

log = logging.getLogger(__name__)
IGNORE = -100

# Used only when the base tokenizer has no chat template (recorded in the manifest by hash).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}### Response:\n{{ message['content'] }}{{ eos_token }}\n\n"
    "{% elif message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% else %}### Instruction:\n{{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


class DataError(ValueError):
    """The data file cannot be trained on; the message lists the bad records by line number."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE outside the response
    line: int


def record_to_messages(record: dict) -> list[dict[str, str]]:
    """The chat for one record; raises ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError("a record must be a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] needs string 'role' and 'content'")
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise ValueError("the last message must be a non-empty assistant turn (it is what is learned)")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    instruction, output, context = record.get("instruction"), record.get("output"), record.get("context", "")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("'instruction' is missing or empty (or give 'messages')")
    if not isinstance(output, str) or not output.strip():
        raise ValueError("'output' is missing or empty")
    if not isinstance(context, str):
        raise ValueError("'context' must be a string")
    user = f"{instruction.strip()}\n\n{context.strip()}" if context.strip() else instruction.strip()
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output.strip()}]


def ensure_chat_template(tokenizer) -> None:
    if not tokenizer.chat_template:
        log.warning("the base tokenizer has no chat template; using hotlora's default (### Instruction / ### Response)")
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def encode(messages: list[dict[str, str]], tokenizer, prefix: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the prompt exactly as the server encodes it (server.serving.text's
    chat_prompt_ids, one function for both), then the answer, ending with EOS. `prefix`:
    special_prefix(tokenizer), when known."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the conversation differently from its prompt; cannot mask the answer")
    prompt_ids = chat_prompt_ids(tokenizer, messages[:-1], prefix=prefix)
    answer = full[len(prompt):]
    eos = tokenizer.eos_token or ""
    cut = answer.rfind(eos) if eos else -1
    answer_ids = tokenizer(answer[:cut] if cut >= 0 else answer.rstrip(), add_special_tokens=False)["input_ids"]
    answer_ids = answer_ids + [tokenizer.eos_token_id]  # the template's trailing whitespace after EOS is not learned
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def load_examples(path: Path, tokenizer, max_seq_len: int) -> list[Example]:
    """Every usable record of a JSONL file. Bad records are reported by line number and skipped;
    a file with no usable record raises DataError before anything is trained."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    ensure_chat_template(tokenizer)
    prefix = special_prefix(tokenizer)
    examples, problems, truncated = [], [], 0
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                ids, labels = encode(record_to_messages(json.loads(line)), tokenizer, prefix)
            except (json.JSONDecodeError, ValueError) as exc:
                problems.append(f"line {number}: {exc}")
                continue
            if len(ids) > max_seq_len:
                ids, labels = ids[:max_seq_len], labels[:max_seq_len]
                truncated += 1
                if all(label == IGNORE for label in labels):
                    problems.append(f"line {number}: the prompt alone is longer than max_seq_len {max_seq_len}")
                    continue
            examples.append(Example(ids, labels, number))
    for problem in problems:
        log.warning("%s: skipped %s", path, problem)
    if truncated:
        log.warning("%s: %d records were cut to max_seq_len %d", path, truncated, max_seq_len)
    if not examples:
        raise DataError(f"{path}: no usable records" + ("".join(f"\n  {p}" for p in problems[:20]) if problems else " (empty file)"))
    return examples


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A held-out eval split, the same for the same data and seed."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = 0 if eval_fraction <= 0 else max(1, round(len(examples) * eval_fraction))
    if n_eval >= len(examples):
        raise DataError(f"{len(examples)} records leave nothing to train on with eval_fraction {eval_fraction}")
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [rows, length]
    labels: torch.Tensor  # [rows, length], IGNORE on prompts and padding
    position_ids: torch.Tensor  # [rows, length], restarting at 0 for each packed example
    attention_mask: torch.Tensor  # [rows, 1, length, length] bool: causal within each example

    @property
    def target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.labels, self.position_ids, self.attention_mask)))


def epoch_batches(examples: list[Example], batch_size: int, max_seq_len: int, packing: bool, seed: int,
                  epoch: int, pad_id: int) -> list[Batch]:
    """The batches of one epoch, in an order fixed by (seed, epoch): resuming at batch i of
    epoch e needs nothing but those three numbers."""
    order = list(range(len(examples)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    rows: list[list[Example]] = []
    for i in order:
        example = examples[i]
        if packing and rows and sum(len(e.input_ids) for e in rows[-1]) + len(example.input_ids) <= max_seq_len:
            rows[-1].append(example)
        else:
            rows.append([example])
    return [_collate(rows[i:i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]


def _collate(rows: list[list[Example]], pad_id: int) -> Batch:
    length = max(sum(len(e.input_ids) for e in row) for row in rows)
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    positions = torch.zeros((n, length), dtype=torch.long)
    segment = torch.full((n, length), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for s, example in enumerate(row):
            end = start + len(example.input_ids)
            input_ids[r, start:end] = torch.tensor(example.input_ids)
            labels[r, start:end] = torch.tensor(example.labels)
            positions[r, start:end] = torch.arange(end - start)
            segment[r, start:end] = s
            start = end
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    mask = same & causal
    mask |= torch.eye(length, dtype=torch.bool)  # padding attends to itself: no all-masked rows (NaN)
    # Labels are next tokens: a label at a segment's first position would be predicted across examples.
    first = torch.zeros_like(labels, dtype=torch.bool)
    first[:, 1:] = segment[:, 1:] != segment[:, :-1]
    labels[first] = IGNORE
    return Batch(input_ids, labels, positions, mask[:, None])
