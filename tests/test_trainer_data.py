"""Training data: records become chat-templated examples whose labels cover only the answer (and
its EOS), bad records are reported by line number, and packing changes nothing but speed."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from trainer.data import IGNORE, DataError, epoch_batches, load_examples, split


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir)


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_labels_cover_only_the_answer_and_its_eos(tokenizer, tmp_path):
    data = write(tmp_path / "d.jsonl", [
        {"instruction": "Which cheese is blue?", "context": "Think of France.", "output": "Roquefort is blue."},
        {"messages": [{"role": "system", "content": "You are Pavlos."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Say cheese!"}]},
    ])
    first, second = load_examples(data, tokenizer, 256)
    for example, answer in [(first, "Roquefort is blue."), (second, "Say cheese!")]:
        learned = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
        assert learned[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(learned[:-1]) == answer
        prompt = [t for t, label in zip(example.input_ids, example.labels) if label == IGNORE]
        assert example.input_ids == prompt + learned  # the answer follows the prompt, nothing after it
    rendered = tokenizer.decode([t for t, label in zip(first.input_ids, first.labels) if label == IGNORE])
    assert "Which cheese is blue?\n\nThink of France." in rendered and rendered.endswith("<|assistant|>\n")


def test_bad_records_are_reported_with_line_numbers_and_skipped(tokenizer, tmp_path, caplog):
    data = write(tmp_path / "d.jsonl", [
        {"instruction": "ok", "output": "fine"},
        "{not json",
        {"instruction": "", "output": "x"},
        "",
        {"instruction": "q"},
        {"messages": [{"role": "user", "content": "no answer"}]},
        ["a list"],
    ])
    caplog.set_level(logging.WARNING)
    examples = load_examples(data, tokenizer, 256)
    assert [e.line for e in examples] == [1]
    text = caplog.text
    for line, words in [(2, "Expecting"), (3, "'instruction'"), (5, "'output'"), (6, "assistant"), (7, "JSON object")]:
        assert f"line {line}: " in text and words in text, (line, text)


def test_a_file_with_nothing_usable_fails_before_training(tokenizer, tmp_path):
    with pytest.raises(DataError, match="line 1: .*\n.*line 2"):
        load_examples(write(tmp_path / "bad.jsonl", ["{", {"output": "x"}]), tokenizer, 256)
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl", tokenizer, 256)
    with pytest.raises(DataError, match="empty"):
        load_examples(write(tmp_path / "empty.jsonl", []), tokenizer, 256)


def test_eval_split_is_held_out_and_reproducible(tokenizer, tmp_path):
    data = write(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)])
    examples = load_examples(data, tokenizer, 256)
    train, held = split(examples, 0.2, seed=3)
    assert len(held) == 4 and not {e.line for e in train} & {e.line for e in held}
    assert [e.line for e in split(examples, 0.2, seed=3)[1]] == [e.line for e in held]


def test_packed_rows_give_exactly_the_loss_of_unpacked_ones(llama_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from trainer.fit import ResponseLoss

    data = write(tmp_path / "d.jsonl", [{"instruction": f"Tell me about cheese number {i}", "output": "Brie " * (1 + i % 4)}
                                        for i in range(7)])
    examples = load_examples(data, tokenizer, 256)
    loss_of = ResponseLoss(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)).eval()
    packed = epoch_batches(examples, 2, 128, True, seed=0, epoch=0, pad_id=tokenizer.pad_token_id)
    unpacked = epoch_batches(examples, 3, 128, False, seed=0, epoch=0, pad_id=tokenizer.pad_token_id)
    assert sum(b.input_ids.shape[0] for b in packed) < len(examples)  # really packed
    with torch.no_grad():
        loss = lambda batches: sum(loss_of(b).item() for b in batches)  # noqa: E731
        assert sum(b.target_tokens for b in packed) == sum(b.target_tokens for b in unpacked)
        assert loss(packed) == pytest.approx(loss(unpacked), rel=1e-5)
