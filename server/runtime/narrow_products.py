"""Narrow matrix products of a compiled CPU step, as fused multiply-reduce loops, and its attention.

Owns how a compiled decode step on a CPU computes products with few rows (`mm`/`addmm` with at
most NARROW_ROWS rows: every projection of a batch of 1 to 4 sequences), small products (at most
SMALL_PRODUCT multiply-adds: the rotary's `q @ R`, one row per query head, of such a batch) or a
short inner dimension (`baddbmm` over at most NARROW_INNER terms: AltUp's 4x4 stream mixing and its
per-stream correction): as a broadcast multiply and a sum, which inductor generates as one
vectorised loop fused with the ops around it, instead of an external BLAS call (the input of a
large one computed once before its loop, not once per column: `_input`); and the attention of
such a batch (below).

Decode attention of as few sequences runs as two batched products (BLAS) around a softmax that
inductor fuses into its loops, in place of the CPU attention kernel (one external call per
layer, whose per-call cost outweighs its work for a few queries): a bench-preset batch-1 step
1.05x as fast in each of three paired runs (benchmarks/bench_attention_forms.py, results/).
Written instead as two narrow products, it made the step slower (0.83-0.84x there; 0.69-0.72x
once small products fused too, when inductor made the whole step 4 kernels): inductor inlines
what the products read into their loops, so the queries' norm and rotary (pow, cos, sin) ran
once per key, the keys and values were gathered through the block table element by element
once per query head. With the operands stored first (the benchmark's `realized` form) it ran
at 0.95x: no gain over the batched products, whose external calls need their operands stored
anyway. Larger batches keep the kernel: they were not measured faster this way.

Why: a batch-1 projection is a matrix-vector product that must read its weight once. MKL read
the bench preset's FFN weights at 1 row at ~8 GB/s on the 2-core build machine, the fused loop
at 26-35 GB/s, about a plain read's speed; at 2 and 4 rows 4x and 1.6x faster, at 8 rows and up
BLAS is faster (benchmarks/bench_narrow_products.py, results/). At 1 row it also reads faster
than a hand-written AVX2 loop with four rows' accumulators in flight (--hand-loop, 0.80x): the
products are not what keeps a compiled step from its read floor. And every external call is a
Python-level call in inductor's CPU wrapper (with its output allocation and operand views),
which on a small model is most of a step.

A small product is a few microseconds of arithmetic, so a BLAS call's fixed cost is most of
what it costs: the rotary's [8 x 64] @ [64 x 64] of a bench-preset batch of 1 (8 query rows,
past NARROW_ROWS) was one such call per layer. Fused, 35 such rotations take 0.28-0.34x BLAS's
time at 8 rows, 0.51-0.77x at 16, 0.88-0.96x at 32 and 1.22-1.39x at 64 (two runs of
bench_narrow_products.py --rotary), so the bound is 32 rows' worth: 2^17 multiply-adds. A
whole batch-1 step gains little from it: 1.00x and 1.01x the step with BLAS's rotation, medians
of 9 and 15 alternated rounds whose single rounds spread +-10% (bench_attention_forms.py
--base rotary-blas, results/).

The rewrite is exact up to float32 rounding (the same products, summed in another order), so
the compiled step's logits stay within the suite's bound of the eager forward's.

Deliberately does not know: the model, or which device a step runs on (decode_graph.py uses
these on CPUs only: on CUDA, cuBLAS's products and a captured graph already do this).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

aten = torch.ops.aten

NARROW_ROWS = 4  # 1, 2 and 4 rows run faster fused, 8 and more through BLAS (bench_narrow_products)
SMALL_PRODUCT = 1 << 17  # multiply-adds: the rotary's 32 x 64 x 64 (bench_narrow_products --rotary)
NARROW_INNER = 4  # AltUp's streams
STORED_PRODUCT = 1 << 22  # multiply-adds per row from which a product's input is stored (_input)
DECODE_QUERIES = 16  # query rows per KV head in a decode step (Gemma 3n groups 4 or 2 heads)


def _product(a: torch.Tensor, b: torch.Tensor, dim: int, *, a_at: int, b_at: int) -> torch.Tensor:
    """sum over `dim` of a and b broadcast against each other, accumulated in float32 at least
    (as BLAS accumulates a bfloat16 product)."""
    wide = torch.promote_types(a.dtype, torch.float32)
    return (a.to(wide).unsqueeze(a_at) * b.to(wide).unsqueeze(b_at)).sum(dim).to(a.dtype)


def fuses(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether [M, K] @ [K, N] runs fused: M <= NARROW_ROWS, or M * K * N <= SMALL_PRODUCT."""
    rows, inner = a.shape
    return rows <= NARROW_ROWS or rows * inner * b.shape[1] <= SMALL_PRODUCT


def stored(x: torch.Tensor) -> torch.Tensor:
    """x, computed once into a buffer of its own rather than inlined where it is read.

    Inductor inlines what a reduction reads into the reduction's loop: the input of a product
    [M, K] @ [K, N] is then recomputed once per output column. A stride requirement on a value
    inductor has not stored makes it store it (ExternKernel.require_strides); an input or a
    stored buffer passes as itself, and eagerly it is x."""
    from torch._inductor import inductor_prims  # (imported when a step is traced, not before)

    return inductor_prims.force_stride_order(x, x.stride())


def _input(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The product's input as its loop reads it: `stored` for a product of at least
    STORED_PRODUCT multiply-adds per row, else as inductor leaves it (inlined).

    The LM head's input is the final norm of the mean of the unembedded AltUp streams: inlined,
    five more loads and some ten operations per eight weights, recomputed for each of its 262,400
    columns. Stored, a bench-262k batch-1 step ran 1.15x as fast in two runs (23.0 vs 21.0 and
    24.7 vs 21.9 tok/s; 74% and 84% of the read floor; medians of 9 alternated rounds:
    bench_inductor_options.py --variants served,inlined, results/). Stored for every product,
    the bench preset's step ran 0.95x and 0.93x (--variants stored-all, and an earlier run):
    each stored input is one more serial pass ending in a barrier inside the kernel, and a
    layer's products (at most 512 x 2048 there) are too small for that not to show, where the
    norm they recompute is a few operations hidden under the weights' read. From STORED_PRODUCT
    (16 MiB of float32 weights, half a millisecond's read on this machine) a pass and a barrier
    are a few microseconds against the product's read."""
    return stored(a) if a.shape[1] * b.shape[1] >= STORED_PRODUCT else a


def mm(a: torch.Tensor, b: torch.Tensor) -> Any:
    """[M, K] @ [K, N] -> [M, N] as one multiply-reduce over K, for a product that `fuses`, its
    input as `_input` gives it."""
    if not fuses(a, b):
        return NotImplemented
    return _product(_input(a, b), b, 1, a_at=2, b_at=0)


def addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta=1, alpha=1) -> Any:
    if not fuses(a, b) or beta != 1 or alpha != 1:
        return NotImplemented
    return bias + _product(_input(a, b), b, 1, a_at=2, b_at=0)


def baddbmm(base: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, *, beta=1, alpha=1) -> Any:
    """base + [B, M, K] @ [B, K, N] for K <= NARROW_INNER: K broadcast terms, summed."""
    if b1.shape[2] > NARROW_INNER or beta != 1 or alpha != 1:
        return NotImplemented
    return base + _product(b1, b2, 2, a_at=3, b_at=1)


def rewrites_attention(query, key, dropout_p=0.0, is_causal=False) -> bool:
    """Whether `attention` takes this call (else the CPU attention kernel runs)."""
    return (
        dropout_p == 0.0 and not is_causal and query.dtype in (torch.float32, torch.float64)
        and query.shape[0] <= NARROW_ROWS and query.shape[2] <= DECODE_QUERIES
        and query.shape[1] == key.shape[1]
    )  # fmt: skip


def attention(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """The CPU attention kernel's op (`_scaled_dot_product_flash_attention_for_cpu`: output and
    log-sum-exp) for a decode step of at most NARROW_ROWS sequences, [N, H, L, D] queries with
    at most DECODE_QUERIES rows per head (grouped query heads folded into L), float32 or
    float64: as two batched products around a softmax. Every query row attends at least one key
    (batch.py gives padded queries key 0), so no row's maximum is -inf."""
    if not rewrites_attention(query, key, dropout_p, is_causal):
        return NotImplemented
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask.logical_not(), -math.inf)
        else:
            scores = scores + attn_mask
    top = scores.amax(dim=-1, keepdim=True)
    weights = torch.exp(scores - top)
    total = weights.sum(dim=-1, keepdim=True)
    return torch.matmul(weights / total, value), (top + torch.log(total)).squeeze(-1)


NARROW = {
    aten.mm.default: mm,
    aten.addmm.default: addmm,
    aten.baddbmm.default: baddbmm,
    aten._scaled_dot_product_flash_attention_for_cpu.default: attention,
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
