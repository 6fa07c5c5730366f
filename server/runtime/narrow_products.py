"""Narrow matrix products of a compiled CPU step, as fused multiply-reduce loops.

Owns how a compiled decode step on a CPU computes products with few rows (`mm`/`addmm` with at
most NARROW_ROWS rows: every projection of a batch of 1 to 4 sequences) or a short inner
dimension (`baddbmm` over at most NARROW_INNER terms: AltUp's 4x4 stream mixing and its
per-stream correction): as a broadcast multiply and a sum, which inductor generates as one
vectorised loop fused with the ops around it, instead of an external BLAS call.

Attention stays the CPU attention kernel: written the same way (two narrow products around a
softmax) it made a tiny-preset step slower (six times the buffer allocations per step).

Why: a batch-1 projection is a matrix-vector product that must read its weight once. MKL read
the bench preset's FFN weights at 1 row at ~8 GB/s on the 2-core build machine, the fused loop
at 26-35 GB/s, about a plain read's speed; at 2 and 4 rows 4x and 1.6x faster, at 8 rows and up
BLAS is faster (benchmarks/bench_narrow_products.py, results/). And every external call is a
Python-level call in inductor's CPU wrapper (with its output allocation and operand views),
which on a small model is most of a step.

The rewrite is exact up to float32 rounding (the same products, summed in another order), so
the compiled step's logits stay within the suite's bound of the eager forward's.

Deliberately does not know: the model, or which device a step runs on (decode_graph.py uses
these on CPUs only: on CUDA, cuBLAS's products and a captured graph already do this).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

aten = torch.ops.aten

NARROW_ROWS = 4  # 1, 2 and 4 rows run faster fused, 8 and more through BLAS (bench_narrow_products)
NARROW_INNER = 4  # AltUp's streams


def _product(a: torch.Tensor, b: torch.Tensor, dim: int, *, a_at: int, b_at: int) -> torch.Tensor:
    """sum over `dim` of a and b broadcast against each other, accumulated in float32 at least
    (as BLAS accumulates a bfloat16 product)."""
    wide = torch.promote_types(a.dtype, torch.float32)
    return (a.to(wide).unsqueeze(a_at) * b.to(wide).unsqueeze(b_at)).sum(dim).to(a.dtype)


def mm(a: torch.Tensor, b: torch.Tensor) -> Any:
    """[M, K] @ [K, N] -> [M, N] as one multiply-reduce over K, for M <= NARROW_ROWS."""
    if a.shape[0] > NARROW_ROWS:
        return NotImplemented
    return _product(a, b, 1, a_at=2, b_at=0)


def addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta=1, alpha=1) -> Any:
    if a.shape[0] > NARROW_ROWS or beta != 1 or alpha != 1:
        return NotImplemented
    return bias + _product(a, b, 1, a_at=2, b_at=0)


def baddbmm(base: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, *, beta=1, alpha=1) -> Any:
    """base + [B, M, K] @ [B, K, N] for K <= NARROW_INNER: K broadcast terms, summed."""
    if b1.shape[2] > NARROW_INNER or beta != 1 or alpha != 1:
        return NotImplemented
    return base + _product(b1, b2, 2, a_at=3, b_at=1)


NARROW = {
    aten.mm.default: mm,
    aten.addmm.default: addmm,
    aten.baddbmm.default: baddbmm,
}


class InductorTable(dict):
    """Inductor's decomposition table with the narrow products in front of its own.

    Inductor hashes the table it is given into its FX-graph cache key by pickling it; its entries
    (operator overloads, C++-bound functions) do not pickle, which would bypass that cache and
    recompile every graph on every start. The table pickles as the call that builds it: what it
    holds follows from this module's code, and a change to the rewrites changes the graphs
    (which the key also covers)."""

    def __reduce__(self):
        return (inductor_decompositions, ())


def inductor_decompositions() -> InductorTable:
    from torch._inductor.decomposition import select_decomp_table

    table = InductorTable(select_decomp_table())
    for op, narrow in NARROW.items():
        table[op] = _in_front_of(narrow, table.get(op))
    return table


def _in_front_of(narrow: Callable[..., Any], fallback: Callable[..., Any] | None):
    def either(*args, **kwargs):
        out = narrow(*args, **kwargs)
        if out is NotImplemented and fallback is not None:
            return fallback(*args, **kwargs)
        return out

    return either
