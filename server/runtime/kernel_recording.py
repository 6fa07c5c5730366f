"""A compiled CPU step recorded as its kernel calls and replayed without inductor's wrapper.

Owns the CPU counterpart of a CUDA graph. Inductor's CPU output is a Python wrapper around its
C++ kernels: every call it allocates the intermediate buffers, makes views of them for reuse
(`reinterpret_tensor`), and calls the kernels and the external products (`extern_kernels.bmm`,
`out=` a buffer) in order. For a graph of static shapes all of that is the same every call but the
data, and on a small step it is a large share of the time: a bench-preset batch-1 decode step
spent 2.49 ms of 23.1 in it (session 24), replayed 0.48-0.67 ms (its loop and the input
copies), and the replayed step ran 1.04-1.08x as fast as the wrapper's (medians of alternated
pairs in three runs; tiny preset, dispatch-bound: 1.58x; benchmarks/bench_decode.py, results/).
`record` runs the step once with the wrapper's names intercepted in its module, keeping every
kernel and external call with the tensors it was given; the replay makes the same calls on the
same tensors (buffers kept alive across steps, as a CUDA graph's pool keeps them), after the
caller has copied the step's inputs into the static ones the recording was made with. Weights
and the cache are read and written where they are, by the address a call was recorded with: a
caller that replaces one (a resize) must record again, as for a CUDA graph.

A recording is refused (`Unrecordable`, with the reason) unless the wrapper does only what can be
replayed this way: its code names nothing but the kernels, the external products called with
`out=`, the buffer allocator and views, and dtypes; every tensor a call is given is a graph input
or a buffer (or view) the wrapper made; the static inputs reach the graph as themselves (not a
copy); and the output is one of the wrapper's buffers. A step with an operator inductor leaves to
ATen (e.g. the CPU attention kernel of a batch past narrow_products' rows: it allocates its output
every call) is refused and runs as compiled.

Deliberately does not know: the model, decode steps, buckets, or when a recording is stale.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

# Names a recordable wrapper's `call` may use besides its kernels (`cpp_fused_*`) and dtypes.
_ALLOCATORS = ("empty_strided_cpu", "reinterpret_tensor")
_WRAPPER_NAMES = frozenset({"args", "clear", "torch", "extern_kernels", *_ALLOCATORS})
_EXTERNS = frozenset({"bmm", "mm", "addmm", "baddbmm"})
_lock = threading.Lock()  # one recording at a time: it patches a class and a module


class Unrecordable(RuntimeError):
    """The step's compiled code does something a replay of its kernel calls would not redo."""


Call = tuple[Callable[..., Any], tuple, dict]


class Replay:
    """The recorded calls, in order; calling it makes them again."""

    def __init__(self, calls: list[Call]) -> None:
        self.calls = tuple(calls)

    def __call__(self) -> None:
        for fn, args, kwargs in self.calls:
            fn(*args, **kwargs)


def record(run: Callable[..., Any], *static: torch.Tensor) -> tuple[Any, Replay]:
    """(the output of `run(*static)`, its replay): `run` must call one inductor CPU graph, whose
    recording it runs twice (finding the graph, then recording it). Raises Unrecordable."""
    with _lock:
        graph = _the_graph(run, static)
        program, out = _recorded(graph, run, static)
    return out, Replay(program)


def _the_graph(run, static):
    """The one inductor graph (CompiledFxGraph) that `run` calls, found by running it."""
    from torch._inductor.output_code import CompiledFxGraph

    me, found = threading.get_ident(), []
    original = CompiledFxGraph.__call__

    def spy(graph, inputs):
        if threading.get_ident() == me:
            found.append(graph)
        return original(graph, inputs)

    CompiledFxGraph.__call__ = spy
    try:
        run(*static)
    finally:
        CompiledFxGraph.__call__ = original
    if len(found) != 1:
        raise Unrecordable(f"the step called {len(found)} inductor graphs, not one")
    return found[0]


def _recorded(graph, run, static) -> tuple[list[Call], Any]:
    call = graph.current_callable
    code = getattr(call, "__func__", call).__code__
    module = getattr(call, "__func__", call).__globals__
    unknown = sorted(
        n for n in code.co_names
        if n not in _WRAPPER_NAMES and n not in _EXTERNS and not n.startswith("cpp_fused")
        and not isinstance(getattr(torch, n, None), torch.dtype)
    )  # fmt: skip
    if unknown:
        raise Unrecordable(f"the graph's wrapper calls {', '.join(unknown)}")
    me = threading.get_ident()
    program: list[Call] = []
    made: dict[int, torch.Tensor] = {}  # id -> tensor the wrapper made (kept: ids stay unique)
    inputs: list[torch.Tensor] = []
    refusals: list[str] = []

    def kernel(fn):
        def recorded(*args, **kwargs):
            if threading.get_ident() == me:
                program.append((fn, args, kwargs))
            return fn(*args, **kwargs)

        return recorded

    def allocator(fn):
        def recorded(*args, **kwargs):
            t = fn(*args, **kwargs)
            if threading.get_ident() == me:
                made[id(t)] = t
            return t

        return recorded

    class Externs:
        def __init__(self, inner) -> None:
            self.inner = inner

        def __getattr__(self, name: str):
            fn = getattr(self.inner, name)

            def recorded(*args, **kwargs):
                if threading.get_ident() == me:
                    if name not in _EXTERNS or "out" not in kwargs:
                        refusals.append(f"extern_kernels.{name} without out=")
                    program.append((fn, args, kwargs))
                return fn(*args, **kwargs)

            return recorded

    def wrapper(call_inputs):
        if threading.get_ident() == me:
            inputs.extend(t for t in call_inputs if isinstance(t, torch.Tensor))
        return call(call_inputs)

    patched = {
        n: (kernel(f) if n.startswith("cpp_fused") else allocator(f))
        for n, f in module.items()
        if n.startswith("cpp_fused") or n in _ALLOCATORS
    }
    if "extern_kernels" in module:
        patched["extern_kernels"] = Externs(module["extern_kernels"])
    saved = {n: module[n] for n in patched}
    module.update(patched)
    graph.current_callable = wrapper
    try:
        out = run(*static)
    finally:
        graph.current_callable = call
        module.update(saved)
    if refusals:
        raise Unrecordable(refusals[0])
    known = {id(t) for t in inputs} | set(made)
    for fn, args, kwargs in program:
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor) and id(a) not in known:
                raise Unrecordable(f"{getattr(fn, '__name__', fn)} is given a tensor the "
                                   "wrapper did not make (an operator's own output)")  # fmt: skip
    storages = {t.untyped_storage().data_ptr() for t in inputs}
    if any(s.untyped_storage().data_ptr() not in storages for s in static):
        raise Unrecordable("a static input reaches the graph as a copy")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    buffers = {t.untyped_storage().data_ptr() for t in made.values()}
    if any(o.untyped_storage().data_ptr() not in buffers for o in outs):
        raise Unrecordable("the step's output is not one of the graph's buffers")
    return program, out
