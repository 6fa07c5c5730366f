"""Per-request sparse logit adjustments, kept on the logits' device across steps.

Owns the state behind min_tokens, logit_bias and the repetition / frequency / presence penalties:
for every request that asks for any of them, one row (a "slot") of a device table listing the
token ids it touches, each with its bias, whether it was seen (prompt or output: repetition
penalty), how often it was generated (output only: frequency and presence penalties) and whether
min_tokens blocks it (an eos or stop id). Applying them is one gather, one elementwise formula
and one scatter over [rows, entries] -- never over the vocabulary -- and recording a step's
tokens updates the table in place from the device tensor of sampled ids, with no host round trip.

Layout: `ids/bias/seen/blocked/count` are [slots, width]; `n` [slots] counts a slot's valid
entries, which come first. A slot's entries are distinct ids. Entries past `n` hold zeros, and a
gather over a fixed width reads them as copies of entry 0 (see `apply`), so padded columns write
back exactly what entry 0 writes. Slots are reused after `free`; the table doubles in slots or
width when a new request needs more, which is rare and happens at registration, not per step.

Deliberately does not know: sampling parameters beyond the numbers it is given, or which rows of a
step belong to which request (the sampler maps rows to slots).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.runtime.row_gather import gather_rows, scatter_rows_

_F32_MAX = torch.finfo(torch.float32).max
_F32_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class Entry:
    """One token id a request's adjustments touch at registration."""

    token_id: int
    bias: float = 0.0
    seen: bool = False  # in the prompt (repetition penalty)
    blocked: bool = False  # an eos or stop id while min_tokens is not reached


class PenaltyTable:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._free: list[int] = []
        self._alloc(0, 0)

    @property
    def slots(self) -> int:
        return self.ids.shape[0]

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def _alloc(self, slots: int, width: int) -> None:
        old = getattr(self, "ids", None)
        new = {
            "ids": torch.zeros(slots, width, dtype=torch.long, device=self.device),
            "bias": torch.zeros(slots, width, dtype=torch.float32, device=self.device),
            "seen": torch.zeros(slots, width, dtype=torch.bool, device=self.device),
            "blocked": torch.zeros(slots, width, dtype=torch.bool, device=self.device),
            "count": torch.zeros(slots, width, dtype=torch.float32, device=self.device),
        }
        n = torch.zeros(slots, dtype=torch.long, device=self.device)
        if old is not None:
            s, w = old.shape
            for name, t in new.items():
                t[:s, :w] = getattr(self, name)
            n[:s] = self.n
            self._free.extend(range(slots - 1, s - 1, -1))
        else:
            self._free = list(range(slots - 1, -1, -1))
        for name, t in new.items():
            setattr(self, name, t)
        self.n = n

    def allocate(self, entries: Sequence[Entry], capacity: int) -> int:
        """A slot holding `entries` (distinct ids) with room for `capacity` entries in all."""
        capacity = max(capacity, len(entries), 1)
        if capacity > self.width:
            self._alloc(self.slots, max(capacity, 2 * self.width))
        if not self._free:
            self._alloc(max(4, 2 * self.slots), self.width)
        slot = self._free.pop()
        for name in ("ids", "bias", "seen", "blocked", "count"):
            getattr(self, name)[slot].zero_()
        k = len(entries)
        if k:
            # One host->device copy per field, at registration only.
            self.ids[slot, :k] = torch.tensor([e.token_id for e in entries], dtype=torch.long)
            self.bias[slot, :k] = torch.tensor([e.bias for e in entries], dtype=torch.float32)
            self.seen[slot, :k] = torch.tensor([e.seen for e in entries], dtype=torch.bool)
            self.blocked[slot, :k] = torch.tensor([e.blocked for e in entries], dtype=torch.bool)
        self.n[slot] = k
        return slot

    def ensure_width(self, width: int) -> None:
        """Grow the table so that `width` columns exist (before recording past a slot's room)."""
        if width > self.width:
            self._alloc(self.slots, max(width, 2 * self.width))

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def apply(
        self,
        x: torch.Tensor,
        rows: torch.Tensor | None,
        slots: torch.Tensor,
        width: int,
        min_tokens_active: torch.Tensor,
        repetition: torch.Tensor,
        frequency: torch.Tensor,
        presence: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adjust x[rows] in place, in the sampler's order: min_tokens, bias, repetition penalty,
        frequency and presence penalties. Per-row tensors are [P] on x's device; `width` bounds
        every slot's valid entries (the host knows it: entries at registration plus outputs).
        `rows` None means every row of x, in order. Returns the ids [P, width] written and x's
        values there before and after, so that a caller adjusting logits it does not own can
        put them back."""
        width = max(1, min(width, self.width))
        cols = torch.arange(width, device=x.device)
        n = self.n.index_select(0, slots)
        # Padded columns read entry 0, so every write in a row at a repeated id is the same value.
        valid = cols < n[:, None]

        def field(table: torch.Tensor) -> torch.Tensor:
            """The slots' first `width` entries of a field, padded columns as entry 0 (a slice's
            rows: much cheaper than indexing [P, width] pairs, and than whole rows of a table
            sized for max_tokens)."""
            t = table[:, :width].index_select(0, slots)
            return torch.where(valid, t, t[:, :1])

        ids = field(self.ids)
        before = gather_rows(x, rows, ids)
        v = before.float()
        v = torch.where(field(self.blocked) & min_tokens_active[:, None], float("-inf"), v)
        v = v + field(self.bias)
        # Within float32's normal range: a penalty that rounds to 0 or inf would turn a blocked
        # -inf (times 0) or a zero logit (times inf) into NaN.
        rep = repetition[:, None].clamp(_F32_TINY, _F32_MAX)
        # Repetition (HF/vLLM): positive logits divided, negative ones multiplied; 1 is the
        # identity, so rows without it need no mask.
        v = torch.where(field(self.seen), torch.where(v > 0, v / rep, v * rep), v)
        count = field(self.count)
        v = v - (frequency[:, None] * count + presence[:, None] * (count > 0))
        # A tiny repetition penalty can overflow a positive logit to +inf, which would make the
        # weights NaN; the largest float keeps the token on top and the maths finite.
        after = v.clamp(max=_F32_MAX)
        scatter_rows_(x, rows, ids, after)
        return ids, before, after

    def record(
        self, slots: torch.Tensor, tokens: torch.Tensor, ok: torch.Tensor, width: int
    ) -> None:
        """Count one sampled token per slot, in place: an existing entry's count goes up and it is
        marked seen; a new id is appended. Rows with ok False (failed) change nothing. `width`
        bounds every slot's valid entries before this call; the caller has ensured room for one
        more."""
        width = min(width + 1, self.width)
        cols = torch.arange(width, device=tokens.device)
        n = self.n.index_select(0, slots)
        ids = self.ids[:, :width].index_select(0, slots)
        match = (cols < n[:, None]) & (ids == tokens[:, None])
        found = match.any(dim=1)
        pos = torch.where(found, match.to(torch.uint8).argmax(dim=1), n)
        at = (slots, pos)
        # Slots are distinct, so these read-modify-writes never collide.
        self.ids[at] = torch.where(ok, tokens, self.ids[at])
        self.count[at] = self.count[at] + ok.float()
        self.seen[at] = self.seen[at] | ok
        self.n[slots] = n + (ok & ~found).long()
