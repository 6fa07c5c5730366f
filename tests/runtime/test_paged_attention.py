"""A static decode step's attention reads K/V where the paged cache holds them (batch.py `_paged`,
gemma3n.py `attend_paged`), compiled by inductor, the backend a server's compiled steps use.

The compiled-step tests (test_decode_graph.py) run "aot_eager", where FlexAttention attends
every slot of the pool through `mask_mod`; inductor's kernel instead visits only the blocks the
block mask lists and applies `mask_mod` to the first and last of them. So this checks inductor's
kernel on its own, against keys and values gathered through the block tables one row at a time
in float64: scattered blocks, a block two sequences share (a cached prefix), a sliding window
whose earlier blocks were released, a context inside one block, and a padded row.
"""

from __future__ import annotations

import math

import pytest
import torch

from server.runtime.batch import StaticShape, materialize, plan_step, upload
from server.runtime.decode_graph import context_bucket, cpu_backend
from server.runtime.kv_cache import KVCache
from server.vocabulary.step import StepSequence
from server.vocabulary.text_config import SLIDING

BS = 16
POOL = 400  # blocks: more than the tables below hold (no block in two places)


def _tables(text, positions: list[int], seed: int) -> list[list[list[int]]]:
    """Per sequence and KV-owning layer, distinct random blocks (the first sequence's first
    block also opens the second's table: a shared prefix); sliding layers release blocks that
    lie wholly before their window (-1)."""
    g = torch.Generator().manual_seed(seed)
    order = iter(torch.randperm(POOL, generator=g).tolist())
    out = []
    for n, pos in enumerate(positions):
        per_layer = []
        for layer in range(text.first_kv_shared_layer):
            blocks = [next(order) for _ in range(pos // BS + 1)]
            if n == 1:
                blocks[0] = out[0][layer][0]
            if text.layer_types[layer] == SLIDING:
                low = max(0, pos - text.sliding_window + 1)
                blocks = [-1 if (i + 1) * BS <= low else b for i, b in enumerate(blocks)]
            per_layer.append(blocks)
        out.append(per_layer)
    return out


@pytest.mark.parametrize("kind", ["full_attention", SLIDING])
def test_inductor_reads_the_paged_cache_as_a_gather_would(tiny, kind: str) -> None:
    text, model = tiny.store.text, tiny.model
    torch.manual_seed(0)
    kv = KVCache(text, POOL, BS)
    kv.k.normal_()
    kv.v.normal_()
    # Positions: a context inside one block, one ending on a block's last slot, longer ones
    # (past the sliding window); rows 5-8 pad the bucket.
    positions = [5, 31, 77, 140]
    tables = _tables(text, positions, seed=1)
    subnet = tiny.subnets["full"]
    seqs = [
        StepSequence(f"r{i}", subnet, [7], p, t, sample=True)
        for i, (p, t) in enumerate(zip(positions, tables, strict=True))
    ]
    context = context_bucket(max(positions) + 1, BS)
    shape = StaticShape(8, context, tiny.weights.resident_widths, paged=True)
    planned = plan_step(text, seqs, BS, kv.scratch_block, "masked", static=shape)
    layer = next(i for i in range(text.first_kv_shared_layer) if text.layer_types[i] == kind)
    heads, dim = text.num_attention_heads, text.head_dim
    q = torch.randn(shape.num_rows, heads, dim)

    def attend(flat: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        batch = materialize(planned.spec, flat, text, torch.float32)
        [group] = batch.attention[layer]
        return model.attend_paged(group.paged[layer], q, kv, group.num_seqs)

    compiled = torch.compile(attend, fullgraph=True, backend=cpu_backend("inductor"))
    with torch.no_grad():
        got = compiled(upload(planned.values, torch.device("cpu")), q)[:, 0]

    rep = heads // text.num_key_value_heads
    for row, i in enumerate(planned.order):
        pos = positions[i]
        low = 0 if kind != SLIDING else max(0, pos - text.sliding_window + 1)
        keys = torch.arange(low, pos + 1)
        slots = torch.tensor(tables[i][layer])[keys // BS] * BS + keys % BS
        assert (slots >= 0).all()  # released blocks lie before the window
        k = kv.k[slots].double().repeat_interleave(rep, dim=1)  # [n, heads, dim]
        v = kv.v[slots].double().repeat_interleave(rep, dim=1)
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q[row].double(), k), dim=1)
        want = torch.einsum("hn,nhd->hd", weights, v).reshape(-1)
        # float32 scores of 16 terms and float32 weighted sums of <= 141 keys, values ~N(0, 1):
        # far inside 1e-4 of float64; a wrong, missing or extra key moves the mean by ~1/n.
        torch.testing.assert_close(got[row].double(), want, rtol=0, atol=1e-4)
    # The padded rows attend one slot of the scratch block: finite, never NaN.
    assert torch.isfinite(got).all()
    assert math.isfinite(float(got[len(seqs) :].abs().sum()))
