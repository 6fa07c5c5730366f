"""A forward batch: everything one forward pass over many sequences of many subnets needs, planned
on the host and sent to the device in one transfer.

Owns the step's layout. Each sequence (`StepSequence`, server/vocabulary/step.py) contributes the
tokens it processes this step, the position of the first, its KV block table, and whether its
last row needs logits. Sequences are reordered so that each subnet's sequences form one
contiguous segment. Then, for every layer, on the host and from plain Python data:

- which rows run it. Layers from `first_kv_shared_layer` on write no KV, so a prefill's rows
  stop before them except those whose logits are wanted (prefill early exit). A subnet that skips
  a layer leaves its rows untouched there, in one of two layouts:
  "grouped": the layer runs on the kept rows only (an index);
  "masked": it runs on every row and a per-row keep mask restores the skipping rows afterwards
  (a skipped layer is the identity on the four streams). Skipping rows of a KV-owning layer then
  write their K/V into the cache's scratch block, never into a real one;
- how its FFN runs over the rows' widths: one GEMM per distinct width ("grouped"), or one at the
  widest with each row masked to its own width ("masked": exact, masked units add nothing);
- where each row's K/V goes, and which cache slots each attention group reads.

Every index is computed here from Python lists and packed into one integer buffer, copied to the
device once (pinned and asynchronous on CUDA); masks and rotary tables are derived from it on the
device. So the forward never reads a device value on the host: no synchronisation in the layer
loop, and no tensor built from Python data inside it.

Deliberately does not know: weights, the model math (gemma3n.py), or how tokens are chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from server.vocabulary.compute import FFN_MODES
from server.vocabulary.step import StepSequence
from server.vocabulary.subnets import Subnet
from server.vocabulary.text_config import SLIDING, TextConfig

LAYOUTS = FFN_MODES  # grouped or masked: the way mixed subnets share a step


class Upload:
    """Integer arrays gathered on the host, sent to the device as one tensor."""

    def __init__(self) -> None:
        self._flat: list[int] = []
        self._parts: list[tuple[int, int, tuple[int, ...]]] = []

    def add(self, values: list[int], shape: tuple[int, ...] | None = None) -> int:
        self._parts.append((len(self._flat), len(values), shape or (len(values),)))
        self._flat.extend(values)
        return len(self._parts) - 1

    def send(self, device: torch.device) -> list[torch.Tensor]:
        flat = torch.tensor(self._flat, dtype=torch.long)
        if device.type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        parts = flat.split([n for _, n, _ in self._parts])
        return [
            p if len(shape) == 1 else p.view(shape)
            for p, (_, _, shape) in zip(parts, self._parts, strict=True)
        ]


def rotary(positions: torch.Tensor, theta: float, dim: int, dtype: torch.dtype):
    """cos/sin [N, 1, dim] for neox-style rotary embedding over the full head_dim, computed in
    float32 as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    freqs = positions[:, None].float() * inv_freq.to(positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


@dataclass(frozen=True)
class Segment:
    """Consecutive sequences (and their rows) that share one subnet."""

    subnet: Subnet
    seqs: slice  # sequence indices, in batch order
    rows: slice  # token rows, in batch order


@dataclass
class LayerRows:
    """The rows one layer runs on; layers with the same `key` share them.

    `index`: positions of those rows in the phase's stream tensor (None: all of them).
    `keep`: [R, 1, 1] True where the row's subnet keeps the layer (masked layout; None: all)."""

    key: tuple
    rows: list[int]  # batch row ids (host)
    index: torch.Tensor | None = None
    keep: torch.Tensor | None = None


@dataclass
class FfnPlan:
    """How a layer's FFN runs: one width for every row, per-width row groups, or masked."""

    width: int  # the one width, or the widest
    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (width, rows) grouped
    row_width: torch.Tensor | None = None  # [R, 1, 1] float32 widths, masked
    keep: torch.Tensor | None = None  # [R, 1, width] True inside each row's own width, masked


@dataclass
class AttentionGroup:
    """Sequences whose queries are padded into one attention call."""

    q_index: torch.Tensor | None  # [G, Q] positions (in the layer's rows) of each query; None: 1:1
    scatter: tuple[torch.Tensor, torch.Tensor] | None  # (dest rows, flat source) of valid queries
    slots: list[torch.Tensor]  # per KV-owning layer: [G, K] cache slots read
    mask: torch.Tensor  # [G, 1, rep*Q, K] True where a query may attend a key
    num_seqs: int
    q_len: int


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [N] on the device
    host_ids: torch.Tensor  # [N] on the host (per-layer embeddings are gathered there)
    positions: torch.Tensor  # [N]
    logits_rows: torch.Tensor | None  # [M] rows whose logits are returned; None: every row
    segments: list[Segment]
    order: list[int]  # batch index -> index in the caller's list
    layout: str
    num_rows: int
    # Per layer (None: no sequence keeps it): its rows, its FFN plan, its attention groups
    # (shared by the layers with the same rows and attention kind) and KV write slots.
    rows: list[LayerRows | None] = field(default_factory=list)
    ffn: list[FfnPlan | None] = field(default_factory=list)
    attention: list[list[AttentionGroup] | None] = field(default_factory=list)
    write_slots: list[torch.Tensor | None] = field(default_factory=list)
    rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    reads: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # by model


def build_forward_batch(
    text: TextConfig,
    seqs: Sequence[StepSequence],
    block_size: int,
    scratch_block: int,
    device: torch.device | str = "cpu",
    layout: str = "grouped",
    all_logits: bool = False,
    dtype: torch.dtype = torch.float32,
) -> ForwardBatch:
    """Plan a step. `scratch_block`: the cache block that skipping rows write into (masked
    layout). `all_logits`: logits for every row (a prompt's whole distribution)."""
    if not seqs:
        raise ValueError("a forward batch needs at least one sequence")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    return _Planner(text, seqs, block_size, scratch_block, torch.device(device), layout).plan(
        all_logits, dtype
    )


class _Planner:
    def __init__(self, text, seqs, block_size, scratch_block, device, layout):
        self.text, self.bs, self.scratch, self.device = text, block_size, scratch_block, device
        self.layout = layout
        n_kv = text.first_kv_shared_layer
        first_seen: dict[str, int] = {}
        for s in seqs:
            first_seen.setdefault(s.subnet.name, len(first_seen))
        self.order = sorted(range(len(seqs)), key=lambda i: first_seen[seqs[i].subnet.name])
        self.seqs = [seqs[i] for i in self.order]
        self.ids: list[int] = []
        self.positions: list[int] = []
        self.row_seq: list[int] = []
        self.segments: list[Segment] = []
        seg_start = (0, 0)
        for b, s in enumerate(self.seqs):
            if not s.token_ids:
                raise ValueError("every sequence in a step must process at least one token")
            if len(s.block_table) != n_kv:
                raise ValueError(f"block_table needs {n_kv} per-layer lists")
            self.ids.extend(s.token_ids)
            self.positions.extend(range(s.start, s.start + len(s.token_ids)))
            self.row_seq.extend([b] * len(s.token_ids))
            if b + 1 == len(self.seqs) or self.seqs[b + 1].subnet.name != s.subnet.name:
                self.segments.append(Segment(s.subnet, slice(seg_start[0], b + 1),
                                             slice(seg_start[1], len(self.ids))))  # fmt: skip
                seg_start = (b + 1, len(self.ids))
        self.segment_of_row = [0] * len(self.ids)
        for i, seg in enumerate(self.segments):
            self.segment_of_row[seg.rows] = [i] * (seg.rows.stop - seg.rows.start)
        self.up = Upload()

    # ---- the plan ---------------------------------------------------------------------------

    def plan(self, all_logits: bool, dtype: torch.dtype) -> ForwardBatch:
        t, up = self.text, self.up
        n = len(self.ids)
        if all_logits:
            logits_rows = list(range(n))
        else:
            logits_rows, row = [], 0
            for s in self.seqs:
                row += len(s.token_ids)
                if s.sample:
                    logits_rows.append(row - 1)
        phase_rows = (list(range(n)), logits_rows)
        handles: dict = {"ids": up.add(self.ids), "pos": up.add(self.positions)}
        handles["tables"] = up.add(*self._tables())
        if logits_rows != phase_rows[0]:
            handles["logits"] = up.add(logits_rows)

        rows_of: dict[tuple, tuple[list[int], int | None, int | None]] = {}
        layer_key: list[tuple | None] = []
        ffn_of: dict[tuple, tuple] = {}
        layer_ffn: list[tuple | None] = []
        writes: dict[tuple, list[tuple[int, list[int]]]] = {}  # rows key -> (layer, slots)
        group_of: dict[tuple, list] = {}
        for layer in range(t.num_hidden_layers):
            keep = tuple(seg.subnet.keeps(layer) for seg in self.segments)
            if not any(keep):
                layer_key.append(None)
                layer_ffn.append(None)
                continue
            # KV consumers run on the logits rows (phase 1), unless those are all rows anyway.
            phase = 0 if t.owns_kv(layer) or "logits" not in handles else 1
            if not phase_rows[phase]:  # a prefill chunk that samples nothing stops here
                layer_key.append(None)
                layer_ffn.append(None)
                continue
            key = (phase, keep)
            if key not in rows_of:
                rows_of[key] = self._rows(phase_rows[phase], keep)
            layer_key.append(key)
            rows = rows_of[key][0]
            widths = tuple(seg.subnet.width_of(layer) for seg in self.segments)
            fkey = (key, widths)
            if fkey not in ffn_of:
                ffn_of[fkey] = self._ffn(rows, keep, widths)
            layer_ffn.append(fkey)
            if t.owns_kv(layer):
                writes.setdefault(key, []).append((layer, self._writes(layer, rows, keep)))
            gkey = (key if self.layout == "grouped" else (phase,), t.layer_types[layer])
            if gkey not in group_of:
                group_of[gkey] = self._groups(rows, t.layer_types[layer])
        # K/V write slots: one [layers, rows] array per distinct row set.
        write_handles = {
            key: (
                [layer for layer, _ in v],
                up.add([x for _, s in v for x in s], (len(v), len(v[0][1]))),
            )
            for key, v in writes.items()
        }
        sent = up.send(self.device)

        batch = ForwardBatch(
            input_ids=sent[handles["ids"]],
            host_ids=torch.tensor(self.ids, dtype=torch.long),
            positions=sent[handles["pos"]],
            logits_rows=sent[handles["logits"]] if "logits" in handles else None,
            segments=self.segments,
            order=self.order,
            layout=self.layout,
            num_rows=n,
        )
        rows_built = {k: self._layer_rows(k, v, sent) for k, v in rows_of.items()}
        ffn_built = {k: self._ffn_plan(v, sent) for k, v in ffn_of.items()}
        tables = sent[handles["tables"]]
        groups_built = {
            k: [self._attention_group(g, sent, tables) for g in v] for k, v in group_of.items()
        }
        for layer in range(t.num_hidden_layers):
            key = layer_key[layer]
            batch.rows.append(None if key is None else rows_built[key])
            batch.ffn.append(None if key is None else ffn_built[layer_ffn[layer]])
            if key is None:
                batch.attention.append(None)
            else:
                gkey = (key if self.layout == "grouped" else (key[0],), t.layer_types[layer])
                batch.attention.append(groups_built[gkey])
        batch.write_slots = [None] * t.num_hidden_layers
        for layers, handle in write_handles.values():
            for layer, slots in zip(layers, sent[handle].unbind(0), strict=True):
                batch.write_slots[layer] = slots
        # Rotary tables per (rows, attention kind), from the positions on the device.
        for key, lr in rows_built.items():
            pos = batch.positions
            if key[0] == 1 and batch.logits_rows is not None:
                pos = pos[batch.logits_rows]
            if lr.index is not None:
                pos = pos[lr.index]
            thetas = (("full_attention", t.rope_theta_full), (SLIDING, t.rope_theta_sliding))
            for kind, theta in thetas:
                batch.rope[(key, kind)] = rotary(pos, theta, t.head_dim, dtype)
        return batch

    # ---- per layer, on the host -------------------------------------------------------------

    def _tables(self) -> tuple[list[int], tuple[int, ...]]:
        """Block tables [S, L_kv, max_blocks]; released and missing blocks read the scratch
        block (only ever at masked positions)."""
        n_kv = self.text.first_kv_shared_layer
        width = max(1, max(len(bt) for s in self.seqs for bt in s.block_table))
        flat: list[int] = []
        for s in self.seqs:
            for bt in s.block_table:
                flat.extend(b if b >= 0 else self.scratch for b in bt)
                flat.extend([self.scratch] * (width - len(bt)))
        return flat, (len(self.seqs), n_kv, width)

    def _rows(self, phase_rows: list[int], keep: tuple[bool, ...]):
        """(batch rows of the layer, handle of their index in the phase, handle of keep)."""
        if all(keep):
            return phase_rows, None, None
        if self.layout == "masked":
            flags = [int(keep[self.segment_of_row[r]]) for r in phase_rows]
            return phase_rows, None, self.up.add(flags)
        index = [i for i, r in enumerate(phase_rows) if keep[self.segment_of_row[r]]]
        return [phase_rows[i] for i in index], self.up.add(index), None

    def _ffn(self, rows: list[int], keep: tuple[bool, ...], widths: tuple[int | None, ...]):
        kept = [w for w, k in zip(widths, keep, strict=True) if k]
        distinct = sorted(set(kept))
        if len(distinct) == 1:
            return (distinct[0], [], None)
        if self.layout == "grouped":
            per_row = [widths[self.segment_of_row[r]] for r in rows]
            groups = [
                (w, self.up.add([i for i, x in enumerate(per_row) if x == w])) for w in distinct
            ]
            return (distinct[-1], groups, None)
        top = distinct[-1]  # rows of a skipping subnet compute at the widest; they are restored
        per_row = [widths[self.segment_of_row[r]] or top for r in rows]
        return (top, [], self.up.add(per_row, (len(rows), 1, 1)))

    def _writes(self, layer: int, rows: list[int], keep: tuple[bool, ...]) -> list[int]:
        """Cache slot of each row's K/V in `layer` (the scratch block for skipping rows)."""
        bs, slots = self.bs, []
        for r in rows:
            table = self.seqs[self.row_seq[r]].block_table[layer]
            pos = self.positions[r]
            block = table[pos // bs] if keep[self.segment_of_row[r]] else self.scratch
            slots.append(block * bs + pos % bs)
        return slots

    def _groups(self, rows: list[int], kind: str) -> list[dict]:
        """Sequences with one query row (decodes, last-token logits) share one padded call; a
        sequence with several rows (a prefill chunk) gets its own, with a causal mask. Sliding
        layers read only keys inside the window of their earliest query."""
        by_seq: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_seq.setdefault(self.row_seq[r], []).append(i)
        singles = [s for s, idx in by_seq.items() if len(idx) == 1]
        out = []
        if singles:
            out.append(self._group([by_seq[s] for s in singles], singles, rows, kind))
        out.extend(self._group([idx], [s], rows, kind) for s, idx in by_seq.items() if len(idx) > 1)
        return out

    def _group(self, q_rows: list[list[int]], seqs: list[int], rows: list[int], kind: str) -> dict:
        t, up = self.text, self.up
        window = t.sliding_window if kind == SLIDING else None
        q_len = max(len(r) for r in q_rows)
        lows, highs, q_pos, q_index, flat_src, dest = [], [], [], [], [], []
        for g, r in enumerate(q_rows):
            first, last = self.positions[rows[r[0]]], self.positions[rows[r[-1]]]
            lows.append(0 if window is None else max(0, first - window + 1))
            highs.append(last + 1)
            padded = r + [r[0]] * (q_len - len(r))
            q_index.extend(padded)
            q_pos.extend(self.positions[rows[i]] for i in padded)
            flat_src.extend(g * q_len + j for j in range(len(r)))
            dest.extend(r)
        k_len = max(h - lo for lo, h in zip(lows, highs, strict=True))
        identity = q_len == 1 and dest == list(range(len(rows)))
        g = len(q_rows)
        return {
            "q_index": None if identity else up.add(q_index, (g, q_len)),
            "scatter": None if identity else (up.add(dest), up.add(flat_src)),
            "seqs": up.add(seqs),
            "q_pos": up.add(q_pos, (g, q_len)),
            "low": up.add(lows, (g, 1)),
            "high": up.add(highs, (g, 1)),
            "valid": up.add([int(j < len(r)) for r in q_rows for j in range(q_len)], (g, q_len)),
            "window": window,
            "q_len": q_len,
            "k_len": k_len,
        }

    # ---- on the device, from the one upload ---------------------------------------------------

    @staticmethod
    def _layer_rows(key, planned, sent) -> LayerRows:
        rows, index, keep = planned
        return LayerRows(
            key,
            rows,
            None if index is None else sent[index],
            None if keep is None else sent[keep].bool()[:, None, None],
        )

    def _ffn_plan(self, planned, sent) -> FfnPlan:
        width, groups, row_width = planned
        plan = FfnPlan(width, [(w, sent[h]) for w, h in groups])
        if row_width is not None:
            plan.row_width = sent[row_width].float()
            plan.keep = torch.arange(width, device=self.device) < plan.row_width
        return plan

    def _attention_group(self, g: dict, sent, tables: torch.Tensor) -> AttentionGroup:
        """Key positions, the cache slots of every KV-owning layer, and the mask, on the device
        (from the uploaded integers: nothing is read back)."""
        t, bs = self.text, self.bs
        k = torch.arange(g["k_len"], device=self.device)
        key_pos = sent[g["low"]] + k  # [G, K]
        high = sent[g["high"]]
        read_pos = torch.minimum(key_pos, high - 1)  # padding re-reads the last key (masked)
        seq_tables = tables[sent[g["seqs"]]]  # [G, L_kv, max_blocks]
        blocks = torch.gather(
            seq_tables, 2, (read_pos // bs)[:, None, :].expand(-1, seq_tables.shape[1], -1)
        )
        slots = (blocks * bs + (read_pos % bs)[:, None, :]).transpose(0, 1)  # [L_kv, G, K]
        q_pos, valid = sent[g["q_pos"]][:, :, None], sent[g["valid"]].bool()[:, :, None]
        mask = key_pos[:, None, :] <= q_pos  # [G, Q, K]
        if g["window"] is not None:
            mask &= key_pos[:, None, :] > q_pos - g["window"]
        # Padded query slots attend key 0, so softmax never sees an all-masked row.
        mask |= ~valid & (k == 0)
        rep = t.num_attention_heads // t.num_key_value_heads
        num_seqs, q_len = mask.shape[0], g["q_len"]
        mask = mask[:, None, None].expand(num_seqs, 1, rep, q_len, g["k_len"])
        scatter = None
        if g["scatter"] is not None:
            scatter = (sent[g["scatter"][0]], sent[g["scatter"][1]])
        return AttentionGroup(
            q_index=None if g["q_index"] is None else sent[g["q_index"]],
            scatter=scatter,
            slots=list(slots.unbind(0)),
            mask=mask.reshape(num_seqs, 1, rep * q_len, g["k_len"]),
            num_seqs=num_seqs,
            q_len=q_len,
        )
