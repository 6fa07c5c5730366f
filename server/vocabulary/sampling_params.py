"""Per-request sampling parameters: what a request asks the sampler for, and the rules they meet.

Owns: the `SamplingParams` record (frozen, hashable, so the engine can keep it on a request and
compare it freely), its defaults, and `validate`, which checks every field against the vocabulary
and context length and names the offending parameter, so the API can answer 400 with `param`.

Deliberately does not know: tensors, tokenizers or HTTP. It is plain Python (no torch) because
both the API layer and the engine import it; `server/runtime/sampler.py` turns it into tensors.
The meaning of each field (order of processing, penalties, determinism) is documented there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.vocabulary.structured_output import KINDS, StructuredOutput

MAX_STOP_STRINGS = 16
# The stop strings' total length. Matching is linear in it (server/engine/stop_strings.py), and a
# request holds back up to its longest stop string's length of text; stop strings are delimiters,
# and 4096 characters is 16 of 256 each.
MAX_STOP_CHARS = 4096
# stop_token_ids and logit_bias entries: the sampler applies both to every row at every step and
# the stop check looks ids up every token, so their size is per-step work. 1024 ids are far more
# than any ban list or set of end markers needs, and a small fraction of a real vocabulary.
MAX_TOKEN_ID_LIST = 1024
MAX_LOGPROBS = 20
# A structured-output constraint's text (schema, pattern, grammar, choices). Compiling is roughly
# linear in it and runs before admission; 64 KiB is far beyond any schema a client sends (the
# request body itself is capped at 1 MiB).
MAX_STRUCTURED_CHARS = 65536
MAX_ABS_LOGIT_BIAS = 100.0
MAX_ABS_PENALTY = 2.0
# torch.Generator.manual_seed accepts exactly this range (negative seeds wrap to 64 bits).
SEED_MIN = -(2**63)
SEED_END = 2**64


class SamplingParamsError(ValueError):
    """A request's sampling parameter breaks a rule; `param` names it (e.g. "top_p")."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0.0 means greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 = off; else >= 1
    min_p: float = 0.0  # [0, 1]
    seed: int | None = None  # any int in [-2**63, 2**64)
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    repetition_penalty: float = 1.0  # > 0 (1 = off)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    stop: tuple[str, ...] = ()  # stop strings, non-empty
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's plus the top k
    # The prompt tokens' logprobs (vLLM's prompt_logprobs): None: none; k >= 0: each prompt
    # token's (from the second on) with its rank, plus the top k at its position.
    prompt_logprobs: int | None = None
    structured: StructuredOutput | None = None  # the output must match this (None: free)

    def __post_init__(self) -> None:
        # Callers naturally pass lists (JSON arrays) or a dict for logit_bias; store tuples so the
        # record stays hashable. Anything else is left as given for `validate` to reject by name.
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))
        for name in ("logit_bias", "stop", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.logit_bias, tuple):
            pairs = tuple(tuple(p) if isinstance(p, list) else p for p in self.logit_bias)
            object.__setattr__(self, "logit_bias", pairs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(
        self,
        vocab_size: int,
        max_model_len: int | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        """Raise `SamplingParamsError` for the first field that breaks its rule.

        `vocab_size` is the number of sampleable (text) token ids: token ids in `logit_bias` and
        `stop_token_ids` must lie in [0, vocab_size). `max_model_len`, when given, bounds
        `max_tokens` (the engine checks prompt plus max_tokens itself, knowing the prompt).
        `eos_token_ids`, the model's end-of-generation ids, take part in the one rule that
        involves several fields: while min_tokens is unmet, eos and stop_token_ids are masked,
        and they must leave at least one token to sample (else every step would fail).
        """
        if not _is_int(vocab_size) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        _int("max_tokens", self.max_tokens, low=1)
        if max_model_len is not None and self.max_tokens > max_model_len:
            raise SamplingParamsError(
                "max_tokens",
                f"max_tokens must be at most the model's context length {max_model_len}, "
                f"got {self.max_tokens}",
            )
        _int("min_tokens", self.min_tokens, low=0)
        if self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                "min_tokens",
                f"min_tokens must be at most max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )
        _real("temperature", self.temperature)
        if self.temperature < 0:
            raise SamplingParamsError(
                "temperature",
                f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}",
            )
        _real("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise SamplingParamsError("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        _int("top_k", self.top_k, low=0, rule="top_k must be 0 (off) or >= 1")
        _real("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise SamplingParamsError("min_p", f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (
            not _is_int(self.seed) or not SEED_MIN <= self.seed < SEED_END
        ):
            raise SamplingParamsError(
                "seed", f"seed must be null or an int in [-2**63, 2**64), got {self.seed!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _real(name, value)
            if not -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY:
                raise SamplingParamsError(name, f"{name} must be in [-2, 2], got {value!r}")
        _real("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0:
            raise SamplingParamsError(
                "repetition_penalty",
                f"repetition_penalty must be > 0 (1 means off), got {self.repetition_penalty!r}",
            )
        self._validate_logit_bias(vocab_size)
        self._validate_stop()
        if not isinstance(self.stop_token_ids, tuple):
            raise SamplingParamsError(
                "stop_token_ids",
                f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}",
            )
        if len(self.stop_token_ids) > MAX_TOKEN_ID_LIST:
            raise SamplingParamsError(
                "stop_token_ids",
                f"stop_token_ids may hold at most {MAX_TOKEN_ID_LIST} ids, "
                f"got {len(self.stop_token_ids)}",
            )
        for token in self.stop_token_ids:
            _token_id("stop_token_ids", token, vocab_size)
        if self.min_tokens > 0:
            masked = set(self.stop_token_ids) | {t for t in eos_token_ids if 0 <= t < vocab_size}
            if len(masked) >= vocab_size:
                raise SamplingParamsError(
                    "min_tokens",
                    "min_tokens > 0 masks the end-of-generation ids and stop_token_ids until it "
                    "is met, and together they cover the whole vocabulary: no token could be "
                    "generated",
                )
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(
                    name, f"{name} must be a boolean, got {getattr(self, name)!r}"
                )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                rule = f"{name} must be null or an int in [0, {MAX_LOGPROBS}]"
                _int(name, value, low=0, rule=rule)
                if value > MAX_LOGPROBS:
                    raise SamplingParamsError(name, f"{rule}, got {value!r}")
        if self.structured is not None:
            validate_structured(self.structured)
            if self.min_tokens:
                # The constraint decides where the output ends (eos only where it may): a
                # floor on the length could contradict it, leaving no token to sample.
                raise SamplingParamsError(
                    "min_tokens",
                    "min_tokens cannot be combined with a structured-output constraint "
                    "(the constraint decides where the output ends)",
                )

    def _validate_logit_bias(self, vocab_size: int) -> None:
        if not isinstance(self.logit_bias, tuple):
            raise SamplingParamsError(
                "logit_bias",
                f"logit_bias must map token ids to biases, got {self.logit_bias!r}",
            )
        if len(self.logit_bias) > MAX_TOKEN_ID_LIST:
            raise SamplingParamsError(
                "logit_bias",
                f"logit_bias may hold at most {MAX_TOKEN_ID_LIST} entries, "
                f"got {len(self.logit_bias)}",
            )
        seen: set[int] = set()
        for pair in self.logit_bias:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise SamplingParamsError(
                    "logit_bias", f"logit_bias entries must be (token id, bias) pairs, got {pair!r}"
                )
            token, bias = pair
            _token_id("logit_bias", token, vocab_size)
            # A duplicate would leave "which bias wins" to the sampler; say so instead.
            if token in seen:
                raise SamplingParamsError("logit_bias", f"logit_bias names token id {token} twice")
            seen.add(token)
            if not _is_real(bias) or not -MAX_ABS_LOGIT_BIAS <= bias <= MAX_ABS_LOGIT_BIAS:
                raise SamplingParamsError(
                    "logit_bias",
                    f"logit_bias for token id {token} must be a number in [-100, 100], "
                    f"got {bias!r}",
                )

    def _validate_stop(self) -> None:
        if not isinstance(self.stop, tuple):
            raise SamplingParamsError("stop", f"stop must be a list of strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError(
                "stop",
                f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}",
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingParamsError(
                    "stop", f"stop strings must be non-empty strings, got {s!r}"
                )
            if not _is_unicode(s):
                # Generated text is always valid Unicode, so it could never match.
                raise SamplingParamsError(
                    "stop", f"stop strings must be valid Unicode (no lone surrogates), got {s!r}"
                )
        total = sum(len(s) for s in self.stop)
        if total > MAX_STOP_CHARS:
            raise SamplingParamsError(
                "stop",
                f"stop strings may total at most {MAX_STOP_CHARS} characters, got {total}",
            )


def validate_structured(s: Any) -> None:
    """The constraint's shape (param "structured"; the API names its own field instead). Whether
    a schema, pattern or grammar compiles is the grammar engine's to say (runtime/grammar.py)."""
    if not isinstance(s, StructuredOutput) or s.kind not in KINDS:
        raise SamplingParamsError(
            "structured", f"structured must be a StructuredOutput of kind {KINDS}, got {s!r}"
        )
    if not isinstance(s.spec, str):
        raise SamplingParamsError("structured", f"the {s.kind} constraint must be text")
    if len(s.spec) > MAX_STRUCTURED_CHARS:
        raise SamplingParamsError(
            "structured",
            f"the {s.kind} constraint may have at most {MAX_STRUCTURED_CHARS} characters, "
            f"got {len(s.spec)}",
        )
    if s.kind != "json" and not s.spec:
        raise SamplingParamsError("structured", f"the {s.kind} constraint is empty")
    if s.kind in ("json_schema", "choice"):
        try:
            value = json.loads(s.spec)
        except ValueError as e:
            raise SamplingParamsError(
                "structured", f"the {s.kind} constraint is not valid JSON: {e}"
            ) from None
        if s.kind == "json_schema" and not isinstance(value, dict | bool):
            raise SamplingParamsError(
                "structured", f"a JSON schema must be an object (or a boolean), got {s.spec[:80]}"
            )
        if s.kind == "choice" and (
            not isinstance(value, list)
            or not value
            or not all(isinstance(c, str) and c for c in value)
        ):
            raise SamplingParamsError(
                "structured", "choices must be a non-empty list of non-empty strings"
            )


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `max_tokens: true` is a client bug, not the number 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_real(value: Any) -> bool:
    # NaN and infinities compare false with every bound; reject them explicitly anyway so the
    # message says "a finite number" rather than an odd range failure.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int(name: str, value: Any, low: int, rule: str | None = None) -> None:
    rule = rule or f"{name} must be an int >= {low}"
    if not _is_int(value) or value < low:
        raise SamplingParamsError(name, f"{rule}, got {value!r}")


def _real(name: str, value: Any) -> None:
    if not _is_real(value):
        raise SamplingParamsError(name, f"{name} must be a finite number, got {value!r}")


def _token_id(name: str, token: Any, vocab_size: int) -> None:
    if not _is_int(token) or not 0 <= token < vocab_size:
        raise SamplingParamsError(
            name, f"{name} token ids must be ints in [0, {vocab_size}), got {token!r}"
        )
