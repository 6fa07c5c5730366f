"""Streaming text for one request: generated token ids in, safe text deltas out, stop strings cut.

Owns turning a request's generated ids, one at a time, into text deltas whose concatenation is
exactly what the tokenizer decodes for the whole output, without ever streaming half a character,
and matching the request's stop strings on that text (the first to complete wins; a stop string
is never split across deltas).

Deliberately does not know: which tokenizer it talks to (anything with `decode(ids,
skip_special_tokens)`), stop token ids, sampling, or how deltas reach the client. Plain Python:
no torch, no transformers.

How it stays exact while decoding only a few ids per token: it keeps a short *window* of the
newest ids and decodes the whole window every step. The window begins with *context* ids whose
text was already streamed; the delta is whatever the window's text has beyond that. The context
starts on a token with text of its own, so it absorbs what a decoder does at the start of a text
(SentencePiece-style decoders drop a leading space): decode(a + b) != decode(a) + decode(b) does
not leak into the stream. Text is released only once it can no longer change:
- a decode ending in U+FFFD may be an incomplete character: that tail waits for more ids;
- a token that decodes on its own to nothing or to U+FFFD (a byte-fallback byte, a skipped
  special token) may still be inside a run of bytes that the decoder judges as a whole (the
  tokenizers ByteFallback decoder turns every byte of a run into U+FFFD if any of it is invalid,
  rewriting characters that looked complete), so nothing is released until a token with text of
  its own ends the run, or `_MAX_HELD_TOKENS` have been held.

Streamed text cannot be taken back, so exactness needs a decoder whose text for old ids stops
changing once the rules above say so. Known limits: an ASCII byte-fallback token (<0x41>) has
text of its own and releases its run early; a decoder that strips a leading space loses it after
more than `_MAX_WINDOW` tokens without text; clean_up_tokenization_spaces-style rewrites of
earlier text are not followed. With Gemma's tokenizer (no strip, no clean-up) the stream can
only differ from decode(all ids) if the model writes invalid UTF-8 after an ASCII byte token or
after more than `_MAX_HELD_TOKENS` byte tokens in one run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from server.engine.stop_strings import StopMatcher

_REPLACEMENT = "\ufffd"
# Bounds the window (so the cost per token) when a stream is nothing but byte tokens, e.g. text
# in a script the vocabulary lacks. Past it, text is released as soon as it is whole characters;
# exactness is then lost only if a later byte of the same run is invalid and the decoder
# rewrites the run.
_MAX_HELD_TOKENS = 16
# How far back (in ids) the next window's context may start. Only matters after a long stretch
# of tokens without text of their own; see _slide.
_MAX_WINDOW = 32


class TokenDecoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class TextDelta:
    text: str  # new text to stream now (may be "")
    stopped: bool  # a stop string matched: the request must finish now
    stop_reason: str | None  # the matched stop string, else None


class IncrementalDetokenizer:
    """One request's output. push() each generated id; finish() once at eos/length/abort.
    Stop strings are looked for once `min_tokens` ids were pushed (before, the text streams as
    is), as the scheduler treats stop token ids and vLLM stop strings."""

    def __init__(
        self,
        decoder: TokenDecoder,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
    ):
        self._decoder = decoder
        self._skip = skip_special_tokens
        # Linear in the stop strings' total length (building it runs on the engine's step
        # thread, so it must never cost more than reading them).
        self._matcher = StopMatcher(tuple(stop))
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        self._pushed = 0

        self._window: list[int] = []
        self._passed = 0  # chars of decode(window) already handed to the stop-string stage
        # Window prefix lengths whose decode ended in a whole character: the only places a new
        # window may start (0, the current start, is one by construction).
        self._clean: list[int] = []
        self._held_tokens = 0  # consecutive pushes that released nothing
        self._alone: dict[int, str] = {}  # decode([id]) per id seen

        self._pending = ""  # text past the decoder stage, held back as a possible stop prefix
        self._emitted: list[str] = []
        self._stop_reason: str | None = None
        self._closed = False

    @property
    def text(self) -> str:
        """Everything emitted so far (all deltas, plus finish()'s text once called)."""
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]
        return self._emitted[0] if self._emitted else ""

    @property
    def stopped(self) -> bool:
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    def push(self, token_id: int) -> TextDelta:
        if self._stop_reason is not None:
            raise RuntimeError(f"push() after stop string {self._stop_reason!r} matched")
        if self._closed:
            raise RuntimeError("push() after finish()")
        self._pushed += 1
        window = self._window
        window.append(token_id)
        text = self._decode(window)
        whole = not text.endswith(_REPLACEMENT)
        if whole:
            self._clean.append(len(window))

        if self._has_own_text(token_id):
            self._held_tokens = 0  # a token with text of its own ends any byte run
        elif self._held_tokens < _MAX_HELD_TOKENS:
            self._held_tokens += 1
            return TextDelta("", False, None)
        # else: a run past the bound; from here on it is released a character at a time

        # A trailing U+FFFD run may be an unfinished character; a genuine one is released by the
        # next token or by finish().
        ready = len(text.rstrip(_REPLACEMENT))
        new = text[self._passed : ready]
        self._passed = max(self._passed, ready)
        if whole:
            self._slide()
        return self._stop_stage(new, final=False)

    def finish(self) -> str:
        """Release held text at the end of the request (eos, length or abort); idempotent.

        Undecided bytes come out as decode gives them (U+FFFD). Released text is still checked
        for stop strings: held bytes may complete one, and then the text is cut as in push()."""
        if self._closed or self._stop_reason is not None:
            self._closed = True
            return ""
        self._closed = True
        text = self._decode(self._window)
        return self._stop_stage(text[self._passed :], final=True).text

    def _slide(self) -> None:
        """Everything decoded is streamed and ends on a whole character: keep only a short
        context as the next window. It starts at a clean boundary, on a token with text of its
        own where one is near, because a context whose text is empty (a skipped special token,
        a space the decoder strips) would not absorb the start-of-text rules."""
        window, n = self._window, len(self._window)
        starts = [k for k in reversed(self._clean) if k < n and n - k <= _MAX_WINDOW]
        if n <= _MAX_WINDOW:
            starts.append(0)  # the window's own start is clean by construction
        if not starts:
            return  # no character boundary near: the window has to keep growing
        start, context = starts[0], None
        for k in starts:
            if k == 0 and self._has_own_text(window[0]):
                return  # the window already starts at the best place
            if self._has_own_text(window[k]):
                # The usual case, one id, is already known.
                text = self._alone[window[k]] if k == n - 1 else self._decode(window[k:])
                if text:
                    start, context = k, text
                    break
        if start == 0:
            return
        if context is None:  # nothing with text near: the newest boundary, whatever its text
            context = self._decode(window[start:])
        del window[:start]
        self._clean = [k - start for k in self._clean if k > start]
        self._passed = len(context)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._decoder.decode(ids, skip_special_tokens=self._skip)

    def _has_own_text(self, token_id: int) -> bool:
        """Does the id alone decode to text, without U+FFFD? Such a token ends any byte run."""
        alone = self._alone.get(token_id)
        if alone is None:
            alone = self._alone[token_id] = self._decode([token_id])
        return bool(alone) and _REPLACEMENT not in alone

    def _stop_stage(self, new: str, final: bool) -> TextDelta:
        """Feed the new text to the stop matcher: cut at the first stop string to complete, else
        stream all of the pending text but the tail that could still become one (all of it
        when final). Before `min_tokens` ids, nothing is matched (nor held): the matcher starts
        on the text after them."""
        if self._pushed < self._min_tokens:
            pending, self._pending = self._pending + new, ""
            return self._emit(pending, None)  # no stop string may end the output yet
        found = self._matcher.feed(new)
        if found is not None:
            read, s = found
            pending = self._pending + new[:read]  # the stop string ends it
            self._pending = ""
            self._stop_reason = s
            end = len(pending)
            return self._emit(pending[: end if self._include_stop else end - len(s)], s)
        pending = self._pending + new
        hold = 0 if final else min(self._matcher.held, len(pending))
        cut = len(pending) - hold
        self._pending = pending[cut:]
        return self._emit(pending[:cut], None)

    def _emit(self, text: str, stop_reason: str | None) -> TextDelta:
        if text:
            self._emitted.append(text)
        return TextDelta(text, stop_reason is not None, stop_reason)
