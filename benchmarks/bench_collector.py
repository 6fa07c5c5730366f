"""A full pass of Python's cyclic garbage collector in a serving process, with the long-lived heap
tracked (as before server/runtime/object_heap.py) vs frozen (as served).

A full pass starts on whichever allocation crosses the collector's thresholds, in the middle of
a step, and holds the GIL: every stream in flight stalls for it. This loads the preset's runtime
(eager), then builds a compiled engine and decodes once (one bucket compiled), and after each
times --repeats full passes over the heap thawed (`gc.unfreeze()`: every object back in the
oldest generation, as nothing froze them) and over the heap as the runtime leaves it (frozen by
`freeze_long_lived`), side by side.

    PYTHONPATH=. python benchmarks/bench_collector.py [--preset bench] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from benchmarks.bench_decode import decode_tps, engine, prompt_of
from server.runtime.elastic import ElasticRuntime
from server.runtime.object_heap import freeze_long_lived
from server.tools.dev_model import dev_model_cache


def full_pass_ms() -> float:
    t0 = time.perf_counter()
    gc.collect()
    return 1e3 * (time.perf_counter() - t0)


def side_by_side(stage: str, repeats: int) -> None:
    gc.unfreeze()
    tracked = len(gc.get_objects())
    thawed = [full_pass_ms() for _ in range(repeats)]
    frozen_count = freeze_long_lived()
    frozen = [full_pass_ms() for _ in range(repeats)]
    med = statistics.median
    print(f"{stage}: {tracked} objects tracked; a full pass {med(thawed):.1f} ms "
          f"({' '.join(f'{x:.1f}' for x in thawed)}) with them tracked, {med(frozen):.2f} ms "
          f"({' '.join(f'{x:.2f}' for x in frozen)}) with {frozen_count} frozen")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, preset {args.preset}")
    rt = ElasticRuntime.open(dev_model_cache(args.preset), dtype="float32", huge_pages=True)
    side_by_side("loaded runtime", args.repeats)
    compiled = engine(rt, True)
    t0 = time.perf_counter()
    decode_tps(compiled, rt, prompt_of(16), 8, count=False)
    print(f"compiled the batch-1 bucket and decoded 8 tokens in {time.perf_counter() - t0:.0f} s")
    side_by_side("with a compiled bucket", args.repeats)


if __name__ == "__main__":
    main()
