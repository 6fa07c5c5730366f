"""Weights in a huge-page arena (server/runtime/huge_pages.py, Weights(huge_pages=True)): every
weight a step reads is the arena's copy, the mapping is advised for huge pages where the kernel
has them (or the runtime says why not and keeps 4 KiB pages), and every subnet computes the
same logits as from the checkpoint's mapped views, to float32 rounding.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from server.runtime import huge_pages
from server.runtime.elastic import ElasticRuntime
from server.runtime.huge_pages import HugePageArena
from tests.runtime.conftest import assert_float32_close, prefill_logits, prompt_ids


@pytest.fixture(scope="module")
def opened(tiny_dir: Path) -> tuple[ElasticRuntime, list[str]]:
    """The tiny runtime with huge pages, and the warnings opening it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rt = ElasticRuntime.open(tiny_dir, huge_pages=True)
    # A ResourceWarning here is the garbage collector finalising something an earlier test in
    # this worker left behind (an event loop, a socket), not anything opening the runtime said.
    return rt, [str(w.message) for w in caught if not issubclass(w.category, ResourceWarning)]


@pytest.fixture(scope="module")
def arena_rt(opened: tuple[ElasticRuntime, list[str]]) -> ElasticRuntime:
    return opened[0]


def step_weights(rt: ElasticRuntime) -> list[torch.Tensor]:
    w = rt.weights
    out = [w.embed, w.lm_head, w.final_norm, w.ple_model_projection, w.ple_projection_norm]
    out += [*w.altup_projections, *w.altup_unembed]
    for layer in w.layers:
        out += [t for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    return out


def test_every_weight_but_the_ple_table_is_the_arenas_copy(
    opened: tuple[ElasticRuntime, list[str]],
) -> None:
    arena_rt, opening_warnings = opened
    w = arena_rt.weights
    reason = huge_pages.unavailable()
    if reason is not None:  # this kernel has no huge pages: said once, and nothing changes
        assert w.arena is None
        assert any(reason in m for m in opening_warnings), opening_warnings
        return
    assert w.arena is not None and opening_warnings == []
    weights = step_weights(arena_rt)
    outside = [tuple(t.shape) for t in weights if not w.arena.holds(t)]
    assert outside == [], f"weights outside the arena: {outside}"
    assert not w.arena.holds(w.ple_table)  # the PLE table stays mapped: rows are gathered
    assert all(t.dtype == w.dtype and t.is_contiguous() for t in weights)
    # The FFN residency's views are of the arena's copies, at every resident width.
    for layer in range(len(w.layers)):
        for t in w.residency.view(layer, w.residency.widths[layer] // 2):
            assert w.arena.holds(t)
    # The kernel takes the advice: the mapping is eligible for huge pages (whether it has
    # backed it with them yet depends on free 2 MiB blocks, which no test can promise).
    assert w.arena.eligible()
    assert w.arena.bytes.data_ptr() % huge_pages.HUGE_PAGE == 0


def test_every_subnet_computes_the_same_logits(
    arena_rt: ElasticRuntime, tiny: ElasticRuntime, tiny64: ElasticRuntime
) -> None:
    ids = prompt_ids(12, seed=3)
    for subnet in tiny.subnets:
        got = prefill_logits(arena_rt, subnet, ids)
        want = prefill_logits(tiny, subnet, ids)
        exact = prefill_logits(tiny64, subnet, ids)
        assert_float32_close(got, want, exact, f"{subnet.name} logits")


@pytest.mark.skipif(huge_pages.unavailable() is not None, reason="no transparent huge pages")
def test_the_arena_converts_places_in_order_and_refuses_past_its_capacity() -> None:
    arena = HugePageArena(4096)
    assert arena.capacity == huge_pages.HUGE_PAGE  # whole huge pages
    a = torch.arange(10, dtype=torch.bfloat16).view(2, 5)
    b = torch.ones(3, dtype=torch.float64)
    ca, cb = arena.copy(a, torch.float32), arena.copy(b)
    assert ca.dtype == torch.float32 and torch.equal(ca, a.float())
    assert torch.equal(cb, b) and arena.holds(ca) and arena.holds(cb)
    assert cb.data_ptr() - ca.data_ptr() == huge_pages.ALIGN  # 40 bytes, then the next line
    assert not arena.holds(torch.ones(3))
    with pytest.raises(MemoryError, match=r"arena .* is full"):
        arena.copy(torch.empty(huge_pages.HUGE_PAGE // 4))
