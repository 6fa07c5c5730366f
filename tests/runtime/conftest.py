"""Fixtures for runtime tests: the tiny dev checkpoint, made once per session, and its runtime."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.engine import offline
from server.engine.assembly import assemble_engine, kv_bytes_for
from server.engine.offline import Generation, GenerationRequest
from server.runtime.elastic import ElasticRuntime

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> ElasticRuntime:
    return ElasticRuntime.open(tiny_dir)


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
