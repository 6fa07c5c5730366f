"""Fixtures for runtime tests: the tiny dev checkpoint, made once per session, and its runtime."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.runtime.elastic import ElasticRuntime
from server.tools.dev_model import make_dev_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dev_model("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", progress=False)


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> ElasticRuntime:
    return ElasticRuntime.open(tiny_dir)


def prompt_ids(length: int, seed: int = 0, vocab: int = 500) -> list[int]:
    """A deterministic prompt: BOS then ids from the ordinary text vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [2, *torch.randint(107, vocab, (length - 1,), generator=g).tolist()]
