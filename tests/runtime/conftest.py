"""Fixtures for runtime tests: the tiny dev checkpoint's runtime (float32, and float64 as the
reference for float32 rounding), generation through the engine, and the float32 comparison rule.

How float32 logits are compared, everywhere in the suite: two float32 evaluations of the same
logits (another batch shape, FFN mode, file layout or implementation) differ only by rounding,
and how much depends on the CPU's kernels and the thread count (sums reorder). So the bound is
never a number seen on one machine: it is measured in the same run, as NOISE_FACTOR times the
float32 rounding error of the reference side against the same logits computed in float64, with
a floor of a few float32 units of the logits' scale. A real error (a wrong mask, a mis-mapped
tensor, a wrong width) moves logits by orders of magnitude more.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from server.engine import offline
from server.engine.assembly import assemble_engine, kv_bytes_for
from server.engine.offline import Generation, GenerationRequest
from server.runtime.elastic import ElasticRuntime

# Two threads by default (this machine's cores); OMP_NUM_THREADS, when set, chooses another count,
# so the suite can be run with other reduction orders (the float32 rule must hold for any).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> ElasticRuntime:
    return ElasticRuntime.open(tiny_dir)


@pytest.fixture(scope="session")
def tiny64(tiny_dir: Path) -> ElasticRuntime:
    """The same checkpoint computed in float64: the reference that measures float32 rounding."""
    return ElasticRuntime.open(tiny_dir, dtype="float64")


@pytest.fixture(scope="session")
def trained() -> ElasticRuntime:
    """The committed trained dev model (models/dev-trained): float32 over its bf16 weights."""
    from server.tools.dev_model import TRAINED_CHECKPOINT

    return ElasticRuntime.open(TRAINED_CHECKPOINT, dtype="float32")


@pytest.fixture(scope="session")
def trained64() -> ElasticRuntime:
    from server.tools.dev_model import TRAINED_CHECKPOINT

    return ElasticRuntime.open(TRAINED_CHECKPOINT, dtype="float64")


# Two float32 evaluations' rounding errors are of one size (same operations, other orders): the
# largest over hundreds of logits is a stable statistic, so the other side's is within a small
# factor of the measured side's, and their difference within the sum. 8 leaves room for that.
NOISE_FACTOR = 8
FLOOR_ULPS = 64  # float32 units of the logits' largest magnitude


def float32_bound(measured: torch.Tensor, exact: torch.Tensor) -> float:
    """How far another float32 evaluation of `measured`'s logits may lie from it."""
    err = (measured.double() - exact.double()).abs().max().item()
    scale = exact.double().abs().max().item()
    return max(NOISE_FACTOR * err, FLOOR_ULPS * torch.finfo(torch.float32).eps * scale)


def assert_float32_close(
    got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor, what: str = "logits"
) -> None:
    """`got` and `want`: float32 evaluations of the same logits; `exact`: them in float64."""
    assert got.shape == want.shape == exact.shape, (got.shape, want.shape, exact.shape)
    bound = float32_bound(want, exact)
    diff = (got.double() - want.double()).abs().max().item()
    assert diff <= bound, (
        f"{what} differ by {diff:.2e}; float32 rounding here allows {bound:.2e} "
        f"({NOISE_FACTOR}x the reference side's error against float64)"
    )


def prefill_logits(
    rt: ElasticRuntime, subnet, ids: list[int], all_positions: bool = True
) -> torch.Tensor:
    """Logits at every position of `ids` from one prefill step of the model alone (no engine):
    for a generated sequence, position p holds what decode step p - len(prompt) + 1 saw."""
    return rt.prefill_logits(rt.subnets[subnet.name], ids, all_positions)


def decode_reference(
    rt64: ElasticRuntime, subnet, prompt: list[int], generated: list[int]
) -> torch.Tensor:
    """The float64 logits each decode step of a generation saw (teacher-forced: the float32
    run's own tokens), [steps, vocab]."""
    full = prefill_logits(rt64, subnet, prompt + generated[:-1])
    return full[len(prompt) - 1 :]


def prompt_ids(length: int, seed: int = 0, vocab: int = 500) -> list[int]:
    """A deterministic prompt: BOS then ids from the ordinary text vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [2, *torch.randint(107, vocab, (length - 1,), generator=g).tolist()]


def generate(
    rt: ElasticRuntime,
    requests: list[GenerationRequest],
    keep_logits: bool = False,
    ffn_mode: str = "grouped",
) -> list[Generation]:
    """Run requests to completion in one batch through a fresh engine sized for them (the one
    generation path: the serving engine, via server/engine/offline.py)."""
    tokens = sum(len(r.prompt_ids) + r.params.max_tokens + 16 for r in requests)
    engine = assemble_engine(rt, kv_bytes_for(rt, tokens), ffn_mode=ffn_mode)
    return offline.generate(engine, requests, keep_logits=keep_logits)


def alone(rt: ElasticRuntime, request: GenerationRequest, keep_logits: bool = False) -> Generation:
    """One request with nothing else in its batch."""
    [result] = generate(rt, [request], keep_logits)
    return result


class DispatchedOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside it, by op name (`ops`); on an accelerator each is
    at least one kernel launch."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))
