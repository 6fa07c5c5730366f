"""Narrow products: BLAS vs inductor's fused multiply-reduce, at the rows a decode step has.

For a chain of FFN-shaped projections (the bench preset's: 35 layers x gate, up and down of
2048 x 512, float32), in one run: the plain read bandwidth of the machine (a sum over 256 MB),
then, for each row count, the chain compiled with inductor as it is (each product an external
BLAS call, as `F.linear` runs eagerly too) and compiled with the narrow-product rewrites
(server/runtime/narrow_products.py), as ms per chain and GB/s of weights read, and the fused form
forced at every row count. The rewrites apply up to NARROW_ROWS rows; above that the first two
columns are both BLAS's, and the forced column shows whether the bound sits at the crossover.

With --hand-loop (x86 with AVX2 and a C++ compiler; built on first use), the 1-row chain once
more through a hand-written loop that keeps four rows' accumulators in flight (FMA, one call for
the whole chain, OpenMP over rows like inductor's loop): whether a better-pipelined loop than
inductor's one-accumulator reduction would read the weights faster.

With --rotary, small products instead: the rotary's `q @ R` (R the 64 x 64 half rotation, q one
row per query head: 8 rows for a bench-preset sequence), 35 of them per call as in a step's
layers, each inside `q * cos + (q @ R) * sin` as the model writes it, compiled with inductor as
it is (a BLAS call each) and with the rewrites (fused up to SMALL_PRODUCT multiply-adds, forced
here at every row count), alternated: where the SMALL_PRODUCT bound belongs.

    python benchmarks/bench_narrow_products.py [--threads 2] [--rows 1,2,4,8,16,32] [--hand-loop]
    python benchmarks/bench_narrow_products.py --rotary [--rotary-rows 8,16,32,64]
"""

from __future__ import annotations

import argparse
from functools import partial
from unittest.mock import patch

import torch
import torch.nn.functional as F

from benchmarks.bench_sampler import time_reference
from server.runtime import narrow_products
from server.runtime.decode_graph import cpu_backend
from server.runtime.gemma3n import half_rotation
from server.runtime.narrow_products import NARROW_ROWS, SMALL_PRODUCT

HIDDEN, WIDTH, LAYERS = 512, 2048, 35


def chain(x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [F.linear(x, w) for w in weights]


def forced(x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The rewrite's form at any row count (where the bound would not apply it)."""
    return [(x[:, None, :] * w).sum(-1) for w in weights]


def rotations(qs: torch.Tensor, r: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return [torch.addcmul(q * cos, q @ r, sin) for q in qs.unbind(0)]


def rotary(args) -> None:
    """Fused vs BLAS small products at each of --rotary-rows (see the module's docstring)."""
    r = half_rotation(64, torch.float32, torch.device("cpu"))
    # The rewrite's form at any row count (as `forced` above), in place of the bounded one.
    fuse_any = {torch.ops.aten.mm.default: lambda a, b: (a.unsqueeze(2) * b.unsqueeze(0)).sum(1)}
    print(f"torch {torch.__version__}, {args.threads} threads, {LAYERS} rotations q @ R of "
          f"[rows x 64] @ [64 x 64] per call, float32; fused up to {SMALL_PRODUCT} "
          f"multiply-adds when served; median of {args.repeats} alternated")  # fmt: skip
    for rows in (int(n) for n in args.rotary_rows.split(",")):
        qs, cos, sin = torch.randn(LAYERS, rows, 64), torch.randn(rows, 64), torch.randn(rows, 64)
        torch._dynamo.reset()
        blas = torch.compile(rotations, fullgraph=True, dynamic=False)
        with patch.dict(narrow_products.NARROW, fuse_any):  # inductor reads it as it compiles
            fused = torch.compile(rotations, fullgraph=True, dynamic=False,
                                  backend=cpu_backend("inductor"))  # fmt: skip
            got = fused(qs, r, cos, sin)
        # q @ R is each input times +-1: exact, so any difference is a wrong product.
        same = all(torch.equal(g, w) for g, w in zip(got, blas(qs, r, cos, sin), strict=True))
        b, f = [], []
        for _ in range(args.repeats):
            b.append(time_reference(partial(blas, qs, r, cos, sin), 50))
            f.append(time_reference(partial(fused, qs, r, cos, sin), 50))
        b, f = (sorted(t)[len(t) // 2] for t in (b, f))
        served = "fused" if rows * 64 * 64 <= SMALL_PRODUCT else "BLAS"
        print(f"rows {rows:3d} ({rows * 64 * 64:7d} multiply-adds, served {served:>5}): BLAS "
              f"{1e6 * b:6.1f} us, fused {1e6 * f:6.1f} us, fused/BLAS {f / b:.2f}x; "
              f"equal: {same}")  # fmt: skip


HAND_LOOP = r"""
#include <torch/extension.h>
#include <immintrin.h>

// out[n] = w[n, :] . x for each weight of the chain; rows four at a time, four accumulators.
std::vector<torch::Tensor> chain(torch::Tensor x, std::vector<torch::Tensor> weights) {
  std::vector<torch::Tensor> outs;
  const float* xp = x.data_ptr<float>();
  for (auto& w : weights) {
    int64_t n_rows = w.size(0), k = w.size(1);
    auto out = torch::empty({1, n_rows}, x.options());
    const float* wp = w.data_ptr<float>();
    float* op = out.data_ptr<float>();
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < n_rows; n += 4) {
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                       _mm256_setzero_ps()};
      for (int64_t i = 0; i < k; i += 8) {
        __m256 xv = _mm256_loadu_ps(xp + i);
        for (int r = 0; r < 4; r++)
          acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(wp + (n + r) * k + i), xv, acc[r]);
      }
      for (int r = 0; r < 4; r++) {
        float lanes[8];
        _mm256_storeu_ps(lanes, acc[r]);
        op[n + r] = lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6]
                    + lanes[7];
      }
    }
    outs.push_back(out);
  }
  return outs;
}
"""


def hand_loop():
    """The chain as a hand-written C++ loop (None, with the reason, where it cannot be built)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None, f"this CPU runs {torch.backends.cpu.get_cpu_capability()}, not AVX2"
    from torch.utils.cpp_extension import load_inline

    flags = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
    module = load_inline("narrow_hand_loop", cpp_sources=HAND_LOOP, functions=["chain"],
                         extra_cflags=flags, extra_ldflags=["-fopenmp"])  # fmt: skip
    return module.chain, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--hand-loop", action="store_true", help="the 1-row chain hand-written too")
    ap.add_argument("--rotary", action="store_true", help="small products (the rotary's) only")
    ap.add_argument("--rotary-rows", default="8,16,32,64")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.rotary:
        rotary(args)
        return
    weights = [torch.randn(WIDTH, HIDDEN) for _ in range(3 * LAYERS)]
    nbytes = sum(w.nbytes for w in weights)
    plain = torch.ones(64 * 1024 * 1024)
    read = plain.nbytes / 1e9 / time_reference(plain.sum, args.repeats)
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
    if args.hand_loop:
        hand, why = hand_loop()
        if hand is None:
            print(f"hand-written loop: not run ({why})")
            return
        x = torch.randn(1, HIDDEN)
        torch._dynamo.reset()
        fused = torch.compile(chain, fullgraph=True, dynamic=False, backend=cpu_backend("inductor"))
        want = [F.linear(x.double(), w.double()) for w in weights]
        worst = max(
            ((g - w).abs().max() / w.abs().max()).item()
            for g, w in zip(hand(x, weights), want, strict=True)
        )
        # Alternated, so that both see the same moments of this machine's bandwidth.
        h, f, r = [], [], []
        for _ in range(args.repeats):
            h.append(time_reference(partial(hand, x, weights), 3))
            f.append(time_reference(partial(fused, x, weights), 3))
            r.append(time_reference(plain.sum, 3))
        h, f, r = (sorted(t)[len(t) // 2] for t in (h, f, r))
        print(f"rows   1: hand-written loop {1e3 * h:6.1f} ms ({nbytes / 1e9 / h:5.1f} GB/s), "
              f"narrow-compiled {1e3 * f:6.1f} ms ({nbytes / 1e9 / f:5.1f} GB/s), "
              f"hand/narrow {f / h:.2f}x, plain read alongside {plain.nbytes / 1e9 / r:.1f} GB/s; "
              f"largest difference from float64 {worst:.1e} of the values' scale")  # fmt: skip


if __name__ == "__main__":
    main()
