"""Narrow products: BLAS vs inductor's fused multiply-reduce, at the rows a decode step has.

For a chain of FFN-shaped projections (the bench preset's: 35 layers x gate, up and down of
2048 x 512, float32), in one run: the plain read bandwidth of the machine (a sum over 256 MB),
then, for each row count, the chain compiled with inductor as it is (each product an external
BLAS call, as `F.linear` runs eagerly too) and compiled with the narrow-product rewrites
(server/runtime/narrow_products.py), as ms per chain and GB/s of weights read, and the fused form
forced at every row count. The rewrites apply up to NARROW_ROWS rows; above that the first two
columns are both BLAS's, and the forced column shows whether the bound sits at the crossover.

    python benchmarks/bench_narrow_products.py [--threads 2] [--rows 1,2,4,8,16,32]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.bench_sampler import time_reference
from server.runtime.decode_graph import cpu_backend
from server.runtime.narrow_products import NARROW_ROWS

HIDDEN, WIDTH, LAYERS = 512, 2048, 35


def chain(x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [F.linear(x, w) for w in weights]


def forced(x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The rewrite's form at any row count (where the bound would not apply it)."""
    return [(x[:, None, :] * w).sum(-1) for w in weights]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights = [torch.randn(WIDTH, HIDDEN) for _ in range(3 * LAYERS)]
    nbytes = sum(w.nbytes for w in weights)
    a = torch.ones(64 * 1024 * 1024)
    read = a.nbytes / 1e9 / time_reference(a.sum, args.repeats)
    print(f"torch {torch.__version__}, {args.threads} threads, {len(weights)} products of "
          f"{WIDTH}x{HIDDEN} float32 ({nbytes / 1e6:.0f} MB); plain read {read:.1f} GB/s; "
          f"narrow up to {NARROW_ROWS} rows; median of {args.repeats}")  # fmt: skip
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, HIDDEN)
        torch._dynamo.reset()
        blas = torch.compile(chain, fullgraph=True, dynamic=False)
        fused = torch.compile(chain, fullgraph=True, dynamic=False, backend=cpu_backend("inductor"))
        anyrows = torch.compile(forced, fullgraph=True, dynamic=False)
        want = blas(x, weights)
        got = fused(x, weights)
        # Both are float32 sums of 512 products in different orders.
        worst = max(
            ((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want, strict=True)
        )
        b = time_reference(partial(blas, x, weights), args.repeats)
        f = time_reference(partial(fused, x, weights), args.repeats)
        a = time_reference(partial(anyrows, x, weights), args.repeats)
        print(f"rows {rows:3d}: BLAS {1e3 * b:6.1f} ms ({nbytes / 1e9 / b:5.1f} GB/s), "
              f"narrow-compiled {1e3 * f:6.1f} ms ({nbytes / 1e9 / f:5.1f} GB/s), "
              f"BLAS/narrow {b / f:.2f}x; the fused form forced {1e3 * a:6.1f} ms "
              f"(BLAS/forced {b / a:.2f}x); largest difference {worst:.1e} "
              f"of the values' scale")  # fmt: skip


if __name__ == "__main__":
    main()
