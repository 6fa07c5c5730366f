"""Grammar engines at Gemma 3n's vocabulary: xgrammar vs llguidance, side by side in one run.

For each engine, at a 262,144-id vocabulary:
  compile   time from a JSON schema's text to a matcher ready for its first mask (xgrammar: the
            tokenizer info and compiler are built once, outside the timing, as a server does;
            then `compile_json_schema` + `GrammarMatcher`; llguidance: the tokenizer is built
            once; then `grammar_from_json_schema` + `LLMatcher`), a fresh compiler cache each
            repeat so nothing is reused;
  fill      per decode step, filling the packed allowed-token bitmask of B constrained rows (one
            matcher each, serially on the host, as the sampler does) and advancing each matcher by
            the step's token, walking a valid instance of the schema token by token; median over
            the instance's tokens;
  apply     setting the disallowed logits of those B rows to -inf in float32 logits [B, 262400]
            (the sampler's step 1b: a copy of the text logits, then
            `server/runtime/token_bitmask.apply_bitmask_`; the same code for both engines, since
            both write the same packed format);
            xgrammar's own CPU kernel for reference.

The vocabulary: no real 262k tokenizer can be downloaded where this runs, and the dev tokenizer at
262,144 ids is mostly reserved `<unusedN>` slots (special tokens, which a mask excludes at no
cost), so this one is synthesised, deterministically: the dev tokenizer's fixed ids (controls,
256 byte tokens, the space) and its 8,192-id vocabulary learned on English, then, up to 262,144
ids, concatenations of 2-3 learned tokens (40%), other scripts (CJK, Cyrillic, Greek, accented
Latin, Arabic: 20%), code-like identifiers (15%), lower/capitalised words with or without a
leading space (15%), and digits, punctuation, JSON fragments and whitespace runs (10%). What a
mask costs depends on how many tokens a grammar state leaves undecided, and this mix has the
kinds a real vocabulary has (many tokens that can open or continue a JSON string, few that fit
structural positions). Both engines see exactly the same token bytes.

    PYTHONPATH=. python benchmarks/bench_grammar.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import llguidance
import llguidance.torch as llg_torch
import numpy as np
import torch
import xgrammar as xgr

from server.runtime.token_bitmask import allocate_bitmask, apply_bitmask_
from server.tools.dev_tokenizer import _build_tokenizer

VOCAB = 262144
WIDTH = VOCAB + 256
EOS = (1, 106)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0},
        "height_m": {"type": "number"},
        "member": {"type": "boolean"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "scores": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"subject": {"type": "string"}, "value": {"type": "number"}},
                "required": ["subject", "value"],
            },
        },
    },
    "required": ["name", "age", "member", "role", "address", "tags", "scores"],
    "additionalProperties": False,
}
INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "height_m": 1.65,
    "member": True,
    "role": "editor",
    "address": {"city": "London", "zip": "W1 4AB"},
    "tags": ["mathematics", "engines", "poetry"],
    "scores": [{"subject": "analysis", "value": 9.5}, {"subject": "notes", "value": 10}],
}


def synthetic_vocabulary() -> tuple[list[bytes], set[int]]:
    """262,144 token byte strings and the special ids (see the module docstring)."""
    dev = json.loads(_build_tokenizer(8192).to_str())["model"]["vocab"]
    tokens: list[bytes] = [b""] * len(dev)
    special: set[int] = set()
    for piece, i in dev.items():
        if piece.startswith("<0x") and len(piece) == 6:
            tokens[i] = bytes([int(piece[3:5], 16)])
        elif piece.startswith("<") and piece.endswith(">"):
            tokens[i] = piece.encode()
            special.add(i)
        else:
            tokens[i] = piece.replace("\u2581", " ").encode()
    learned = [t for i, t in enumerate(tokens) if i >= 364]
    seen = set(tokens)
    rng = np.random.default_rng(0)
    scripts = [
        (0x4E00, 0x9FFF),
        (0x0400, 0x04FF),
        (0x0391, 0x03C9),
        (0x00C0, 0x017F),
        (0x0621, 0x064A),
    ]
    letters = "abcdefghijklmnopqrstuvwxyz"
    punct = [*"{}[]\":,.;!?()-_/\\'*#=+<>@&%$", '":', '",', '{"', '"}', "],", '":"', '": ']

    def word(n: int) -> str:
        return "".join(letters[j] for j in rng.integers(0, 26, n))

    while len(tokens) < VOCAB:
        kind = rng.random()
        if kind < 0.40:
            parts = rng.integers(0, len(learned), rng.integers(2, 4))
            t = b"".join(learned[j] for j in parts)
        elif kind < 0.60:
            lo, hi = scripts[rng.integers(0, len(scripts))]
            t = (
                ("" if rng.random() < 0.7 else " ")
                .join(chr(c) for c in rng.integers(lo, hi + 1, rng.integers(1, 4)))
                .encode()
            )
        elif kind < 0.75:
            a, b = word(int(rng.integers(2, 7))), word(int(rng.integers(2, 7)))
            t = (a + rng.choice(["_", ""]) + b.capitalize()).encode()
        elif kind < 0.90:
            w = word(int(rng.integers(2, 11)))
            t = (
                (" " if rng.random() < 0.6 else "") + (w.capitalize() if rng.random() < 0.3 else w)
            ).encode()
        else:
            r = rng.random()
            if r < 0.3:
                t = str(int(rng.integers(0, 100000))).encode()
            elif r < 0.7:
                t = "".join(
                    punct[j] for j in rng.integers(0, len(punct), rng.integers(1, 4))
                ).encode()
            else:
                t = ("\n" * int(rng.integers(0, 3)) + " " * int(rng.integers(1, 17))).encode()
        if t and t not in seen:
            seen.add(t)
            tokens.append(t)
    return tokens, special


class _GreedyEncoder:
    """Longest-match encoding over the synthetic vocabulary (llguidance asks for an encoder; it
    only serves to tokenize grammar literals, never the timed path)."""

    def __init__(self, tokens: list[bytes], special: set[int]) -> None:
        self.ids = {t: i for i, t in enumerate(tokens) if i not in special and t}
        self.longest = max(len(t) for t in self.ids)

    def __call__(self, text: bytes | str) -> list[int]:
        data = text.encode() if isinstance(text, str) else text
        out, i = [], 0
        while i < len(data):
            for n in range(min(self.longest, len(data) - i), 0, -1):
                tid = self.ids.get(data[i : i + n])
                if tid is not None:
                    out.append(tid)
                    i += n
                    break
        return out


class _Vocab:
    def __init__(self, tokens: list[bytes], special: set[int]) -> None:
        self.tokens = [b"\xff" + t if i in special else t for i, t in enumerate(tokens)]
        self.special_token_ids = sorted(special)
        self.eos_token_id = EOS[0]
        self.bos_token_id = 2
        self._encode = _GreedyEncoder(tokens, special)

    def __call__(self, text: bytes | str) -> list[int]:
        return self._encode(text)


class XGrammar:
    name = "xgrammar 0.2.9"

    def __init__(self, tokens: list[bytes], special: set[int], threads: int) -> None:
        vocab = [b"" if i in special else t for i, t in enumerate(tokens)]
        self.info = xgr.TokenizerInfo(
            vocab, xgr.VocabType.RAW, vocab_size=VOCAB, stop_token_ids=list(EOS)
        )
        self.threads = threads

    def compile(self, schema: str):
        compiler = xgr.GrammarCompiler(self.info, max_threads=self.threads, cache_enabled=False)
        return xgr.GrammarMatcher(
            compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
        )

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher, token: int) -> None:
        assert matcher.accept_token(token), token

    def done(self, matcher) -> bool:
        return matcher.is_terminated()


class LLGuidance:
    name = "llguidance 1.9.1"

    def __init__(self, tokens: list[bytes], special: set[int], threads: int) -> None:
        self.tok = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_Vocab(tokens, special)), n_vocab=VOCAB, eos_token=list(EOS)
        )

    def compile(self, schema: str):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema,
            defaults={"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"},
        )
        m = llguidance.LLMatcher(self.tok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        llg_torch.fill_next_token_bitmask(matcher, bitmask, row)

    def accept(self, matcher, token: int) -> None:
        assert matcher.consume_token(token), (token, matcher.get_error())

    def done(self, matcher) -> bool:
        return matcher.is_stopped()


def time_compile(engine, schema: str, repeats: int) -> float:
    engine.compile(schema)  # warm-up: lazy tables, allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.compile(schema)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_steps(engine, schema: str, path: list[int], batch: int) -> dict[str, float]:
    """Per step, ms: median and worst fill (all rows), median apply (ours) and median apply
    (xgrammar's CPU kernel)."""
    matchers = [engine.compile(schema) for _ in range(batch)]
    bitmask = allocate_bitmask(batch, VOCAB)
    logits = torch.randn(batch, WIDTH, generator=torch.Generator().manual_seed(batch))
    out = torch.empty(batch, VOCAB)
    fills, applies, native = [], [], []
    for token in path:
        t0 = time.perf_counter()
        for r, m in enumerate(matchers):
            engine.fill(m, bitmask, r)
        t1 = time.perf_counter()
        out.copy_(logits[:, :VOCAB])
        apply_bitmask_(out, range(batch), bitmask)
        t2 = time.perf_counter()
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=VOCAB, backend="cpu")
        t3 = time.perf_counter()
        # The step's token must be allowed by every row's mask: the path is a valid instance.
        assert (bitmask[:, token // 32] >> (token % 32) & 1).all(), token
        for m in matchers:
            engine.accept(m, token)
        fills.append(t1 - t0)
        applies.append(t2 - t1)
        native.append(t3 - t2)
    # The whole instance leaves each matcher able to stop (the object is complete).
    med = statistics.median
    return {
        f"fill{batch}": med(fills) * 1e3,
        f"worst{batch}": max(fills) * 1e3,
        f"apply{batch}": med(applies) * 1e3,
        f"native{batch}": med(native) * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timed compiles per engine")
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.perf_counter()
    tokens, special = synthetic_vocabulary()
    made = time.perf_counter() - t0
    schema = json.dumps(SCHEMA)
    print(
        f"torch {torch.__version__}  {platform.machine()}  threads {args.threads}  vocabulary "
        f"{len(tokens)} ids ({len(special)} special; synthesised in {made:.1f} s)  logits "
        f"[B, {WIDTH}] float32\n"
    )
    engines = []
    for cls in (XGrammar, LLGuidance):
        t0 = time.perf_counter()
        engines.append(cls(tokens, special, args.threads))
        print(f"{cls.name:<18} tokenizer setup (once per server) {time.perf_counter() - t0:8.2f} s")
    text = json.dumps(INSTANCE, separators=(",", ":"))
    path = _GreedyEncoder(tokens, special)(text)
    print(f"\ninstance: {len(text)} bytes, {len(path)} tokens (longest-match)\n")

    results: dict[str, dict[str, float]] = {}
    for e in engines:
        r = results[e.name] = {"compile": time_compile(e, schema, args.repeats) * 1e3}
        for b in batches:
            r.update(time_steps(e, schema, path, b))
    names = [e.name for e in engines]
    rows = [("compile (ms)", "compile")]
    for b in batches:
        rows += [
            (f"B={b} fill (ms/step)", f"fill{b}"),
            (f"B={b} fill, worst step (ms)", f"worst{b}"),
            (f"B={b} apply, ours (ms/step)", f"apply{b}"),
            (f"B={b} fill + apply (ms/step)", None),
            (f"B={b} apply, xgr kernel (ref)", f"native{b}"),
        ]
    print(f"{'':<32}" + "".join(f"{n:>20}" for n in names) + f"{'xgr / llg':>12}")
    for label, key in rows:
        if key is None:
            b = label.split()[0][2:]
            vals = [results[n][f"fill{b}"] + results[n][f"apply{b}"] for n in names]
        else:
            vals = [results[n][key] for n in names]
        print(f"{label:<32}" + "".join(f"{v:>20.3f}" for v in vals) + f"{vals[0] / vals[1]:>12.2f}")


if __name__ == "__main__":
    main()
