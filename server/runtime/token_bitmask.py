"""Allowed-token bitmasks: the host buffer a grammar engine fills, and applying it to logits.

Owns the packed format every grammar engine here writes (int32 words, bit i of word j set when
token 32 j + i is allowed; both xgrammar and llguidance use it) and `apply_bitmask_`, which sets
the disallowed logits of some rows to -inf on the logits' device (one pass, or one per row).

Deliberately does not know: grammars, matchers or sampling. The sampler decides which rows are
constrained and calls this before anything that selects tokens.

Why an additive lookup table: a packed row is 32 KiB at 262,144 ids. Viewed as bytes, one
`index_select` into a [256, 8] table of {0, -inf} unpacks it straight into the logits' dtype,
and one `add` applies it: -inf plus any logit is -inf, 0 plus a logit is that logit exactly.
Measured on this project's CPU, a boolean unpack followed by `masked_fill_` or `torch.where`
costs about 5x more at 262,144 ids (CPU masked_fill is slow), and shifting words by 0..31 makes
a temporary 32 times the mask's size.
The bytes are read in little-endian order, which is how the engines write the words on every
platform torch runs on here (x86-64, aarch64).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

if sys.byteorder != "little":  # pragma: no cover - no big-endian target exists for this server
    raise ImportError("token_bitmask reads packed masks as little-endian bytes")

_BITS = torch.tensor([[(b >> i) & 1 for i in range(8)] for b in range(256)], dtype=torch.bool)
_ADDEND = torch.where(_BITS, 0.0, float("-inf"))  # [256, 8]: what byte b adds to its 8 tokens
_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row for `vocab_size` token ids."""
    return (vocab_size + 31) // 32


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A host [rows, words] int32 buffer, every token allowed (-1 is all bits set)."""
    return torch.full((rows, bitmask_words(vocab_size)), -1, dtype=torch.int32)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, vocab_size] bool on the bitmask's device: True where a token is allowed (tests and
    diagnostics; the sampler uses `apply_bitmask_`)."""
    table = _BITS.to(bitmask.device)
    as_bytes = bitmask.contiguous().view(torch.uint8).flatten().int()
    return table.index_select(0, as_bytes).view(bitmask.shape[0], -1)[:, :vocab_size]


def _addend(bitmask: torch.Tensor, vocab_size: int, device, dtype) -> torch.Tensor:
    """[rows, vocab_size] of 0 (allowed) and -inf (disallowed), in `dtype` on `device`."""
    table = _TABLES.get((device, dtype))
    if table is None:
        table = _TABLES[device, dtype] = _ADDEND.to(device, dtype)
    as_bytes = bitmask.to(device, non_blocking=True).contiguous().view(torch.uint8).flatten()
    return table.index_select(0, as_bytes.int()).view(bitmask.shape[0], -1)[:, :vocab_size]


def apply_bitmask_(logits: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> None:
    """In place: logits[rows[i], t] = -inf wherever bit t of bitmask[i] is clear (t below
    logits.shape[1]). `bitmask` [len(rows), >= V / 32] may be on the host (it crosses to the
    device once). Every row at once is one add; some rows are an add per row, so a row without a
    constraint is never touched (index_add_ would do it in one call, but on a CPU it costs about
    7x a plain add at 262,144 ids, and unpacking for every row of the batch about 3x)."""
    V = logits.shape[1]
    if bitmask.shape[1] * 32 < V:
        raise ValueError(f"a bitmask of {bitmask.shape[1]} words cannot cover {V} token ids")
    add = _addend(bitmask, V, logits.device, logits.dtype)
    if list(rows) == list(range(logits.shape[0])):
        logits.add_(add)
        return
    for i, r in enumerate(rows):
        logits[r].add_(add[i])
