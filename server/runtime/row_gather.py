"""Reading and writing a few columns of some rows of a [B, V] tensor without touching the rest.

Owns three helpers for the sampler's vocabulary-sized tensors. `x[rows[:, None], ids]` (aten::index
and index_put) is the obvious way, but on a CPU it costs milliseconds at a 262144-id vocabulary
even for a few thousand elements (and it copies a non-contiguous `x`, such as logits sliced to the
text vocabulary, whole). `gather`/`scatter_` along dim 1 index within each row and cost what they
touch, but need an index for every row: rows not asked for get column 0, which they read (and
write back unchanged). Whole blocks of columns are copied by `index_select` over a view of the
rows as one table of blocks.

Deliberately does not know: what the tensors hold.
"""

from __future__ import annotations

import torch


def _full_index(x: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    full = torch.zeros(x.shape[0], ids.shape[1], dtype=torch.long, device=x.device)
    return full.index_copy_(0, rows, ids)


def gather_rows(x: torch.Tensor, rows: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """x[rows[i], ids[i, j]] as [R, n]; `rows` are distinct row numbers of x (None: every row,
    in order)."""
    if rows is None:
        return x.gather(1, ids)
    return x.gather(1, _full_index(x, rows, ids)).index_select(0, rows)


def scatter_rows_(
    x: torch.Tensor, rows: torch.Tensor | None, ids: torch.Tensor, values: torch.Tensor
) -> None:
    """x[rows[i], ids[i, j]] = values[i, j], in place (`rows` None: every row, in order).
    Repeated ids within a row must carry the same value (scatter_ leaves the order of colliding
    writes unspecified)."""
    if rows is None:
        x.scatter_(1, ids, values.to(x.dtype))
        return
    full = _full_index(x, rows, ids)
    current = x.gather(1, full)  # rows not asked for write their column 0 back as it is
    x.scatter_(1, full, current.index_copy_(0, rows, values.to(x.dtype)))


def gather_blocks(
    x: torch.Tensor, rows: torch.Tensor | None, blocks: torch.Tensor, size: int
) -> torch.Tensor:
    """x[rows[i], blocks[i, j] * size + t] as [R, n, size]: whole blocks of `size` contiguous
    columns (`rows` None: every row, in order). x's last dimension must be contiguous and a
    multiple of `size`.

    On a CPU, where x's rows start on a block boundary of its storage (every [B, V] tensor the
    sampler holds, and the model's logits sliced to the text vocabulary: 262,400 = 4,100 x 64),
    x is viewed as one [blocks, size] table and the blocks are taken by `index_select`, each one
    contiguous copy: indexing a [B, V / size, size] view (aten::index, with its per-element
    offsets) costs more there from about 8 rows up, several times more from 32, and a
    per-element gather more still. Elsewhere that indexing is one kernel launch, where the
    table takes three; and in a compiled graph it is a loop of loads like any other."""
    nb = x.shape[1] // size
    compiled = torch.compiler.is_compiling()
    per, offset = (0, 0) if compiled else divmod(x.stride(0), size)
    if compiled or x.device.type != "cpu" or offset or per < nb:  # (per < nb: overlapping rows)
        view = x.as_strided((x.shape[0], nb, size), (x.stride(0), size, 1))
        if rows is None:
            rows = torch.arange(x.shape[0], device=x.device)
        return view[rows[:, None], blocks]
    # The table spans x's first block to its last, and nothing past it.
    table = x.as_strided(((x.shape[0] - 1) * per + nb, size), (size, 1))
    starts = torch.arange(0, x.shape[0] * per, per, device=x.device)  # each row's first block
    first = starts if rows is None else starts.index_select(0, rows)
    index = (first[:, None] + blocks).flatten()
    return table.index_select(0, index).view(blocks.shape[0], blocks.shape[1], size)
