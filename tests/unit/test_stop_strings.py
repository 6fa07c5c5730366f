"""The stop-string matcher: right answers on repetitive text, and cost linear in the stop strings.

Proves: on a two-letter alphabet (where naive and off-by-one KMP bugs show) fed in random chunks,
the matcher finds the stop string that completes first (the longest on a tie) and holds exactly
the longest tail that is a prefix of a stop string; its memory is linear in the stop strings'
length (the old prefix set was quadratic: a 1 MiB request body could ask for terabytes); and the
cost per token of a detokenizer with a stop string 32 times longer stays about the same.
"""

from __future__ import annotations

import random
import time
import tracemalloc

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.stop_strings import StopMatcher
from server.vocabulary.sampling_params import MAX_STOP_CHARS


def _first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """Brute force: the end of the first completed stop string, the longest on a tie."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return end, max(done, key=len)
    return None


def _held(text: str, stops: list[str]) -> int:
    return max(
        (k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])),
        default=0,
    )


def test_random_repetitive_text_matches_brute_force() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randrange(1, 7))) for _ in range(3)]
        stops = stops[: rng.randrange(1, 4)]
        text = "".join(rng.choice("ab") for _ in range(rng.randrange(0, 30)))
        m, seen = StopMatcher(stops), ""
        found = None
        while seen != text and found is None:
            chunk = text[len(seen) : len(seen) + rng.randrange(1, 5)]
            got = m.feed(chunk)
            if got is not None:
                found = (len(seen) + got[0], got[1])
                seen += chunk[: got[0]]
            else:
                seen += chunk
                assert m.held == _held(seen, stops), (stops, seen)
        assert found == _first_stop(text, stops), (stops, text)


def test_memory_is_linear_in_the_stop_length() -> None:
    # 20 000 chars: every proper prefix kept as a string would be 200 M characters. The bound
    # allows 16 bytes per character (the failure table holds a 4-byte int per character) plus
    # 64 KiB of fixed overhead, whatever Python version or platform.
    n = 20_000
    stop = "ab" * (n // 2)
    tracemalloc.start()
    try:
        IncrementalDetokenizer(_Chars(), stop=[stop])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * n + 64 * 1024, peak


class _Chars:
    """One character per id (id = code point)."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


def _seconds_per_token(stop: str, tokens: int) -> float:
    # The text keeps matching a long prefix of the stop string and never completes it, the
    # worst case for anything that rescans what it holds.
    det = IncrementalDetokenizer(_Chars(), stop=[stop])
    ids = [ord("a")] * tokens
    start = time.perf_counter()
    for i in ids:
        det.push(i)
    return (time.perf_counter() - start) / tokens


def test_cost_per_token_does_not_grow_with_the_stop_length() -> None:
    # Stop strings 32x apart in length, timed side by side: a rescan of the held text would make
    # the long one ~32x slower per token. Allow 4x for noise (the held text is still copied once
    # per token, a memcpy of at most MAX_STOP_CHARS characters).
    short, long = "a" * (MAX_STOP_CHARS // 32) + "b", "a" * MAX_STOP_CHARS + "b"
    best = [min(_seconds_per_token(s, 3 * len(long)) for _ in range(3)) for s in (short, long)]
    assert best[1] < 4 * best[0], best
