"""Fixtures for the API tests: the tiny dev checkpoint, one live server for the session, and the
in-process runtime the live answers are compared with.

The server is a real subprocess (`python -m server serve`) on a free port of 127.0.0.1, with the
test tenants and tiers of `live.py`; its log is printed when a test fails to start it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.api.live import LiveServer, start_server

if TYPE_CHECKING:
    from server.runtime.elastic import ElasticRuntime


@pytest.fixture(scope="session")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tmp_path_factory.mktemp("server"), tiny_dir)
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="session")
def rt(tiny_dir: Path) -> ElasticRuntime:
    """The in-process runtime on the same checkpoint (one thread: the server has the other)."""
    import torch

    from server.runtime.elastic import ElasticRuntime

    torch.set_num_threads(1)
    return ElasticRuntime.open(tiny_dir)


@pytest.fixture(scope="session")
def rt64(tiny_dir: Path) -> ElasticRuntime:
    """The same checkpoint in float64: what measures float32 rounding (tests/runtime/conftest)."""
    from server.runtime.elastic import ElasticRuntime

    return ElasticRuntime.open(tiny_dir, dtype="float64")
