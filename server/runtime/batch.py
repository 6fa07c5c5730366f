"""A forward batch: everything one forward pass over many sequences of many subnets needs, planned
on the host and sent to the device in one transfer.

Owns the step's layout, in two halves:

- the plan (host, plain Python): sequences (`StepSequence`, server/vocabulary/step.py) are
  reordered so that each subnet's sequences form one contiguous segment; then, per layer, which
  rows run it, how its FFN runs over their widths, where each row's K/V goes and which cache
  slots each attention group reads. Every index is computed here from Python lists into one
  integer buffer; the `StepSpec` says how to cut it and holds every other (Python) constant;
- the batch (device): the buffer is copied once (pinned and asynchronous on CUDA), cut into its
  parts, and masks and rotary tables are derived from them with tensor ops only. So neither the
  plan nor the forward ever reads a device value on the host (no synchronisation), and nothing
  inside the forward creates a tensor from Python data.

Which rows run a layer. Layers from `first_kv_shared_layer` on write no KV, so a prefill's rows
stop before them except those whose logits are wanted (prefill early exit). A subnet that skips
a layer leaves its rows untouched there, in one of two layouts:
- "grouped": the layer runs on the kept rows only (an index); its FFN runs one GEMM per width;
- "masked": the layer runs on every row and a per-row keep mask restores the skipping rows (a
  skipped layer is the identity on the four streams; their K/V go to the cache's scratch block);
  the FFN runs once at the widest width with each row masked to its own (exact).

A static step (`StaticShape`: decode steps only) has a shape that depends on buckets alone, not
on the batch's subnet mix: padded to a bucket of rows, every layer over every row with a keep
mask, every FFN at the resident width with width masks, one attention group per kind reading up
to a bucket of keys through the block tables: gathered into a [rows, context] copy (`_group`),
or, in a paged step, read where the cache holds them (`_paged`: a FlexAttention block mask per
KV-owning layer; nothing is copied). Its spec is the same for every step of that shape, so the
device half and the forward can be captured once (server/runtime/decode_graph.py) and serve
every mix.

Deliberately does not know: weights, the model math (gemma3n.py), or how tokens are chosen.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from server.vocabulary.compute import FFN_MODES
from server.vocabulary.step import StepSequence
from server.vocabulary.subnets import Subnet
from server.vocabulary.text_config import SLIDING, TextConfig

LAYOUTS = FFN_MODES  # grouped or masked: the way mixed subnets share a step
KINDS = ("full_attention", SLIDING)


# ---- the batch the forward reads -----------------------------------------------------------------


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
    positions_key: tuple  # its rows' rotary tables: `ForwardBatch.rope[(positions_key, kind)]`
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
    """Sequences whose queries are padded into one attention call: over K/V gathered from the
    cache (`slots`, `mask`), or, in a static decode step, read where the cache holds them
    (`paged`)."""

    key: tuple  # what identifies it within the step (its K/V reads are shared by this key)
    q_index: torch.Tensor | None  # [G, Q] positions (in the layer's rows) of each query; None: 1:1
    scatter: tuple[torch.Tensor, torch.Tensor] | None  # (dest rows, flat source) of valid queries
    slots: list[torch.Tensor] | None  # per KV-owning layer: [G, K] cache slots read
    mask: torch.Tensor | None  # [G, 1, rep*Q, K] True where a query may attend a key
    num_seqs: int
    q_len: int
    # Per KV-owning layer of the group's kind: the cache blocks each sequence reads, and which
    # of their slots it attends (one query per sequence); see `_paged`.
    paged: dict[int, BlockMask] | None = None


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [N] on the device
    positions: torch.Tensor  # [N]
    logits_rows: torch.Tensor | None  # [M] rows whose logits are returned; None: every row
    # Per layer (None: no row runs it): its rows, its FFN plan, its attention groups (shared by
    # the layers with the same rows and attention kind) and KV write slots.
    rows: list[LayerRows | None] = field(default_factory=list)
    ffn: list[FfnPlan | None] = field(default_factory=list)
    attention: list[list[AttentionGroup] | None] = field(default_factory=list)
    write_slots: list[torch.Tensor | None] = field(default_factory=list)
    rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    ple_rows: torch.Tensor | None = None  # [N, L*d] per-layer embedding rows, on the device
    reads: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # model's


@dataclass
class PlannedStep:
    """A plan with its data: the batch order, the host ids, and the integer buffer."""

    spec: StepSpec
    values: list[int]
    host_ids: list[int]  # [N] (the per-layer embedding rows are gathered on the host)
    order: list[int]  # batch index -> index in the caller's list
    segments: list[Segment]
    num_real_rows: int  # rows before a static step's padding


# ---- the spec: how to cut the buffer, and every Python constant ----------------------------------


@dataclass(frozen=True)
class GroupSpec:
    key: tuple
    q_index: int | None
    scatter: tuple[int, int] | None
    seqs: int
    q_pos: int
    low: int
    high: int
    valid: int
    window: int | None
    q_len: int
    k_len: int
    num_seqs: int


@dataclass(frozen=True)
class StepSpec:
    block_size: int
    shapes: tuple[tuple[int, ...], ...]  # the buffer's parts, in order
    ids: int
    pos: int
    tables: int
    logits: int | None
    layer_rows: tuple[tuple | None, ...]  # per layer: its rows key (None: skipped by all)
    # (key, positions key, index part, keep part)
    rows: tuple[tuple[tuple, tuple, int | None, int | None], ...]
    layer_ffn: tuple[tuple | None, ...]
    ffn: tuple[tuple[tuple, int, tuple[tuple[int, int], ...], int | None], ...]
    layer_groups: tuple[tuple | None, ...]
    groups: tuple[tuple[tuple, tuple[GroupSpec, ...]], ...]
    writes: tuple[tuple[tuple[int, ...], int], ...]  # (layers, part [layers, rows])
    rope: tuple[tuple[tuple, int | None, int | None], ...]  # (positions key, phase rows, index)
    # Part [cache blocks]: each block's index in the block table of the sequences that hold it.
    # Set in a paged static step only, whose groups read the cache in place (see `_paged`).
    block_index: int | None = None


@dataclass(frozen=True)
class StaticShape:
    """A decode step's bucketed shape: rows, keys read by full-attention layers, the resident
    FFN width of every layer (the masks' widths), and how attention reads K/V: gathered through
    the block tables into [rows, context] (`_group`), or `paged`, where the cache holds them
    (`_paged`)."""

    num_rows: int
    context: int
    widths: tuple[int, ...]
    paged: bool = False


# ---- building ------------------------------------------------------------------------------------


def plan_step(
    text: TextConfig,
    seqs: Sequence[StepSequence],
    block_size: int,
    scratch_block: int,
    layout: str = "grouped",
    all_logits: bool = False,
    static: StaticShape | None = None,
    per_query_attention: bool = False,
    every_row_of: frozenset[int] = frozenset(),
) -> PlannedStep:
    """`per_query_attention`: every query row is its own attention group, reading exactly the
    keys it attends (no padding to another row's context): the batch-invariant mode's plan.
    `every_row_of`: sequences (indices into `seqs`) whose every row gets logits (a prompt's
    logprobs), in row order; the others get one row of logits if they sample."""
    if not seqs:
        raise ValueError("a forward batch needs at least one sequence")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if per_query_attention and static is not None:
        raise ValueError("a static step pads its attention: it cannot be planned per query")
    planner = _Planner(text, seqs, block_size, scratch_block, layout, per_query_attention)
    if static is not None:
        if every_row_of:
            raise ValueError("a static step is a decode step: it has no prompt rows")
        return planner.plan_static(static)
    return planner.plan(all_logits, every_row_of)


def upload(values: list[int], device: torch.device) -> torch.Tensor:
    """The step's integers on the device: one copy (pinned and asynchronous on CUDA)."""
    flat = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    return flat


def rotary(positions: torch.Tensor, theta: float, dim: int, dtype: torch.dtype):
    """cos/sin [N, 1, dim] for neox-style rotary embedding over the full head_dim, computed in
    float32 as transformers does."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float, device=positions.device) / dim
    freqs = positions[:, None].float() / (theta**exponents)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def materialize(
    spec: StepSpec, flat: torch.Tensor, text: TextConfig, dtype: torch.dtype
) -> ForwardBatch:
    """The device half: cut the uploaded integers and derive masks and rotary tables from them,
    with tensor ops only (nothing read back, nothing made from Python data)."""
    parts = flat.split([_numel(s) for s in spec.shapes])
    sent = [p if len(s) == 1 else p.view(s) for p, s in zip(parts, spec.shapes, strict=True)]
    device = flat.device
    batch = ForwardBatch(
        input_ids=sent[spec.ids],
        positions=sent[spec.pos],
        logits_rows=None if spec.logits is None else sent[spec.logits],
    )
    rows = {
        key: LayerRows(
            key,
            positions_key,
            None if index is None else sent[index],
            None if keep is None else sent[keep].bool()[:, None, None],
        )
        for key, positions_key, index, keep in spec.rows
    }
    ffn = {}
    for key, width, groups, row_width in spec.ffn:
        plan = FfnPlan(width, [(w, sent[part]) for w, part in groups])
        if row_width is not None:
            plan.row_width = sent[row_width].float()
            plan.keep = torch.arange(width, device=device) < plan.row_width
        ffn[key] = plan
    tables = sent[spec.tables]  # [S, L_kv, max_blocks]
    if spec.block_index is None:
        groups = {
            key: [_group(g, sent, tables, text, spec.block_size) for g in gs]
            for key, gs in spec.groups
        }
    else:
        block_index = sent[spec.block_index]
        groups = {
            key: [_paged(g, sent, tables, block_index, text, spec.block_size) for g in gs]
            for key, gs in spec.groups
        }
    for layer in range(text.num_hidden_layers):
        key = spec.layer_rows[layer]
        batch.rows.append(None if key is None else rows[key])
        batch.ffn.append(None if key is None else ffn[spec.layer_ffn[layer]])
        gkey = spec.layer_groups[layer]
        batch.attention.append(None if gkey is None else groups[gkey])
    batch.write_slots = [None] * text.num_hidden_layers
    for layers, part in spec.writes:
        for layer, slots in zip(layers, sent[part].unbind(0), strict=True):
            batch.write_slots[layer] = slots
    thetas = {"full_attention": text.rope_theta_full, SLIDING: text.rope_theta_sliding}
    for key, phase_rows, index in spec.rope:
        pos = batch.positions if phase_rows is None else batch.positions[sent[phase_rows]]
        if index is not None:
            pos = pos[sent[index]]
        for kind in KINDS:
            batch.rope[(key, kind)] = rotary(pos, thetas[kind], text.head_dim, dtype)
    return batch


def _group(
    g: GroupSpec, sent: list[torch.Tensor], tables: torch.Tensor, text: TextConfig, bs: int
) -> AttentionGroup:
    """Key positions, the cache slots of every KV-owning layer, and the mask."""
    k = torch.arange(g.k_len, device=tables.device)
    key_pos = sent[g.low] + k  # [G, K]
    read_pos = torch.minimum(key_pos, sent[g.high] - 1)  # padding re-reads the last key (masked)
    seq_tables = tables if g.seqs < 0 else tables[sent[g.seqs]]  # [G, L_kv, max_blocks]
    blocks = torch.gather(
        seq_tables, 2, (read_pos // bs)[:, None, :].expand(-1, seq_tables.shape[1], -1)
    )
    slots = (blocks * bs + (read_pos % bs)[:, None, :]).transpose(0, 1)  # [L_kv, G, K]
    q_pos = sent[g.q_pos].view(g.num_seqs, g.q_len, 1)
    mask = key_pos[:, None, :] <= q_pos  # [G, Q, K]
    if g.window is not None:
        mask &= key_pos[:, None, :] > q_pos - g.window
    if g.valid >= 0:  # padded query slots attend key 0, so softmax never sees an all-masked row
        mask |= (sent[g.valid].view(g.num_seqs, g.q_len, 1) == 0) & (k == 0)
    rep = text.num_attention_heads // text.num_key_value_heads
    mask = mask[:, None, None].expand(g.num_seqs, 1, rep, g.q_len, g.k_len)
    return AttentionGroup(
        key=g.key,
        q_index=None if g.q_index is None else sent[g.q_index],
        scatter=None if g.scatter is None else (sent[g.scatter[0]], sent[g.scatter[1]]),
        slots=list(slots.unbind(0)),
        mask=mask.reshape(g.num_seqs, 1, rep * g.q_len, g.k_len),
        num_seqs=g.num_seqs,
        q_len=g.q_len,
    )


def _paged(
    g: GroupSpec,
    sent: list[torch.Tensor],
    tables: torch.Tensor,
    block_index: torch.Tensor,
    text: TextConfig,
    bs: int,
) -> AttentionGroup:
    """A group of one query per sequence that reads K/V where the cache holds them: per
    KV-owning layer of the group's kind, a FlexAttention block mask listing the cache blocks
    each sequence attends (the blocks of its block table from its first key's to its
    query's), so no K/V is copied.

    The blocks between the first and the last are attended whole; in the first and the last,
    `mask_mod` keeps the slots whose positions lie in [low, query]. `mask_mod` says the whole
    truth for any slot of the pool (the compiled kernel visits the listed blocks only; run
    eagerly, FlexAttention applies `mask_mod` to every slot): slot s of block b is the row's
    when the row's table holds b at b's index (`block_index`: a block sits at the same index in
    every table that holds it, prefix-cached blocks included) and its position is in range.
    Everything `mask_mod` reads is a view of the step's uploaded integers: the CPU kernel of
    torch 2.13 reads a tensor computed inside the graph wrongly or not at all."""
    low, pos = sent[g.low][:, 0], sent[g.q_pos]  # [G]
    first, last = low // bs, pos // bs  # the table indices of the first and last block read
    width, pool = tables.shape[2], block_index.shape[0]
    inner = (first[:, None] + 1 + torch.arange(width, device=tables.device)).clamp(max=width - 1)
    inner_count = (last - first - 1).clamp(min=0)
    ends = torch.stack([first, last], dim=1)
    end_count = torch.where(first == last, 1, 2)

    def listed(count: torch.Tensor, blocks: torch.Tensor):
        # The kernel checks that the lists could name every block of the pool.
        padded = F.pad(blocks.to(torch.int32), (0, pool - blocks.shape[1]))
        return count.to(torch.int32).view(-1, 1, 1), padded.view(g.num_seqs, 1, 1, pool)

    kind = SLIDING if g.window is not None else "full_attention"
    masks = {}
    for layer, table in enumerate(tables.unbind(1)):  # [G, width]: one KV-owning layer's blocks
        if text.layer_types[layer] != kind:
            continue

        def mask_mod(b, h, q_idx, kv_idx, table=table):
            block = kv_idx // bs
            index = block_index[block]
            position = index * bs + kv_idx % bs
            return (table[b, index] == block) & (position >= low[b]) & (position <= pos[b])

        masks[layer] = BlockMask.from_kv_blocks(
            *listed(end_count, table.gather(1, ends)),
            *listed(inner_count, table.gather(1, inner)),
            BLOCK_SIZE=(1, bs),
            mask_mod=mask_mod,
            seq_lengths=(1, pool * bs),
            compute_q_blocks=False,  # forward only
        )
    return AttentionGroup(
        key=g.key,
        q_index=None,
        scatter=None,
        slots=None,
        mask=None,
        num_seqs=g.num_seqs,
        q_len=1,
        paged=masks,
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---- the plan, on the host -----------------------------------------------------------------------


class _Values:
    """The integer buffer being written, and the shapes of its parts."""

    def __init__(self) -> None:
        self.flat: list[int] = []
        self.shapes: list[tuple[int, ...]] = []

    def add(self, values: list[int], shape: tuple[int, ...] | None = None) -> int:
        self.flat.extend(values)
        self.shapes.append(shape or (len(values),))
        return len(self.shapes) - 1

    def add_parts(self, values: Sequence[int], shapes: Sequence[tuple[int, ...]]) -> list[int]:
        """Consecutive parts at once: `values` is theirs, one after another."""
        first = len(self.shapes)
        self.flat.extend(values)
        self.shapes.extend(shapes)
        return list(range(first, len(self.shapes)))


class _Planner:
    def __init__(self, text, seqs, block_size, scratch_block, layout, per_query=False):
        self.text, self.bs, self.scratch, self.layout = text, block_size, scratch_block, layout
        self.per_query = per_query
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
                rows = slice(seg_start[1], len(self.ids))
                self.segments.append(Segment(s.subnet, slice(seg_start[0], b + 1), rows))
                seg_start = (b + 1, len(self.ids))
        self.segment_of_row = [0] * len(self.ids)
        for i, seg in enumerate(self.segments):
            self.segment_of_row[seg.rows] = [i] * (seg.rows.stop - seg.rows.start)
        self.v = _Values()

    def planned(self, spec_fields: dict, num_real_rows: int) -> PlannedStep:
        spec = StepSpec(block_size=self.bs, shapes=tuple(self.v.shapes), **spec_fields)
        return PlannedStep(spec, self.v.flat, self.ids, self.order, self.segments, num_real_rows)

    # ---- any step -----------------------------------------------------------------------------

    def plan(self, all_logits: bool, every_row_of: frozenset[int] = frozenset()) -> PlannedStep:
        t, v = self.text, self.v
        n = len(self.ids)
        if all_logits:
            logits_rows = list(range(n))
        else:
            logits_rows, row = [], 0
            for b, s in enumerate(self.seqs):
                if self.order[b] in every_row_of:
                    logits_rows.extend(range(row, row + len(s.token_ids)))
                elif s.sample:
                    logits_rows.append(row + len(s.token_ids) - 1)
                row += len(s.token_ids)
        every_row = logits_rows == list(range(n))
        phase_rows = (list(range(n)), logits_rows)
        ids, pos = v.add(self.ids), v.add(self.positions)
        tables = v.add(*self._tables(len(self.seqs)))
        logits = None if every_row else v.add(logits_rows)

        rows_of: dict[tuple, tuple[list[int], int | None, int | None]] = {}
        ffn_of: dict[tuple, tuple] = {}
        group_of: dict[tuple, list[GroupSpec]] = {}
        writes: dict[tuple, list[tuple[int, list[int]]]] = {}  # rows key -> (layer, slots)
        layer_rows: list[tuple | None] = []
        layer_ffn: list[tuple | None] = []
        layer_groups: list[tuple | None] = []
        for layer in range(t.num_hidden_layers):
            keep = tuple(seg.subnet.keeps(layer) for seg in self.segments)
            # KV consumers run on the logits rows (phase 1), unless those are all rows anyway.
            phase = 0 if t.owns_kv(layer) or every_row else 1
            if not any(keep) or not phase_rows[phase]:
                # Skipped by every subnet, or a prefill chunk that samples nothing ends here.
                layer_rows.append(None)
                layer_ffn.append(None)
                layer_groups.append(None)
                continue
            key = (phase, keep)
            if key not in rows_of:
                rows_of[key] = self._rows(phase_rows[phase], keep)
            rows = rows_of[key][0]
            widths = tuple(seg.subnet.width_of(layer) for seg in self.segments)
            fkey = (key, widths)
            if fkey not in ffn_of:
                ffn_of[fkey] = self._ffn(rows, keep, widths)
            if t.owns_kv(layer):
                writes.setdefault(key, []).append((layer, self._writes(layer, rows, keep)))
            kind = t.layer_types[layer]
            gkey = (key if self.layout == "grouped" else (phase,), kind)
            if gkey not in group_of:
                group_of[gkey] = self._groups(gkey, rows, kind)
            layer_rows.append(key)
            layer_ffn.append(fkey)
            layer_groups.append(gkey)
        rope = {}
        for key, (_, index, _) in rows_of.items():
            phase_part = None if key[0] == 0 or every_row else logits
            rope[_positions_key(key, index)] = (phase_part, index)
        spec_fields = {
            "ids": ids,
            "pos": pos,
            "tables": tables,
            "logits": logits,
            "layer_rows": tuple(layer_rows),
            "rows": tuple(
                (k, _positions_key(k, index), index, keep)
                for k, (_, index, keep) in rows_of.items()
            ),
            "layer_ffn": tuple(layer_ffn),
            "ffn": tuple((k, *spec) for k, spec in ffn_of.items()),
            "layer_groups": tuple(layer_groups),
            "groups": tuple((k, tuple(g)) for k, g in group_of.items()),
            "writes": tuple(
                (
                    tuple(layer for layer, _ in w),
                    v.add([x for _, s in w for x in s], (len(w), len(w[0][1]))),
                )
                for w in writes.values()
            ),
            "rope": tuple((k, phase, index) for k, (phase, index) in rope.items()),
        }
        return self.planned(spec_fields, n)

    def _tables(self, num_seqs: int, width: int | None = None) -> tuple[list[int], tuple]:
        """Block tables [S, L_kv, max_blocks]; released and missing blocks read the scratch
        block (only ever at masked positions). Rows past the real sequences (padding) are all
        scratch."""
        n_kv = self.text.first_kv_shared_layer
        if width is None:
            width = max(1, max(len(bt) for s in self.seqs for bt in s.block_table))
        flat: list[int] = []
        for s in self.seqs:
            for bt in s.block_table:
                flat.extend(b if b >= 0 else self.scratch for b in bt[:width])
                flat.extend([self.scratch] * (width - min(width, len(bt))))
        flat.extend([self.scratch] * ((num_seqs - len(self.seqs)) * n_kv * width))
        return flat, (num_seqs, n_kv, width)

    def _rows(self, phase_rows: list[int], keep: tuple[bool, ...]):
        """(rows of the layer, part of their index in the phase, part of keep flags)."""
        if all(keep):
            return phase_rows, None, None
        if self.layout == "masked":
            flags = [int(keep[self.segment_of_row[r]]) for r in phase_rows]
            return phase_rows, None, self.v.add(flags)
        index = [i for i, r in enumerate(phase_rows) if keep[self.segment_of_row[r]]]
        return [phase_rows[i] for i in index], self.v.add(index), None

    def _ffn(self, rows: list[int], keep: tuple[bool, ...], widths: tuple[int | None, ...]):
        kept = [w for w, k in zip(widths, keep, strict=True) if k]
        distinct = sorted(set(kept))
        if len(distinct) == 1:
            return (distinct[0], (), None)
        if self.layout == "grouped":
            per_row = [widths[self.segment_of_row[r]] for r in rows]
            return (
                distinct[-1],
                tuple(
                    (w, self.v.add([i for i, x in enumerate(per_row) if x == w])) for w in distinct
                ),
                None,
            )
        top = distinct[-1]  # rows of a skipping subnet compute at the widest; they are restored
        per_row = [widths[self.segment_of_row[r]] or top for r in rows]
        return (top, (), self.v.add(per_row, (len(rows), 1, 1)))

    def _writes(self, layer: int, rows: list[int], keep: tuple[bool, ...]) -> list[int]:
        """Cache slot of each row's K/V in `layer` (the scratch block for skipping rows)."""
        bs, slots = self.bs, []
        for r in rows:
            table = self.seqs[self.row_seq[r]].block_table[layer]
            pos = self.positions[r]
            block = table[pos // bs] if keep[self.segment_of_row[r]] else self.scratch
            slots.append(block * bs + pos % bs)
        return slots

    def _groups(self, key: tuple, rows: list[int], kind: str) -> list[GroupSpec]:
        """Sequences with one query row (decodes, last-token logits) share one padded call; a
        sequence with several rows (a prefill chunk) gets its own, with a causal mask. Sliding
        layers read only keys inside the window of their earliest query."""
        if self.per_query:  # each query alone: its reduction is over its own keys only
            return [
                self._group((*key, i), [[i]], [self.row_seq[r]], rows, kind)
                for i, r in enumerate(rows)
            ]
        by_seq: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_seq.setdefault(self.row_seq[r], []).append(i)
        singles = [s for s, idx in by_seq.items() if len(idx) == 1]
        out = []
        if singles:
            out.append(self._group((*key, 0), [by_seq[s] for s in singles], singles, rows, kind))
        for s, idx in by_seq.items():
            if len(idx) > 1:
                out.append(self._group((*key, len(out)), [idx], [s], rows, kind))
        return out

    def _group(self, key, q_rows: list[list[int]], seqs: list[int], rows: list[int], kind):
        v = self.v
        window = self.text.sliding_window if kind == SLIDING else None
        q_len = max(len(r) for r in q_rows)
        lows, highs, q_pos, q_index, flat_src, dest, valid = [], [], [], [], [], [], []
        for g, r in enumerate(q_rows):
            first, last = self.positions[rows[r[0]]], self.positions[rows[r[-1]]]
            lows.append(0 if window is None else max(0, first - window + 1))
            highs.append(last + 1)
            padded = r + [r[0]] * (q_len - len(r))
            q_index.extend(padded)
            q_pos.extend(self.positions[rows[i]] for i in padded)
            valid.extend(int(j < len(r)) for j in range(q_len))
            flat_src.extend(g * q_len + j for j in range(len(r)))
            dest.extend(r)
        k_len = max(h - lo for lo, h in zip(lows, highs, strict=True))
        identity = q_len == 1 and dest == list(range(len(rows)))
        g = len(q_rows)
        return GroupSpec(
            key=key,
            q_index=None if identity else v.add(q_index, (g, q_len)),
            scatter=None if identity else (v.add(dest), v.add(flat_src)),
            seqs=v.add(seqs),
            q_pos=v.add(q_pos),
            low=v.add(lows, (g, 1)),
            high=v.add(highs, (g, 1)),
            valid=-1 if all(valid) else v.add(valid),
            window=window,
            q_len=q_len,
            k_len=k_len,
            num_seqs=g,
        )

    # ---- a static decode step -----------------------------------------------------------------

    def plan_static(self, shape: StaticShape) -> PlannedStep:
        """Every sequence decodes one token; rows padded to `shape.num_rows` (id 0, position 0,
        kept by no layer, writing to the scratch block); everything shaped by `shape` alone."""
        t, v, bs = self.text, self.v, self.bs
        n, rows = len(self.ids), shape.num_rows
        if any(len(s.token_ids) != 1 or not s.sample for s in self.seqs):
            raise ValueError("a static step is a decode step: one token per sequence, sampled")
        if n > rows or max(self.positions) >= shape.context:
            raise ValueError(f"{n} rows up to position {max(self.positions)} exceed {shape}")
        pad = rows - n
        self.ids += [0] * pad
        positions = self.positions + [0] * pad
        subnets = [self.seqs[r].subnet for r in range(n)]
        ids, pos = v.add(self.ids), v.add(positions)
        width = shape.context // bs
        tables = v.add(*self._tables(rows, width))
        block_index = None
        if shape.paged:
            block_index = [0] * (self.scratch + 1)  # every block of the pool, the scratch one too
            for s in self.seqs:
                for table in s.block_table:
                    for i, block in enumerate(table[:width]):
                        if block >= 0:
                            block_index[block] = i
        every = tuple(range(t.num_hidden_layers))
        keep, widths = _static_layer_flags(tuple(subnets), pad, shape.widths)
        keep_parts = v.add_parts(keep, [(rows,)] * len(every))
        width_parts = v.add_parts(widths, [(rows, 1, 1)] * len(every))
        slots = []
        n_kv = t.first_kv_shared_layer
        for layer in range(n_kv):
            for r in range(n):
                s, p = self.seqs[r], positions[r]
                block = s.block_table[layer][p // bs] if s.subnet.keeps(layer) else self.scratch
                slots.append(block * bs + p % bs)
            slots.extend([self.scratch * bs] * pad)
        writes = ((tuple(range(n_kv)), v.add(slots, (n_kv, rows))),)
        groups = []
        for kind in KINDS:
            window = t.sliding_window if kind == SLIDING else None
            k_len = shape.context if window is None else min(window, shape.context)
            lows = [0 if window is None else max(0, p - window + 1) for p in positions]
            groups.append(
                (
                    (kind,),
                    (
                        GroupSpec(
                            key=(kind,),
                            q_index=None,
                            scatter=None,
                            seqs=-1,
                            q_pos=pos,
                            low=v.add(lows, (rows, 1)),
                            high=v.add([p + 1 for p in positions], (rows, 1)),
                            valid=-1,
                            window=window,
                            q_len=1,
                            k_len=k_len,
                            num_seqs=rows,
                        ),
                    ),
                )
            )
        key = ("static",)
        spec_fields = {
            "ids": ids,
            "pos": pos,
            "tables": tables,
            "logits": None,
            "layer_rows": tuple((key, layer) for layer in every),
            "rows": tuple(((key, layer), key, None, keep_parts[layer]) for layer in every),
            "layer_ffn": tuple((key, layer) for layer in every),
            "ffn": tuple(
                ((key, layer), shape.widths[layer], (), width_parts[layer]) for layer in every
            ),
            "layer_groups": tuple((t.layer_types[layer],) for layer in every),
            "groups": tuple(groups),
            "writes": writes,
            "rope": ((key, None, None),),
            "block_index": None if block_index is None else v.add(block_index),
        }
        return self.planned(spec_fields, n)


def _positions_key(rows_key: tuple, index: int | None) -> tuple:
    """Rows with the same positions share rotary tables: all of a phase's rows (index None), or
    exactly the rows of `rows_key`."""
    return rows_key[:1] if index is None else rows_key


@functools.lru_cache(maxsize=256)
def _static_layer_flags(
    subnets: tuple[Subnet, ...], pad: int, resident: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A static step's per-layer row flags, layer after layer: whether each row keeps the layer
    (pad rows: no), and each row's FFN width there (a skipped layer's and pad rows': the resident
    width). They depend on the batch's subnets alone, which stay the same from one decode step
    to the next until a request joins or leaves: computed once for them (35 layers x rows
    Python-level lookups a step otherwise)."""
    keep: list[int] = []
    widths: list[int] = []
    for layer, resident_width in enumerate(resident):
        keep.extend([int(s.keeps(layer)) for s in subnets] + [0] * pad)
        widths.extend([s.width_of(layer) or resident_width for s in subnets])
        widths.extend([resident_width] * pad)
    return tuple(keep), tuple(widths)
