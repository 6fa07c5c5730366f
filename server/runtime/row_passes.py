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
reads its input once (benchmarks/bench_sampler.py times both forms). On a CPU that loop's cost
is its exponentials, not its reads, so the compiled block sums take them from `polynomial_exp2`
(plain float32 arithmetic, a few ulps) with multiply-adds contracted, not inductor's exp2.

The number of rows is unbacked (`mark_unbacked`), so one graph serves every batch, a single row
included (a dynamic size would be specialised at 1), and every element's arithmetic is the same
whatever the batch: a row's keys and sums are the same bits alone or among others
(tests/runtime/test_sampler.py).

`compiled_per_row` compiles, the same way, a per-row function the sampler hands over (its top-k
draw: a few dozen small ops on [rows, k] candidates, each a dispatch eager, and on an accelerator
a kernel launch). Once compiled for a kind of input, each runs the code dynamo made for it
without dynamo's per-call guard checks (`_Compiled`).

Deliberately does not know: sampling, which rows want logprobs, or what the values mean.
"""

from __future__ import annotations

import math
import threading
import types

import torch

from server.runtime.object_heap import freeze_long_lived

LOG2E = 1.0 / math.log(2.0)
# Order keys of at most this many elements are formed eagerly: one row's block keys at Gemma's
# vocabulary (a batch of one).
EAGER_KEYS = 4096
_lock = threading.Lock()
_compiled: dict[str, _Compiled] = {}


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
    EAGER_KEYS elements, eager: the same integers, and a compiled call's fixed cost is more than
    the eager ops on so few."""
    if values.numel() <= EAGER_KEYS:
        return order_keys(values, ids, max_id)
    return _compile("order_keys", order_keys, unbacked=(0, 1) if ids.dim() == 2 else (0,))(
        values, ids, max_id
    )


# 2^f for |f| <= 1/2 as 1 + f (c1 + f (c2 + f (c3 + f (c4 + f c5)))): c1..c5 a least-squares fit
# of the relative error on 4,000 Chebyshev nodes (numpy, float64), rounded to float32: about
# 1e-7 relative in exact arithmetic, a few float32 ulps evaluated in float32 (the test holds it
# to a rigorous 2^-19: test_the_polynomial_exp2_keeps_its_error_bound_...). The constant term is
# 1, so 2^0 is exactly 1.
_EXP2_TERMS = (
    0.6931468844413757,
    0.24022237956523895,
    0.05550893023610115,
    0.009671698324382305,
    0.0013218672247603536,
)


def polynomial_exp2(t: torch.Tensor) -> torch.Tensor:
    """2^t, float32, for t below 127.5, in arithmetic a compiled CPU loop keeps in vector
    registers: t = n + f with n = round(t), 2^f by the polynomial above, 2^n by writing n + 127
    into the exponent's bits. Results below 2^-126.5 are 0 (t = -inf included); NaN stays NaN.
    Inductor's own exp2 on a CPU is SLEEF's (1 ulp): with it the compiled normaliser took 6.07
    ms at B=32 in session 16's bench_sampler run, with this and contraction 3.30 ms (both in
    benchmarks/results/bench_sampler.txt)."""
    t = t.clamp(min=-127.0)
    n = torch.round(t)
    f = t - n
    p = f * _EXP2_TERMS[-1] + _EXP2_TERMS[-2]
    for c in (*reversed(_EXP2_TERMS[:-2]), 1.0):
        p = p * f + c
    return p * ((n.to(torch.int32) + 127) << 23).view(torch.float32)


# The block sums' loop contracted to fused multiply-adds (the polynomial's steps, the exponents):
# fewer instructions in a loop whose cost is its arithmetic. Only there: other passes promise the
# eager passes' bits.
_CONTRACTED = {"cpp.enable_floating_point_contract_flag": "fast"}


def _exp2_sums(blocks: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    t = blocks * LOG2E + shift
    return (polynomial_exp2(t) if t.is_cpu else torch.exp2(t)).sum(dim=2)


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
    return _compile("exp2_block_sums", _exp2_sums, unbacked=(0, 1), options=_CONTRACTED)(
        blocks, shifts
    )


def compiled_per_row(
    name: str, fn, dynamic_columns: bool = True, shared: tuple[int, ...] = ()
) -> _Compiled:
    """`fn` compiled once per process (`torch.compile`, one graph), for functions of [rows, ...]
    tensors whose every result row depends on its own rows alone. Rows are unbacked (one graph
    for every batch, a single row included, and the same arithmetic for a row whatever rows come
    with it). With `dynamic_columns` the other dimensions are marked dynamic where they can be
    (a size of 1 is specialised and compiles once more); without, each of their sizes compiles
    its own graph (for a function whose sizes are all its caller's constants: marked static, so
    that dynamo does not make a dimension dynamic once it has seen two sizes, as it does on its
    own, in a graph that may take a size for a constant, e.g. in `math.gcd`). `shared`: the
    positions of arguments that are not per row (the same for every row: e.g. a size carried as
    a tensor's length), each of whose dimensions is dynamic."""
    per_row = tuple(i for i in range(fn.__code__.co_argcount) if i not in shared)
    static = () if dynamic_columns else per_row
    return _compile(
        name, fn, per_row, dynamic_columns, dynamic=tuple(shared), static_columns=static
    )


class _Compiled:
    """`fn` through torch.compile, called directly once compiled for a kind of input.

    Dynamo checks its guards (dtypes, ranks, strides, sizes it assumed, global state) on every
    call, which on a CPU costs more than these passes' own work at small batches. So after the
    first call for a kind of input (`_kind`: everything those guards test, the sizes of dynamic
    dimensions aside), the code dynamo made for it runs directly, as decode_graph.py does for
    the decode step. With `check_guards` (tests), each direct call is checked against the
    guards first and fails if they would have failed.

    `unbacked`: the positional arguments whose rows (dimension 0) are unbacked;
    `dynamic_columns`: every other dimension of every tensor argument is dynamic where it can
    be; `dynamic`: positional arguments (not among `unbacked`) each of whose dimensions is;
    `static_columns`: positional arguments each of whose dimensions but the rows is static."""

    check_guards = False

    def __init__(
        self,
        fn,
        unbacked: tuple[int, ...],
        dynamic_columns: bool,
        options: dict | None = None,
        dynamic: tuple[int, ...] = (),
        static_columns: tuple[int, ...] = (),
    ) -> None:
        self.fn = fn
        self.compiled = torch.compile(fn, fullgraph=True, options=options)
        self.unbacked = unbacked
        self.dynamic_columns = dynamic_columns
        self.dynamic = dynamic
        self.static_columns = static_columns
        self.params = fn.__code__.co_varnames[: fn.__code__.co_argcount]
        self.direct: dict[tuple, tuple] = {}

    def __call__(self, *args):
        kind = _kind(args, self.dynamic_columns, self.dynamic)
        made = self.direct.get(kind)
        if made is None:
            return self._first(kind, args)
        run, guards = made
        if self.check_guards:
            frame = dict(zip(self.params, args, strict=True))
            if not guards.check(frame):
                why = guards.check_verbose(frame).verbose_code_parts
                raise RuntimeError(f"{self.fn.__name__}: a direct call fails its guards: {why}")
        return run(*args)

    def _first(self, kind: tuple, args: tuple):
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                if i in self.unbacked or self.dynamic_columns:
                    torch._dynamo.decorators.mark_unbacked(a, 0)
                if self.dynamic_columns:
                    for d in range(1, a.dim()):
                        torch._dynamo.maybe_mark_dynamic(a, d)
                if i in self.dynamic:
                    for d in range(a.dim()):
                        torch._dynamo.maybe_mark_dynamic(a, d)
                if i in self.static_columns:
                    for d in range(1, a.dim()):
                        torch._dynamo.mark_static(a, d)
        with _lock:
            out = self.compiled(*args)
            frame = dict(zip(self.params, args, strict=True))
            for entry in _debug_get_cache_entry_list(self.fn.__code__):
                if entry.guard_manager.check(frame):
                    run = types.FunctionType(entry.code, self.fn.__globals__)
                    self.direct[kind] = (run, entry.guard_manager)
                    break
            freeze_long_lived()  # what compiling left alive: out of later full collections
        return out


def _kind(args: tuple, dynamic_columns: bool, dynamic: tuple[int, ...] = ()) -> tuple:
    """What dynamo's guards on these arguments test, but for the rows (unbacked: never
    guarded): for a tensor its dtype, device, grad, inference flag, rank, other sizes and
    strides (with `dynamic_columns`, a packed tensor's other sizes only as 0, 1 or more, all
    that the guards of a dynamic size test; for an argument in `dynamic`, every size so); the
    value of anything else; the grad and inference modes. A kind that missed something would
    fail `check_guards` in the tests."""
    kind: list = [torch.is_grad_enabled(), torch.is_inference_mode_enabled()]
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            if not _packed(a):
                layout: tuple = (tuple(a.shape[1:]), a.stride())
            elif i in dynamic:
                layout = tuple(min(n, 2) for n in a.shape)
            elif dynamic_columns:
                layout = tuple(min(n, 2) for n in a.shape[1:])
            else:
                layout = tuple(a.shape[1:])
            kind.append((a.dtype, a.device, a.requires_grad, a.is_inference(), a.dim(), layout))
        else:
            kind.append((type(a), a))
    return tuple(kind)


def _packed(t: torch.Tensor) -> bool:
    """Row-major with no gaps, size-1 dimensions included (`is_contiguous` ignores their strides,
    which a graph compiled for another such tensor may use)."""
    expected = 1
    for n, stride in zip(reversed(t.shape), reversed(t.stride()), strict=True):
        if stride != expected:
            return False
        expected *= n
    return True


def _compile(
    name: str,
    fn,
    unbacked: tuple[int, ...] = (),
    dynamic_columns: bool = False,
    options: dict | None = None,
    dynamic: tuple[int, ...] = (),
    static_columns: tuple[int, ...] = (),
) -> _Compiled:
    """One compiled function per pass and process, made on first use (`options`: inductor's)."""
    with _lock:
        if name not in _compiled:
            _compiled[name] = _Compiled(
                fn, unbacked, dynamic_columns, options, dynamic, static_columns
            )
        return _compiled[name]
