"""Attention in a compiled CPU decode step: the CPU attention kernel vs other forms.

A compiled decode step of at most 4 sequences (inductor) rewrites attention at compile time
through the decomposition table it uses (narrow_products.py). This builds the same batch-1 step
once per form of decode attention, in one process:

- kernel:  the CPU attention kernel, `_scaled_dot_product_flash_attention_for_cpu`, one external
           call per layer (the form before the rewrite, and larger batches' form);
- bmm:     two batched matrix products around a softmax (narrow_products.attention: served);
- narrow:  scores and output as broadcast multiplies and sums (the narrow-product form), so
           inductor fuses attention into its own loops with no external call;
- realized: narrow, with the queries, keys, values and softmax weights each stored once before
           the products read them. Without that, inductor inlines the operands' producers into
           the products' loops: the queries' norm and rotary (with its pow, cos and sin) are
           recomputed for every key, and the keys and values gathered through the block table
           element by element for every query head (the weights it stores by itself);
- rotary-blas: bmm, with the queries' rotary product `q @ R` (8 query rows at batch 1) through
           BLAS, as before small products were fused (narrow_products.SMALL_PRODUCT).

Each engine decodes the same greedy request; the runs alternate, each form's tok/s is the median
of --pairs runs, with its median ratio to the --base form's run of the same round, and whether
its tokens equal the base form's. Compiling takes minutes per form on a CPU (reported, not timed).

    PYTHONPATH=. python benchmarks/bench_attention_forms.py [--preset bench] [--pairs 7]
        [--forms kernel,bmm,narrow,realized,rotary-blas] [--base kernel]
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from unittest.mock import patch

import torch
from torch._inductor import inductor_prims

from benchmarks.bench_decode import side_by_side_main
from server.runtime import narrow_products

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def narrow(
    query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None, store=None
):
    """The served form's calls and softmax, its two products as multiplies and sums. `store`, if
    given, is applied to the operands and the softmax weights before the products read them."""
    if not narrow_products.rewrites_attention(query, key, dropout_p, is_causal):
        return NotImplemented
    store = store or (lambda t: t)
    query, key, value = store(query), store(key), store(value)
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    s = (query.unsqueeze(3) * key.unsqueeze(2)).sum(-1) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask
    m = s.amax(-1, keepdim=True)
    p = store(torch.exp(s - m))
    total = p.sum(-1, keepdim=True)
    out = (p.unsqueeze(-1) * value.unsqueeze(2)).sum(-2) / total
    return out, (m + torch.log(total)).squeeze(-1)


def realized(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """The narrow form with its operands and softmax weights each stored as a buffer before the
    products read them (inductor's `force_stride_order` makes one of what it would inline)."""
    return narrow(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale,
        store=lambda t: inductor_prims.force_stride_order(t, t.stride()),
    )  # fmt: skip


def rows_only_mm(a, b):
    """The narrow `mm` as it was before small products: fused up to NARROW_ROWS rows only."""
    if a.shape[0] > narrow_products.NARROW_ROWS:
        return NotImplemented
    return narrow_products.mm(a, b)


SERVED_MM = narrow_products.mm
# Each form: (the attention rewrite, None for the kernel; the `mm` rewrite).
FORMS = {
    "kernel": (None, SERVED_MM),
    "bmm": (narrow_products.attention, SERVED_MM),
    "narrow": (narrow, SERVED_MM),
    "realized": (realized, SERVED_MM),
    "rotary-blas": (narrow_products.attention, rows_only_mm),
}
MM = torch.ops.aten.mm.default


@contextlib.contextmanager
def form_table(form, mm):
    """The narrow-product table with the form's attention and `mm` entries (no attention entry:
    the CPU kernel), while a step compiles; the served table after it."""
    with patch.dict(narrow_products.NARROW, {FLASH: form, MM: mm}):
        if form is None:
            del narrow_products.NARROW[FLASH]
        yield


def main() -> None:
    builds = {name: partial(form_table, *form) for name, form in FORMS.items()}
    side_by_side_main(__doc__, builds, "forms", "kernel", pairs=7)


if __name__ == "__main__":
    main()
