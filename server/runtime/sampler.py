"""Per-request sampling for a batch of rows: one batched pass per step, on the logits' device.

Owns: turning one step's logits (one row per running request) into one token per row, with that
request's `SamplingParams`: placeholder ids dropped, logprobs, min_tokens, logit_bias, penalties,
greedy or temperature / top-k / top-p / min-p sampling; and the per-request state this needs
across steps (`SamplerState` on the host; seeds, and penalty counts in a device table,
penalties.py).

Order of processing, per row (vLLM-like):
  1. restrict to the text vocabulary: ids >= text_vocab_size (vision/audio placeholders) are
     sliced off and can never be sampled;
  1b. structured output: a row whose request has a constraint (params.structured) gets -inf on
     every token its grammar does not allow next (grammar.py fills a packed bitmask per row on
     the host; token_bitmask.py adds it, as {0, -inf}, to those rows of a copy of the logits),
     so what follows, greedy and sampled paths and logprobs alike, sees only allowed tokens (as
     in vLLM, which masks before its sampler). Stop tokens are allowed only where the grammar
     may end, so a request ends (eos, finish_reason "stop") when its output is complete. Steps
     with no constrained row do none of this. Each row's matcher accepts its token after the
     step;
  2. logprobs, when requested, of these raw logits (before any penalty or temperature): the chosen
     token's and the top k;
  3. min_tokens: while fewer than min_tokens tokens were generated, the eos ids and the request's
     stop_token_ids are masked (whatever ignore_eos says);
  4. logit_bias is added;
  5. repetition_penalty over the ids seen in prompt or output (positive logits divided by it,
     negative ones multiplied, as in HF and vLLM); then frequency_penalty * count and
     presence_penalty * (count > 0) are subtracted, counting output tokens only (as OpenAI does);
  6. greedy (temperature 0): argmax, ties to the lowest id. Otherwise temperature, then top_k
     (exactly k tokens, ties to the lower id), then top_p (the smallest prefix of the distribution
     left by top_k, ordered by logit then id, whose mass reaches top_p), then min_p (drop p <
     min_p * max p); the top token always survives. The draw is over the renormalised survivors.

How, for a batch (no Python loop over rows touches a vocabulary-sized tensor):
  - Block maxima (blocks of `block` ids) are one cheap pass; from them, greedy is the first
    maximum of the first block holding the row maximum, and the top-K candidates of a row lie in
    its K blocks with the highest maxima (each of those holds an element at least as large), so
    top-k never sorts or selects over the vocabulary. Candidates are ordered exactly by (logit
    desc, id asc) through int64 keys, so ties break to the lower id whatever the kernel does.
  - top_k rows (k <= vocabulary) work on their top-k candidates only: temperature, top_p over the
    top-k mass, min_p and the draw are [rows, k] operations.
  - Rows with neither top_k nor top_p (temperature, maybe min_p) draw without weighing the
    vocabulary: exact rejection sampling under an envelope read off the block maxima (the 64
    blocks with the highest maxima weighed exactly, every other block bounded by 64 x the weight
    of its maximum; see `_sample_envelope`). For an LM's distribution nearly every first proposal
    is accepted; rows where none of a step's proposals is (flat distributions) are drawn again
    on the whole-vocabulary path below, after the read-back.
  - The whole-vocabulary path (top_p without top_k, and those redraws): three in-place passes
    write exp2((x - max) * log2(e) / T) into a reused buffer, and one more its block sums (min_p
    adds one threshold pass). They draw by an exponential race over levels (a group of blocks in
    proportion to its mass, a block within it, a token within that): exact, with random numbers
    for about 3 x 64 items per row rather than the vocabulary.
  - min_tokens, logit_bias and penalties touch a few ids per row: float32 logits are adjusted in
    place and the values before are written back before `sample` returns (also on an error), so
    no vocabulary-sized copy is made; other dtypes are adjusted on a float32 copy.
  - top_p without top_k: the top `nucleus_candidates` tokens settle the nucleus when their mass
    reaches top_p of the total (they hold it exactly, and the draw is over them); rows they do not
    settle draw by exact rejection with a moving pivot (FlashInfer's idea, here over the block
    race): draw from the remaining mass, accept when the mass strictly before the drawn token is
    below top_p of the total, else keep only the tokens before it and draw again. Each round
    accepts with probability >= top_p, and reads the logits and weights once (the block sums
    ahead of the drawn token: its mass before, and the next round's narrowed block sums).
  - With `compiled` (a server with `compile: true`), the int64 order keys of top-k selections
    and the logprobs normaliser's exponentials run as one compiled loop each (row_passes.py)
    instead of several torch passes; the keys are the same integers, so no draw changes. The
    top-k draw (`_top_k_draw`: temperature, top_p, min_p and the race over [rows, k]
    candidates), the envelope draws of the other rows (`_envelope_draw`,
    `_nucleus_envelope_draw`), a rejection round's pass (`_ahead_sums`) and the penalties'
    arithmetic (penalties.py) run as one compiled graph each instead of dozens of small ops
    (on an accelerator, kernel launches): the same arithmetic, whose sums may round in another
    order (a draw could change only where a top_p threshold, an acceptance test or two racers'
    ratios tie to within that rounding). A step whose rows are all greedy, none adjusted and
    none asking for logprobs (a compiled engine's common step) is one compiled pass
    (`_greedy_pick`: the first maximum and the failure code, packed): the same tokens. So is a
    step whose rows are all greedy or top_k, none adjusted, none asking for logprobs (sampling
    with Gemma's defaults, top_k 64 and top_p 0.95): `_top_k_pick` selects the candidates and
    draws in one graph (the general path's candidates and draw, as compiled above), one graph
    for every k and batch.
  - Randomness is counter-based (counter_random.py): a pure function of (seed, tokens generated so
    far, stream, token or block index), so a seeded request draws the same tokens whatever else is
    in the batch and wherever its row is; unseeded requests get a random seed at registration.
  - One device->host copy per step: ids, failure codes and requested logprobs packed in one
    float64 tensor. Steps with top_p-without-top_k rows read one more flag vector (which rows the
    candidates settle), and one per rejection round when some row needs them; steps where the
    envelope drew nothing for some row read once more after drawing it again.

Exactness: every path samples exactly the filtered distribution (up to float rounding of the
weights). Bitwise batch invariance needs each row's arithmetic to be the same whatever the batch:
elementwise ops, exact selections (block maxima, int64-keyed top-k, argmax) and the per-row sums
over 64-id blocks. On the CPU the last hold for 1 and 2 threads with a vocabulary that is a
multiple of 64 (no kernel splits a row at an odd offset), which the tests check. On CUDA they
hold as long as torch reduces a [B, n, 64] tensor's last dim the same way for every B, which this
build could not check; a difference would change a draw only when two blocks' races tie within
rounding.

Where this differs from vLLM and FlashInfer, and why:
  - min_p comes after top_k/top_p (this sampler's order before issue 11, kept); vLLM applies it
    first, so its top_p sees the min_p-filtered distribution.
  - Greedy means temperature 0 exactly (vLLM: below 1e-5); a tiny temperature samples, and picks
    the top token unless others lie within rounding of it.
  - Ties in top_k/top_p and in the top logprobs go to the lower id; vLLM's sort and FlashInfer's
    pivots leave their order to the kernel, which batch invariance cannot afford.
  - Noise is keyed by tokens generated so far, not by position in the sequence (vLLM V2), so a
    request's draws do not move with its prompt length.
  - top_p without top_k is exact for any distribution (candidates, then rejection); vLLM's
    PyTorch fallback sorts the vocabulary, and its FlashInfer path cannot take per-request seeds.

Errors: non-finite model logits (NaN or +inf, or no finite logit at all) and min_tokens masking
every token are per-row failures. They never stop the other rows: `sample` finishes every row,
then raises `SamplingError` naming the failed rows and carrying the others' results, which the
engine must use (their state has already advanced).

Deliberately does not know: stop strings, tokenizers, max_tokens or finishing (the engine's);
the model; how requests are scheduled.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch

from server.runtime.counter_random import MAX_INDEX, hash32, race, row_key
from server.runtime.grammar import GrammarMatcher, Grammars
from server.runtime.penalties import Entry, PenaltyTable
from server.runtime.row_gather import gather_blocks, gather_rows, scatter_rows_
from server.runtime.row_passes import (
    LOG2E,
    compiled_exp2_block_sums,
    compiled_order_keys,
    compiled_per_row,
    order_keys,
)
from server.runtime.token_bitmask import allocate_bitmask, apply_bitmask_
from server.vocabulary.sampling_params import SamplingParams
from server.vocabulary.step import SampleResult

NEG_INF = float("-inf")
MAX_BLOCK = 64  # ids per block of the block maxima / block sums (and fan-out of the block race)
NUCLEUS_CANDIDATES = 64  # top_p without top_k: candidates that usually settle the nucleus
ENVELOPE_BLOCKS = 64  # whole-distribution rows: blocks weighed exactly in the envelope
ENVELOPE_PROPOSALS = 8  # whole-distribution rows: proposals per step before the exact path
_KEPT_LENGTHS = 64  # views kept by `Sampler._length`
_F32_MAX = torch.finfo(torch.float32).max
_FAIL_MESSAGES = {
    1: "the model's logits contain NaN or +inf",
    2: "the model's logits have no finite value",
    3: "min_tokens forbids every token: the eos and stop_token_ids cover the whole vocabulary",
}


class SamplingError(RuntimeError):
    """Rows that could not be sampled. `row_index`/`message` name the first; `failures` all.

    `results` has one entry per row: the other rows' results (use them: their state has
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


@dataclass
class SamplerState:
    """One request's sampling state on the host; its penalty entries live in the sampler's table.

    Made by `Sampler.add_request`, advanced by `Sampler.sample`, ended by `Sampler.release`.
    """

    params: SamplingParams
    seed: int  # in [0, 2**64): params.seed mod 2**64, or fresh entropy
    num_generated: int = 0
    slot: int | None = None  # row of the penalty table, if the request adjusts any logit
    tracks_output: bool = False  # penalties that depend on generated tokens
    static_entries: int = 0  # entries at registration (the table may hold more)
    released: bool = False
    matcher: GrammarMatcher | None = None  # structured output: the request's grammar position


class Sampler:
    """Samples one token per row; see the module docstring for the order and the method.

    Its methods run in inference mode: the runner's logits are inference tensors, which
    adjusting in place needs, and the sampler's own tables are then only ever changed there."""

    def __init__(
        self,
        text_vocab_size: int,
        eos_ids: Sequence[int] = (),
        device: torch.device | str = "cpu",
        nucleus_candidates: int = NUCLEUS_CANDIDATES,
        grammars: Grammars | None = None,
        envelope_blocks: int = ENVELOPE_BLOCKS,
        envelope_proposals: int = ENVELOPE_PROPOSALS,
        compiled: bool = False,
    ) -> None:
        """`grammars` compiles structured-output constraints; without it a request with one
        is refused at `add_request`. `compiled`: order keys and the logprobs normaliser run as
        one compiled loop each (row_passes.py) rather than several torch passes, and the draws'
        and penalties' arithmetic as compiled graphs (see the module docstring)."""
        if not 1 <= text_vocab_size <= MAX_INDEX:
            raise ValueError(f"text_vocab_size must be in [1, {MAX_INDEX}], got {text_vocab_size}")
        self.text_vocab_size = text_vocab_size
        self.eos_ids = tuple(t for t in eos_ids if 0 <= t < text_vocab_size)
        self.device = torch.device(device)
        # The largest power of two up to MAX_BLOCK dividing the vocabulary (Gemma's 262144: 64).
        self.block = math.gcd(text_vocab_size, MAX_BLOCK)
        self.nucleus_candidates = nucleus_candidates
        self.envelope_blocks = envelope_blocks
        self.envelope_proposals = envelope_proposals
        self.compiled = compiled
        self.keys = compiled_order_keys if compiled else order_keys
        self._top_k_draw = compiled_per_row("top_k_draw", _top_k_draw) if compiled else _top_k_draw
        self._envelope_draw = (
            compiled_per_row("envelope_draw", _envelope_draw, dynamic_columns=False)
            if compiled
            else _envelope_draw
        )
        self._nucleus_envelope_draw = (
            compiled_per_row("nucleus_envelope_draw", _nucleus_envelope_draw, dynamic_columns=False)
            if compiled
            else _nucleus_envelope_draw
        )
        self._ahead_sums = compiled_per_row("ahead_sums", _ahead_sums, dynamic_columns=False)
        self._greedy_pick = (
            compiled_per_row("greedy_pick", _greedy_pick, dynamic_columns=False)
            if compiled
            else None
        )
        self._top_k_pick = (
            compiled_per_row("top_k_pick", _top_k_pick, dynamic_columns=False, shared=(2, 3))
            if compiled
            else None
        )
        self._lengths: dict[tuple[str, int], torch.Tensor] = {}  # see `_length`
        self._length_buffers: dict[str, torch.Tensor] = {}
        self.table = PenaltyTable(self.device, compiled)
        self.grammars = grammars
        self._buffers: dict[str, torch.Tensor] = {}
        self._bitmask = allocate_bitmask(0, text_vocab_size)  # host, grown to the largest batch

    # ---- requests --------------------------------------------------------------------------

    @torch.inference_mode()
    def add_request(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int] = (),
        eos_ids: Sequence[int] | None = None,
    ) -> SamplerState:
        """Validate `params` and register a request; `eos_ids` default to the sampler's. Prompt
        and eos ids at or past the text vocabulary (placeholders) are ignored."""
        vocab = self.text_vocab_size
        params.validate(vocab)
        # Fresh entropy rather than torch.seed(): that would reseed the global default generator.
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        state = SamplerState(params, seed % 2**64)
        if params.structured is not None:
            if self.grammars is None:
                raise ValueError("this sampler has no grammar compiler for structured output")
            # Compiled already (and cached) when the API checked the request; offline callers
            # compile here.
            state.matcher = self.grammars.matcher(params.structured)
        entries: dict[int, Entry] = {}
        for token, bias in params.logit_bias:
            entries[token] = Entry(token, bias=float(bias))
        if params.min_tokens > 0:
            eos = self.eos_ids if eos_ids is None else eos_ids
            for token in {t for t in eos if 0 <= t < vocab} | set(params.stop_token_ids):
                e = entries.get(token, Entry(token))
                entries[token] = Entry(token, e.bias, e.seen, blocked=True)
        if params.repetition_penalty != 1:
            for token in {t for t in prompt_ids if 0 <= t < vocab}:
                e = entries.get(token, Entry(token))
                entries[token] = Entry(token, e.bias, True, e.blocked)
        state.tracks_output = bool(
            params.repetition_penalty != 1 or params.frequency_penalty or params.presence_penalty
        )
        if entries or state.tracks_output:
            ordered = [entries[t] for t in sorted(entries)]
            room = params.max_tokens if state.tracks_output else 0
            state.slot = self.table.allocate(ordered, len(ordered) + room)
            state.static_entries = len(ordered)
        return state

    def release(self, state: SamplerState) -> None:
        """Forget a finished request (its table slot is reused)."""
        if state.slot is not None and not state.released:
            self.table.free(state.slot)
        state.released = True
        state.matcher = None

    # ---- sampling --------------------------------------------------------------------------

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, states: Sequence[SamplerState]) -> list[SampleResult]:
        """One token per row of `logits` [B, >= text vocabulary]; advances each sampled state."""
        raw = self._text_logits(logits, states)
        if not states:
            return []
        constrained = [r for r, s in enumerate(states) if s.matcher is not None]
        if constrained:
            raw = self._constrained(raw, states, constrained)
        plan = _plan(states, self.text_vocab_size)
        x, adj = self._processed(raw, states, plan)
        try:
            values, width, tokens, fail = self._draw(raw, x, adj, states, plan)
        finally:
            if adj is not None:  # the caller's logits as they were, also after an error
                adj.restore(raw)
        # State advances last: a step that raised before here (e.g. out of memory, which the
        # engine retries) has changed nothing.
        if plan.tracked:
            self._record(states, plan.tracked, tokens, fail == 0)
        for r in constrained:
            if not int(values[r][1]):  # a failed row drew nothing
                m = states[r].matcher
                assert m is not None
                if not m.accept(int(values[r][0])):  # the mask allowed it: cannot happen
                    raise RuntimeError(f"row {r}: the grammar refused a token its mask allowed")
        return _results(values, width, states)

    @torch.inference_mode()
    def record(self, states: Sequence[SamplerState], token_ids: Sequence[int]) -> None:
        """Count tokens as generated without sampling them (one per state; e.g. tokens a caller
        forces). `sample` records its own draws."""
        tracked = [r for r, s in enumerate(states) if s.tracks_output]
        if tracked:
            tokens = torch.tensor(list(token_ids), dtype=torch.long).to(self.device)
            in_vocab = (tokens >= 0) & (tokens < self.text_vocab_size)
            self._record(states, tracked, tokens.clamp(0, self.text_vocab_size - 1), in_vocab)
        for s in states:
            s.num_generated += 1

    @torch.inference_mode()
    def processed_logits(
        self, logits: torch.Tensor, states: Sequence[SamplerState]
    ) -> torch.Tensor:
        """Steps 1 and 3-5: [B, text_vocab_size] float32 logits before temperature and filters."""
        raw = self._text_logits(logits, states)
        x, adj = self._processed(raw, states, _plan(states, self.text_vocab_size))
        out = x.float().clone()
        if adj is not None:
            adj.restore(raw)
        return out

    # ---- steps -----------------------------------------------------------------------------

    def _draw(self, raw, x, adj: _Adjustment | None, states, plan: _Plan):
        """Every row's token from x (the processed logits: raw itself when adjusted in place),
        and the one read-back: (values, logprobs width, tokens, failure codes) on the device."""
        dev, B = raw.device, raw.shape[0]
        every_greedy = len(plan.greedy) == B and adj is None and not plan.logprobs
        if self._greedy_pick is not None and every_greedy:  # one compiled pass, one graph
            tokens, fail, packed = self._greedy_pick(x)
            return packed.tolist(), 0, tokens, fail
        picks = len(plan.greedy) + len(plan.top_k) == B and adj is None and not plan.logprobs
        if self._top_k_pick is not None and picks:  # the common sampled step: one graph too
            k = max(states[r].params.top_k for r in plan.top_k)
            blocks = min(k, self.text_vocab_size // self.block)
            params = _row_params(states, self.text_vocab_size).to(dev, non_blocking=True)
            args = (x, params, self._length("k", k, dev), self._length("blocks", blocks, dev))
            tokens, fail, packed = self._top_k_pick(*args)
            return packed.tolist(), 0, tokens, fail
        bm = self._block_max(x)
        fail = _failures(bm.amax(dim=1).float(), adj)
        step = _Step(x, bm, fail, B, plan.min_p)
        if plan.top_k or plan.nucleus or plan.full:  # rows that draw at random
            step.params = _row_params(states, self.text_vocab_size).to(dev, non_blocking=True)
            step.lo, step.hi = step.params[:, _KEY_LO].long(), step.params[:, _KEY_HI].long()
        top = None

        greedy = step.rows(plan.greedy)
        first = _first_argmax(x, bm, greedy.gather_index, self.block) if plan.greedy else None
        if greedy.every:  # every row greedy: no other path writes a token
            tokens = first
        else:
            tokens = torch.zeros(B, dtype=torch.long, device=dev)
            if plan.greedy:
                tokens[greedy.index] = first
        if plan.top_k:
            rows = step.rows(plan.top_k)
            k = max(states[r].params.top_k for r in plan.top_k)
            ids, vals = _top_candidates(x, bm, rows.gather_index, k, self.block, self.keys)
            tokens[rows.index] = self._sample_top_k(step, rows, ids, vals)
            if not set(plan.logprobs) - set(plan.top_k) - set(plan.adjusted):
                top = (plan.top_k, ids, vals)  # the raw logits' top tokens, for logprobs
        redraw = nucleus = None
        if plan.full or plan.nucleus:  # per row: 0, or what the exact path must do (_REDRAW...)
            redraw = torch.zeros(B, device=dev)
        if plan.full:
            rows = step.rows(plan.full)
            drawn, again = self._sample_envelope(step, rows, bool(plan.min_p & set(plan.full)))
            tokens[rows.index] = drawn
            redraw[rows.index] = torch.where(again, float(_REDRAW), 0.0)
        if plan.nucleus:
            rows = step.rows(plan.nucleus)
            nucleus = self._sample_nucleus_envelope(step, rows)
            tokens[rows.index] = nucleus.token
            redraw[rows.index] = nucleus.code()
        values, width = self._read(raw, bm, adj, states, plan, tokens, fail, redraw, top)
        full = [r for r in plan.full if values[r][1] == _REDRAW]
        undecided = [i for i, r in enumerate(plan.nucleus) if values[r][1] < 0]
        if full or undecided:  # rare: rows the envelope left to the exact path (one more read)
            if adj is not None:
                adj.redo(raw)  # the read restored the raw logits
            if full:
                self._sample_whole(step, full, [], tokens)
            if undecided:
                assert nucleus is not None
                at = [plan.nucleus[i] for i in undecided]
                count = [i for i, r in enumerate(at) if values[r][1] == _PENDING_UNKNOWN]
                self._resolve_nucleus(step, at, nucleus.select(undecided), count, tokens)
            values, width = self._read(raw, bm, adj, states, plan, tokens, fail, None, top)
        return values, width, tokens, fail

    def _length(self, name: str, n: int, device: torch.device) -> torch.Tensor:
        """A tensor of length n (n <= the vocabulary): the size `name` handed to a compiled pass
        as a dynamic size. A view of one vocabulary-long buffer per name (two arguments that
        were one tensor would be another graph), so that sizes cost no memory whatever top_k
        values clients send; the views of the last sizes used are kept (making one is an op)."""
        t = self._lengths.get((name, n))
        if t is None:
            base = self._length_buffers.get(name)
            if base is None:
                base = torch.empty(self.text_vocab_size, dtype=torch.uint8, device=device)
                self._length_buffers[name] = base
            if len(self._lengths) >= _KEPT_LENGTHS:
                self._lengths.clear()
            t = self._lengths[name, n] = base[:n]
        return t

    def _read(self, raw, bm, adj, states, plan, tokens, fail, redraw, top):
        """Pack the results and copy them to the host. Logprobs are of the raw logits, so
        adjustments made in place are undone first, and the block maxima of adjusted rows
        with logprobs are taken again."""
        raw_bm = bm
        if adj is not None:
            adj.restore(raw)
            if set(plan.logprobs) & set(plan.adjusted):
                raw_bm = self._block_max(raw)
        packed, width = self._pack(raw, raw_bm, states, plan, tokens, fail, redraw, top)
        return packed.tolist(), width  # the step's one device->host copy

    def _text_logits(self, logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits must be [{len(states)}, V], got {tuple(logits.shape)}")
        if logits.shape[1] < self.text_vocab_size:
            raise ValueError(
                f"logits have {logits.shape[1]} ids, fewer than the text vocabulary "
                f"{self.text_vocab_size}"
            )
        if logits.device.type != self.device.type:
            raise ValueError(f"the sampler lives on {self.device}, logits on {logits.device}")
        if any(s.released for s in states):
            raise ValueError("a released SamplerState cannot be sampled")
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        # Step 1: slicing (not masking) makes placeholder ids unsampleable by construction.
        return logits[:, : self.text_vocab_size]

    def _constrained(self, raw, states, constrained: list[int]) -> torch.Tensor:
        """Step 1b: a copy of the text logits with each constrained row's disallowed tokens at
        -inf; unconstrained rows are copied unchanged. The copy keeps the model's logits as they
        were (the runner may have handed rows of them out)."""
        C = len(constrained)
        if self._bitmask.shape[0] < C:
            self._bitmask = allocate_bitmask(C, self.text_vocab_size)
        bitmask = self._bitmask[:C]
        for i, r in enumerate(constrained):
            states[r].matcher.fill(bitmask, i)
        out = self._buffer("masked", raw.shape[0], raw.device, raw.dtype)
        out.copy_(raw)
        apply_bitmask_(out, constrained, bitmask)
        return out

    def _block_max(self, x: torch.Tensor) -> torch.Tensor:
        return _block_max(x, self.block)

    def _buffer(
        self, name: str, rows: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """A reused [rows, vocabulary] scratch tensor, grown to the largest batch seen. Reuse
        matters on a CPU, where a fresh vocabulary-sized allocation costs more in page faults
        than the arithmetic written to it; on an accelerator it keeps the step's memory flat."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.device != device or buf.dtype != dtype:
            size = max(rows, buf.shape[0] if buf is not None else 0)
            buf = torch.empty(size, self.text_vocab_size, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:rows]

    def _shifted(self, w: torch.Tensor, x: torch.Tensor, rows: _Rows, shift: torch.Tensor):
        """w <- x[rows] - shift[:, None] as float32, in one pass where torch allows."""
        if rows.every:
            torch.sub(x, shift[:, None], out=w)
            return
        self._copy_rows(w, x, rows.index)
        w.sub_(shift[:, None])

    @staticmethod
    def _copy_rows(w: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> None:
        if x.dtype == torch.float32:
            torch.index_select(x, 0, index, out=w)
        else:
            w.copy_(x.index_select(0, index))

    def _processed(self, raw, states, plan) -> tuple[torch.Tensor, _Adjustment | None]:
        """Steps 3-5 where any row has adjustments this step. They touch a few ids per row, so
        float32 logits are adjusted in place (the values before are kept, and `sample` puts
        them back before it returns); other dtypes on a float32 copy, so that every formula
        runs in float32. Without adjustments: the raw logits themselves."""
        if not plan.adjusted:
            return raw, None
        in_place = raw.dtype == torch.float32
        x = raw
        if not in_place:
            x = self._buffer("processed", raw.shape[0], raw.device)
            x.copy_(raw)
        adj = [states[r] for r in plan.adjusted]
        per_row = torch.tensor(  # penalties.ROW_COLUMNS
            [
                [
                    s.slot,
                    s.num_generated < s.params.min_tokens,
                    s.params.repetition_penalty,
                    s.params.frequency_penalty,
                    s.params.presence_penalty,
                ]
                for s in adj
            ],
            dtype=torch.float64,
        ).to(raw.device, non_blocking=True)
        rows = None if len(adj) == raw.shape[0] else _index(plan.adjusted, raw.device)
        width = max(s.static_entries + s.num_generated for s in adj)
        ids, before, after = self.table.apply(x, rows, per_row, width)
        return x, _Adjustment(rows, ids, before, after, in_place)

    def _sample_top_k(self, step: _Step, rows: _Rows, ids, vals) -> torch.Tensor:
        """Rows with top_k: temperature, top_p, min_p and the draw on their top-k candidates
        (`ids`, `vals`: from `_top_candidates`)."""
        p, lo, hi = rows.pick(step.params), rows.pick(step.lo), rows.pick(step.hi)
        return self._top_k_draw(vals, ids, p, lo, hi)

    def _sample_envelope(
        self, step: _Step, rows: _Rows, min_p: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows with neither top_k nor top_p: the first accepted proposal's token (see
        `_propose`), and which rows got none (to draw again)."""
        # A compiled draw always makes min_p's test (a row without min_p has the threshold
        # -inf, which every token passes), so that one graph serves every batch.
        return self._envelope_draw(*self._envelope_inputs(step, rows), min_p or self.compiled)

    def _sample_nucleus_envelope(self, step: _Step, rows: _Rows) -> _NucleusDraw:
        """top_p rows without top_k, drawn without weighing the vocabulary when the envelope
        settles them (`_nucleus_envelope_draw`)."""
        nc = min(self.nucleus_candidates, self._envelope_blocks() * self.block)
        out = self._nucleus_envelope_draw(*self._envelope_inputs(step, rows), nc)
        return _NucleusDraw(*out)

    def _envelope_blocks(self) -> int:
        return min(self.envelope_blocks, self.text_vocab_size // self.block)

    def _envelope_inputs(self, step: _Step, rows: _Rows) -> tuple:
        """The envelope draws' common arguments. Compiled, the rows are always an index (one
        graph whether or not they are every row)."""
        index = rows.index if self.compiled else rows.gather_index
        sizes = (self._envelope_blocks(), self.envelope_proposals, self.block)
        return (step.x, step.bm, index, step.params, step.lo, step.hi, *sizes)

    def _resolve_nucleus(
        self, step: _Step, at: list[int], draw: _NucleusDraw, count: list[int], tokens
    ) -> None:
        """Nucleus rows the envelope left undecided (batch rows `at`; `draw` holds their part of
        `_sample_nucleus_envelope`'s result): the exact total, the pending j accepted when the
        mass before it is below top_p of it, else an exact draw from the nucleus. `count`: the
        positions in `at` whose pending j lies past the candidates, so the mass before it is
        counted here."""
        rows = step.rows(at)
        w, sums = self._sample_whole(step, [], at, tokens)
        total = sums.double().sum(dim=1)
        j = draw.token
        before = draw.before
        if count:  # rare: the nucleus reaches past the candidates
            i = _index(count, j.device)
            x = step.x.index_select(0, rows.index.index_select(0, i)).float()
            xj = x.gather(1, j.index_select(0, i)[:, None])
            ids = torch.arange(self.text_vocab_size, device=x.device)
            ahead = (x > xj) | ((x == xj) & (ids < j.index_select(0, i)[:, None]))
            ahead = w.index_select(0, i) * ahead
            mass = ahead.view(len(count), -1, self.block).sum(dim=2).double().sum(dim=1)
            before = before.index_copy(0, i, mass)
        inside = draw.has_j & (before < rows.pick(step.params)[:, _TOP_P] * total)
        tokens[rows.index] = torch.where(inside, j, tokens.index_select(0, rows.index))

    def _sample_whole(
        self, step: _Step, full: list[int], nucleus: list[int], tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows without top_k drawn from weights over the whole vocabulary (the rows the
        envelope did not draw), in one buffer whose rows are: full rows with min_p, full rows
        without, nucleus rows. Returns the nucleus rows' weights and block sums."""
        x, dev, V, bs = step.x, step.x.device, self.text_vocab_size, self.block
        with_min_p = [r for r in full if r in step.min_p]
        order = with_min_p + [r for r in full if r not in step.min_p] + nucleus
        rows = step.rows(order)
        R, n_min_p, n_full = len(order), len(with_min_p), len(full)
        p = rows.pick(step.params)
        m = rows.pick(step.bm).amax(dim=1).float()
        w = self._buffer("weights", R, dev)
        if n_min_p:
            # min_p for rows drawn from the whole distribution, as a threshold on x: p_i >=
            # min_p * p_max <=> x_i >= max + T ln(min_p). Shifting by that threshold instead of
            # the max scales the row's weights by 1 / min_p, which no draw can tell apart.
            head = rows.split(0, n_min_p)
            shift = m[:n_min_p] + p[:n_min_p, _MIN_P_SHIFT].float()
            self._shifted(w[:n_min_p], x, head, shift)
            _keep_non_negative_(w[:n_min_p])
        # The rest: shift by the max (subtracting first keeps the product finite however large
        # the logits or small the temperature: x * c - m * c could be inf - inf).
        self._shifted(w[n_min_p:], x, rows.split(n_min_p, R), m[n_min_p:])
        # exp2((x - shift) * log2(e) / T): at most 1 / min_p <= 2^126, so none overflows.
        w.mul_(p[:, _C, None].float()).exp2_()
        sums = w.view(R, V // bs, bs).sum(dim=2)
        lo, hi = rows.pick(step.lo), rows.pick(step.hi)
        if n_full:
            full = slice(0, n_full)
            tokens[rows.index[full]] = _block_race(
                w[full], None, sums[full], lo[full], hi[full], _FULL, bs
            )
        if nucleus:
            nuc = slice(n_full, R)
            tokens[rows.index[nuc]] = self._sample_nucleus(
                step, step.rows(nucleus), w[nuc], sums[nuc], p[nuc], lo[nuc], hi[nuc]
            )
        return w[n_full:], sums[n_full:]

    def _sample_nucleus(self, step, rows: _Rows, w, sums, p, lo, hi) -> torch.Tensor:
        """top_p rows without top_k (their unfiltered weights in w): candidates first, then exact
        rejection for the rows whose nucleus the candidates do not hold."""
        ids, vals = _top_candidates(
            step.x, step.bm, rows.gather_index, self.nucleus_candidates, self.block, self.keys
        )
        # The candidates' weights are read from w, so they are the very terms of the total.
        wc = w.gather(1, ids).double()
        total = sums.double().sum(dim=1)
        z = _tempered(vals, vals[:, :1], p)
        keep = _nucleus_keep(wc, total[:, None], p) & (z >= p[:, _LOG2_MIN_P, None])
        choice = race(torch.where(keep, wc, 0.0), lo, hi, _CANDIDATES, ids)
        out = ids.gather(1, choice[:, None])[:, 0]
        # Settled: the candidates' mass reaches top_p of the total, so the first token outside
        # the nucleus is a candidate, and everything after it is outside too.
        unsettled = (wc.sum(dim=1) < p[:, _TOP_P] * total) & (rows.pick(step.fail) == 0)
        todo = unsettled.nonzero()[:, 0]
        if todo.numel():  # the host read named in the module docstring
            every = rows.every and todo.numel() == len(rows.positions)
            picked = (t.index_select(0, todo) for t in (sums, ids, p, total, lo, hi))
            out[todo] = self._reject(step, rows.index[todo], every, w, todo, *picked)
        return out

    def _reject(self, step, at, every, w, w_rows, sums, candidates, p, total, lo, hi):
        """Exact top_p (and min_p) draws for batch rows `at` [U] whose nucleus holds all their
        candidates and more: draw j in proportion to the weights; accept when j passes min_p and
        the mass strictly before j (logit desc, id asc) is below top_p * total; else narrow the
        weights to the tokens before j, which still hold the accepted set, and draw again. Each
        round accepts with probability >= top_p, and the top token is always accepted, so the
        loop ends. Rows `w_rows` [U] of w hold the rows' unfiltered weights, and `sums` their
        block sums; `every`: `at` is every row of the batch, in order, and `w_rows` every row
        of w. A narrowed row's weights are those where the token is ahead of its pivot (the
        last j it rejected), never written out: a round reads x and w once, for the block sums
        ahead of its j (`_ahead_sums`: the mass before j, and the next round's block sums)."""
        x, V, bs, dev = step.x, self.text_vocab_size, self.block, step.x.device
        U = at.numel()
        m = step.bm.index_select(0, at).amax(dim=1, keepdim=True)
        fan = torch.arange(bs, device=dev)
        out = torch.zeros(U, dtype=torch.long, device=dev)
        live = torch.arange(U, device=dev)  # the rows still drawing: positions in `at`
        pivot = None  # per live row (x, id) of the last j it rejected; None: not narrowed yet
        for round_ in range(V + 1):
            # A stream per round; past the streams available, the key's low bits carry the round.
            stream = _REJECT + 8 * (round_ % _REJECT_STREAMS)
            key = lo ^ (round_ // _REJECT_STREAMS)
            rows, wl = at.index_select(0, live), w_rows.index_select(0, live)
            tokens = _race_blocks(sums, key, hi, stream)[:, None] * bs + fan
            wt = gather_rows(w, wl, tokens)
            if pivot is not None:
                wt = torch.where(_ahead(gather_rows(x, rows, tokens), tokens, *pivot), wt, 0.0)
            j = tokens.gather(1, race(wt.double(), key, hi, stream, tokens)[:, None])
            xj = gather_rows(x, rows, j)
            if self.compiled:
                ahead = self._ahead_sums(x, rows, w, wl, xj, j, bs)
            else:  # no copies of whole rows where they are every row of x and of w
                whole = every and round_ == 0
                ahead = self._ahead_sums_eager(x, None if whole else rows, w, wl, xj, j, whole)
            mass = ahead.double().sum(dim=1)
            zj = _tempered(xj, m.index_select(0, live), p)[:, 0]
            in_candidates = (candidates == j).any(dim=1)
            accept = (in_candidates | (mass < p[:, _TOP_P] * total)) & (zj >= p[:, _LOG2_MIN_P])
            out[live] = torch.where(accept, j[:, 0], out[live])
            again = (~accept).nonzero()[:, 0]
            if not again.numel():
                break
            live, sums, pivot = live[again], ahead[again], (xj[again], j[again])
            lo, hi = lo[again], hi[again]
            candidates, p, total = candidates[again], p[again], total[again]
        return out

    def _ahead_sums_eager(self, x, rows, w, w_rows, x_pivot, pivot, whole: bool):
        """`_ahead_sums` eager: the same predicate (`_ahead`) and sums, each pass written into
        a reused buffer (`_buffer`: fresh [rows, vocabulary] tensors would cost page faults).
        `whole`: w's rows are every row, in order (`w_rows` unused)."""
        R, V, dev = x_pivot.shape[0], self.text_vocab_size, x_pivot.device
        xs = x
        if rows is not None:
            xs = self._buffer("ahead_x", R, dev)
            self._copy_rows(xs, x, rows)
        ws = w if whole else torch.index_select(w, 0, w_rows, out=self._buffer("ahead_w", R, dev))
        ahead, tie = (self._buffer(name, R, dev, torch.bool) for name in ("ahead", "tie"))
        torch.gt(xs, x_pivot, out=ahead)
        torch.eq(xs, x_pivot, out=tie)
        tie &= torch.lt(
            torch.arange(V, device=dev), pivot, out=self._buffer("lt", R, dev, torch.bool)
        )
        ahead |= tie
        weights = torch.mul(ws, ahead, out=self._buffer("ahead_weights", R, dev))
        return weights.view(R, V // self.block, self.block).sum(dim=2)

    def _record(self, states, tracked: list[int], tokens, ok) -> None:
        """Count this step's tokens in the penalty table (device, in place)."""
        dev = tokens.device
        width = max(states[r].static_entries + states[r].num_generated for r in tracked)
        self.table.ensure_width(width + 1)
        rows = _index(tracked, dev)
        slots = _index([states[r].slot for r in tracked], dev)  # type: ignore[misc]
        self.table.record(slots, tokens.index_select(0, rows), ok.index_select(0, rows), width)

    def _pack(self, raw, raw_bm, states, plan, tokens, fail, redraw, top=None):
        """[B, 3 + 2k] float64: token, failure code (or, for a healthy row the envelope did not
        decide, the negative code from `redraw` [B]), chosen logprob, top-k ids, top-k logprobs
        (float64 holds every id exactly). `top` (positions, ids, values): top_k rows'
        candidates, which hold the top logprobs when every logprobs row is among them
        unadjusted and asks for no more."""
        B, dev = raw.shape[0], raw.device
        k = max([states[r].params.logprobs or 0 for r in plan.logprobs], default=0)
        k = min(k, self.text_vocab_size)
        out = torch.full((B, 3 + 2 * k), math.nan, dtype=torch.float64, device=dev)
        out[:, 0] = tokens
        out[:, 1] = fail
        if redraw is not None:  # [B]: rows the envelope left to the exact path
            out[:, 1] = torch.where(fail == 0, redraw.double(), out[:, 1])
        if plan.logprobs:
            rows = _Rows.of(plan.logprobs, B, dev)
            lse = self._log_normalizer(raw, rows, rows.pick(raw_bm).amax(dim=1).float())[:, None]
            chosen = gather_rows(raw, rows.gather_index, rows.pick(tokens)[:, None])
            columns = [chosen.double() - lse]
            if k and top is not None and k <= top[1].shape[1]:
                ids, vals = top[1][:, :k], top[2][:, :k]
                if top[0] != plan.logprobs:
                    where = {r: i for i, r in enumerate(top[0])}
                    at = _index([where[r] for r in plan.logprobs], dev)
                    ids, vals = ids.index_select(0, at), vals.index_select(0, at)
            elif k:
                ids, vals = _top_candidates(
                    raw, raw_bm, rows.gather_index, k, self.block, self.keys
                )
            if k:
                columns += [ids.double(), vals.double() - lse]
            logprobs = torch.cat(columns, dim=1)
            if rows.every:
                out[:, 2:] = logprobs
            else:
                out[rows.index, 2:] = logprobs
        return out, k

    def _log_normalizer(self, raw, rows: _Rows, m) -> torch.Tensor:
        """log sum exp of the raw logits of `rows`, float64 (step 2's normaliser). The exponents
        x log2(e) - m log2(e) come from one fused pass (a separate shift and scale cost a pass
        more over every id); their rounding is float32's at the logits' scale, as the result's."""
        V, bs = self.text_vocab_size, self.block
        if self.compiled and raw.dtype == torch.float32:
            x = raw if rows.every else raw.index_select(0, rows.index)
            sums = compiled_exp2_block_sums(x, m.float() * -LOG2E, bs)
            return m.double() + torch.log(sums.double().sum(dim=1))
        w = self._buffer("weights", len(rows.positions), raw.device)
        shift = (m.float() * -LOG2E)[:, None]
        if rows.every:
            torch.add(shift, raw, alpha=LOG2E, out=w)
        else:
            self._copy_rows(w, raw, rows.index)
            torch.add(shift, w, alpha=LOG2E, out=w)
        w.exp2_()
        total = w.view(-1, V // bs, bs).sum(dim=2).double().sum(dim=1)
        return m.double() + torch.log(total)


# ---- per-step plan and parameters ------------------------------------------------------------

_C, _TOP_K, _TOP_P, _LOG2_MIN_P, _MIN_P_SHIFT, _KEY_LO, _KEY_HI = range(7)  # _row_params
# Random streams (counter_random), one per use so that no two uses share a number. A block race
# uses stream + level (level < 8): rejection round r uses 2 + 8 (r % 24), whole-vocabulary draws
# 200, candidate races 1, the envelope 220.
_CANDIDATES, _REJECT, _REJECT_STREAMS, _FULL, _ENVELOPE = 1, 2, 24, 200, 220
# Failure-code column, rows the envelope left to the exact path: draw again; decide a pending
# top_p proposal whose mass-before is known, or is not (to be counted).
_REDRAW, _PENDING_KNOWN, _PENDING_UNKNOWN = -1, -2, -3
# min_p below float32's smallest normal number is off: it could only drop tokens whose weights
# float32 cannot hold apart from zero (and 1 / min_p would overflow the shifted weights).
_MIN_P_FLOOR = 2.0**-126


@dataclass
class _Plan:
    """Which rows go which way this step, from parameters alone (so a row's path, and hence its
    token, never depends on the rest of its batch)."""

    greedy: list[int]
    top_k: list[int]  # 0 < top_k < vocabulary
    nucleus: list[int]  # top_p < 1 without top_k
    full: list[int]  # neither: temperature, maybe min_p
    logprobs: list[int]
    adjusted: list[int]  # rows with logit adjustments this step
    tracked: list[int]  # rows whose penalties count generated tokens
    min_p: set[int]  # rows with min_p


def _plan(states: Sequence[SamplerState], vocab: int) -> _Plan:
    plan = _Plan([], [], [], [], [], [], [], set())
    for r, s in enumerate(states):
        p = s.params
        if p.greedy:
            plan.greedy.append(r)
        elif 0 < p.top_k < vocab:
            plan.top_k.append(r)
        elif p.top_p < 1:
            plan.nucleus.append(r)
        else:
            plan.full.append(r)
        if p.min_p >= _MIN_P_FLOOR:
            plan.min_p.add(r)
        if p.logprobs is not None:
            plan.logprobs.append(r)
        if s.slot is not None and s.static_entries + s.num_generated > 0:
            plan.adjusted.append(r)
        if s.tracks_output:
            plan.tracked.append(r)
    return plan


def _row_params(states: Sequence[SamplerState], vocab: int) -> torch.Tensor:
    """Per-row parameters and random keys as one host tensor [B, 7] (one copy to the device):
    log2(e) / T (0 when greedy), top_k (vocab when off), top_p, log2(min_p) (-inf when off),
    T ln(min_p) (0 when off), and the halves of the step's random key (`row_key`: 32-bit
    integers, which float64 holds exactly). The temperature factor and log2(min_p) are rounded
    to float32, the precision they are used in, so every comparison of one row sees the same
    threshold."""
    rows = []
    for s in states:
        p = s.params
        c = min(LOG2E / p.temperature, _F32_MAX) if p.temperature > 0 else 0.0
        k = p.top_k if 0 < p.top_k < vocab else vocab
        on = p.min_p >= _MIN_P_FLOOR
        lmp = math.log2(p.min_p) if on else NEG_INF
        shift = p.temperature * math.log(p.min_p) if on else 0.0
        lo, hi = row_key(s.seed, s.num_generated)
        rows.append([_float32(c), k, p.top_p, _float32(lmp), shift, lo, hi])
    return torch.tensor(rows, dtype=torch.float64)


def _float32(v: float) -> float:
    """v rounded to float32 on the host, to nearest as a cast on the device rounds: rounding the
    tensor's columns instead costs several ops a step."""
    return struct.unpack("f", struct.pack("f", v))[0]


class _Proposals(NamedTuple):
    """Envelope proposals for some rows (`_propose`): R rows, n proposals each."""

    token: torch.Tensor  # [R, n] (race_all) or [R, 1] (the first accepted proposal's)
    accept: torch.Tensor  # [R, n] accepted by the envelope
    exact_ids: torch.Tensor  # [R, K * block] the exact part's token ids
    exact_x: torch.Tensor  # their float32 logits
    exact_w: torch.Tensor  # their weights
    m: torch.Tensor  # [R, 1] row maximum
    total_low: torch.Tensor  # [R] float64: the exact part's mass, at most the total
    total_high: torch.Tensor  # [R] float64: at least the total


@dataclass(frozen=True)
class _NucleusDraw:
    """`Sampler._sample_nucleus_envelope`'s result for its R rows."""

    token: torch.Tensor  # [R] the token (for pending rows: the pending j)
    undecided: torch.Tensor  # [R] bool: decided after the read-back
    has_j: torch.Tensor  # [R] bool: undecided with a pending proposal j
    known: torch.Tensor  # [R] bool: the mass before j is known (j is a candidate)
    before: torch.Tensor  # [R] float64: that mass

    def code(self) -> torch.Tensor:
        """[R] float: 0 when decided, else _REDRAW / _PENDING_KNOWN / _PENDING_UNKNOWN."""
        pending = torch.where(self.known, float(_PENDING_KNOWN), float(_PENDING_UNKNOWN))
        return torch.where(self.has_j, pending, torch.where(self.undecided, float(_REDRAW), 0.0))

    def select(self, at: list[int]) -> _NucleusDraw:
        i = _index(at, self.token.device)
        return _NucleusDraw(*(t.index_select(0, i) for t in vars(self).values()))


@dataclass
class _Adjustment:
    """What steps 3-5 changed in one step's logits: rows [P], ids [P, W] and the values there
    before and after (padded columns repeat a row's first entry, so repeated writes agree)."""

    rows: torch.Tensor | None  # None: every row, in order
    ids: torch.Tensor
    before: torch.Tensor
    after: torch.Tensor
    in_place: bool  # made in the caller's logits (else in a copy)
    pending: bool = False  # the caller's logits hold `after` and must get `before` back

    def __post_init__(self) -> None:
        self.pending = self.in_place

    def restore(self, raw: torch.Tensor) -> None:
        if self.pending:
            scatter_rows_(raw, self.rows, self.ids, self.before)
            self.pending = False

    def redo(self, raw: torch.Tensor) -> None:
        """Adjust the caller's logits again after `restore` (adjusting in place only)."""
        if self.in_place and not self.pending:
            scatter_rows_(raw, self.rows, self.ids, self.after)
            self.pending = True


def _failures(x_max: torch.Tensor, adj: _Adjustment | None) -> torch.Tensor:
    """Per-row failure codes (0: none; see _FAIL_MESSAGES) from the row maxima of the processed
    logits and, for adjusted rows, the raw values at the ids adjusting changed: amax propagates
    NaN, so x_max shows NaN / +inf anywhere processing left alone, and the raw values show them
    where it did not (a blocked or clamped id hides them). A row whose processed maximum is -inf
    had no finite raw logit (2) unless one of its adjusted ids had one (3: min_tokens)."""
    bad = torch.isnan(x_max) | (x_max == math.inf)
    none = x_max == NEG_INF
    if adj is None:
        return torch.where(bad, 1, torch.where(none, 2, 0))
    before = adj.before.float()
    rows_bad = (torch.isnan(before) | (before == math.inf)).any(dim=1)
    finite = torch.isfinite(before).any(dim=1)
    if adj.rows is None:
        bad, had_finite = bad | rows_bad, finite
    else:
        bad = bad.index_copy(0, adj.rows, bad.index_select(0, adj.rows) | rows_bad)
        had_finite = torch.zeros_like(bad).index_copy(0, adj.rows, finite)
    return torch.where(bad, 1, torch.where(none, torch.where(had_finite, 3, 2), 0))


def _index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long).to(device, non_blocking=True)


@dataclass(frozen=True)
class _Rows:
    """Some rows of the batch: their positions, whether they are every row in order (then
    per-row tensors are used as they are, with no index_select), and their device index, made
    (one upload) the first time a path needs it: a batch of greedy rows never does."""

    positions: tuple[int, ...]
    every: bool
    device: torch.device

    @classmethod
    def of(cls, positions: Sequence[int], batch: int, device: torch.device) -> _Rows:
        positions = tuple(positions)
        return cls(positions, positions == tuple(range(batch)), device)

    @cached_property
    def index(self) -> torch.Tensor:
        return _index(self.positions, self.device)

    def pick(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.every else t.index_select(0, self.index)

    def split(self, start: int, stop: int) -> _Rows:
        """The rows at positions [start, stop) of this set (every row only if that is all)."""
        whole = self.every and start == 0 and stop == len(self.positions)
        return _Rows(self.positions[start:stop], whole, self.device)

    @property
    def gather_index(self) -> torch.Tensor | None:
        return None if self.every else self.index


@dataclass
class _Step:
    """What every path of one step reads: processed logits, their block maxima, failure codes,
    and, where a row draws at random, per-row parameters and random keys."""

    x: torch.Tensor
    bm: torch.Tensor
    fail: torch.Tensor
    batch: int
    min_p: set[int]  # rows with min_p
    params: torch.Tensor | None = None  # [B, 7]: _row_params
    lo: torch.Tensor | None = None  # [B] random keys
    hi: torch.Tensor | None = None

    def rows(self, positions: Sequence[int]) -> _Rows:
        return _Rows.of(positions, self.batch, self.x.device)


# ---- batched building blocks -------------------------------------------------------------------


def _top_k_draw(vals, ids, p, lo, hi) -> torch.Tensor:
    """One token per row from its candidates (ids [R, k] and float32 values, in (logit desc,
    id asc) order; parameters p [R, 5]; random keys lo, hi [R]): the first top_k of them,
    tempered, then top_p and min_p, then the race. Fixed shapes and no host decisions, so a
    compiled sampler runs it as one graph (`compiled_per_row`)."""
    z = _tempered(vals, vals[:, :1], p)
    keep = torch.arange(ids.shape[1], device=ids.device) < p[:, _TOP_K, None]
    w = torch.where(keep, torch.exp2(z), 0.0)
    keep &= _nucleus_keep(w, w.sum(dim=1, keepdim=True), p)
    keep &= z >= p[:, _LOG2_MIN_P, None]
    choice = race(torch.where(keep, w, 0.0), lo, hi, _CANDIDATES, ids)
    return ids.gather(1, choice[:, None])[:, 0]


def _propose(x, bm, rows, params, lo, hi, K, n, bs, min_p, race_all) -> _Proposals:
    """Exact rejection sampling from the whole tempered distribution of some rows, without weighing
    the vocabulary: proposals under an envelope read off the block maxima. The envelope gives
    each of the row's K blocks with the highest maxima its exact mass (their tokens are gathered
    and weighed: for an LM's distribution they hold nearly all of it) and every other block a
    bound, block size x the weight of its maximum (no token of it weighs more), inflated by
    2^-10 so that float rounding of the token weights never exceeds it. Each of n proposals
    picks a block in proportion to its envelope, in two stages so that no CDF spans the blocks
    (a slot among the exact blocks and groups of 64 bounded blocks, then a block of the group),
    weighs that block's tokens, and is accepted with probability mass / bound (always, for an
    exact block); an accepted proposal's block then races its tokens by weight. Accepted
    proposals are independent exact draws whatever the envelope, so a loose one costs only rows
    where no proposal is accepted, which the caller draws again on the exact whole-vocabulary
    path.

    min_p (when `min_p`, for rows that have it) keeps a token when x - (max + T ln min_p) >=
    -tiny, the test `_sample_whole` makes, so both paths keep the same tokens; a block whose
    maximum fails it weighs 0. `race_all`: race the tokens of every proposal's block (else
    only the first accepted one's).

    x [B, V] the processed logits and bm [B, V / bs] their block maxima, params [B, 5], lo,
    hi [B] the random keys; `rows` [R] the rows drawn (None: every row, in order); K blocks
    exact (at most V / bs), n proposals, blocks of bs ids. Sizes are ints, so that this runs
    as one graph (`compiled_per_row`)."""
    dev, p = x.device, params
    if rows is not None:
        bm, p, lo, hi = (t.index_select(0, rows) for t in (bm, params, lo, hi))
    bm = bm.float()
    R, nb = bm.shape[0], x.shape[1] // bs
    c = p[:, _C, None].float()
    m = bm.amax(dim=1, keepdim=True)
    if min_p:  # the threshold; -inf for rows without min_p (x - (-inf) is +inf)
        floor = torch.where(
            p[:, _LOG2_MIN_P, None] > NEG_INF, m + p[:, _MIN_P_SHIFT, None].float(), NEG_INF
        )
    tiny = -torch.finfo(torch.float32).tiny

    def weigh(values: torch.Tensor) -> torch.Tensor:
        """Token (or block-maximum) weights exp2((x - max) log2(e) / T), 0 below min_p."""
        values = values.float()
        w = torch.exp2((values - m) * c)
        return torch.where((values - floor) >= tiny, w, 0.0) if min_p else w

    # The exact part: the K blocks with the highest maxima, ties to the lower block (int64
    # keys), so which blocks are exact never depends on the batch.
    top = order_keys(bm, torch.arange(nb, device=dev), nb - 1).topk(K, dim=1).indices
    fan = torch.arange(bs, device=dev)
    exact_ids = (top[:, :, None] * bs + fan).flatten(1)
    exact_x = gather_blocks(x, rows, top, bs).flatten(1).float()
    exact = weigh(exact_x)
    exact_mass = exact.view(R, K, bs).sum(dim=2)
    bound = weigh(bm).mul_(bs * (1.0 + 2.0**-10)).scatter_(1, top, 0.0)
    G = -(-nb // _FAN_OUT)
    groups = torch.nn.functional.pad(bound, (0, G * _FAN_OUT - nb)).view(R, G, _FAN_OUT)
    group_bound = groups.sum(dim=2)
    slots = torch.cat([exact_mass, group_bound], dim=1).double()
    # Random numbers, one hash call: per proposal a slot's u, a block's u and the
    # acceptance v; then the token races' exponentials (by position within the block).
    count = 3 * n + bs * (n if race_all else 1)
    h = hash32(lo, hi, _ENVELOPE, torch.arange(count, device=dev).expand(R, -1))
    u = (h.double() + 0.5) * 2.0**-32
    cdf = slots.cumsum(dim=1)
    slot = torch.searchsorted(cdf, u[:, :n] * cdf[:, -1:], right=True).clamp_(max=K + G - 1)
    group = (slot - K).clamp_(min=0)
    within = groups.gather(1, group[:, :, None].expand(R, n, _FAN_OUT)).double().cumsum(dim=2)
    target = (u[:, n : 2 * n] * within[:, :, -1])[:, :, None]
    member = torch.searchsorted(within, target, right=True)[:, :, 0].clamp_(max=_FAN_OUT - 1)
    is_exact = slot < K
    block = torch.where(
        is_exact, top.gather(1, slot.clamp(max=K - 1)), (group * _FAN_OUT + member)
    ).clamp_(max=nb - 1)
    w = weigh(gather_blocks(x, rows, block, bs).flatten(1)).view(R, n, bs)
    accept = is_exact | (u[:, 2 * n : 3 * n] * bound.gather(1, block) < w.sum(dim=2))
    exponentials = -torch.log(u[:, 3 * n :]).view(R, -1, bs)
    if race_all:
        token = block * bs + (w.double() / exponentials).argmax(dim=2)
    else:
        first = accept.to(torch.uint8).argmax(dim=1)
        chosen = w.gather(1, first[:, None, None].expand(R, 1, bs)).double()
        j = (chosen / exponentials).argmax(dim=2)
        token = block.gather(1, first[:, None]) * bs + j
    total_low = exact_mass.double().sum(dim=1)
    total_high = total_low + group_bound.double().sum(dim=1)
    return _Proposals(token, accept, exact_ids, exact_x, exact, m, total_low, total_high)


def _envelope_draw(x, bm, rows, params, lo, hi, K, n, bs, min_p):
    """Rows with neither top_k nor top_p: [R] the first accepted proposal's token (see
    `_propose`), [R] bool: the rows that got none (to draw again). Arguments as `_propose`'s.
    """
    P = _propose(x, bm, rows, params, lo, hi, K, n, bs, min_p, race_all=False)
    return P.token[:, 0], ~P.accept.any(dim=1)


def _nucleus_envelope_draw(x, bm, rows, params, lo, hi, K, n, bs, nc):
    """top_p rows without top_k, without weighing the vocabulary when the envelope settles
    them. Their draw is rejection sampling too: a proposal j from the tempered distribution
    (`_propose`, before min_p) is accepted when j passes min_p and the mass strictly before
    it (logit desc, id asc) is below top_p of the total. The total is known only within
    bounds (the exact part below, plus the envelope's bounds above); the mass before j is
    exact when j is one of the top nc tokens (all in the exact part: the candidates), and
    at least their mass otherwise. So each proposal is surely in, surely out, or ambiguous.
    The first proposal that is not surely out ends the row's loop: surely in, it is the
    token; ambiguous, the row is decided exactly after the read-back (`_resolve_nucleus`:
    the exact total, j accepted or not, and if not an exact draw, which is what the rest
    of the loop would give). Rows whose proposals all fail go there too, without a j.

    Arguments as `_propose`'s, and nc candidates (at most K * bs). Returns `_NucleusDraw`'s
    fields."""
    P = _propose(x, bm, rows, params, lo, hi, K, n, bs, min_p=False, race_all=True)
    p = params if rows is None else params.index_select(0, rows)
    pos = order_keys(P.exact_x, P.exact_ids, x.shape[1] - 1).topk(nc, dim=1).indices
    cand = P.exact_ids.gather(1, pos)
    cw = P.exact_w.gather(1, pos).double()
    before_cand = torch.cumsum(cw, dim=1) - cw
    match = cand[:, None, :] == P.token[:, :, None]  # [R, n, nc]
    known = match.any(dim=2)
    at = match.to(torch.uint8).argmax(dim=2)
    before = torch.where(known, before_cand.gather(1, at), cw.sum(dim=1, keepdim=True))
    top_p = p[:, _TOP_P, None]
    surely_in = known & (before < top_p * P.total_low[:, None])
    surely_out = before >= top_p * P.total_high[:, None]
    xj = gather_rows(x, rows, P.token).float()
    passes_min_p = (xj - P.m) * p[:, _C, None].float() >= p[:, _LOG2_MIN_P, None].float()
    ends = P.accept & passes_min_p & ~surely_out
    first = ends.to(torch.uint8).argmax(dim=1)[:, None]
    has_j = ends.any(dim=1)
    done = has_j & surely_in.gather(1, first)[:, 0]
    token = P.token.gather(1, first)[:, 0]
    known, before = known.gather(1, first)[:, 0], before.gather(1, first)[:, 0]
    return token, ~done, has_j & ~done, known, before


def _tempered(vals: torch.Tensor, top: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(vals - top) * log2(e) / T in float32 (as the weight buffer computes it), then float64."""
    return ((vals.float() - top.float()) * p[:, _C, None].float()).double()


def _nucleus_keep(w: torch.Tensor, total: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """top_p over weights in (logit desc, id asc) order: keep a token while the mass strictly
    before it is below top_p * total, which is the smallest prefix reaching top_p and always keeps
    the first. Rows with top_p = 1 keep everything (no rounding may drop a tail token)."""
    before = torch.cumsum(w, dim=1) - w
    return (before < p[:, _TOP_P, None] * total) | (p[:, _TOP_P, None] >= 1)


def _keep_non_negative_(w: torch.Tensor) -> None:
    """w[w < 0] = -inf, in place, in one pass (`threshold_` keeps values above its threshold).
    The threshold is minus the smallest normal float32 rather than minus the smallest subnormal,
    which flush-to-zero modes would read as -0 (dropping exact zeros, the max itself when min_p
    is 1); a difference of two floats lands strictly between the two only when both are below
    ~1e-31."""
    torch.nn.functional.threshold_(w, -torch.finfo(torch.float32).tiny, NEG_INF)


def _top_candidates(
    x, bm, rows, k: int, bs: int, keys, n_blocks: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest logits of each row `rows` [R] picks (None: every row, in order), ordered by
    (logit desc, id asc) through `keys` (row_passes.py, eager or compiled): ids [R, k] and
    float32 values. They lie in the row's k blocks with the highest maxima (ordered the same
    way): each such block holds an element at least as large as any element of a later block.
    `n_blocks`: how many blocks that is, min(k, V / bs), where the caller has it (a compiled
    pass, whose k is a dynamic size: the comparison would be a guard of its graph)."""
    nb = bm.shape[1]
    V = nb * bs
    if n_blocks is None:
        k = min(k, V)
        n_blocks = min(k, nb)
    dev = x.device
    picked = bm if rows is None else bm.index_select(0, rows)
    block_keys = keys(picked, torch.arange(nb, device=dev), nb - 1)
    blocks = block_keys.topk(n_blocks, dim=1).indices
    ids = (blocks[:, :, None] * bs + torch.arange(bs, device=dev)).flatten(1)
    vals = gather_blocks(x, rows, blocks, bs).flatten(1).float()
    pos = keys(vals, ids, V - 1).topk(k, dim=1).indices
    return ids.gather(1, pos), vals.gather(1, pos)


def _greedy_pick(x: torch.Tensor):
    """A step whose rows are all greedy, none adjusted, none asking for logprobs: (each row's
    first maximum, its failure code as `_failures` gives it, both packed as `_pack` packs them:
    [B, 3] float64, the logprob column NaN). Compiled (`compiled_per_row`): one graph for what
    the general path dispatches as some thirty ops (a kernel launch each on an accelerator).
    Through block maxima, as the general path: one pass of plain maxima over the row, then 4,096
    maxima and 64 logits per row at Gemma's vocabulary. (`x.argmax` over the row compiled for a
    CPU into a loop several times slower than the maxima: 16.8 ms against 2.4 ms eager at 32
    rows, bench_sampler.py.)"""
    bm, bs, fail = _block_maxima(x)
    token = _first_argmax(x, bm, None, bs)
    return token, fail, _packed_picks(token, fail)


def _top_k_pick(x: torch.Tensor, p: torch.Tensor, k: torch.Tensor, blocks: torch.Tensor):
    """A step whose rows are all greedy or top_k, none adjusted, none asking for logprobs (the
    common sampled step: Gemma's generation_config asks for top_k 64): each row's token, its
    failure code as `_failures` gives it, and both packed as `_pack` packs them ([B, 3] float64,
    the logprob column NaN). x [B, V]: the text logits; p [B, 7]: `_row_params`; k and blocks:
    lengths, the largest top_k of the batch and the number of blocks its candidates come from
    (min(k, V / block), worked out on the host, so that no guard of the graph compares them and
    one graph serves every k). Compiled (`compiled_per_row`): one graph for what the general
    path dispatches as some eighty ops (a kernel launch each on an accelerator).

    The same decisions as the general path: the same top-k candidates (the same integer keys),
    `_top_k_draw` on them; a greedy row takes its first candidate, the lowest id holding the
    row's maximum, as `_first_argmax` does (order keys make -0.0 and +0.0 one value, as == does).
    """
    bm, bs, fail = _block_maxima(x)
    ids, vals = _top_candidates(x, bm, None, k.shape[0], bs, order_keys, blocks.shape[0])
    drawn = _top_k_draw(vals, ids, p, p[:, _KEY_LO].long(), p[:, _KEY_HI].long())
    token = torch.where(p[:, _C] == 0, ids[:, 0], drawn)
    return token, fail, _packed_picks(token, fail)


def _block_maxima(x: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
    """What a one-pass pick starts from: the block maxima of x [B, V] (a compiled pass's V is
    static: the block size is `Sampler.block`, worked out from it), the block size, and each
    row's failure code as `_failures` gives it without adjustments."""
    bs = math.gcd(x.shape[1], MAX_BLOCK)
    bm = _block_max(x, bs)
    return bm, bs, _failures(bm.amax(dim=1).float(), None)


def _block_max(x: torch.Tensor, bs: int) -> torch.Tensor:
    """[B, V / bs]: the maximum of each block of bs ids of x [B, V]."""
    return x.reshape(x.shape[0], x.shape[1] // bs, bs).amax(dim=2)


def _packed_picks(token: torch.Tensor, fail: torch.Tensor) -> torch.Tensor:
    """A one-pass pick's results packed as `_pack` packs them: [B, 3] float64, the logprob
    column NaN."""
    nan = torch.full_like(token, math.nan, dtype=torch.float64)
    return torch.stack([token.double(), fail.double(), nan], dim=1)


def _first_argmax(x, bm, rows, bs: int) -> torch.Tensor:
    """The lowest id holding the maximum of each row `rows` [R] picks (None: every row, in
    order): the first block whose maximum is the row's, then the first position in it that
    holds it."""
    b = bm if rows is None else bm.index_select(0, rows)
    top = b.amax(dim=1, keepdim=True)
    block = (b == top).to(torch.uint8).argmax(dim=1)
    values = gather_blocks(x, rows, block[:, None], bs)[:, 0]
    first = (values == top).to(torch.uint8).argmax(dim=1)
    return block * bs + first


_FAN_OUT = 64


def _block_race(w, sel, sums, lo, hi, stream: int, bs: int) -> torch.Tensor:
    """One token per selected row of the weights w [*, V], drawn in proportion to w: a race over
    groups of blocks, then over the blocks of the winning group, ..., then over the tokens of the
    winning block. Each level picks a child with probability child mass / sibling mass, so a token
    wins with probability w_i / sum(w). `sums` [S, V / bs] are the rows' block sums; `sel` [S]
    picks w's rows (None: all, in order). Random numbers: stream + level, indexed by global block
    or token id."""
    tokens = _race_blocks(sums, lo, hi, stream)[:, None] * bs + torch.arange(bs, device=w.device)
    mass = gather_rows(w, sel, tokens).double()
    return tokens.gather(1, race(mass, lo, hi, stream, tokens)[:, None])[:, 0]


def _race_blocks(sums, lo, hi, stream: int) -> torch.Tensor:
    """The block of each row that `_block_race` draws from its block sums [S, V / bs]."""
    S, dev = sums.shape[0], sums.device
    levels = [sums.double()]
    while levels[-1].shape[1] > _FAN_OUT:
        s = levels[-1]
        s = torch.nn.functional.pad(s, (0, -s.shape[1] % _FAN_OUT))
        levels.append(s.view(S, -1, _FAN_OUT).sum(dim=2))
    top = levels[-1]
    index = torch.arange(top.shape[1], device=dev).expand(S, -1)
    node = race(top, lo, hi, stream + len(levels), index)
    fan = torch.arange(_FAN_OUT, device=dev)
    for level in range(len(levels) - 2, -1, -1):
        s = levels[level]
        children = node[:, None] * _FAN_OUT + fan
        inside = children.clamp(max=s.shape[1] - 1)
        mass = torch.where(children < s.shape[1], s.gather(1, inside), 0.0)
        node = children.gather(1, race(mass, lo, hi, stream + level + 1, children)[:, None])[:, 0]
    return node


def _ahead(x: torch.Tensor, ids: torch.Tensor, x_pivot: torch.Tensor, pivot: torch.Tensor):
    """Whether each token (logit x, id) comes before the pivot's in (logit desc, id asc) order;
    x_pivot, pivot [R, 1]."""
    return (x > x_pivot) | ((x == x_pivot) & (ids < pivot))


def _ahead_sums(x, rows, w, live, x_pivot, pivot, bs: int) -> torch.Tensor:
    """[R, V / bs] float32 block sums of the weights w[live] [R, V] of the tokens ahead of each
    row's pivot (`_ahead`) in x[rows] (`rows`, `live`: None for every row, in order)."""
    xs = x if rows is None else x.index_select(0, rows)
    ws = w if live is None else w.index_select(0, live)
    ids = torch.arange(w.shape[1], device=w.device)
    ahead = torch.where(_ahead(xs, ids, x_pivot, pivot), ws, 0.0)
    return ahead.view(ws.shape[0], w.shape[1] // bs, bs).sum(dim=2)


def _results(values: list[list[float]], k: int, states: Sequence[SamplerState]):
    failures: dict[int, str] = {}
    results: list[SampleResult | None] = []
    for r, (row, s) in enumerate(zip(values, states, strict=True)):
        code = int(row[1])
        if code:
            failures[r] = _FAIL_MESSAGES[code]
            results.append(None)
            continue
        s.num_generated += 1
        token = int(row[0])
        n = s.params.logprobs
        if n is None:
            results.append(SampleResult(token, None, ()))
            continue
        n = min(n, k)
        top = tuple((int(row[3 + i]), row[3 + k + i]) for i in range(n))
        results.append(SampleResult(token, row[2], top))
    if failures:
        first = min(failures)
        raise SamplingError(first, failures[first], failures, results)
    return results
