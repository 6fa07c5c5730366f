# The sampler as it was before issue 11 (commit 50cbac9, server/runtime/sampler.py), kept verbatim
# below so that benchmarks/bench_sampler.py can time the old and the new one in the same run.
# Not used by the server.
# ruff: noqa
# fmt: off
"""Per-request sampling for a batch of rows, each with its own parameters and random stream.

Owns: turning one step's logits (one row per running request) into one token per row, with that
request's `SamplingParams`: placeholder masking, logprobs, min_tokens, logit_bias, penalties,
greedy or temperature / top-k / top-p / min-p sampling. Also owns the per-request state this
needs across steps (`SamplerState`: token counts for the penalties, the random generator).

Order of processing, per row (vLLM-like, and written in this order below):
  1. restrict to the text vocabulary: ids >= text_vocab_size (vision/audio placeholders) are
     dropped and can never be sampled;
  2. logprobs, when requested, from log_softmax of these raw logits (before any penalty or
     temperature): the chosen token's and the top k;
  3. min_tokens: while fewer than min_tokens tokens were generated, the eos ids and the
     request's stop_token_ids are masked (whatever ignore_eos says);
  4. logit_bias is added;
  5. repetition_penalty over the ids seen in prompt or output (positive logits divided by it,
     negative ones multiplied, as in HF and vLLM); then frequency_penalty * count and
     presence_penalty * (count > 0) are subtracted, counting output tokens only (as OpenAI does);
  6. greedy (temperature 0): argmax, ties to the lowest id. Otherwise divide by temperature, then
     top_k (exactly k tokens, ties to the lower id), then top_p (the smallest prefix of the
     sorted distribution whose mass reaches top_p), then min_p (drop p < min_p * max p); the top
     token always survives. The draw is over the renormalised survivors.

Determinism: a seeded request gets the same tokens whatever else is in its batch and wherever its
row is. Each request owns a `torch.Generator` (seeded from params.seed, or from fresh OS entropy),
and every non-greedy step consumes exactly one `exponential_` call over the text vocabulary from
it: the token is argmax(p_i / E_i) with E_i ~ Exp(1) ("exponential race"), which picks i with
probability p_i / sum(p) with no normalisation, cumsum or search. Steps 1 and 3-5 are elementwise
and vectorised over the batch (bitwise the same as one row alone); step 6 runs per row on a 1-D
tensor of fixed length, so its reductions never see the other rows.

Errors: nothing a valid `SamplingParams` asks for empties a distribution except min_tokens when
the eos and stop ids cover the whole vocabulary (logit_bias is bounded, so it cannot). That and
non-finite model logits (NaN or +inf, or no finite logit at all) are the only per-row failures.
They never stop the other rows: `sample` finishes every row, then raises `SamplingError` naming
the failed rows and carrying the others' results, which the engine must use (their generators
have already advanced).

Deliberately does not know: stop strings, tokenizers, max_tokens or finishing (the engine's);
the model; how requests are scheduled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.vocabulary.sampling_params import SamplingParams

_NEG_INF = float("-inf")
_F32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class SampleResult:
    token_id: int
    logprob: float | None  # the chosen token's log-probability; None unless logprobs requested
    top_logprobs: tuple[tuple[int, float], ...]  # top-k (id, logprob), highest first


class SamplingError(RuntimeError):
    """Rows that could not be sampled. `row_index`/`message` name the first; `failures` all.

    `results` has one entry per row: the other rows' results (use them: their generators have
    advanced) and None for each failed row.
    """

    def __init__(
        self,
        row_index: int,
        message: str,
        failures: dict[int, str] | None = None,
        results: list[SampleResult | None] | None = None,
    ) -> None:
        super().__init__(f"row {row_index}: {message}")
        self.row_index = row_index
        self.message = message
        self.failures = failures if failures is not None else {row_index: message}
        self.results = results if results is not None else []


class SamplerState:
    """Per-request sampling state kept across steps: the generator and the penalty counts.

    `vocab_size` is the sampler's text vocabulary size; prompt and eos ids at or past it
    (placeholders) are ignored. The params are validated here, so the sampler never sees
    invalid ones.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        vocab_size: int,
        eos_ids: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> None:
        params.validate(vocab_size)
        self.params = params
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.num_generated = 0
        # Fresh entropy rather than torch.seed(): that would reseed the global default generator.
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8))
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed)

        def ids(values: Sequence[int] | set[int]) -> torch.Tensor:
            return torch.tensor(sorted(values), dtype=torch.long, device=self.device)

        self._prompt = {t for t in prompt_ids if 0 <= t < vocab_size}
        self._prompt_ids = ids(self._prompt) if params.repetition_penalty != 1 else None
        self._min_tokens_ids = (
            ids({t for t in eos_ids if 0 <= t < vocab_size} | set(params.stop_token_ids))
            if params.min_tokens > 0
            else None
        )
        # Bias ids and values in the same (id) order; validate() guarantees distinct ids.
        bias = sorted(params.logit_bias)
        self._bias_ids = ids([t for t, _ in bias]) if bias else None
        self._bias = (
            torch.tensor([b for _, b in bias], dtype=torch.float32, device=self.device)
            if bias
            else None
        )
        self._counts: dict[int, int] = {}  # output token -> count, in first-seen order
        self._new: list[int] = []  # output tokens not in the prompt, in first-seen order

    def record(self, token_id: int) -> None:
        """Note one generated token (call once per step, after sampling, before the next)."""
        self.num_generated += 1
        if not 0 <= token_id < self.vocab_size:
            return  # a placeholder the engine inserted itself: counts for min_tokens only
        if token_id not in self._counts and token_id not in self._prompt:
            self._new.append(token_id)
        self._counts[token_id] = self._counts.get(token_id, 0) + 1

    def _seen_ids(self) -> torch.Tensor | None:
        """Distinct ids in prompt or output, for the repetition penalty (no duplicates)."""
        if self._prompt_ids is None:
            return None
        new = torch.tensor(self._new, dtype=torch.long, device=self.device)
        return torch.cat([self._prompt_ids, new])


class Sampler:
    """Samples one token per row; see the module docstring for the order and determinism."""

    def __init__(self, text_vocab_size: int) -> None:
        self.text_vocab_size = text_vocab_size

    def sample(self, logits: torch.Tensor, states: Sequence[SamplerState]) -> list[SampleResult]:
        raw = self._text_logits(logits, states)
        failures = self._check_raw(raw)
        x = self._process(raw, states)
        empty = torch.isneginf(x).all(dim=1).tolist()
        for row, is_empty in enumerate(empty):
            if is_empty and row not in failures:
                failures[row] = (
                    "min_tokens forbids every token: the eos and stop_token_ids cover the "
                    "whole vocabulary"
                )
        logprobs = self._logprobs(raw, states)
        results: list[SampleResult | None] = []
        for row, state in enumerate(states):
            if row in failures:
                results.append(None)
                continue
            token = self._draw(x[row], state)
            lp, top = logprobs[row] if logprobs[row] is not None else (None, ())
            results.append(SampleResult(token, None if lp is None else float(lp[token]), top))
        if failures:
            first = min(failures)
            raise SamplingError(first, failures[first], failures, results)
        return [r for r in results if r is not None]

    def processed_logits(
        self, logits: torch.Tensor, states: Sequence[SamplerState]
    ) -> torch.Tensor:
        """Steps 1 and 3-5: [B, text_vocab_size] float32 logits before temperature and filters."""
        return self._process(self._text_logits(logits, states), states)

    def probabilities(self, logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
        """The distribution each row draws from (one-hot for greedy rows), [B, text_vocab_size]."""
        x = self.processed_logits(logits, states)
        out = torch.zeros_like(x)
        for row, state in enumerate(states):
            if state.params.greedy:
                out[row, int(torch.argmax(x[row]))] = 1.0
            else:
                out[row] = torch.softmax(self._filtered(x[row], state.params), dim=0)
        return out

    # ---- steps ---------------------------------------------------------------------------------

    def _text_logits(self, logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits must be [{len(states)}, V], got {tuple(logits.shape)}")
        if logits.shape[1] < self.text_vocab_size:
            raise ValueError(
                f"logits have {logits.shape[1]} ids, fewer than the text vocabulary "
                f"{self.text_vocab_size}"
            )
        for state in states:
            if state.vocab_size != self.text_vocab_size:
                raise ValueError("a SamplerState was made for another vocabulary size")
            if state.device.type != logits.device.type:
                raise ValueError(
                    f"a SamplerState lives on {state.device}, logits on {logits.device}"
                )
        # Step 1: slicing (not masking) makes placeholder ids unsampleable by construction.
        return logits[:, : self.text_vocab_size].float()

    @staticmethod
    def _check_raw(raw: torch.Tensor) -> dict[int, str]:
        bad = (torch.isnan(raw) | torch.isposinf(raw)).any(dim=1).tolist()
        none = torch.isneginf(raw).all(dim=1).tolist()
        failures = {}
        for row in range(raw.shape[0]):
            if bad[row]:
                failures[row] = "the model's logits contain NaN or +inf"
            elif none[row]:
                failures[row] = "the model's logits have no finite value"
        return failures

    def _process(self, raw: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
        x = raw.clone()
        # Each step gathers (row, id) pairs from every row that needs it and applies one indexed
        # update; the ids within a row are distinct, so plain (non-accumulating) writes are exact.
        rows, ids = _pairs(
            [s._min_tokens_ids if s.num_generated < s.params.min_tokens else None for s in states]
        )
        if rows is not None:
            x[rows, ids] = _NEG_INF  # step 3
        rows, ids = _pairs([s._bias_ids for s in states])
        if rows is not None:
            bias = torch.cat([s._bias for s in states if s._bias is not None])
            x[rows, ids] += bias  # step 4
        rows, ids = _pairs([s._seen_ids() for s in states])
        if rows is not None:  # step 5a: repetition penalty
            penalty = _floats([s.params.repetition_penalty for s in states], x.device)
            v, p = x[rows, ids], penalty[rows]
            x[rows, ids] = torch.where(v > 0, v / p, v * p)
        counted = [
            bool(s._counts) and bool(s.params.frequency_penalty or s.params.presence_penalty)
            for s in states
        ]
        if any(counted):  # step 5b: frequency and presence, output tokens only
            rows, ids = _pairs(
                [
                    torch.tensor(list(s._counts), dtype=torch.long, device=x.device) if c else None
                    for s, c in zip(states, counted, strict=True)
                ]
            )
            assert rows is not None and ids is not None
            count = _floats(
                [n for s, c in zip(states, counted, strict=True) if c for n in s._counts.values()],
                x.device,
            )
            freq = _floats([s.params.frequency_penalty for s in states], x.device)
            pres = _floats([s.params.presence_penalty for s in states], x.device)
            x[rows, ids] -= freq[rows] * count + pres[rows]
        # A tiny repetition penalty can overflow a positive logit to +inf, which would turn the
        # softmax into NaN; the largest float keeps the token on top and the maths finite.
        return x.clamp_(max=_F32_MAX)

    @staticmethod
    def _filtered(x: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """Step 6 before the draw: one row's tempered logits with dropped ids at -inf."""
        # Shift first: the top logit becomes 0, so no temperature can overflow it to +inf.
        x = (x - x.max()) / params.temperature
        if 0 < params.top_k < x.numel() or params.top_p < 1:
            # A stable sort puts ties in id order, so top_k and top_p break them to the lower id.
            sorted_x, order = torch.sort(x, descending=True, stable=True)
            drop = torch.zeros_like(sorted_x, dtype=torch.bool)
            if 0 < params.top_k < x.numel():
                drop[params.top_k :] = True
                sorted_x = sorted_x.masked_fill(drop, _NEG_INF)
            if params.top_p < 1:
                p = torch.softmax(sorted_x, dim=0)
                # Keep a token when the mass strictly before it is still short of top_p: that is
                # the smallest prefix reaching top_p, and the top token (mass 0 before it) stays.
                drop |= (torch.cumsum(p, dim=0) - p) >= params.top_p
                drop[0] = False
            x = x.scatter(0, order, sorted_x.masked_fill(drop, _NEG_INF))
        if params.min_p > 0:
            # p_i < min_p * p_max  <=>  x_i - x_max < log(min_p), and x_max is 0 here (the top
            # token survives top_k / top_p, so the maximum is unchanged).
            x = x.masked_fill(x < math.log(params.min_p), _NEG_INF)
        return x

    def _draw(self, x: torch.Tensor, state: SamplerState) -> int:
        if state.params.greedy:
            return int(torch.argmax(x))  # the first maximum: ties go to the lowest id
        x = self._filtered(x, state.params)
        # Exponential race: argmax(log p_i - log E_i) = argmax(p_i / E_i), E_i ~ Exp(1). Exactly
        # one exponential_ call of the full text-vocabulary length per step, dropped ids or not.
        e = torch.empty_like(x).exponential_(generator=state.generator)
        score = torch.where(torch.isneginf(x), _NEG_INF, x - torch.log(e))
        return int(torch.argmax(score))

    @staticmethod
    def _logprobs(
        raw: torch.Tensor, states: Sequence[SamplerState]
    ) -> list[tuple[torch.Tensor, tuple[tuple[int, float], ...]] | None]:
        """Step 2: per row, (log_softmax of the raw logits, top-k pairs) or None if not asked."""
        out: list[tuple[torch.Tensor, tuple[tuple[int, float], ...]] | None] = []
        for row, state in enumerate(states):
            k = state.params.logprobs
            if k is None:
                out.append(None)
                continue
            lp = torch.log_softmax(raw[row], dim=0)
            top: tuple[tuple[int, float], ...] = ()
            if k > 0:
                values, idx = torch.topk(lp, min(k, lp.numel()))
                pairs = zip(idx.tolist(), values.tolist(), strict=True)
                top = tuple(sorted(pairs, key=lambda p: (-p[1], p[0])))
            out.append((lp, top))
        return out


def _pairs(
    per_row: Sequence[torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Flatten per-row id tensors into (row index, id) tensors for one indexed update."""
    rows, ids = [], []
    for row, t in enumerate(per_row):
        if t is not None and t.numel():
            rows.append(torch.full_like(t, row))
            ids.append(t)
    if not ids:
        return None, None
    return torch.cat(rows), torch.cat(ids)


def _floats(values: Sequence[float], device: torch.device) -> torch.Tensor:
    # float32 explicitly: the logits are float32 whatever torch's default dtype is.
    return torch.tensor(values, dtype=torch.float32, device=device)
