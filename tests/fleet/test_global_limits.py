"""The global tenant limits as the API uses them, without Ray: a decision that waits for the
store (slow, or gone until `limits_timeout_s`) waits off the ingress's event loop.

The store's answer is held back by an event the test sets only after seeing the event loop run
other work, so the test has no timing in it: a decision that blocked the loop would never let
the test set the event (the store's wait gives up after 10 s and the test fails).
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from server.api.limits import Limiter
from server.api.submission import decide
from server.fleet.tenant_limits import UNAVAILABLE, GlobalLimiter
from server.tenancy import Tenant, Tier

TENANT = Tenant("t", Tier("ten", requests_per_minute=10, max_concurrent=100))


def test_a_decision_waiting_for_the_store_leaves_the_event_loop_free():
    answer = threading.Event()

    def call(method: str, *args):
        if method in ("peek", "admit") and not answer.wait(10):
            raise TimeoutError("the test never answered: the event loop was blocked")
        return None

    limiter = GlobalLimiter(call, lambda *args: None, on_loss="closed")
    svc = SimpleNamespace(limiter=limiter)

    async def main() -> None:
        admitting = asyncio.create_task(decide(svc, limiter.admit, TENANT, 10, 1))
        ticks = 0
        while ticks < 3:  # other work runs while the decision waits
            await asyncio.sleep(0.01)
            ticks += 1
        assert not admitting.done()
        answer.set()
        assert await admitting is None
        assert await decide(svc, limiter.peek, TENANT, 10, 1) is None

    asyncio.run(main())
    assert limiter.connected


def test_a_lost_store_refuses_off_the_event_loop_when_failing_closed():
    def call(method: str, *args):
        raise TimeoutError("no answer")

    limiter = GlobalLimiter(call, lambda *args: None, on_loss="closed")
    refusal = asyncio.run(decide(SimpleNamespace(limiter=limiter), limiter.admit, TENANT, 10, 1))
    assert refusal == UNAVAILABLE and not limiter.connected and limiter.loss_decisions == 1


def test_a_local_limiter_decides_at_once():
    """One process: no thread, nothing runs between the decision and what follows it."""
    limiter = Limiter()

    async def main() -> None:
        other = asyncio.create_task(asyncio.sleep(0))
        assert await decide(SimpleNamespace(limiter=limiter), limiter.admit, TENANT, 10, 1) is None
        assert not other.done()  # the decision never yielded to the event loop
        await other

    asyncio.run(main())
    assert limiter.in_flight(TENANT) == 1
