"""Per-request sampling for a batch of rows: one batched pass per step, on the logits' device.

Owns: turning one step's logits (one row per running request) into one token per row, with that
request's `SamplingParams`: placeholder ids dropped, logprobs, min_tokens, logit_bias, penalties,
greedy or temperature / top-k / top-p / min-p sampling; and the per-request state this needs
across steps (`SamplerState` on the host; seeds, and penalty counts in a device table,
penalties.py).

Order of processing, per row (vLLM-like):
  1. restrict to the text vocabulary: ids >= text_vocab_size (vision/audio placeholders) are
     sliced off and can never be sampled;
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
  - Rows without top_k need the whole distribution: one pass writes exp2((x - max) * log2(e) / T)
    into a reused buffer and block sums of it. Temperature/min_p rows draw by a two-or-more-level
    exponential race (a block in proportion to its mass, then a token within it), exact and with
    random numbers for O(blocks/64 + 64 + block) items per row rather than the vocabulary.
  - top_p without top_k: the top `nucleus_candidates` tokens settle the nucleus when their mass
    reaches top_p of the total (they hold it exactly); rows they do not settle draw by exact
    rejection with a moving pivot (FlashInfer's idea): draw from the remaining mass, accept when
    the mass strictly before the drawn token is below top_p, else keep only tokens before it and
    draw again. Each round accepts with probability >= top_p. Deciding which rows need it reads
    one flag per such row back to the host.
  - Randomness is counter-based (counter_random.py): a pure function of (seed, tokens generated so
    far, stream, token or block index), so a seeded request draws the same tokens whatever else is
    in the batch and wherever its row is; unseeded requests get a random seed at registration.
  - One device->host copy per step: ids, failure codes and requested logprobs packed in one
    float64 tensor (plus the flag above, only with vocabulary-wide top_p rows).

Exactness: every path samples exactly the filtered distribution (up to float rounding of the
weights). Bitwise batch invariance needs each row's arithmetic to be the same whatever the batch:
elementwise ops and per-row reductions are; on the CPU this holds for 1 and 2 threads with a
vocabulary that is a multiple of 64 (no kernel splits a row at an odd offset). Tests check it.

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
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.runtime.counter_random import MAX_INDEX, race, row_key
from server.runtime.penalties import Entry, PenaltyTable
from server.vocabulary.sampling_params import SamplingParams

LOG2E = 1.0 / math.log(2.0)
NEG_INF = float("-inf")
MAX_BLOCK = 64  # ids per block of the block maxima / block sums (and fan-out of the block race)
NUCLEUS_CANDIDATES = 128  # top_p without top_k: candidates that usually settle the nucleus
_F32_MAX = torch.finfo(torch.float32).max
_FAIL_MESSAGES = {
    1: "the model's logits contain NaN or +inf",
    2: "the model's logits have no finite value",
    3: "min_tokens forbids every token: the eos and stop_token_ids cover the whole vocabulary",
}


@dataclass(frozen=True)
class SampleResult:
    token_id: int
    logprob: float | None  # the chosen token's log-probability; None unless logprobs requested
    top_logprobs: tuple[tuple[int, float], ...]  # top-k (id, logprob), highest first


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


class Sampler:
    """Samples one token per row; see the module docstring for the order and the method."""

    def __init__(
        self,
        text_vocab_size: int,
        eos_ids: Sequence[int] = (),
        device: torch.device | str = "cpu",
        nucleus_candidates: int = NUCLEUS_CANDIDATES,
    ) -> None:
        if not 1 <= text_vocab_size <= MAX_INDEX:
            raise ValueError(f"text_vocab_size must be in [1, {MAX_INDEX}], got {text_vocab_size}")
        self.text_vocab_size = text_vocab_size
        self.eos_ids = tuple(t for t in eos_ids if 0 <= t < text_vocab_size)
        self.device = torch.device(device)
        # The largest power of two up to MAX_BLOCK dividing the vocabulary (Gemma's 262144: 64).
        self.block = math.gcd(text_vocab_size, MAX_BLOCK)
        self.nucleus_candidates = nucleus_candidates
        self.table = PenaltyTable(self.device)
        self._buffers: dict[str, torch.Tensor] = {}

    # ---- requests --------------------------------------------------------------------------

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

    # ---- sampling --------------------------------------------------------------------------

    def sample(self, logits: torch.Tensor, states: Sequence[SamplerState]) -> list[SampleResult]:
        """One token per row of `logits` [B, >= text vocabulary]; advances each sampled state."""
        raw = self._text_logits(logits, states)
        if not states:
            return []
        plan = _plan(states, self.text_vocab_size)
        dev, B = raw.device, raw.shape[0]
        raw_bm = self._block_max(raw)
        raw_max = raw_bm.amax(dim=1).float()
        # amax propagates NaN, so the row maximum tells NaN / +inf / no finite value apart.
        fail = torch.where(
            torch.isnan(raw_max) | (raw_max == math.inf),
            1,
            torch.where(raw_max == NEG_INF, 2, 0),
        )
        x, bm = self._processed(raw, raw_bm, states, plan)
        if x is not raw:
            fail = torch.where((fail == 0) & (bm.amax(dim=1) == NEG_INF), 3, fail)
        host = torch.tensor([row_key(s.seed, s.num_generated) for s in states], dtype=torch.long)
        keys = host.to(dev, non_blocking=True)
        lo, hi = keys[:, 0], keys[:, 1]
        params = _row_params(states, self.text_vocab_size).to(dev, non_blocking=True)
        tokens = torch.zeros(B, dtype=torch.long, device=dev)

        if plan.greedy:
            rows = _index(plan.greedy, dev)
            tokens[rows] = _first_argmax(x, bm, rows, self.block)
        if plan.top_k:
            rows = _index(plan.top_k, dev)
            k = max(states[r].params.top_k for r in plan.top_k)
            tokens[rows] = self._sample_top_k(x, bm, rows, k, params, lo, hi)
        if plan.full or plan.nucleus:
            self._sample_whole(x, bm, plan, params, lo, hi, tokens, fail)
        if plan.tracked:
            self._record(states, plan.tracked, tokens, fail == 0)
        packed, width = self._pack(raw, raw_bm, raw_max, states, plan, tokens, fail)
        return _results(packed.tolist(), width, states)  # the step's one device->host copy

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

    def processed_logits(
        self, logits: torch.Tensor, states: Sequence[SamplerState]
    ) -> torch.Tensor:
        """Steps 1 and 3-5: [B, text_vocab_size] float32 logits before temperature and filters."""
        raw = self._text_logits(logits, states)
        x, _ = self._processed(
            raw, self._block_max(raw), states, _plan(states, self.text_vocab_size)
        )
        return x.float().clone()

    # ---- steps -----------------------------------------------------------------------------

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

    def _block_max(self, x: torch.Tensor) -> torch.Tensor:
        bs = self.block
        return x.reshape(x.shape[0], self.text_vocab_size // bs, bs).amax(dim=2)

    def _buffer(self, name: str, rows: int, device: torch.device) -> torch.Tensor:
        """A reused float32 [rows, vocabulary] scratch tensor. Reuse matters on a CPU, where a
        fresh vocabulary-sized allocation costs more in page faults than the arithmetic."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.device != device:
            size = max(rows, buf.shape[0] if buf is not None else 0)
            buf = torch.empty(size, self.text_vocab_size, dtype=torch.float32, device=device)
            self._buffers[name] = buf
        return buf[:rows]

    def _rows_into(self, buf: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, every: bool):
        """buf <- x[rows] as float32, without an intermediate copy where torch allows."""
        if every:
            buf.copy_(x)
        elif x.dtype == torch.float32:
            torch.index_select(x, 0, rows, out=buf)
        else:
            buf.copy_(x.index_select(0, rows))

    def _processed(self, raw, raw_bm, states, plan) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 3-5 on a float32 copy when any row has adjustments this step; else the raw
        logits themselves (no copy)."""
        if not plan.adjusted:
            return raw, raw_bm
        x = self._buffer("processed", raw.shape[0], raw.device)
        x.copy_(raw)
        adj = [states[r] for r in plan.adjusted]
        per_row = torch.tensor(
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
        self.table.apply(
            x,
            _index(plan.adjusted, raw.device),
            per_row[:, 0].long(),
            max(s.static_entries + s.num_generated for s in adj),
            per_row[:, 1].bool(),
            per_row[:, 2].float(),
            per_row[:, 3].float(),
            per_row[:, 4].float(),
        )
        return x, self._block_max(x)

    def _sample_top_k(self, x, bm, rows, k, params, lo, hi) -> torch.Tensor:
        """Rows with top_k: temperature, top_p, min_p and the draw on their top-k candidates."""
        ids, vals = _top_candidates(x, bm, rows, k, self.block)
        p = params.index_select(0, rows)
        z = _tempered(vals, vals[:, :1], p)
        keep = torch.arange(ids.shape[1], device=x.device) < p[:, _TOP_K, None]
        w = torch.where(keep, torch.exp2(z), 0.0)
        keep &= _nucleus_keep(w, w.sum(dim=1, keepdim=True), p)
        keep &= z >= p[:, _LOG2_MIN_P, None]
        choice = race(torch.where(keep, w, 0.0), lo[rows], hi[rows], _CANDIDATES, ids)
        return ids.gather(1, choice[:, None]).squeeze(1)

    def _sample_whole(self, x, bm, plan, params, lo, hi, tokens, fail) -> None:
        """Rows without top_k: temperature, min_p and top_p over the whole vocabulary."""
        dev, V, bs = x.device, self.text_vocab_size, self.block
        order = sorted(plan.full + plan.nucleus)
        R = len(order)
        rows = _index(order, dev)
        p = params.index_select(0, rows)
        w = self._buffer("weights", R, dev)
        self._rows_into(w, x, rows, order == list(range(x.shape[0])))
        m = bm.index_select(0, rows).amax(dim=1).float()
        # z = (x - max) * log2(e) / T: exactly 0 at the top, so no temperature overflows it.
        w.sub_(m[:, None]).mul_(p[:, _C].float()[:, None])
        full = set(plan.full)
        in_full = [i for i, r in enumerate(order) if r in full]
        if plan.full_min_p:
            # min_p where the whole distribution is drawn from: drop z < log2(min_p) before the
            # weights. Nucleus rows apply it by acceptance: their total must stay unfiltered.
            is_full = _index([r in full for r in order], dev).bool()
            lmp = torch.where(is_full, p[:, _LOG2_MIN_P], NEG_INF).float()
            w.masked_fill_(w < lmp[:, None], NEG_INF)
        w.exp2_()
        sums = w.view(R, V // bs, bs).sum(dim=2)
        if in_full:
            sel = _index(in_full, dev)
            r = rows.index_select(0, sel)
            tokens[r] = _block_race(w, sel, sums.index_select(0, sel), lo[r], hi[r], _FULL, bs)
        if plan.nucleus:
            nuc = _index([i for i, r in enumerate(order) if r not in full], dev)
            tokens[rows.index_select(0, nuc)] = self._sample_nucleus(
                x, bm, w, sums, rows, nuc, p.index_select(0, nuc), lo, hi, fail
            )

    def _sample_nucleus(self, x, bm, w, sums, rows, nuc, p, lo, hi, fail) -> torch.Tensor:
        """top_p rows without top_k (unfiltered weights in w[nuc]): candidates first, then exact
        rejection for the rows whose nucleus the candidates do not hold."""
        r = rows.index_select(0, nuc)
        ids, vals = _top_candidates(x, bm, r, self.nucleus_candidates, self.block)
        # The candidates' weights are read from w, so they are the very terms of the total.
        wc = w[nuc[:, None], ids].double()
        total = sums.index_select(0, nuc).double().sum(dim=1, keepdim=True)
        z = _tempered(vals, vals[:, :1], p)
        keep = _nucleus_keep(wc, total, p) & (z >= p[:, _LOG2_MIN_P, None])
        choice = race(torch.where(keep, wc, 0.0), lo[r], hi[r], _CANDIDATES, ids)
        out = ids.gather(1, choice[:, None]).squeeze(1)
        # Settled: the candidates' mass reaches top_p of the total, so the first token outside
        # the nucleus is a candidate and everything after it is outside too.
        unsettled = (wc.sum(dim=1) < p[:, _TOP_P] * total[:, 0]) & (fail.index_select(0, r) == 0)
        todo = unsettled.nonzero().squeeze(1)
        if todo.numel():  # the host read named in the module docstring
            at = nuc.index_select(0, todo)
            out[todo] = self._reject(
                x.index_select(0, rows.index_select(0, at)).float(),
                w.index_select(0, at),
                ids.index_select(0, todo),
                p.index_select(0, todo),
                total.index_select(0, todo)[:, 0],
                lo[r[todo]],
                hi[r[todo]],
            )
        return out

    def _reject(self, x, w, candidates, p, total, lo, hi) -> torch.Tensor:
        """Exact top_p (and min_p) draws for rows whose nucleus holds all their candidates and
        more: draw j from w; accept when the mass strictly before j (logit desc, id asc) is below
        top_p * total and j passes min_p; else narrow w to the tokens before j, which contain the
        accepted set, and draw again. Each round accepts with probability >= top_p, and the top
        token is always accepted, so the loop ends. x and w are [U, V] copies."""
        U, V, bs = x.shape[0], self.text_vocab_size, self.block
        dev = x.device
        m = x.amax(dim=1, keepdim=True)
        ids = torch.arange(V, device=dev)
        out = torch.zeros(U, dtype=torch.long, device=dev)
        live = torch.arange(U, device=dev)
        for round_ in range(V + 1):
            n = live.numel()
            sums = w.view(n, V // bs, bs).sum(dim=2)
            # A stream per round (the key's low bits carry rounds past the streams available).
            stream = _REJECT + 8 * (round_ % _REJECT_STREAMS)
            salt = round_ // _REJECT_STREAMS
            j = _block_race(w, torch.arange(n, device=dev), sums, lo ^ salt, hi, stream, bs)
            xl = x.index_select(0, live)
            xj = xl.gather(1, j[:, None])
            before = (xl > xj) | ((xl == xj) & (ids < j[:, None]))
            narrowed = w * before
            mass = narrowed.view(n, V // bs, bs).sum(dim=2).double().sum(dim=1)
            zj = _tempered(xj, m.index_select(0, live), p.index_select(0, live))[:, 0]
            in_candidates = (candidates.index_select(0, live) == j[:, None]).any(dim=1)
            accept = (in_candidates | (mass < p[live, _TOP_P] * total[live])) & (
                zj >= p[live, _LOG2_MIN_P]
            )
            out[live] = torch.where(accept, j, out[live])
            again = (~accept).nonzero().squeeze(1)
            if not again.numel():
                break
            w, live, lo, hi = (
                narrowed.index_select(0, again),
                live.index_select(0, again),
                lo.index_select(0, again),
                hi.index_select(0, again),
            )
        return out

    def _record(self, states, tracked: list[int], tokens, ok) -> None:
        """Count this step's tokens in the penalty table (device, in place)."""
        dev = tokens.device
        width = max(states[r].static_entries + states[r].num_generated for r in tracked)
        self.table.ensure_width(width + 1)
        rows = _index(tracked, dev)
        slots = _index([states[r].slot for r in tracked], dev)  # type: ignore[misc]
        self.table.record(slots, tokens.index_select(0, rows), ok.index_select(0, rows), width)

    def _pack(self, raw, raw_bm, raw_max, states, plan, tokens, fail):
        """[B, 3 + 2k] float64: token, failure code, chosen logprob, top-k ids, top-k logprobs
        (float64 holds every id exactly)."""
        B, dev = raw.shape[0], raw.device
        k = max([states[r].params.logprobs or 0 for r in plan.logprobs], default=0)
        k = min(k, self.text_vocab_size)
        out = torch.full((B, 3 + 2 * k), math.nan, dtype=torch.float64, device=dev)
        out[:, 0] = tokens
        out[:, 1] = fail
        if plan.logprobs:
            rows = _index(plan.logprobs, dev)
            every = plan.logprobs == list(range(B))
            lse = self._log_normalizer(raw, rows, raw_max.index_select(0, rows), every)
            chosen = raw[rows, tokens.index_select(0, rows)].double()
            out[rows, 2] = chosen - lse
            if k:
                ids, vals = _top_candidates(raw, raw_bm, rows, k, self.block)
                out[rows, 3 : 3 + k] = ids.double()
                out[rows, 3 + k :] = vals.double() - lse[:, None]
        return out, k

    def _log_normalizer(self, raw, rows, m, every: bool) -> torch.Tensor:
        """log sum exp of the raw logits of `rows`, float64 (step 2's normaliser)."""
        V, bs = self.text_vocab_size, self.block
        w = self._buffer("weights", rows.numel(), raw.device)
        self._rows_into(w, raw, rows, every)
        w.sub_(m[:, None]).mul_(LOG2E).exp2_()
        total = w.view(-1, V // bs, bs).sum(dim=2).double().sum(dim=1)
        return m.double() + torch.log(total)


# ---- per-step plan and parameters ------------------------------------------------------------

_C, _TOP_K, _TOP_P, _LOG2_MIN_P = range(4)  # columns of _row_params
# Random streams (counter_random), one per use so that no two uses share a number. A block race
# uses stream + level (level < 8): rejection round r uses 2 + 8 (r % 24), whole-vocabulary draws
# 200, candidate races 1.
_CANDIDATES, _REJECT, _REJECT_STREAMS, _FULL = 1, 2, 24, 200


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
    full_min_p: bool  # some "full" row has min_p


def _plan(states: Sequence[SamplerState], vocab: int) -> _Plan:
    plan = _Plan([], [], [], [], [], [], [], False)
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
            if p.min_p > 0:
                plan.full_min_p = True
        if p.logprobs is not None:
            plan.logprobs.append(r)
        if s.slot is not None and s.static_entries + s.num_generated > 0:
            plan.adjusted.append(r)
        if s.tracks_output:
            plan.tracked.append(r)
    return plan


def _row_params(states: Sequence[SamplerState], vocab: int) -> torch.Tensor:
    """Per-row parameters as one host tensor [B, 4] (one copy to the device):
    log2(e) / temperature, top_k (vocab when off), top_p, log2(min_p) (-inf when off). The
    temperature factor and log2(min_p) are rounded to float32, the precision they are used in,
    so every path compares against the same threshold."""
    rows = []
    for s in states:
        p = s.params
        c = min(LOG2E / p.temperature, _F32_MAX) if p.temperature > 0 else 0.0
        k = p.top_k if 0 < p.top_k < vocab else vocab
        lmp = math.log2(p.min_p) if p.min_p > 0 else NEG_INF
        rows.append([c, k, p.top_p, lmp])
    out = torch.tensor(rows, dtype=torch.float64)
    out[:, _C] = out[:, _C].float().double()
    out[:, _LOG2_MIN_P] = out[:, _LOG2_MIN_P].float().double()
    return out


def _index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


# ---- batched building blocks -------------------------------------------------------------------


def _tempered(vals: torch.Tensor, top: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(vals - top) * log2(e) / T in float32 (as the weight buffer computes it), then float64."""
    return ((vals.float() - top.float()) * p[:, _C, None].float()).double()


def _nucleus_keep(w: torch.Tensor, total: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """top_p over weights in (logit desc, id asc) order: keep a token while the mass strictly
    before it is below top_p * total, which is the smallest prefix reaching top_p and always keeps
    the first. Rows with top_p = 1 keep everything (no rounding may drop a tail token)."""
    before = torch.cumsum(w, dim=1) - w
    return (before < p[:, _TOP_P, None] * total) | (p[:, _TOP_P, None] >= 1)


def _order_keys(values: torch.Tensor, ids: torch.Tensor, max_id: int) -> torch.Tensor:
    """int64 keys ordered like (value desc, id asc) under a descending sort: the float32 bits
    made order-preserving, then the id reversed in the low bits. Exact, so ties never depend on
    a kernel's choice."""
    bits = (values.float() + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip magnitude bits
    return key * (1 << max_id.bit_length()) + (max_id - ids)


def _top_candidates(x, bm, rows, k, bs) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest logits of each row in `rows`, ordered by (logit desc, id asc): ids [R, k]
    and float32 values. They lie in the row's k blocks with the highest maxima (ordered the same
    way): each such block holds an element at least as large as any element of a later block."""
    R, nb = rows.numel(), bm.shape[1]
    V = nb * bs
    k = min(k, V)
    dev = x.device
    block_ids = torch.arange(nb, device=dev)
    top_blocks = _order_keys(bm.index_select(0, rows), block_ids, nb - 1)
    blocks = top_blocks.topk(min(k, nb), dim=1).indices
    ids = (blocks[:, :, None] * bs + torch.arange(bs, device=dev)).reshape(R, -1)
    vals = x[rows[:, None], ids].float()
    pos = _order_keys(vals, ids, V - 1).topk(k, dim=1).indices
    return ids.gather(1, pos), vals.gather(1, pos)


def _first_argmax(x, bm, rows, bs) -> torch.Tensor:
    """The lowest id holding each row's maximum: the first block whose maximum is the row's,
    then the first position in it that holds it."""
    b = bm.index_select(0, rows)
    top = b.amax(dim=1, keepdim=True)
    block = (b == top).to(torch.uint8).argmax(dim=1)
    ids = block[:, None] * bs + torch.arange(bs, device=x.device)
    first = (x[rows[:, None], ids] == top).to(torch.uint8).argmax(dim=1)
    return block * bs + first


_FAN_OUT = 64


def _block_race(w, sel, sums, lo, hi, stream: int, bs: int) -> torch.Tensor:
    """One token per selected row of the weights w [*, V], drawn in proportion to w: a race over
    the groups of blocks, then over the blocks of the winning group, ..., then over the tokens of
    the winning block. Each level picks a child with probability child mass / sibling mass, so a
    token wins with probability w_i / sum(w). `sums` [S, V / bs] are the rows' block sums; `sel`
    [S] picks w's rows. Random numbers: stream + level, indexed by global block or token id."""
    S, dev = sel.numel(), w.device
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
    tokens = node[:, None] * bs + torch.arange(bs, device=dev)
    mass = w[sel[:, None], tokens].double()
    return tokens.gather(1, race(mass, lo, hi, stream, tokens)[:, None])[:, 0]


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
