"""Per-request sparse logit adjustments, kept on the logits' device across steps.

Owns the state behind min_tokens, logit_bias and the repetition / frequency / presence penalties:
for every request that asks for any of them, one row (a "slot") of a device table listing the
token ids it touches, each with its bias, whether it was seen (prompt or output: repetition
penalty), how often it was generated (output only: frequency and presence penalties) and whether
min_tokens blocks it (an eos or stop id). Applying them is one gather, one elementwise formula
and one scatter over [rows, entries] -- never over the vocabulary -- and recording a step's
tokens updates the table in place from the device tensor of sampled ids, with no host round trip.

Layout: `entries` [slots, 5, width] float32, five planes: the id (exact: ids are below 2^24),
its bias, seen (0/1), blocked (0/1) and count; one tensor, so that reading a slot's entries is one
index, not one per field. `n` [slots] counts a slot's valid entries, which come first. A slot's
entries are distinct ids. Entries past `n` hold zeros, and a gather over a fixed width reads them
as copies of entry 0 (see `apply`), so padded columns write back exactly what entry 0 writes.
Slots are reused after `free`; the table doubles in slots or width when a new request needs more,
which is rare and happens at registration, not per step.

Deliberately does not know: sampling parameters beyond the numbers it is given, or which rows of a
step belong to which request (the sampler maps rows to slots).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.runtime.row_gather import gather_rows, scatter_rows_
from server.runtime.row_passes import compiled_per_row

_F32_MAX = torch.finfo(torch.float32).max
_F32_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class Entry:
    """One token id a request's adjustments touch at registration."""

    token_id: int
    bias: float = 0.0
    seen: bool = False  # in the prompt (repetition penalty)
    blocked: bool = False  # an eos or stop id while min_tokens is not reached


_ID, _BIAS, _SEEN, _BLOCKED, _COUNT = range(5)  # planes of PenaltyTable.entries
# The per-row columns `PenaltyTable.apply` reads, in order.
ROW_COLUMNS = ("slot", "min_tokens active", "repetition", "frequency", "presence")


class PenaltyTable:
    """`compiled`: the arithmetic of each step's adjustment (`adjusted`: the entries' lookup and
    formula) and of its recording (`counted`) runs as one compiled graph each
    (row_passes.compiled_per_row) instead of a few dozen small ops."""

    def __init__(self, device: torch.device, compiled: bool = False) -> None:
        self.device = device
        self._free: list[int] = []
        self._adjusted = compiled_per_row("penalties", adjusted) if compiled else adjusted
        self._counted = compiled_per_row("penalty_counts", counted) if compiled else counted
        self._alloc(0, 0)

    @property
    def slots(self) -> int:
        return self.entries.shape[0]

    @property
    def width(self) -> int:
        return self.entries.shape[2]

    def _alloc(self, slots: int, width: int) -> None:
        old = getattr(self, "entries", None)
        entries = torch.zeros(slots, 5, width, dtype=torch.float32, device=self.device)
        n = torch.zeros(slots, dtype=torch.long, device=self.device)
        if old is not None:
            s, _, w = old.shape
            entries[:s, :, :w] = old
            n[:s] = self.n
            self._free.extend(range(slots - 1, s - 1, -1))
        else:
            self._free = list(range(slots - 1, -1, -1))
        self.entries, self.n = entries, n

    def allocate(self, entries: Sequence[Entry], capacity: int) -> int:
        """A slot holding `entries` (distinct ids) with room for `capacity` entries in all."""
        capacity = max(capacity, len(entries), 1)
        if capacity > self.width:
            self._alloc(self.slots, max(capacity, 2 * self.width))
        if not self._free:
            self._alloc(max(4, 2 * self.slots), self.width)
        slot = self._free.pop()
        self.entries[slot].zero_()
        k = len(entries)
        if k:  # one host->device copy, at registration only
            planes = [[e.token_id, e.bias, e.seen, e.blocked, 0.0] for e in entries]
            self.entries[slot, :, :k] = torch.tensor(planes, dtype=torch.float32).T
        self.n[slot] = k
        return slot

    def ensure_width(self, width: int) -> None:
        """Grow the table so that `width` columns exist (before recording past a slot's room)."""
        if width > self.width:
            self._alloc(self.slots, max(width, 2 * self.width))

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def apply(
        self, x: torch.Tensor, rows: torch.Tensor | None, per_row: torch.Tensor, width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adjust x[rows] in place, in the sampler's order: min_tokens, bias, repetition penalty,
        frequency and presence penalties. `per_row` [P, 5] float64 on x's device holds each
        row's slot, whether min_tokens is still active (0/1) and its repetition, frequency and
        presence penalties (`ROW_COLUMNS`, one upload for all); `width` bounds every slot's
        valid entries (the host knows it: entries at registration plus outputs). `rows` None
        means every row of x, in order. Returns the ids [P, W] written (W: `width`
        rounded up to a power of two, so that a compiled adjustment meets few shapes) and x's
        values there before and after, so that a caller adjusting logits it does not own can
        put them back."""
        # A slice's rows: much cheaper than indexing [P, W] pairs, and than whole rows of a
        # table sized for max_tokens.
        entries = self.entries[:, :, : self._columns(width)]
        ids, before, after = self._adjusted(x, rows, entries, self.n, per_row)
        scatter_rows_(x, rows, ids, after)
        return ids, before, after

    def record(
        self, slots: torch.Tensor, tokens: torch.Tensor, ok: torch.Tensor, width: int
    ) -> None:
        """Count one sampled token per slot, in place: an existing entry's count goes up and it is
        marked seen; a new id is appended. Rows with ok False (failed) change nothing. `width`
        bounds every slot's valid entries before this call; the caller has ensured room for one
        more."""
        entries = self.entries[:, :, : self._columns(width + 1)]
        pos, entry, n = self._counted(entries, self.n, slots, tokens, ok)
        # Slots are distinct, so these writes never collide.
        self.entries[slots, :, pos] = entry
        self.n[slots] = n

    def _columns(self, width: int) -> int:
        """`width` rounded up to a power of two (at most the table's): the columns a step reads,
        so that a compiled sampler's graphs meet few shapes."""
        return min(1 << max(width - 1, 0).bit_length(), self.width)


def counted(entries, n, slots, tokens, ok):
    """`PenaltyTable.record`'s arithmetic: per slot, the column of its token (its entry's, or
    the first free one), that entry's five planes after counting (unchanged where not `ok`),
    and the slot's count of valid entries after."""
    W = entries.shape[2]
    n = n.index_select(0, slots)
    ids = entries[:, _ID].index_select(0, slots)
    match = (torch.arange(W, device=ids.device) < n[:, None]) & (ids == tokens[:, None])
    found = match.any(dim=1)
    pos = torch.where(found, match.to(torch.uint8).argmax(dim=1), n)
    entry = entries[slots, :, pos]  # [P, 5]
    seen = torch.ones_like(entry[:, _SEEN])
    after = (tokens.float(), entry[:, _BIAS], seen, entry[:, _BLOCKED], entry[:, _COUNT] + 1)
    entry = torch.where(ok[:, None], torch.stack(after, dim=1), entry)
    return pos, entry, n + (ok & ~found).long()


def adjusted(x, rows, entries, n, per_row):
    """The adjustment of x[rows] (`rows` None: every row) by the entries ([slots, 5, W] planes,
    of which `n` [slots] are valid) of the slots in `per_row` (see `PenaltyTable.apply`):
    (ids [P, W], x's values there before, float32 values after). Padded columns read entry 0,
    so every write in a row at a repeated id is the same value."""
    W = entries.shape[2]
    slots = per_row[:, 0].long()
    min_tokens_active = per_row[:, 1] > 0
    repetition, frequency, presence = per_row[:, 2:].float().unbind(dim=1)
    e = entries.index_select(0, slots)
    valid = torch.arange(W, device=e.device) < n.index_select(0, slots)[:, None]
    e = torch.where(valid[:, None], e, e[:, :, :1])
    ids = e[:, _ID].long()
    before = gather_rows(x, rows, ids)
    v = before.float()
    blocked = (e[:, _BLOCKED] > 0) & min_tokens_active[:, None]
    v = torch.where(blocked, float("-inf"), v) + e[:, _BIAS]
    # Within float32's normal range: a penalty that rounds to 0 or inf would turn a blocked
    # -inf (times 0) or a zero logit (times inf) into NaN.
    rep = repetition[:, None].clamp(_F32_TINY, _F32_MAX)
    # Repetition (HF/vLLM): positive logits divided, negative ones multiplied; 1 is the
    # identity, so rows without it need no mask.
    v = torch.where(e[:, _SEEN] > 0, torch.where(v > 0, v / rep, v * rep), v)
    count = e[:, _COUNT]
    v = v - (frequency[:, None] * count + presence[:, None] * (count > 0))
    # A tiny repetition penalty can overflow a positive logit to +inf, which would make the
    # weights NaN; the largest float keeps the token on top and the maths finite.
    return ids, before, v.clamp(max=_F32_MAX)
