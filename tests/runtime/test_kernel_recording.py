"""A compiled CPU step recorded as its kernel calls, and replayed (runtime/kernel_recording.py).

Compiled by inductor with the server's CPU backend (decode_graph.cpu_backend: the narrow products
and attention rewritten), on a small step shaped like a decode step: a batch-1 row normalised and
projected (fused loops), written into a cache in place at a slot the step is given, attended over
the cache (the narrow attention: two external batched products with `out=`), projected again.

- the recording holds both kinds of call (generated kernels, external products);
- after each step's inputs are copied into the static ones, a replay gives exactly the direct
  compiled call's output (the same kernels on the same data: bitwise) and writes the cache as it
  does; its output is the recorded tensor each time;
- what a replay would not redo is refused with the reason: a wrapper that calls an operator
  inductor leaves to ATen (here `sort`), and a run that calls no inductor graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.runtime.decode_graph import cpu_backend
from server.runtime.kernel_recording import Unrecordable, record

D, HEADS, GROUP, SLOTS = 64, 2, 4, 32


def make_step():
    g = torch.Generator().manual_seed(0)
    w_q, w_kv = (torch.randn(D, n * D, generator=g) / D**0.5 for n in (HEADS * GROUP, 2 * HEADS))
    w_o = torch.randn(HEADS * GROUP * D, D, generator=g) / D
    cache = torch.zeros(2, SLOTS, HEADS, D)

    def step(x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x, (D,))
        q = (h @ w_q).view(1, HEADS, GROUP, D)
        kv = (h @ w_kv).view(2, 1, HEADS, D)
        cache.index_copy_(1, slot, kv)  # the cache, a graph input, written in place
        k, v = (c.permute(1, 0, 2).unsqueeze(0) for c in cache)  # [1, HEADS, SLOTS, D]
        # Slots past the one written are masked out, as a decode step masks unwritten slots.
        mask = torch.where(torch.arange(SLOTS) <= slot, 0.0, -torch.inf).view(1, 1, 1, SLOTS)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return att.reshape(1, HEADS * GROUP * D) @ w_o

    return step, cache


def test_a_replay_is_the_compiled_step_on_each_steps_inputs():
    step, cache = make_step()
    compiled = torch.compile(step, fullgraph=True, backend=cpu_backend("inductor"))
    g = torch.Generator().manual_seed(1)
    static_x, static_slot = torch.randn(1, D, generator=g), torch.tensor([0])
    with torch.no_grad():
        compiled(static_x, static_slot)  # compiles
        out, replay = record(compiled, static_x, static_slot)
        kinds = {getattr(fn, "__name__", "") for fn, _, _ in replay.calls}
        assert "bmm" in kinds and any(k.startswith("kernel") for k in kinds), kinds
        for i in range(1, 6):
            x, slot = torch.randn(1, D, generator=g), torch.tensor([(7 * i) % SLOTS])
            before = cache.clone()
            direct = compiled(x, slot).clone()
            direct_cache = cache.clone()
            cache.copy_(before)
            static_x.copy_(x)
            static_slot.copy_(slot)
            replay()
            assert torch.equal(out, direct), i  # the same kernels on the same data
            assert torch.equal(cache, direct_cache), i  # the slot written as the step writes it
            assert not torch.equal(cache, before), i


def test_what_a_replay_would_not_redo_is_refused():
    x = torch.randn(4, D)

    def sorted_rows(x: torch.Tensor) -> torch.Tensor:
        return torch.sort(x * 2, dim=-1).values + 1  # inductor leaves sort to ATen

    compiled = torch.compile(sorted_rows, fullgraph=True, backend=cpu_backend("inductor"))
    compiled(x)
    with pytest.raises(Unrecordable, match="wrapper calls"):
        record(compiled, x)
    with pytest.raises(Unrecordable, match="called 0 inductor graphs"):
        record(sorted_rows, x)
