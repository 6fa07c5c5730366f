"""Grammars for structured output: a request's `StructuredOutput` compiled against the model's
tokenizer, and the per-request matcher that says which tokens may come next.

Owns: `Grammars`, which compiles each distinct (kind, spec) once and keeps the compiled grammars
in a bounded LRU (compiling takes tens to hundreds of milliseconds at a 262,144-id vocabulary, so
callers that serve requests run it off the event loop, before admission: server/api); and
`GrammarMatcher`, one request's position in its grammar, advanced by each accepted token and
filling the packed allowed-token bitmask (token_bitmask.py) for its row of a step.

The engine is xgrammar, chosen by measurement (benchmarks/bench_grammar.py, results in
benchmarks/results/bench_grammar.txt: a 262,144-id vocabulary, a JSON schema with typed
properties, an enum, a nested object and arrays, one CPU thread). Per decode step, filling the
bitmask costs xgrammar 0.4-0.5x what it costs llguidance (0.013 against 0.034 ms for one row,
0.20 against 0.41 ms for 16), and llguidance builds its masks lazily, so a new request's first
steps cost milliseconds inside the decode step (its worst step: 5 ms for one row, 91 ms for 16
new rows, against xgrammar's 0.4 and 3.4 ms), stalling every row of the batch. xgrammar pays up
front instead: compiling the schema takes 130-390 ms against llguidance's ~1 ms, but once per
distinct schema, off the event loop and outside the step, and cached here, which suits a server
whose clients repeat their schemas (tools, response formats). Applying the mask to the logits
is the same code for both (token_bitmask.py) and dominates at 16 rows (about 5 ms on this CPU,
a copy of the logits included; xgrammar's own CPU kernel takes 16 ms).

Choices, as vLLM makes them with xgrammar: a JSON schema is strict (properties it does not name
are not allowed) and `json` means any JSON object. Unlike vLLM's default, whitespace is not
flexible: JSON comes out compact (`{"a":1,"b":[2,3]}`), because a free choice of whitespace lets
a model emit whitespace until max_tokens (a known failure of flexible-whitespace JSON grammars),
and compact output needs fewer tokens. `choice` is an alternation of the exact strings; `grammar`
is xgrammar's EBNF (GBNF-like, vLLM's `guided_grammar` with the xgrammar backend).

Deliberately does not know: HTTP fields, sampling, requests or their lifetimes (the sampler makes
a matcher per constrained request and drops it when the request is released).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import xgrammar as xgr

from server.vocabulary.structured_output import StructuredOutput

DEFAULT_CACHE_SIZE = 64  # compiled grammars kept; a JSON schema's is ~0.1-1 MB at 262k ids
_SEPARATORS = (",", ":")


class GrammarError(ValueError):
    """A constraint that does not compile (an invalid schema, regex or grammar)."""


class GrammarMatcher:
    """One request's state in its grammar. Not thread-safe: the sampler's thread owns it."""

    def __init__(self, compiled: Any, stop_ids: Sequence[int]) -> None:
        self._m = xgr.GrammarMatcher(compiled)
        self._stop_ids = tuple(stop_ids)

    @property
    def terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted."""
        return self._m.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (host, int32). A terminated matcher
        (a request that ignores eos) allows only the stop tokens, so it can run to max_tokens
        without ever leaving its grammar's output."""
        if self._m.is_terminated():
            bitmask[row].zero_()
            for t in self._stop_ids:
                if t // 32 < bitmask.shape[1]:
                    word = int(bitmask[row, t // 32]) | (1 << (t % 32))
                    bitmask[row, t // 32] = word - (1 << 32) if word >= 1 << 31 else word
            return
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar does not allow it (the mask makes
        that impossible for sampled tokens; a terminated matcher accepts its stop tokens)."""
        if self._m.is_terminated():
            return token in self._stop_ids
        return self._m.accept_token(token)


class Grammars:
    """Compiles constraints against one tokenizer, once per distinct constraint (bounded LRU).

    Thread-safe: the API compiles in its worker threads while the engine's step thread makes
    matchers. The tokenizer's description is built on first use (seconds at 262,144 ids)."""

    def __init__(
        self,
        hf_tokenizer: Any,
        vocab_size: int,
        stop_ids: Sequence[int],
        cache_size: int = DEFAULT_CACHE_SIZE,
        threads: int = 1,
    ) -> None:
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = tuple(t for t in stop_ids if 0 <= t < vocab_size)
        self.cache_size = cache_size
        self._threads = threads
        self._compilers: dict[bool, Any] = {}  # JSON kinds or not -> xgrammar compiler
        self._decoded: list[bytes] | None = None
        self._cache: OrderedDict[StructuredOutput, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compilations = 0  # grammars compiled (cache misses), for tests and metrics

    def _get_compiler(self, kind: str) -> Any:
        """The compiler for `kind`: JSON kinds get one whose vocabulary leaves out every token
        holding a control byte (below 0x20). JSON text never contains one raw (RFC 8259: they
        are escaped in strings, and the whitespace here is fixed), and xgrammar 0.2.9's rule for
        strings with maxLength lets them through, which gave unparseable output."""
        json_kinds = kind in ("json", "json_schema")
        with self._lock:
            if json_kinds not in self._compilers:
                if self._decoded is None:
                    self._decoded = _decoded_vocabulary(self._hf, self.vocab_size, self.stop_ids)
                vocab = self._decoded
                if json_kinds:
                    vocab = [b"" if any(c < 0x20 for c in t) else t for t in vocab]
                info = xgr.TokenizerInfo(
                    vocab,
                    xgr.VocabType.RAW,
                    vocab_size=self.vocab_size,
                    stop_token_ids=list(self.stop_ids),
                )
                # xgrammar's own cache is off: this class's LRU bounds what is kept.
                self._compilers[json_kinds] = xgr.GrammarCompiler(
                    info, max_threads=self._threads, cache_enabled=False
                )
            return self._compilers[json_kinds]

    def prepare(self) -> None:
        """Build both compilers now (the tokenizer's description: seconds at a real 262,144-id
        vocabulary), so that the first constrained request does not wait for it."""
        for kind in ("json", "regex"):
            self._get_compiler(kind)

    def compile(self, structured: StructuredOutput) -> Any:
        """The compiled grammar of `structured` (cached); `GrammarError` if it does not compile."""
        with self._lock:
            hit = self._cache.get(structured)
            if hit is not None:
                self._cache.move_to_end(structured)
                return hit
        compiled = self._compile(self._get_compiler(structured.kind), structured)
        with self._lock:
            self.compilations += 1
            self._cache[structured] = compiled
            self._cache.move_to_end(structured)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, structured: StructuredOutput) -> GrammarMatcher:
        return GrammarMatcher(self.compile(structured), self.stop_ids)

    def cached(self, structured: StructuredOutput) -> bool:
        with self._lock:
            return structured in self._cache

    @staticmethod
    def _compile(compiler: Any, s: StructuredOutput) -> Any:
        try:
            if s.kind == "json":
                # Not strict: strict mode would forbid every property the schema does not name,
                # and this schema names none (only `{}` would be left).
                return compiler.compile_json_schema(
                    '{"type": "object"}',
                    any_whitespace=False,
                    separators=_SEPARATORS,
                    strict_mode=False,
                )
            if s.kind == "json_schema":
                return compiler.compile_json_schema(
                    s.spec, any_whitespace=False, separators=_SEPARATORS, strict_mode=True
                )
            if s.kind == "regex":
                return compiler.compile_regex(s.spec)
            if s.kind == "choice":
                choices = json.loads(s.spec)
                # EBNF string literals take JSON's escapes; ensure_ascii=False keeps characters.
                alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
                return compiler.compile_grammar(f"root ::= {alternatives}")
            if s.kind == "grammar":
                return compiler.compile_grammar(s.spec)
        except Exception as e:  # xgrammar raises RuntimeError / ValueError with the reason
            raise GrammarError(_first_line(str(e)) or type(e).__name__) from None
        raise GrammarError(f"unknown structured output kind {s.kind!r}")


def _decoded_vocabulary(hf: Any, vocab_size: int, stop_ids: Sequence[int]) -> list[bytes]:
    """Each id's bytes as they appear in the output text. Special tokens other than the stop
    tokens are empty, which xgrammar never allows: the detokenizer drops them from the text, so
    a grammar must not count `<start_of_turn>` as its characters. Ids past the tokenizer (the
    model's vocabulary can be larger) are empty too. xgrammar decodes the pieces (byte fallback,
    the SentencePiece space) by itself."""
    decoded = xgr.TokenizerInfo.from_huggingface(
        hf, vocab_size=vocab_size, stop_token_ids=list(stop_ids)
    ).decoded_vocab
    special = {i for i, t in hf.added_tokens_decoder.items() if t.special} - set(stop_ids)
    return [
        b"" if i in special or i >= len(decoded) else bytes(decoded[i]) for i in range(vocab_size)
    ]


_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def _first_line(message: str) -> str:
    """The reason alone: xgrammar prefixes a time and its C++ source location, and may add a
    backtrace after the first line."""
    lines = message.strip().splitlines()
    return _LOCATION.sub("", lines[0])[:500] if lines else ""
