"""Incremental detokenization and stop strings, on fake decoders (plain Python, no torch).

Two fakes stand in for the kinds of tokenizer the engine meets:
- ByteDecoder: byte-level ids (0..255) plus a few multi-byte tokens, some of which straddle
  UTF-8 characters; decode is bytes.decode(errors="replace").
- PieceDecoder: SentencePiece-like pieces with "▁" for a space, <0xNN> byte-fallback tokens that
  are judged a run at a time exactly as the tokenizers ByteFallback decoder does (one invalid
  byte turns the whole run into U+FFFD), and one leading space stripped from the whole text, so
  decode(a + b) != decode(a) + decode(b).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pytest

from server.engine.detokenizer import IncrementalDetokenizer, TextDelta

REPO = Path(__file__).resolve().parents[2]
FFFD = "\ufffd"


class ByteDecoder:
    # Multi-byte tokens; the last six end or begin inside a UTF-8 character.
    MULTI: ClassVar[tuple[bytes, ...]] = (
        *(b"hello", b" world", b"<end>", b"<en", b"en", b"d>", b"ab", b"bc"),
        *(b"\xe4\xb8", b"\xad\xe6", b"\x96\x87", b"\xf0\x9f", b"\x98\x80", b"x\xf0"),
        b"\x9f\x98\x80y",
    )
    EOS = 256 + len(MULTI)

    def __init__(self) -> None:
        self.calls: list[int] = []  # length of every decode call, to check the cost per token

    def token_bytes(self, i: int, skip: bool) -> bytes:
        if i < 256:
            return bytes([i])
        if i == self.EOS:
            return b"" if skip else b"<eos>"
        return self.MULTI[i - 256]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.calls.append(len(ids))
        data = b"".join(self.token_bytes(i, skip_special_tokens) for i in ids)
        return data.decode("utf-8", errors="replace")

    def ids_of(self, *parts: str | bytes | int) -> list[int]:
        """Each str/bytes part as one id per byte, unless it is a multi-byte token; ints as is."""
        out: list[int] = []
        for p in parts:
            if isinstance(p, int):
                out.append(p)
                continue
            b = p.encode() if isinstance(p, str) else p
            out += [256 + self.MULTI.index(b)] if b in self.MULTI else list(b)
        return out


class PieceDecoder:
    # The last piece is a special token: dropped when skip_special_tokens.
    PIECES: ClassVar[tuple[str, ...]] = (
        *("▁", "▁a", "a", "b", "c", "d", "<", ">", "en", "d>", "▁hello", "lo", "\n", "é", "x"),
        "<eos>",
    )
    FIRST_BYTE = len(PIECES)

    def __init__(self) -> None:
        self.calls: list[int] = []

    def byte(self, b: int) -> int:
        return self.FIRST_BYTE + b

    def piece(self, p: str) -> int:
        return self.PIECES.index(p)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.calls.append(len(ids))
        out: list[str] = []
        run = bytearray()

        def flush() -> None:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(FFFD * len(run))
            run.clear()

        for i in ids:
            if i >= self.FIRST_BYTE:
                run.append(i - self.FIRST_BYTE)
                continue
            if self.PIECES[i] == "<eos>" and skip_special_tokens:
                continue  # dropped before the decoder sees it, so it does not end a byte run
            flush()
            out.append(self.PIECES[i].replace("▁", " "))
        flush()
        text = "".join(out)
        return text[1:] if text.startswith(" ") else text


def stream(det: IncrementalDetokenizer, ids: Sequence[int]) -> list[TextDelta]:
    deltas = []
    for i in ids:
        deltas.append(det.push(i))
        if deltas[-1].stopped:
            break
    return deltas


def joined(deltas: Sequence[TextDelta]) -> str:
    return "".join(d.text for d in deltas)


# --- whole characters only ------------------------------------------------------------------


@pytest.mark.parametrize("text", ["a中文😀b", "😀", "中文", "héllo 😀\n中"])
def test_multibyte_characters_split_into_single_bytes(text: str) -> None:
    dec = ByteDecoder()
    ids = dec.ids_of(text.encode())
    det = IncrementalDetokenizer(dec)
    deltas = stream(det, ids)
    assert all(FFFD not in d.text for d in deltas)
    assert joined(deltas) + det.finish() == text == dec.decode(ids)
    assert det.text == text


def test_tokens_straddling_character_boundaries() -> None:
    dec = ByteDecoder()
    # 中 = e4 b8 ad, 文 = e6 96 87, 😀 = f0 9f 98 80; the middle tokens end inside a character.
    ids = dec.ids_of(b"\xe4\xb8", b"\xad\xe6", b"\x96\x87", b"x\xf0", b"\x9f\x98\x80y")
    det = IncrementalDetokenizer(dec)
    deltas = stream(det, ids)
    assert all(FFFD not in d.text for d in deltas)
    assert joined(deltas) + det.finish() == "中文x😀y"


def test_leading_space_rule_does_not_leak_into_the_stream() -> None:
    dec = PieceDecoder()
    ids = [dec.piece(p) for p in ["▁hello", "▁", "▁a", "<eos>", "▁", "▁a", "b", "▁hello"]]
    assert dec.decode(ids[:1]) + dec.decode(ids[1:]) != dec.decode(ids)
    det = IncrementalDetokenizer(dec)
    assert joined(stream(det, ids)) + det.finish() == dec.decode(ids) == "hello  a  ab hello"


def test_context_is_not_empty_text() -> None:
    """A long run of skipped special tokens is released past the hold bound; the next window
    must still start with text, or the decoder would strip the space of the next piece."""
    dec = PieceDecoder()
    ids = [dec.piece("a"), dec.piece("▁")] + [dec.piece("<eos>")] * 24 + [dec.piece("▁a")]
    for n in range(2, len(ids) + 1):
        det = IncrementalDetokenizer(dec)
        assert joined(stream(det, ids[:n])) + det.finish() == dec.decode(ids[:n])
    assert dec.decode(ids) == "a  a"


def test_byte_run_rewritten_by_a_later_invalid_byte() -> None:
    """中 as three byte tokens looks complete, but one more lone lead byte makes the decoder
    turn the whole run into U+FFFD; nothing of the run may have been streamed by then."""
    dec = PieceDecoder()
    ids = [dec.byte(b) for b in "中".encode()] + [dec.byte(0xE4), dec.piece("a")]
    det = IncrementalDetokenizer(dec)
    deltas = stream(det, ids)
    assert [d.text for d in deltas[:-1]] == ["", "", "", ""]
    assert joined(deltas) + det.finish() == dec.decode(ids) == FFFD * 4 + "a"


def test_skipped_special_token_inside_a_byte_run() -> None:
    dec = PieceDecoder()
    b = "中".encode()
    ids = [dec.byte(b[0]), dec.piece("<eos>"), dec.byte(b[1]), dec.byte(b[2]), dec.piece("x")]
    det = IncrementalDetokenizer(dec)
    deltas = stream(det, ids)
    assert all(FFFD not in d.text for d in deltas)
    assert joined(deltas) == "中x"


def test_finish_releases_incomplete_bytes_as_decode_gives_them() -> None:
    dec = ByteDecoder()
    det = IncrementalDetokenizer(dec)
    assert [d.text for d in stream(det, dec.ids_of("ok", b"\xe4\xb8"))] == ["o", "k", ""]
    assert det.finish() == FFFD
    assert det.text == "ok" + FFFD
    assert det.finish() == ""  # idempotent
    with pytest.raises(RuntimeError):
        det.push(0x61)


def test_genuine_replacement_character_is_released_by_the_next_token() -> None:
    dec = ByteDecoder()
    det = IncrementalDetokenizer(dec)
    deltas = stream(det, dec.ids_of(b"\xff", "a"))
    assert [d.text for d in deltas] == ["", FFFD + "a"]


# --- stop strings ---------------------------------------------------------------------------


def test_stop_inside_one_token() -> None:
    dec = ByteDecoder()
    det = IncrementalDetokenizer(dec, stop=["lo w"])
    deltas = stream(det, dec.ids_of("hello", " world", "!"))
    assert deltas[-1] == TextDelta("", True, "lo w")
    assert joined(deltas) == "hel"
    assert len(deltas) == 2  # the stream ended on the token that completed the stop string


def test_stop_spanning_three_tokens() -> None:
    dec = ByteDecoder()
    det = IncrementalDetokenizer(dec, stop=["<end>"])
    deltas = stream(det, dec.ids_of("hi", b"<", b"en", b"d>", "tail"))
    assert [d.text for d in deltas] == ["h", "i", "", "", ""]
    assert deltas[-1].stopped and deltas[-1].stop_reason == "<end>"
    assert det.finish() == ""
    assert det.text == "hi"


def test_stop_starting_mid_token() -> None:
    dec = ByteDecoder()
    det = IncrementalDetokenizer(dec, stop=["lo!"])
    deltas = stream(det, dec.ids_of("hello", "!"))
    assert [d.text for d in deltas] == ["hel", ""]
    assert deltas[-1].stop_reason == "lo!"


def test_overlapping_stop_candidates() -> None:
    dec = ByteDecoder()
    # "ab" completes before "abc" or "bc" can.
    det = IncrementalDetokenizer(dec, stop=["abc", "ab", "bc"])
    deltas = stream(det, dec.ids_of("x", "a", "b", "c"))
    assert joined(deltas) == "x" and deltas[-1].stop_reason == "ab"
    # "abc" and "bc" complete on the same character: the earlier start wins.
    det = IncrementalDetokenizer(dec, stop=["bc", "abc"])
    deltas = stream(det, dec.ids_of("x", "a", "b", "c"))
    assert joined(deltas) == "x" and deltas[-1].stop_reason == "abc"
    # "bc" completes while "abcd" is still only possible: the first to complete wins.
    det = IncrementalDetokenizer(dec, stop=["abcd", "bc"])
    deltas = stream(det, dec.ids_of("x", "a", "b", "c", "d"))
    assert joined(deltas) == "xa" and deltas[-1].stop_reason == "bc"
    # All three inside one token: the same answers as char by char.
    det = IncrementalDetokenizer(dec, stop=["abc", "bc"])
    assert stream(det, dec.ids_of("x", b"ab", "c")) == [
        TextDelta("x", False, None),
        TextDelta("", False, None),
        TextDelta("", True, "abc"),
    ]


def test_near_miss_prefix_is_released() -> None:
    dec = ByteDecoder()
    det = IncrementalDetokenizer(dec, stop=["<end>"])
    deltas = stream(det, dec.ids_of("a", b"<en", "x", "<", "e", "<", b"en", b"d>"))
    assert [d.text for d in deltas] == ["a", "", "<enx", "", "", "<e", "", ""]
    assert deltas[-1].stop_reason == "<end>"
    assert det.text == "a<enx<e"


def test_include_stop_str_in_output() -> None:
    dec = ByteDecoder()
    det = IncrementalDetokenizer(dec, stop=["<end>"], include_stop_str_in_output=True)
    deltas = stream(det, dec.ids_of("hi", b"<en", b"d>", "tail"))
    assert [d.text for d in deltas] == ["h", "i", "", "<end>"]
    assert deltas[-1] == TextDelta("<end>", True, "<end>")


def test_no_text_after_a_stop() -> None:
    dec = ByteDecoder()
    det = IncrementalDetokenizer(dec, stop=["d>"])
    deltas = stream(det, dec.ids_of(b"<end>", "more"))
    assert deltas == [TextDelta("<en", True, "d>")]
    assert det.finish() == "" and det.text == "<en" and det.stopped
    with pytest.raises(RuntimeError, match="after stop"):
        det.push(0x61)


def test_finish_releases_held_stop_prefix() -> None:
    dec = ByteDecoder()
    det = IncrementalDetokenizer(dec, stop=["<end>"])
    assert joined(stream(det, dec.ids_of("ok", b"<en"))) == "ok"
    assert det.finish() == "<en"
    assert det.text == "ok<en" and not det.stopped


def test_finish_checks_stop_strings_in_held_bytes() -> None:
    dec = PieceDecoder()
    det = IncrementalDetokenizer(dec, stop=["中"])
    deltas = stream(det, [dec.piece("a")] + [dec.byte(b) for b in "中文".encode()])
    assert joined(deltas) == "a" and not deltas[-1].stopped
    assert det.finish() == "" and det.stop_reason == "中"


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError):
        IncrementalDetokenizer(ByteDecoder(), stop=["ok", ""])


# --- cost ------------------------------------------------------------------------------------


def test_decode_calls_stay_short() -> None:
    dec = ByteDecoder()
    det = IncrementalDetokenizer(dec, stop=["zzz"])
    ids = dec.ids_of(*(["hello", " world", "é", "中", "ab", "\n"] * 300))
    stream(det, ids)
    assert len(ids) > 2000
    assert max(dec.calls) <= 8
    assert len(dec.calls) <= 3 * len(ids)

    # A long run of byte-fallback tokens is held, but only up to a bounded window.
    dec = PieceDecoder()
    det = IncrementalDetokenizer(dec)
    ids = [dec.byte(b) for b in ("中文" * 200).encode()]
    text = joined(stream(det, ids)) + det.finish()
    assert text == "中文" * 200
    assert max(dec.calls) <= 24


# --- against a brute-force reference --------------------------------------------------------


def reference(full: str, stops: Sequence[str], include: bool) -> tuple[str, str | None]:
    """Full text cut at the stop occurrence that ends first (earliest start on a tie)."""
    best = None
    for s in stops:
        for at in range(len(full) - len(s) + 1):
            if full.startswith(s, at):
                if best is None or (at + len(s), at) < best[:2]:
                    best = (at + len(s), at, s)
                break
    if best is None:
        return full, None
    end, at, s = best
    return full[: end if include else at], s


def random_ids(rng: random.Random, dec: ByteDecoder | PieceDecoder, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        r = rng.random()
        if isinstance(dec, ByteDecoder):
            if r < 0.5:
                ids += dec.ids_of(rng.choice(["a", "b", "c", "<", ">", "e", "n", "d", " ", "\n"]))
            elif r < 0.7:
                ids += dec.ids_of(rng.choice(["é", "中", "文", "😀"]).encode())
            elif r < 0.9:
                ids.append(256 + rng.randrange(len(dec.MULTI)))
            elif r < 0.95:
                ids.append(dec.EOS)
            else:
                ids.append(rng.randrange(256))  # any byte, valid or not
        elif r < 0.6:
            ids.append(rng.randrange(dec.FIRST_BYTE))  # any piece, <eos> included
        elif r < 0.9:
            ids += [dec.byte(b) for b in rng.choice(["é", "中", "文", "😀"]).encode()]
        else:
            # Bytes of multi-byte characters only: an ASCII byte token inside a byte run has text
            # of its own, so it releases the run (see the module docstring).
            ids.append(dec.byte(rng.randrange(0x80, 0x100)))
    return ids[:n]


def random_stops(rng: random.Random, full: str) -> list[str]:
    stops = []
    for _ in range(rng.randrange(4)):
        if full and rng.random() < 0.6:
            at = rng.randrange(len(full))
            stops.append(full[at : at + rng.randrange(1, 6)])
        else:
            stops.append("".join(rng.choice("abc<>end中") for _ in range(rng.randrange(1, 5))))
    return stops


@pytest.mark.parametrize("make", [ByteDecoder, PieceDecoder])
def test_random_streams_match_reference(make: type[ByteDecoder] | type[PieceDecoder]) -> None:
    rng = random.Random(1234)
    stopped_cases = 0
    for _ in range(1500):
        dec = make()
        skip = rng.random() < 0.8
        include = rng.random() < 0.3
        ids = random_ids(rng, dec, rng.randrange(1, 40))
        full = dec.decode(ids, skip_special_tokens=skip)
        stops = random_stops(rng, full)
        want, want_reason = reference(full, stops, include)

        det = IncrementalDetokenizer(
            dec, stop=stops, include_stop_str_in_output=include, skip_special_tokens=skip
        )
        deltas = stream(det, ids)
        tail = det.finish()
        got = joined(deltas) + tail
        context = f"ids={ids} stops={stops} include={include} skip={skip}"
        assert got == want, context
        assert det.text == want and det.stop_reason == want_reason, context
        if FFFD not in full:
            assert all(FFFD not in d.text for d in deltas), context
        if want_reason is not None:
            stopped_cases += 1
            assert tail == "" or not deltas[-1].stopped, context
            # The matched stop string was never split: everything before the final delta ends at
            # or before where the stop string begins.
            final = tail if tail else deltas[-1].text
            before = len(got) - len(final)
            assert before <= len(want) - (len(want_reason) if include else 0), context
    assert stopped_cases > 300  # the generator really exercises stop strings
