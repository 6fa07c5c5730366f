"""Global tenant limits (server/fleet/tenant_limits.py): several ingress replicas share one
store, so a tenant gets its tier once; losing the store fails closed or open as configured."""

from __future__ import annotations

import pytest

from server.fleet.tenant_limits import GlobalLimiter, LimitsStore
from server.tenancy import Tenant, Tier

TEN_PER_MINUTE = Tenant("t", Tier("ten", requests_per_minute=10, max_concurrent=100))
SOLO = Tenant("s", Tier("solo", max_concurrent=1))


class Link:
    """A transport to one in-process store that can be cut."""

    def __init__(self, store: LimitsStore):
        self.store = store
        self.up = True
        self.late = False  # the store runs calls, but the answers come after the caller gave up
        self.sent: list[str] = []

    def call(self, method: str, *args):
        if not self.up:
            raise TimeoutError("no answer")
        answer = getattr(self.store, method)(*args)
        if self.late:
            raise TimeoutError("no answer in time")
        return answer

    def send(self, method: str, *args) -> None:
        if not self.up:
            raise ConnectionError("gone")
        self.sent.append(method)
        getattr(self.store, method)(*args)


def ingress(link: Link, on_loss: str = "closed") -> GlobalLimiter:
    return GlobalLimiter(link.call, link.send, on_loss)


def test_two_ingresses_share_one_allowance():
    link = Link(LimitsStore())
    a, b = ingress(link), ingress(link)
    answers = [(a if i % 2 else b).admit(TEN_PER_MINUTE, 1) for i in range(20)]
    assert sum(r is None for r in answers) == 10  # not 20: one bucket for both
    refused = [r for r in answers if r is not None]
    assert {r.limit for r in refused} == {"requests_per_minute"}
    assert all(r.retry_after >= 1 for r in refused)


def test_concurrency_is_global_and_released_by_either():
    link = Link(LimitsStore())
    a, b = ingress(link), ingress(link)
    assert a.admit(SOLO, 1) is None
    assert b.admit(SOLO, 1).limit == "concurrency"
    assert b.peek(SOLO, 1).limit == "concurrency"
    a.release(SOLO, 0)
    assert b.admit(SOLO, 1) is None
    assert link.store.in_flight(SOLO) == 1


def test_preparing_counts_against_concurrency_across_ingresses():
    link = Link(LimitsStore())
    a, b = ingress(link), ingress(link)
    with a.preparing(SOLO):
        assert b.peek(SOLO, 1).limit == "concurrency"
    assert b.peek(SOLO, 1) is None


def test_an_admitted_request_is_not_also_counted_as_preparing():
    """Admission moves the request from preparing to in flight in one store call: another
    ingress never sees it twice (a burst of max_concurrent requests was refused one)."""
    two = Tenant("two", Tier("two", max_concurrent=2))
    link = Link(LimitsStore())
    a, b = ingress(link), ingress(link)
    with a.preparing(two):
        assert a.admit(two, 1) is None
        assert b.peek(two, 1) is None  # 1 in flight, nothing preparing: room for 1 more
    with b.preparing(two), a.preparing(two):
        assert a.admit(two, 1) is None  # the second slot
        assert b.admit(two, 1).limit == "concurrency"  # refused: b still prepares its own
    limiter = link.store.limiter
    assert (limiter.in_flight(two), limiter._states["two"].preparing) == (2, 0)


def test_an_admission_whose_answer_came_too_late_holds_nothing():
    """The store ran it, the ingress had given up (and refused the request): the ticket is
    forgotten, so the slot and tokens come back instead of staying held for good."""
    link = Link(LimitsStore())
    a, b = ingress(link), ingress(link)
    link.late = True
    assert a.admit(SOLO, 5).limit == "limits_unavailable"
    link.late = False
    assert link.store.in_flight(SOLO) == 0
    assert b.admit(SOLO, 1) is None  # the one slot is free


def test_a_forgotten_admission_that_arrives_later_is_refused():
    store = LimitsStore()
    store.forget("t1")  # the caller gave up before the store got to its admission
    assert store.admit(SOLO, 1, 1, 0, "t1").limit == "limits_unavailable"
    assert store.in_flight(SOLO) == 0
    assert store.admit(SOLO, 1, 1, 0, "t2") is None


def test_losing_the_store_fails_closed():
    link = Link(LimitsStore())
    a = ingress(link, "closed")
    link.up = False
    r = a.admit(TEN_PER_MINUTE, 1)
    assert r is not None and r.limit == "limits_unavailable" and r.retry_after == 1
    assert not a.connected and a.loss_decisions == 1
    link.up = True
    assert a.admit(TEN_PER_MINUTE, 1) is None and a.connected


def test_losing_the_store_fails_open_to_local_limits():
    link = Link(LimitsStore())
    a = ingress(link, "open")
    link.up = False
    assert a.admit(SOLO, 1) is None  # admitted by this ingress's own limiter
    assert a.admit(SOLO, 1).limit == "concurrency"  # which still limits
    a.release(SOLO, 0)  # given back where it was charged, not to the store
    assert a.local.in_flight(SOLO) == 0
    assert a.loss_decisions == 2
    link.up = True
    assert a.admit(SOLO, 1) is None and a.connected


def test_wait_connected_gives_up_after_its_timeout():
    link = Link(LimitsStore())
    link.up = False
    ticks = iter(range(100))
    assert not ingress(link).wait_connected(3, clock=lambda: next(ticks))
    link.up = True
    assert ingress(link).wait_connected(3)


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="limits_on_loss"):
        GlobalLimiter(lambda *a: None, lambda *a: None, "maybe")
