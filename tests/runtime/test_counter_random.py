"""The counter-based hash behind every draw (server/runtime/counter_random.py), against murmur3's
32-bit finalizer written on Python ints, whose arithmetic is exact: the tensor form must give the
same bits for every input, the extremes of each argument included, and stay within its op budget
(on an accelerator each op is a kernel launch, and the sampler hashes once or more per step).
"""

from __future__ import annotations

import random

import torch

from server.runtime.counter_random import MASK32, MAX_INDEX, STREAM_SHIFT, _mul32, hash32
from tests.runtime.conftest import DispatchedOps

FMIX_CONSTANTS = (0x85EBCA6B, 0xC2B2AE35)  # murmur3's fmix32


def fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * FMIX_CONSTANTS[0]) & MASK32
    h ^= h >> 13
    h = (h * FMIX_CONSTANTS[1]) & MASK32
    return h ^ (h >> 16)


def reference(lo: int, hi: int, stream: int, index: int) -> int:
    return fmix32(fmix32(index ^ lo ^ (stream << STREAM_SHIFT)) ^ hi)


EDGES = [0, 1, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]


def test_a_product_keeps_the_low_32_bits_of_the_exact_one():
    rng = random.Random(0)
    values = EDGES + [rng.randrange(2**32) for _ in range(4000)]
    h = torch.tensor(values, dtype=torch.long)
    for c in [*FMIX_CONSTANTS, 1, 2**31 - 1, 2**31, 2**32 - 1]:
        assert _mul32(h, c).tolist() == [(v * c) & MASK32 for v in values], hex(c)


def test_hashes_equal_murmur3s_finalizer_on_python_ints():
    rng = random.Random(1)
    keys = [(lo, hi) for lo in EDGES for hi in (0, 2**32 - 1)]
    keys += [(rng.randrange(2**32), rng.randrange(2**32)) for _ in range(16)]
    indices = [0, 1, MAX_INDEX - 1] + [rng.randrange(MAX_INDEX) for _ in range(509)]
    lo = torch.tensor([k[0] for k in keys], dtype=torch.long)
    hi = torch.tensor([k[1] for k in keys], dtype=torch.long)
    index = torch.tensor(indices, dtype=torch.long).expand(len(keys), -1)
    for stream in (0, 1, 200, 255):
        got = hash32(lo, hi, stream, index).tolist()
        want = [[reference(a, b, stream, i) for i in indices] for a, b in keys]
        assert got == want, stream


def test_a_hash_of_a_batch_dispatches_at_most_25_ops():
    # Two fmix32 rounds of 10 ops each (three shifts, three xors, two multiplies, two masks),
    # three xors injecting the key halves and the stream, two views of the key halves as
    # columns: 25, whatever the batch. (Products from 16-bit halves took 41.)
    lo = torch.tensor([3, 2**32 - 1], dtype=torch.long)
    hi = torch.tensor([5, 7], dtype=torch.long)
    index = torch.arange(64).expand(2, -1)
    with DispatchedOps() as count:
        hash32(lo, hi, 9, index)
    assert count.ops.total() <= 25, count.ops
