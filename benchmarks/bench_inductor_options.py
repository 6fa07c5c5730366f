"""Inductor's options for a compiled CPU decode step: the served ones vs others, side by side.

A server's compiled CPU step is compiled with decode_graph.CPU_INDUCTOR over inductor's defaults.
This builds the same batch-1 step once as served and once per variant (each an extra set of
inductor options, on top of the served ones), in one process, and times them alternately
(bench_decode.builds_side_by_side): tok/s, share of the read floor, ratio to the served step's
run of the same round, tokens equal, and how long each took to compile. Variants:

- cpp-wrapper:  the graph's wrapper (what calls the kernels, allocates the buffers between them
                and views them: ~800 Python-level calls per bench-preset step) generated as C++
                and compiled with the kernels into one library (`cpp_wrapper`);
- cpp-separate: the same, its wrapper compiled apart from the kernels, at a lower optimisation
                level (`cpp_wrapper_build_separate`: meant to cut cpp-wrapper's compile time);
- chunk-8k:     loops with fewer than 8192 elements' work run on one thread (`cpp.min_chunk_size`,
                default 512): fewer parallel loops, each ending in a barrier;
- realize-8:    pointwise expressions of more than 8 ops stored before their users read them
                (`realize_opcount_threshold`, CPU default 50): e.g. the normalised input of a
                projection computed once, not again for each output row;
- inlined:      every narrow product's input inlined into the product's loop, as inductor does
                by itself (served: the inputs of products of at least STORED_PRODUCT
                multiply-adds per row stored, computed once: narrow_products._input), e.g. the
                LM head's input (the final norm of the mean of the unembedded streams)
                recomputed for every column;
- stored-all:   every narrow product's input stored, whatever its size.

The FX-graph cache is off, so that every variant builds its own graph; the C++ it generates is
still looked up in inductor's build cache, so a compile time printed here is a cold one only where
that cache is empty (`TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)`). Cold, on the 2-core build machine,
the cpp-wrapper build is the slow one: all kernels and the wrapper in one translation unit.

    PYTHONPATH=. python benchmarks/bench_inductor_options.py [--preset bench] [--pairs 9]
        [--variants served,cpp-wrapper,cpp-separate,chunk-8k,realize-8,inlined,stored-all]
        [--base served]
"""

from __future__ import annotations

from functools import partial
from unittest.mock import patch

import torch._inductor.config as inductor_config

from benchmarks.bench_decode import side_by_side_main
from server.runtime import narrow_products

VARIANTS = {
    "served": {},
    "cpp-wrapper": {"cpp_wrapper": True},
    "cpp-separate": {"cpp_wrapper": True, "cpp_wrapper_build_separate": True},
    "chunk-8k": {"cpp.min_chunk_size": 8192},
    "realize-8": {"realize_opcount_threshold": 8},
}


def main() -> None:
    builds = {name: partial(inductor_config.patch, options) for name, options in VARIANTS.items()}
    builds["inlined"] = partial(patch.object, narrow_products, "stored", lambda x: x)
    builds["stored-all"] = partial(
        patch.object, narrow_products, "_input", lambda a, b: narrow_products.stored(a)
    )
    side_by_side_main(__doc__, builds, "variants", "served", pairs=9)


if __name__ == "__main__":
    main()
