"""Finding a request's stop strings in its text as the text streams in, one character at a time.

Owns: the matcher state of one request. Each stop string keeps a Knuth-Morris-Pratt failure
table (one 4-byte int per character) and its current match length, so memory is linear in the
total length of the stop strings, and each character of text costs amortised O(number of stop
strings), whatever their lengths. The first stop string to complete wins; when several complete
on the same character, the longest (the one that started earliest). `held` is the longest tail
of the text that may still grow into a stop string: the text that must not be streamed yet.

The total length is capped by request validation (`MAX_STOP_CHARS` in
server/vocabulary/sampling_params.py); this module works for any length, it is just linear in it.

Deliberately does not know: tokens, decoding, or what is done with the held text.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from functools import lru_cache


@lru_cache(maxsize=256)
def _failure(stop: str) -> array:
    """KMP failure table: entry i is the length of the longest proper prefix of stop[: i + 1]
    that is also its suffix. Cached: the choices of one request (and repeated requests) share
    stop strings, and the tables are immutable."""
    table = array("i", [0]) * len(stop)  # 4 bytes per character, no temporary list
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = table[k - 1]
        if stop[i] == stop[k]:
            k += 1
        table[i] = k
    return table


class StopMatcher:
    def __init__(self, stops: Sequence[str]):
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {tuple(stops)!r}")
        self.stops = tuple(dict.fromkeys(stops))
        self._tables = [_failure(s) for s in self.stops]
        self._matched = [0] * len(self.stops)  # per stop: its prefix that ends the text so far

    @property
    def held(self) -> int:
        """Characters at the end of the text that are a proper prefix of some stop string."""
        return max(self._matched, default=0)

    def feed(self, text: str) -> tuple[int, str] | None:
        """Advance over `text`. On the first character that completes a stop string, stop there
        and return (how many characters of `text` were read, the stop string); else None."""
        if not self.stops:
            return None
        stops, tables, matched = self.stops, self._tables, self._matched
        for read, ch in enumerate(text, 1):
            done: str | None = None
            for j, stop in enumerate(stops):
                k = matched[j]
                if k == len(stop):  # it completed earlier (finish() may feed again): restart
                    k = tables[j][k - 1]
                while k and stop[k] != ch:
                    k = tables[j][k - 1]
                if stop[k] == ch:
                    k += 1
                matched[j] = k
                if k == len(stop) and (done is None or len(stop) > len(done)):
                    done = stop
            if done is not None:
                return read, done
        return None
