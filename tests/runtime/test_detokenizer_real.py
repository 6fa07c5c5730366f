"""Incremental detokenization on the real dev tokenizer (transformers' GemmaTokenizer over our
tokenizer.json): byte-fallback characters, spaces, newlines, special tokens and stop strings."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from server.checkpoint.tokenizer import TextTokenizer
from server.engine.detokenizer import IncrementalDetokenizer, TextDelta
from server.tools.dev_tokenizer import write_dev_tokenizer

FFFD = "\ufffd"
FIRST_BYTE_ID = 107  # <0x00>; <0x80>..<0xFF> are FIRST_BYTE_ID + 128..255

TEXTS = [
    "The harbor town wakes before the sun.",
    "Café, naïve, crème brûlée — déjà vu.",
    "中文测试：你好，世界！",
    "Emoji 😀🎉 and flags 🇫🇷, family 👨‍👩‍👧 done.",
    "  two leading spaces,\ttab,\n\nnew paragraph\n   indented 中 line\n",
    "mixed: a中b😀c é\nend",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    folder: Path = tmp_path_factory.mktemp("devtok")
    write_dev_tokenizer(folder, 512)
    return TextTokenizer(folder)


def output_ids(tok: TextTokenizer, text: str) -> list[int]:
    """The ids a model would generate for `text`: its encoding without the BOS."""
    ids = tok.encode(text)
    assert ids[0] == tok.hf.bos_token_id
    return ids[1:]


def stream(det: IncrementalDetokenizer, ids: Sequence[int]) -> list[TextDelta]:
    deltas = []
    for i in ids:
        deltas.append(det.push(i))
        if deltas[-1].stopped:
            break
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_is_the_original(tok: TextTokenizer, text: str) -> None:
    ids = output_ids(tok, text)
    assert tok.decode(ids) == text  # the dev tokenizer round-trips exactly
    det = IncrementalDetokenizer(tok)
    deltas = stream(det, ids)
    assert all(FFFD not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) + det.finish() == text


def test_byte_fallback_characters_are_really_split(tok: TextTokenizer) -> None:
    """Guards the test above: the dev vocabulary must spell these characters in byte tokens."""
    ids = output_ids(tok, "中😀é")
    assert sum(FIRST_BYTE_ID + 0x80 <= i < FIRST_BYTE_ID + 0x100 for i in ids) >= 7


@pytest.mark.parametrize(
    ("text", "stop", "include", "want"),
    [
        ("Hello there.\nUser: more", ["\nUser:"], False, "Hello there."),
        ("Hello there.\nUser: more", ["\nUser:"], True, "Hello there.\nUser:"),
        ("数字：一二三文四", ["文"], False, "数字：一二三"),
        ("party 🎉 time 😀 later", ["😀", "time"], False, "party 🎉 "),
        ("the sun and the sea", ["he s", "sea"], True, "the s"),
        ("café crème", ["é c"], False, "caf"),
        ("no stop here", ["xyz"], False, "no stop here"),
    ],
)
def test_stop_strings_in_real_text(
    tok: TextTokenizer, text: str, stop: list[str], include: bool, want: str
) -> None:
    det = IncrementalDetokenizer(tok, stop=stop, include_stop_str_in_output=include)
    deltas = stream(det, output_ids(tok, text))
    got = "".join(d.text for d in deltas) + det.finish()
    assert got == want == det.text
    assert det.stopped == (want != text)
    assert all(FFFD not in d.text for d in deltas)


@pytest.mark.parametrize("skip", [True, False])
def test_random_id_streams_match_full_decode(tok: TextTokenizer, skip: bool) -> None:
    """Ids a model could emit, invalid byte sequences and special tokens included, whose byte
    runs the real ByteFallback decoder judges as a whole. Two things stay within the
    detokenizer's stated limits: no ASCII byte tokens, and a text token at least every 12 ids,
    so a byte run is never longer than it holds back."""
    rng = random.Random(7)
    multibyte = [FIRST_BYTE_ID + b for b in range(0x80, 0x100)]
    others = [i for i in range(tok.vocab_size) if not FIRST_BYTE_ID <= i < FIRST_BYTE_ID + 0x100]
    texty = sorted(i for i in others if tok.decode([i]).strip())
    is_texty = set(texty)
    chars = "é中文😀🎉ü"
    for _ in range(300):
        ids: list[int] = []
        since_text = 0
        while len(ids) < 40:
            r = rng.random()
            if since_text >= 8:
                new = [rng.choice(texty)]
            elif r < 0.4:
                new = [rng.choice(others)]
            elif r < 0.8:
                new = output_ids(tok, rng.choice(chars))
            else:
                new = [rng.choice(multibyte)]
            ids += new
            since_text = 0 if new[0] in is_texty else since_text + len(new)
        det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        deltas = stream(det, ids)
        full = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(d.text for d in deltas) + det.finish() == full, ids
        if FFFD not in full:
            assert all(FFFD not in d.text for d in deltas), ids
