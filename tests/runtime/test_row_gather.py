"""The sampler's row helpers (server/runtime/row_gather.py) against plain advanced indexing.

Each helper is a copy or a write of chosen elements, so results must equal the obvious
`x[rows, ids]` exactly, for every layout the helpers meet or refuse to assume: rows that start
on a block boundary of the storage (a whole tensor, the logits sliced to the text vocabulary, a
slice of rows, every other row), and rows that do not (an odd row stride, an expanded tensor).
"""

from __future__ import annotations

import pytest
import torch

from server.runtime.row_gather import gather_blocks, gather_rows, scatter_rows_

LAYOUTS = {
    # name: (allocated shape, view taken of it, block size)
    "whole": ((5, 4096), lambda t: t, 64),
    "text-vocabulary slice": ((5, 4160), lambda t: t[:, :4096], 64),
    "rows from the second": ((4, 4096), lambda t: t[1:], 64),
    "every other row": ((6, 512), lambda t: t[::2, :448], 64),
    "single row": ((1, 300), lambda t: t[:, :256], 64),
    "odd row stride": ((4, 515), lambda t: t[:, :512], 64),
    "columns from an offset": ((4, 4100), lambda t: t[:, 4:4100], 32),
    "expanded": ((1, 128), lambda t: t.expand(3, 128), 64),
}


def reference(x: torch.Tensor, rows: torch.Tensor | None, blocks: torch.Tensor, size: int):
    rows = torch.arange(x.shape[0]) if rows is None else rows
    columns = blocks[:, :, None] * size + torch.arange(size)
    return x[rows[:, None, None], columns]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_blocks_takes_exactly_the_blocks_asked_for(layout: str) -> None:
    shape, view, size = LAYOUTS[layout]
    g = torch.Generator().manual_seed(len(layout))
    x = view(torch.randn(*shape, generator=g))
    blocks = torch.randint(0, x.shape[1] // size, (x.shape[0], 5), generator=g)
    blocks[0, 0], blocks[-1, -1] = 0, x.shape[1] // size - 1  # the first and the last block
    assert torch.equal(gather_blocks(x, None, blocks, size), reference(x, None, blocks, size))
    rows = torch.tensor([x.shape[0] - 1, 0])  # some rows, out of order
    got = gather_blocks(x, rows, blocks[:2], size)
    assert torch.equal(got, reference(x, rows, blocks[:2], size))


def test_gather_and_scatter_rows_touch_only_the_ids_asked_for() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 300, generator=g)[:, :256]
    rows = torch.tensor([2, 0])
    ids = torch.randint(0, 256, (2, 7), generator=g)
    assert torch.equal(gather_rows(x, rows, ids), x[rows[:, None], ids])
    assert torch.equal(gather_rows(x, None, ids.repeat(2, 1)), x.gather(1, ids.repeat(2, 1)))
    want = x.clone()
    values = torch.randn(2, 7, generator=g)
    ids[:, 1] = ids[:, 0]  # a repeated id carries the same value
    values[:, 1] = values[:, 0]
    want[rows[:, None], ids] = values
    scatter_rows_(x, rows, ids, values)
    assert torch.equal(x, want)
