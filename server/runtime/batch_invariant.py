"""Batch-invariant computation: a row's result does not depend on the rows it shares a step with.

Owns the operations whose rounding would otherwise change with the step's shape, replaced while
the forward runs (a `TorchFunctionMode`, entered around the step by the runner; the forward itself
is unchanged and does not know):

- matrix products (`linear`, `matmul`, `einsum` over a row axis, `baddbmm`/`bmm`): a BLAS or cuBLAS
  call picks its blocking, its split of the reduction and its kernel from the whole product's
  shape, so row r of `x @ w.T` with 16 rows is not rounded as with 1. Here each row is its own
  product, on a fresh contiguous copy (so its address alignment is always the same too): every
  row's reduction is the call a request alone makes;
- element-wise functions whose vectorised and scalar versions differ in the last bit (GELU's tanh
  form is one, measured on AVX-512): on a CPU a tensor's elements at the end of a loop, or at a
  thread's chunk edge, take the scalar version, and where those edges fall depends on the number
  of rows. Here the elements go through in padded chunks of a fixed size below ATen's parallel
  grain, so every element takes the vectorised path, whatever the step. (On CUDA each element is
  computed by the same code whatever the launch: nothing to do.)

Row-local reductions (RMSNorm, means and standard deviations over a row's own last axis,
softmax) reduce each row on its own in ATen whatever the number of rows (one output per row,
below the parallel grain), so they need nothing here. Fused element-wise ops that round twice in
their scalar form (`add(alpha=)`, `addcmul`) are invariant only where their inner loop's length
does not depend on the row count (a hidden or head axis); on per-row values ([rows, 1, 1]) the
forward uses plain single-rounding ops instead (gemma3n.py's sparsity cutoff). Attention is made
invariant by the plan instead (batch.py: every query is its own attention group reading exactly
its own keys, so no padding to the batch's longest context enters its reduction), and mixed FFN
widths run grouped, each row at its own width (the runner's choice).

The price is one product per row instead of one per step (and per-query attention): measured
against the default mode in benchmarks/bench_batch_invariant.py.

Deliberately does not know: the model, the plan, or which rows belong to which request.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Element-wise functions whose scalar (loop tail) and vectorised forms may round differently.
_ELEMENTWISE = {
    F.gelu,
    torch.tanh,
    torch.Tensor.tanh,
    torch.exp,
    torch.Tensor.exp,
    torch.sigmoid,
    torch.Tensor.sigmoid,
    torch.cos,
    torch.Tensor.cos,
    torch.sin,
    torch.Tensor.sin,
    torch.erf,
    torch.Tensor.erf,
    F.silu,
}
# Elements per padded chunk: a multiple of every vector width's unrolled step (64 bf16 lanes on
# AVX-512), and under ATen's parallel grain (32768 elements), so one thread runs each chunk and
# no chunk has a tail.
CHUNK = 16384
_STEP = 64


class BatchInvariantOps(TorchFunctionMode):
    """Enter around a forward pass to compute it batch-invariantly (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return _per_row(lambda x: F.linear(x, *args[1:], **kwargs), args[0], 1)
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__):
            a, b = args[0], args[1]
            if a.dim() >= 2 and b.dim() == 2:
                return _per_row(lambda x: torch.matmul(x, b), a, 1)
        if func is torch.einsum:
            out = _einsum_per_row(args, kwargs)
            if out is not None:
                return out
        if func in (torch.baddbmm, torch.Tensor.baddbmm):
            base, b1, b2 = args[:3]
            rows = [
                torch.baddbmm(
                    base[i : i + 1], _fresh(b1[i : i + 1]), _fresh(b2[i : i + 1]), **kwargs
                )
                for i in range(b1.shape[0])
            ]
            return torch.cat(rows)
        if func in (torch.bmm, torch.Tensor.bmm):
            a, b = args[:2]
            return torch.cat(
                [torch.bmm(_fresh(a[i : i + 1]), _fresh(b[i : i + 1])) for i in range(a.shape[0])]
            )
        if func in _ELEMENTWISE and isinstance(args[0], torch.Tensor) and not args[0].is_cuda:
            return _elementwise(func, args, kwargs)
        return func(*args, **kwargs)


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy in newly allocated memory: the same alignment for every row."""
    return t.clone(memory_format=torch.contiguous_format)


def _per_row(op, x: torch.Tensor, trailing: int) -> torch.Tensor:
    """`op` on each vector of `x` (its last `trailing` axes) alone, results stacked back."""
    lead = x.shape[: x.dim() - trailing]
    flat = x.reshape(-1, *x.shape[x.dim() - trailing :])
    if flat.shape[0] == 0:
        return op(flat).reshape(*lead, *op(flat[:0]).shape[1:])
    rows = [op(_fresh(flat[i : i + 1])) for i in range(flat.shape[0])]
    out = torch.cat(rows)
    return out.reshape(*lead, *out.shape[1:])


def _einsum_per_row(args, kwargs) -> torch.Tensor | None:
    """An einsum whose first operand's first axis is the output's first axis and appears in no
    other operand (a row axis, as in "nh,aoh->nao"): computed row by row. Else None."""
    equation, operands = args[0], args[1:]
    if len(operands) == 1 and isinstance(operands[0], list | tuple):
        operands = tuple(operands[0])
    if "->" not in equation or not operands or kwargs:
        return None
    inputs, output = equation.replace(" ", "").split("->")
    subs = inputs.split(",")
    row = subs[0][:1]
    if not row or not output.startswith(row) or any(row in s for s in subs[1:]):
        return None
    if subs[0].count(row) != 1 or "." in equation:
        return None
    first, rest = operands[0], operands[1:]
    rows = [torch.einsum(equation, _fresh(first[i : i + 1]), *rest) for i in range(first.shape[0])]
    return torch.cat(rows) if rows else torch.einsum(equation, first, *rest)


def _elementwise(func, args, kwargs) -> torch.Tensor:
    """An element-wise function evaluated in padded fixed-size chunks (every element on the
    vectorised path, one thread per chunk)."""
    x = args[0]
    n = x.numel()
    if n == 0:
        return func(*args, **kwargs)
    flat = x.reshape(-1)
    padded = -(-n // _STEP) * _STEP
    out = torch.empty(padded, dtype=x.dtype, device=x.device)
    buf = torch.zeros(min(padded, CHUNK), dtype=x.dtype, device=x.device)
    for start in range(0, padded, CHUNK):
        stop = min(start + CHUNK, padded)
        width = min(stop, n) - start
        chunk = buf[: stop - start]
        if width < chunk.shape[0]:
            chunk.zero_()
        chunk[:width] = flat[start : start + width]
        out[start:stop] = func(chunk, *args[1:], **kwargs)
    return out[:n].view(x.shape)
