"""Streaming detokenization and stop strings, on a real byte-level BPE tokenizer: pieces add up to
the full decode (even when a character's bytes span tokens), and no piece of a stop string is
ever released."""

from __future__ import annotations

import pytest

from server.errors import InvalidRequest
from server.model.factory import build_tokenizer
from server.serving.text import TextCodec

TEXT = "Comté and Roquefort 🧀 are cheeses; the answer is: Brie. ### END"


@pytest.fixture(scope="module")
def codec():
    return TextCodec(build_tokenizer(400))


def stream(codec, ids, stop):
    decoder = codec.decoder([1, 2, 3], stop)
    pieces = []
    for token in ids:
        pieces.append(decoder.push([token]))
        if decoder.stopped:
            break
    pieces.append(decoder.finish())
    return pieces, decoder


def test_pieces_add_up_to_the_full_decode_even_across_multibyte_characters(codec):
    ids = codec.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(TEXT.encode()) / 4  # small vocabulary: the emoji's bytes span tokens
    pieces, decoder = stream(codec, ids, [])
    assert "".join(pieces) == TEXT and not decoder.stopped
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("stop, expected", [("###", "Comté and Roquefort 🧀 are cheeses; the answer is: Brie. "),
                                            ("🧀", "Comté and Roquefort "), ("answer is:", "Comté and Roquefort 🧀 are cheeses; the "),
                                            ("not there", TEXT)])
def test_stop_strings_cut_the_text_and_are_never_partly_released(codec, stop, expected):
    ids = codec.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces, decoder = stream(codec, ids, [stop, "zzz"])
    assert "".join(pieces) == expected and decoder.stopped == (stop in TEXT)
    released = ""
    for piece in pieces[:-1]:
        released += piece
        assert stop not in released


def test_bad_stop_lists_and_empty_prompts_are_invalid(codec):
    with pytest.raises(InvalidRequest, match="at most 8"):
        codec.decoder([1], ["x"] * 9)
    with pytest.raises(InvalidRequest, match="stop\\[0\\]"):
        codec.decoder([1], [""])
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        codec.encode_prompt("")
    with pytest.raises(InvalidRequest, match="messages is empty"):
        codec.encode_chat([])
