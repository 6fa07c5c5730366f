"""Batch-invariant mode (server/runtime/batch_invariant.py, `batch_invariant: true`): a request's
logits are bitwise what it gets alone, whatever it shares its steps with, in bfloat16 too.

Proves: the replaced operations give a row the same bits alone and among others (products row by
row; GELU's tanh form, whose vectorised and scalar loops round differently, always vectorised);
through the engine, 16 concurrent greedy requests over eight subnets (both KV layouts, skipped
layers, non-official widths) produce exactly their solo tokens and logits in bfloat16, and six
do in float32 (where the element-wise rounding differences are not hidden by bfloat16's coarse
rounding); the sparsity statistics no longer depend on the dtype or the FFN layout (float32 in
both); and the mode refuses to be combined with compiled (padded) steps.

Exact equality is the claim, so every comparison here is `torch.equal`, never a tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.engine.assembly import assemble_engine
from server.engine.offline import GenerationRequest, generate, greedy
from server.engine.scheduler import SchedulerConfig
from server.runtime.batch_invariant import BatchInvariantOps
from server.runtime.elastic import ElasticRuntime
from server.runtime.gemma3n import Gemma3nModel
from tests.runtime.conftest import prompt_ids

SUBNETS = [
    "full",
    "e2b",
    "e2.98b-layer",
    "mix-0.75",
    "skip-3-7",
    "skip-30-33",
    "e3.39b-layer",
    "e2.49b-block",
]


@pytest.fixture(scope="module")
def tiny_bf16(tiny_dir) -> ElasticRuntime:
    return ElasticRuntime.open(tiny_dir, dtype="bfloat16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_replaced_operation_gives_a_row_the_same_bits_alone_and_batched(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 1, 16, generator=g).to(dtype)  # rows of 16: loop tails on any CPU
    w = torch.randn(48, 16, generator=g).to(dtype)
    p = torch.randn(3, 16, 16, generator=g).to(dtype)
    s = torch.randn(7, 4, 16, generator=g).to(dtype)
    c = torch.randn(7, 4, 4, generator=g).to(dtype)
    ops = {
        "linear": lambda t, i: F.linear(t, w),
        "gelu": lambda t, i: F.gelu(t, approximate="tanh"),
        "tanh": lambda t, i: torch.tanh(t),
        "einsum": lambda t, i: torch.einsum("nh,aoh->nao", t[:, 0], p),
        "baddbmm": lambda t, i: torch.baddbmm(s[i], c[i], s[i]),
        "matmul": lambda t, i: t @ w.T,
    }
    with BatchInvariantOps():
        for name, op in ops.items():
            for rows in (slice(0, 7), slice(2, 5)):
                batched = op(x[rows], rows)
                for k, r in enumerate(range(rows.start, rows.stop)):
                    alone = op(x[r : r + 1], slice(r, r + 1))
                    assert torch.equal(batched[k : k + 1], alone), (name, rows, r)


def _engine(rt, invariant: bool):
    # A 32-token budget over 16 requests: together, prompts are cut into other chunks than alone
    config = SchedulerConfig(
        max_num_seqs=16, max_num_batched_tokens=32, max_prefill_chunk=12, max_model_len=512
    )
    return assemble_engine(rt, 16 << 20, config, block_size=8, batch_invariant=invariant)


def _alone_and_together(rt, requests):
    alone = [generate(_engine(rt, True), [r], keep_logits=True)[0] for r in requests]
    together = generate(_engine(rt, True), requests, keep_logits=True)
    return alone, together


def test_sixteen_concurrent_greedy_requests_equal_their_solo_runs_in_bfloat16(tiny_bf16):
    """Different prompt lengths (so prefill chunks split differently alone and together, and
    decode steps carry 1 to 16 rows), eight subnets: tokens and every step's logits equal."""
    requests = [
        GenerationRequest(
            tiny_bf16.subnets[SUBNETS[i % len(SUBNETS)]],
            prompt_ids(5 + (7 * i) % 19, seed=i),
            greedy(5),
        )
        for i in range(16)
    ]
    alone, together = _alone_and_together(tiny_bf16, requests)
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert b.token_ids == a.token_ids, (i, requests[i].subnet.name)
        assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True)), i


def test_concurrent_requests_equal_their_solo_runs_bitwise_in_float32(tiny):
    requests = [
        GenerationRequest(tiny.subnets[name], prompt_ids(7 + 5 * i, seed=20 + i), greedy(5))
        for i, name in enumerate(SUBNETS[:6])
    ]
    alone, together = _alone_and_together(tiny, requests)
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert b.token_ids == a.token_ids, i
        assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True)), i


def test_sparsity_statistics_are_float32_in_both_layouts_in_bfloat16():
    """A row of width 4915 (a count bfloat16 cannot hold: it rounds to 4928) alone, and masked
    inside a batch at width 8192: the mean and standard deviation are float32 in both, so the
    cutoff rounds to the same bfloat16 and the kept activations are equal. (They could differ
    only where the float32 sums, taken in different orders, straddle a bfloat16 rounding
    boundary: about 1e-7 relative in 2^-9, a few in 100,000 rows; here, 8 fixed rows.)"""
    g = torch.Generator().manual_seed(3)
    width, wide, z = 4915, 8192, 1.6448536  # z of the 0.95 sparsity target
    gate = (torch.randn(8, 1, wide, generator=g) * 2).to(torch.bfloat16)
    row_width = torch.full((8, 1, 1), float(width))
    keep = torch.arange(wide) < row_width
    masked = Gemma3nModel.sparsify(gate, z, keep, row_width)
    alone = Gemma3nModel.sparsify(gate[..., :width], z)
    assert torch.equal(masked[..., :width], alone)
    exact = gate[..., :width].double()
    cutoff = (exact.mean(-1, keepdim=True) + z * exact.std(-1, keepdim=True, correction=0)).to(
        torch.bfloat16
    )
    assert torch.equal(alone, F.relu(gate[..., :width] - cutoff))  # the float64 answer


def test_batch_invariant_steps_are_not_compiled(tiny):
    from server.config import ConfigError, ServerConfig
    from server.runtime.runner import ModelRunner

    with pytest.raises(ValueError, match="cannot be compiled"):
        ModelRunner(tiny.model, 16, 8, (1,), compile_backend="aot_eager", batch_invariant=True)
    with pytest.raises(ConfigError, match="batch_invariant and compile"):
        ServerConfig(batch_invariant=True, compile=True)
