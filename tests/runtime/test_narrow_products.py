"""Narrow products (server/runtime/narrow_products.py): the rewrites a compiled CPU step uses for
products of few rows and short inner dimensions.

- each rewrite computes its op: compared in float64, where the only difference is the order of
  a sum of at most a few hundred terms (relative 1e-12 is ~4,500 float64 ulps: far above that
  reordering's error, far below any wrong index or transpose);
- small products fuse at any row count, up to SMALL_PRODUCT multiply-adds;
- outside its bounds (rows and size, inner size, scaled forms) it declines, and the op runs as
  it is;
- reduced-precision inputs are accumulated in float32 and come back in their dtype;
- decode attention rewritten as two products around a softmax computes the CPU attention
  kernel's op (output and log-sum-exp, boolean or additive masks), and prefills, larger
  batches, reduced precision, dropout and causal calls are left to the kernel;
- the table given to inductor pickles, and to the same bytes each time: inductor hashes it into
  its FX-graph cache key, and a table that does not pickle bypasses that cache (every start would
  recompile every graph).

The compiled step itself, rewrites included, is compared with the eager forward in
test_decode_graph.py.
"""

from __future__ import annotations

import math
import pickle
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from server.runtime import narrow_products as narrow

aten = torch.ops.aten


def randn(*shape, dtype=torch.float64):
    return torch.randn(*shape, generator=GEN, dtype=dtype)


GEN = torch.Generator().manual_seed(0)


def assert_same(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-12 * scale


@pytest.mark.parametrize("rows", [1, 2, narrow.NARROW_ROWS])
def test_few_rows_multiply_as_the_product(rows):
    a, w = randn(rows, 96), randn(160, 96)  # a weight [out, in], used transposed as F.linear does
    assert_same(narrow.mm(a, w.t()), a @ w.t())
    bias = randn(160)
    assert_same(narrow.addmm(bias, a, w.t()), torch.addmm(bias, a, w.t()))


def test_small_products_fuse_at_any_row_count_up_to_their_bound():
    rows = narrow.SMALL_PRODUCT // (64 * 64)  # the rotary's q @ R: [rows x 64] @ [64 x 64]
    assert rows > narrow.NARROW_ROWS
    q, r = randn(rows, 64), randn(64, 64)
    assert_same(narrow.mm(q, r), q @ r)
    bias = randn(64)
    assert_same(narrow.addmm(bias, q, r), torch.addmm(bias, q, r))
    # One row more is one product of 64 x 64 multiply-adds past the bound.
    assert narrow.mm(randn(rows + 1, 64), r) is NotImplemented
    assert narrow.addmm(bias, randn(rows + 1, 64), r) is NotImplemented


@pytest.mark.parametrize("inner", [1, 2, narrow.NARROW_INNER])
def test_short_inner_batches_multiply_as_the_product(inner):
    base, b1, b2 = randn(3, 4, 64), randn(3, 4, inner), randn(3, inner, 64)
    assert_same(narrow.baddbmm(base, b1, b2), torch.baddbmm(base, b1, b2))


def test_outside_their_bounds_the_rewrites_decline():
    # More rows than NARROW_ROWS and more multiply-adds than SMALL_PRODUCT.
    wide, b = randn(narrow.NARROW_ROWS + 1, 256), randn(256, 128)
    assert (narrow.NARROW_ROWS + 1) * 256 * 128 > narrow.SMALL_PRODUCT
    assert narrow.mm(wide, b) is NotImplemented
    assert narrow.addmm(randn(128), wide, b) is NotImplemented
    assert narrow.addmm(randn(8), randn(1, 8), randn(8, 8), beta=2) is NotImplemented
    assert narrow.addmm(randn(8), randn(1, 8), randn(8, 8), alpha=0.5) is NotImplemented
    b1 = randn(2, 3, narrow.NARROW_INNER + 1)
    assert narrow.baddbmm(randn(2, 3, 8), b1, randn(2, narrow.NARROW_INNER + 1, 8)) is (
        NotImplemented
    )
    assert narrow.baddbmm(randn(2, 3, 8), randn(2, 3, 2), randn(2, 2, 8), beta=0) is (
        NotImplemented
    )


def test_bfloat16_accumulates_in_float32():
    a, w = randn(2, 512, dtype=torch.bfloat16), randn(64, 512, dtype=torch.bfloat16)
    got = narrow.mm(a, w.t())
    want = (a.double() @ w.double().t()).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    # Summed in float32 then rounded once: at most one bfloat16 ulp (<= 2^-7 of the value) from
    # the exact product rounded; rounding each product to bfloat16 first drifts far past that.
    assert ((got.double() - want.double()).abs() <= want.double().abs() * 2**-7 + 1e-6).all()


def test_the_table_puts_the_rewrites_in_front_and_falls_back_to_inductors_own():
    table = narrow.inductor_decompositions()
    a, w = randn(1, 32), randn(48, 32)
    assert_same(table[aten.mm.default](a, w.t()), a @ w.t())
    # A scaled form: the narrow one declines; inductor's own turns this dot product into a sum.
    bias, row, column = randn(1, 1), randn(1, 8), randn(8, 1)
    assert narrow.addmm(bias, row, column, beta=2) is NotImplemented
    got = table[aten.addmm.default](bias, row, column, beta=2)
    assert_same(got, torch.addmm(bias, row, column, beta=2))
    assert set(narrow.NARROW) <= set(table)


def test_the_table_pickles_to_the_same_bytes():
    first, second = narrow.inductor_decompositions(), narrow.inductor_decompositions()
    assert pickle.dumps(first) == pickle.dumps(second)
    again = pickle.loads(pickle.dumps(first))
    assert set(again) == set(first)


FLASH = aten._scaled_dot_product_flash_attention_for_cpu.default


@pytest.mark.parametrize("seqs", [1, narrow.NARROW_ROWS])
@pytest.mark.parametrize("scale", [1.0, None])
def test_decode_attention_is_the_cpu_attention_kernels_op(seqs, scale):
    # A decode step's layout: 2 KV heads, 4 grouped queries each, 24 keys; every query attends
    # at least key 0 (as batch.py arranges), some not the later ones.
    q, k, v = randn(seqs, 2, 4, 16), randn(seqs, 2, 24, 16), randn(seqs, 2, 24, 16)
    allowed = torch.rand(seqs, 1, 4, 24, generator=GEN) < 0.7
    allowed[..., 0] = True
    additive = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, -math.inf)
    want, want_lse = FLASH(q, k, v, attn_mask=additive, scale=scale)
    for mask in (allowed, additive):
        got, lse = narrow.attention(q, k, v, attn_mask=mask, scale=scale)
        assert_same(got, want)
        assert_same(lse, want_lse.view(lse.shape))
    got, _ = narrow.attention(q, k, v, scale=scale)
    assert_same(got, FLASH(q, k, v, scale=scale)[0])


def test_attention_outside_a_decode_step_is_left_to_the_kernel():
    def call(q, k, **kw):
        return narrow.attention(q, k, k, **kw)

    q, k = randn(1, 2, 4, 16), randn(1, 2, 8, 16)
    assert call(
        randn(narrow.NARROW_ROWS + 1, 2, 4, 16), randn(narrow.NARROW_ROWS + 1, 2, 8, 16)
    ) is (NotImplemented)
    assert call(randn(1, 2, narrow.DECODE_QUERIES + 1, 16), k) is NotImplemented  # a prefill
    assert call(randn(1, 4, 4, 16), k) is NotImplemented  # query heads not folded onto KV heads
    assert call(q.to(torch.bfloat16), k.to(torch.bfloat16)) is NotImplemented
    assert call(q, k, dropout_p=0.1) is NotImplemented
    assert call(q, k, is_causal=True) is NotImplemented


def test_a_large_products_input_is_computed_once_not_once_per_column():
    # The LM head's form: a normalised row times a weight of many columns. Inductor inlines what a
    # reduction reads into the reduction's loop; `mm` stores the input of a product of
    # STORED_PRODUCT multiply-adds per row first, so the loop over its columns reads the
    # normalised row and computes no norm (no square root) per column. A smaller product's input
    # stays inlined (its loop does compute the norm).
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from server.runtime.decode_graph import cpu_backend

    inner = 64
    large = narrow.STORED_PRODUCT // inner  # columns; every extent here is distinct, so that it
    small = 1000  # names its own loop in the generated code
    x, y, w = randn(1, inner).float(), randn(1, inner).float(), randn(inner).float()
    head, proj = randn(large, inner).float(), randn(small, inner).float()

    def two_products(x, y, w, head, proj):
        norm = partial(F.rms_norm, normalized_shape=(inner,), weight=w, eps=1e-6)
        return F.linear(norm(x), head), F.linear(norm(y), proj)

    compiled = torch.compile(two_products, fullgraph=True, backend=cpu_backend("inductor"))
    with inductor_config.patch(fx_graph_cache=False):  # generated here, not loaded
        out, (code,) = run_and_get_code(compiled, x, y, w, head, proj)

    def loop_over(columns: int) -> str:
        """The C++ of the loop over `columns`: from its `for` to its closing brace (matched, so
        that it holds at any thread count, parallel regions or not)."""
        start = code.index("{", code.index(f"<static_cast<int64_t>({columns}L)"))
        depth = 0
        for end in range(start, len(code)):
            depth += {"{": 1, "}": -1}.get(code[end], 0)
            if depth == 0:
                return code[start : end + 1]
        raise AssertionError("unbalanced braces")

    assert "sqrt" not in loop_over(large) and "sqrt" in loop_over(small)
    want = two_products(x.double(), y.double(), w.double(), head.double(), proj.double())
    for got, exact in zip(out, want, strict=True):
        # float32 sums of 64 terms of O(1) values: far inside 1e-4 of the outputs' scale.
        assert (got.double() - exact).abs().max().item() <= 1e-4 * exact.abs().max().item()
