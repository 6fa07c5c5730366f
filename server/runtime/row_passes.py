"""The sampler's passes over whole rows, and their compiled forms: one loop each, not several.

Owns two computations the sampler runs over every element of [rows, n] tensors:

- order keys: int64 keys that order (value desc, id asc) exactly under a descending sort or
  top-k, so that ties never depend on a kernel's choice. Eager torch forms them in eight
  elementwise passes over int64 tensors (the block maxima of every row, 4,096 per row at
  Gemma's vocabulary, and the candidates gathered from the top blocks);
- block sums of exponentials: per block of ids, the sum of exp2(x log2(e) + shift), the one
  pass over every id of a row that logprobs need (the raw distribution's log-normaliser is
  the max plus the log of their total). Eager, the sampler runs it as three passes (exponents
  written out, exp2 in place, the sums: Sampler._log_normalizer), each reading and writing the
  whole [rows, vocabulary] tensor: memory traffic rather than arithmetic on a CPU.

Compiled (`torch.compile`: inductor's C++ loops on a CPU, Triton on CUDA), each is one loop that
reads its input once (benchmarks/bench_sampler.py times both forms). The number of rows is
unbacked (`mark_unbacked`), so one graph serves every batch, a single row included (a dynamic
size would be specialised at 1), and every element's arithmetic is the same whatever the batch:
a row's keys and sums are the same bits alone or among others (tests/runtime/test_sampler.py).

`compiled_per_row` compiles, the same way, a per-row function the sampler hands over (its top-k
draw: a few dozen small ops on [rows, k] candidates, each a dispatch eager, and on an accelerator
a kernel launch).

Deliberately does not know: sampling, which rows want logprobs, or what the values mean.
"""

from __future__ import annotations

import math
import threading

import torch

LOG2E = 1.0 / math.log(2.0)
# Order keys of at most this many elements are formed eagerly: one row's block keys at Gemma's
# vocabulary (a batch of one).
EAGER_KEYS = 4096
_lock = threading.Lock()
_compiled: dict[str, object] = {}


def order_keys(values: torch.Tensor, ids: torch.Tensor, max_id: int) -> torch.Tensor:
    """int64 keys ordered like (value desc, id asc) under a descending sort: the float32 bits
    made order-preserving, then the id reversed in the low bits. Exact, so ties never depend on
    a kernel's choice. In place after the first copy (these are the step's largest small tensors).
    """
    key = (values.float() + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0
    magnitude = key >> 31  # -1 for negative floats, 0 otherwise
    magnitude &= 0x7FFFFFFF
    key ^= magnitude  # negative floats: flip the magnitude bits, so larger floats sort higher
    key *= 1 << max_id.bit_length()
    key -= ids
    key += max_id
    return key


def compiled_order_keys(values: torch.Tensor, ids: torch.Tensor, max_id: int) -> torch.Tensor:
    """`order_keys` [R, n] in one compiled loop (ids [n] shared by every row, or [R, n]); up to
    EAGER_KEYS elements, eager: the same integers, and a compiled call's fixed cost (dynamo's
    guards, the graph's wrapper) is more than the eager ops on so few."""
    if values.numel() <= EAGER_KEYS:
        return order_keys(values, ids, max_id)
    _rows_unbacked(values, *([ids] if ids.dim() == 2 else []))
    return _compile("order_keys", order_keys)(values, ids, max_id)


def _exp2_sums(blocks: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return torch.exp2(blocks * LOG2E + shift).sum(dim=2)


def compiled_exp2_block_sums(x: torch.Tensor, shift: torch.Tensor, block: int) -> torch.Tensor:
    """[R, V / block] float32 sums of exp2(x * log2(e) + shift[row]) over each block of x
    [R, V] (float32, unit stride along V, a multiple of `block`); `shift` [R] float32."""
    if x.stride(1) != 1 or x.shape[1] % block:
        raise ValueError("block sums need rows of unit stride and whole blocks")
    rows, width = x.shape
    # Explicit strides: a view would give a single row the stride of a contiguous one, another
    # graph for the same rows.
    blocks = x.as_strided((rows, width // block, block), (x.stride(0), block, 1))
    shifts = shift.view(rows, 1, 1)
    _rows_unbacked(blocks, shifts)
    return _compile("exp2_block_sums", _exp2_sums)(blocks, shifts)


def compiled_per_row(name: str, fn):
    """`fn` compiled once per process (`torch.compile`, one graph), for functions of [rows, ...]
    tensors whose every result row depends on its own rows alone. Rows are unbacked (one graph
    for every batch, a single row included, and the same arithmetic for a row whatever rows come
    with it); the other dimensions are marked dynamic where they can be (a size of 1 is
    specialised and compiles once more)."""

    def call(*args):
        for a in args:
            if isinstance(a, torch.Tensor):
                torch._dynamo.decorators.mark_unbacked(a, 0)
                for d in range(1, a.dim()):
                    torch._dynamo.maybe_mark_dynamic(a, d)
        return _compile(name, fn)(*args)

    return call


def _rows_unbacked(*tensors: torch.Tensor) -> None:
    for t in tensors:
        torch._dynamo.decorators.mark_unbacked(t, 0)


def _compile(name: str, fn):
    """One compiled function per pass and process, made on first use."""
    with _lock:
        if name not in _compiled:
            _compiled[name] = torch.compile(fn, fullgraph=True)
        return _compiled[name]
