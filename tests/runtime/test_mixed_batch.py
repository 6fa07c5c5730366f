"""A batch that mixes subnets gives every sequence exactly what it gets alone.

Six subnets (official ones with both widths, one skipping KV consumers 20-24, the custom ones
with non-official widths, with skipped consumers 30-33, and with skipped layers 3 and 7, which
changes the KV layout), prompts of different lengths, two sequences sharing a subnet: greedy
tokens must be identical and logits equal up to float32 rounding (the suite's float32 rule,
tests/runtime/conftest.py), in both FFN modes.
"""

from __future__ import annotations

import pytest
import torch

from server.engine.offline import GenerationRequest, greedy
from tests.runtime.conftest import alone as run_alone
from tests.runtime.conftest import (
    assert_float32_close,
    decode_reference,
    generate,
    prompt_ids,
)

SUBNETS = ["full", "e2b", "e2.98b-layer", "mix-0.75", "skip-30-33", "skip-3-7", "e2b"]
LENGTHS = [7, 61, 19, 33, 48, 80, 12]
STEPS = 12


@pytest.fixture(scope="module")
def alone(tiny):
    out = []
    for i, (name, n) in enumerate(zip(SUBNETS, LENGTHS, strict=True)):
        req = GenerationRequest(tiny.subnets[name], prompt_ids(n, seed=i), greedy(STEPS))
        out.append(run_alone(tiny, req, keep_logits=True))
    return out


@pytest.mark.parametrize("ffn_mode", ["grouped", "masked"])
def test_each_sequence_equals_its_run_alone(tiny, tiny64, alone, ffn_mode):
    requests = [
        GenerationRequest(tiny.subnets[name], prompt_ids(n, seed=i), greedy(STEPS))
        for i, (name, n) in enumerate(zip(SUBNETS, LENGTHS, strict=True))
    ]
    together = generate(tiny, requests, keep_logits=True, ffn_mode=ffn_mode)
    for i, (name, got, ref) in enumerate(zip(SUBNETS, together, alone, strict=True)):
        assert got.token_ids == ref.token_ids, name
        prompt = prompt_ids(LENGTHS[i], seed=i)
        exact = decode_reference(tiny64, tiny.subnets[name], prompt, ref.token_ids)
        assert_float32_close(
            torch.stack(got.logits), torch.stack(ref.logits), exact, f"{name} ({ffn_mode})"
        )


def test_sequences_stop_independently(tiny):
    # Different max_tokens in one batch: short ones leave, the others carry on unchanged.
    reqs = [
        GenerationRequest(tiny.subnets["e2b"], prompt_ids(20, seed=3), greedy(3)),
        GenerationRequest(tiny.subnets["full"], prompt_ids(30, seed=4), greedy(10)),
    ]
    short, long_ = generate(tiny, reqs)
    assert len(short.token_ids) == 3 and len(long_.token_ids) == 10
    long_alone = run_alone(tiny, reqs[1])
    assert long_.token_ids == long_alone.token_ids
