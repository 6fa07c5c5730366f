"""Fixtures for the engine tests: a fake monotonic clock that only engine steps move."""

from __future__ import annotations

import time

import pytest

from tests.engine.fake_runner import FakeClock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """`time.monotonic` as a FakeClock (restored after the test): request events, latencies
    and elasticity's cool-down read it, and a FakeRunner given it advances it by each step's
    seconds. Only for synchronous tests: asyncio's own timers read time.monotonic too."""
    fake = FakeClock()
    monkeypatch.setattr(time, "monotonic", fake)
    return fake
