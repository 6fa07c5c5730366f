"""Python's object heap in a serving process: what is alive once the server is set up is kept out
of the cyclic garbage collector's full passes.

Owns `freeze_long_lived`, which the runtime calls once its model is loaded, and the decode
graphs and the sampler's row passes after each compile. CPython's collector walks every tracked
object in its oldest generation on a full pass, and a full pass starts on whichever allocation
crosses its thresholds: in the middle of a step, holding the GIL, so every stream in flight
stalls. A loaded bench-preset runtime tracks ~240,000 objects (the libraries' and the model's),
and one with a compiled bucket ~640,000 (dynamo's and inductor's). On the 2-core build machine
one full pass over the first took 96-98 ms, over the second 337-343 ms, and 0.01 ms or less
once they were frozen (benchmarks/bench_collector.py, results/). vLLM (once its model is
compiled and warmed up) and SGLang (its `freeze_gc`) freeze their startup heap for the same
reason.

Frozen objects are never collected as cycles (reference counting still frees the rest). A
resize drops the graphs of the old widths; so each call first thaws what an earlier call froze
and collects over everything, then freezes what is still alive. That full pass comes right
after a load or a compile, which take seconds to minutes anyway. At exit the heap is thawed,
so that the interpreter's last collection finalises it (else nanobind, under triton, which
inductor imports, reports its frozen objects as leaked).

Deliberately does not know: what the objects are, tensors, or the C heap (host_heap.py).
"""

from __future__ import annotations

import atexit
import gc
import threading

_lock = threading.Lock()
_thaw_at_exit = False


def freeze_long_lived() -> int:
    """Collect every generation (what earlier calls froze included), then move what is still
    alive out of the collector's passes. Returns how many objects are frozen."""
    global _thaw_at_exit
    with _lock:  # two engines' compiles in one process: one thaw-collect-freeze at a time
        if not _thaw_at_exit:
            atexit.register(gc.unfreeze)
            _thaw_at_exit = True
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        return gc.get_freeze_count()
