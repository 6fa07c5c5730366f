"""Per-step metadata of a forward batch: which rows each layer runs on, and how attention is laid
out over the paged KV cache.

Owns the bookkeeping that depends only on the batch, built once per distinct use within a step and
shared by every layer that needs it: the rows of the segments whose subnet keeps a layer (two
phases: all rows for KV-owning layers, only the rows that need logits for KV-consumer layers),
their rotary embeddings, the distinct FFN widths among them, and attention groups (queries padded
together, the key positions each reads, the causal and sliding-window mask).

Deliberately does not know: weights or the model math (gemma3n.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.runtime.batch import ForwardBatch
from server.vocabulary.text_config import SLIDING, TextConfig


def rotary(positions: torch.Tensor, theta: float, dim: int, dtype: torch.dtype):
    """cos/sin [N, dim] for neox-style rotary embedding over the full head_dim."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    freqs = positions[:, None].float() * inv_freq.to(positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@dataclass
class AttentionGroup:
    """Sequences whose queries are padded into one attention call."""

    q_index: torch.Tensor  # [G, Q] rows (in the layer's active-row space) of each query slot
    q_valid: torch.Tensor  # [G, Q] False for padding
    seqs: torch.Tensor  # [G] batch index of each sequence
    key_pos: torch.Tensor  # [G, K] positions of the keys read (padding clamped to valid)
    mask: torch.Tensor  # [G, 1, rep*Q, K] True where a query may attend a key (per query head
    # of a KV group, see `Gemma3nModel.attention`)


@dataclass(frozen=True)
class LayerRows:
    """The rows one layer runs on. Layers with the same `key` run on the same rows."""

    key: tuple  # (phase, which segments keep the layer)
    rows: torch.Tensor  # batch row ids
    index: torch.Tensor | None  # positions of those rows in the phase's stream tensor; None: all


class StepContext:
    """What every layer of one forward needs about the batch, built once per distinct use.

    Two phases: layers that own KV run on every row of the step; KV-consumer layers only on the
    rows whose logits are wanted (`batch.logits_rows`).
    """

    def __init__(self, text: TextConfig, batch: ForwardBatch, dtype: torch.dtype):
        self.text = text
        self.batch = batch
        device = batch.input_ids.device
        self.rope = {
            kind: rotary(batch.positions, theta, text.head_dim, dtype)
            for kind, theta in (
                ("full_attention", text.rope_theta_full),
                (SLIDING, text.rope_theta_sliding),
            )
        }
        self.phase_rows = (torch.arange(batch.input_ids.numel(), device=device), batch.logits_rows)
        segment_of_row = torch.empty(batch.input_ids.numel(), dtype=torch.long)
        for s, seg in enumerate(batch.segments):
            segment_of_row[seg.rows] = s
        self.segment_of_row = segment_of_row.to(device)
        self._layer_rows: dict[tuple, LayerRows] = {}
        self._groups: dict[tuple, list[AttentionGroup]] = {}
        self._rope_rows: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # K/V read from the cache by KV-consumer layers: every consumer of one producer reads
        # the same keys for the same rows, so one gather serves all of them.
        self.consumer_reads: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._widths: dict[tuple, list[tuple[int, torch.Tensor | None]]] = {}

    def layer_rows(self, phase: int, keep: tuple[bool, ...]) -> LayerRows:
        """Rows of the segments whose subnet keeps a layer (`keep`, one flag per segment)."""
        key = (phase, keep)
        if key not in self._layer_rows:
            rows = self.phase_rows[phase]
            if all(keep):
                self._layer_rows[key] = LayerRows(key, rows, None)
            else:
                kept = torch.tensor(keep, device=rows.device)[self.segment_of_row[rows]]
                index = kept.nonzero().flatten()
                self._layer_rows[key] = LayerRows(key, rows[index], index)
        return self._layer_rows[key]

    def widths(self, lr: LayerRows, layer_widths: tuple[int | None, ...]):
        """Distinct FFN widths among a layer's rows and, when several, the rows of each
        (indices into `lr.rows`). `layer_widths` holds each segment's width for the layer."""
        key = (lr.key, layer_widths)
        if key not in self._widths:
            distinct = sorted({wd for wd in layer_widths if wd is not None})
            if len(distinct) == 1:
                self._widths[key] = [(distinct[0], None)]
            else:
                per_segment = torch.tensor([wd or 0 for wd in layer_widths])
                row_width = per_segment.to(lr.rows.device)[self.segment_of_row[lr.rows]]
                self._widths[key] = [(wd, (row_width == wd).nonzero().flatten()) for wd in distinct]
        return self._widths[key]

    def rope_rows(self, lr: LayerRows, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [R, 1, head_dim] of a layer's rows."""
        key = (lr.key, kind)
        if key not in self._rope_rows:
            cos, sin = self.rope[kind]
            if lr.key[0] != 0 or lr.index is not None:
                cos, sin = cos[lr.rows], sin[lr.rows]
            self._rope_rows[key] = (cos[:, None, :], sin[:, None, :])
        return self._rope_rows[key]

    def attention_groups(self, lr: LayerRows, kind: str) -> list[AttentionGroup]:
        """Attention layout for a layer's query rows, for one layer type.

        Sequences with one query row (decodes, last-token logits) share one padded call; a
        sequence with several rows (a prefill chunk) gets its own call with a causal mask.
        Sliding layers read only keys inside the window of their earliest query.
        """
        key = (lr.key, kind)
        if key in self._groups:
            return self._groups[key]
        b = self.batch
        window = self.text.sliding_window if kind == SLIDING else None
        row_seq = b.row_seq[lr.rows].tolist()
        row_pos = b.positions[lr.rows].tolist()
        by_seq: dict[int, list[int]] = {}
        for i, s in enumerate(row_seq):
            by_seq.setdefault(s, []).append(i)
        singles = [s for s, idx in by_seq.items() if len(idx) == 1]
        groups = []
        if singles:
            groups.append(self._group([[by_seq[s][0]] for s in singles], singles, row_pos, window))
        for s, idx in by_seq.items():
            if len(idx) > 1:
                groups.append(self._group([idx], [s], row_pos, window))
        self._groups[key] = groups
        return groups

    def _group(
        self, q_rows: list[list[int]], seqs: list[int], row_pos: list[int], window: int | None
    ) -> AttentionGroup:
        q_len = max(len(r) for r in q_rows)
        lows, highs = [], []
        for r in q_rows:
            first, last = row_pos[r[0]], row_pos[r[-1]]
            lows.append(0 if window is None else max(0, first - window + 1))
            highs.append(last + 1)
        k_len = max(h - lo for lo, h in zip(lows, highs, strict=True))
        device = self.batch.input_ids.device
        q_index = torch.tensor([r + [r[0]] * (q_len - len(r)) for r in q_rows], device=device)
        q_valid = torch.tensor(
            [[True] * len(r) + [False] * (q_len - len(r)) for r in q_rows], device=device
        )
        low = torch.tensor(lows, device=device)[:, None]
        key_pos = low + torch.arange(k_len, device=device)[None, :]  # [G, K]
        q_pos = torch.tensor(row_pos, device=device)[q_index]  # [G, Q]
        kp, qp = key_pos[:, None, :], q_pos[:, :, None]
        mask = kp <= qp
        if window is not None:
            mask &= kp > qp - window
        # Padded query slots attend key 0 so softmax never sees an all-masked row.
        mask |= (~q_valid[:, :, None]) & (torch.arange(k_len, device=device) == 0)
        key_pos = torch.minimum(key_pos, torch.tensor(highs, device=device)[:, None] - 1)
        rep = self.text.num_attention_heads // self.text.num_key_value_heads
        mask = mask[:, None, None].expand(len(q_rows), 1, rep, q_len, k_len)
        mask = mask.reshape(len(q_rows), 1, rep * q_len, k_len)
        return AttentionGroup(q_index, q_valid, torch.tensor(seqs, device=device), key_pos, mask)
