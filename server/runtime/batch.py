"""A forward batch: the tensors one forward pass over many sequences of many subnets needs.

Owns the packing of `StepSequence`s (server/vocabulary/step.py) into tensors. Each sequence
contributes the tokens it processes this step (a prompt chunk, or its last sampled token), the
position of the first one, its KV block table, and which rows need logits (the last row of a
sequence that samples; every row when a caller asks for all logits). Sequences are reordered so
that each subnet's sequences form one contiguous segment: the forward then runs
width-independent parts over all rows together and the FFN per segment, and a layer that some
subnet skips is a gather of the other segments' rows.

Deliberately does not know: how tokens are chosen, which blocks are free, or the model math.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.vocabulary.step import StepSequence
from server.vocabulary.subnets import Subnet


@dataclass(frozen=True)
class Segment:
    """Consecutive sequences (and their rows) that share one subnet."""

    subnet: Subnet
    seqs: slice  # sequence indices, in batch order
    rows: slice  # token rows, in batch order


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [N] token ids, sequences back to back in batch order
    positions: torch.Tensor  # [N] position of each row in its sequence
    row_seq: torch.Tensor  # [N] batch index of each row's sequence
    seq_end: torch.Tensor  # [S] positions in the KV cache after this step (context length)
    block_tables: torch.Tensor  # [S, num_kv_layers, max_blocks] block ids, -1 where none
    block_size: int
    logits_rows: torch.Tensor  # [M] rows whose logits are returned, in batch order
    segments: list[Segment]
    order: list[int]  # batch index -> index in the caller's list


def build_forward_batch(
    seqs: Sequence[StepSequence],
    num_kv_layers: int,
    block_size: int,
    device: torch.device | str = "cpu",
    all_logits: bool = False,
) -> ForwardBatch:
    """Pack sequences into one batch, grouping them by subnet (stable within a subnet).
    `all_logits`: logits for every row (a prompt's full distribution), not only sampled ones."""
    if not seqs:
        raise ValueError("a forward batch needs at least one sequence")
    first_seen: dict[str, int] = {}
    for s in seqs:
        first_seen.setdefault(s.subnet.name, len(first_seen))
    order = sorted(range(len(seqs)), key=lambda i: first_seen[seqs[i].subnet.name])

    ids: list[int] = []
    positions: list[int] = []
    row_seq: list[int] = []
    seq_end: list[int] = []
    logits_rows: list[int] = []
    segments: list[Segment] = []
    max_blocks = max(1, max(len(bt) for s in seqs for bt in s.block_table))
    tables: list[list[list[int]]] = []  # one tensor is built at the end: far cheaper than many

    seg_start = (0, 0)
    for b, i in enumerate(order):
        s = seqs[i]
        n = len(s.token_ids)
        if n == 0:
            raise ValueError("every sequence in a step must process at least one token")
        if len(s.block_table) != num_kv_layers:
            raise ValueError(f"block_table needs {num_kv_layers} per-layer lists")
        row0 = len(ids)
        ids.extend(s.token_ids)
        positions.extend(range(s.start, s.start + n))
        row_seq.extend([b] * n)
        seq_end.append(s.start + n)
        if all_logits:
            logits_rows.extend(range(row0, row0 + n))
        elif s.sample:
            logits_rows.append(row0 + n - 1)
        tables.append([list(bt) + [-1] * (max_blocks - len(bt)) for bt in s.block_table])
        last = b + 1 == len(order) or seqs[order[b + 1]].subnet.name != s.subnet.name
        if last:
            segments.append(
                Segment(
                    subnet=s.subnet,
                    seqs=slice(seg_start[0], b + 1),
                    rows=slice(seg_start[1], len(ids)),
                )
            )
            seg_start = (b + 1, len(ids))

    def long(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    return ForwardBatch(
        input_ids=long(ids),
        positions=long(positions),
        row_seq=long(row_seq),
        seq_end=long(seq_end),
        block_tables=long(tables) if tables else long([]),
        block_size=block_size,
        logits_rows=long(logits_rows),
        segments=segments,
        order=order,
    )
