"""`ConcentricRouter` inside Ray Serve's own routing loop, without a cluster: the router class the
ingress's handle runs, driven by Serve's `_choose_replica_for_request` (its routing tasks, its
queue-length cache and probes, its backoff), with fake replicas that answer queue-length probes
after a real suspension, as an RPC does.

Closed-loop clients keep one engine call each in flight, as the benchmark's clients do. Under
that load Serve's routing tasks drop the request they took whenever the task count exceeds the
waiting requests (served ones are counted until they reach the queue's front); a router that
gives a task's replica to nobody then leaves the dropped request waiting forever while the
remaining task loops on `choose_replicas` without ever yielding the event loop (the fleet
stalled). Each call must be routed promptly, and `choose_replicas` must be asked a bounded
number of times per call.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

pytest.importorskip("ray.serve")

from ray.serve._private.common import (
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    RequestMetadata,
)
from ray.serve._private.request_router.common import PendingRequest

from policies.replica_routing import ReplicaReport
from server.fleet.engine_call import EngineCall
from server.fleet.replica_router import ConcentricRouter
from server.vocabulary.sampling_params import SamplingParams

DEPLOYMENT = DeploymentID(name="ConcentricEngine", app_name="concentric")
MAX_ONGOING = 64  # FleetConfig's default max_ongoing_requests
# Routing attempts one call may take: one per rank tried, a few more while another task serves
# it or a probe is late. A router that spins asks tens of thousands of times a second.
ASKS_PER_CALL = 20


class FakeReplica:
    """What the router reads of a replica: its id, capacity, report and queue length."""

    def __init__(self, name: str, can_offer: list[str] | None = None):
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)
        self.max_ongoing_requests = MAX_ONGOING
        self.ongoing = 0
        self.given: list[str | None] = []  # the pinned subnet of each call routed here
        self.can_offer = can_offer

    @property
    def routing_stats(self) -> dict:
        report = ReplicaReport(
            at=time.time(),
            offered={},
            can_offer=None if self.can_offer is None else frozenset(self.can_offer),
            headroom_bytes=10**10,
            running=self.ongoing,
            max_num_seqs=16,
        )
        return report.to_dict()

    async def get_queue_len(self, *, deadline_s: float) -> int:
        await asyncio.sleep(0.002)  # an RPC: the router's loop runs others meanwhile
        return self.ongoing


class CountingRouter(ConcentricRouter):
    """Counts `choose_replicas` calls, and fails the routing task past a bound, so a router
    that spins without yielding ends (as a stall) instead of hanging the test."""

    asks = 0
    limit = 10**9

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        CountingRouter.asks += 1
        if CountingRouter.asks > CountingRouter.limit:
            raise RuntimeError("choose_replicas asked without end: the router spins")
        return await super().choose_replicas(candidate_replicas, pending_request)


def make_router(replicas: list[FakeReplica]) -> CountingRouter:
    router = CountingRouter(
        DEPLOYMENT,
        DeploymentHandleSource.REPLICA,
        use_replica_queue_len_cache=True,  # as a deployment handle runs it
    )
    router.initialize_state(stale_after_s=2.0, gold_priority=0, min_headroom_bytes=0)
    router.update_replicas(replicas)
    return router


_ids = itertools.count()


async def route(router: CountingRouter, subnet: str | None = None) -> FakeReplica:
    n = next(_ids)
    call = EngineCall(f"call-{n}", (1, 2, 3), subnet, SamplingParams(max_tokens=4), priority=10)
    pending = PendingRequest(
        args=[call],
        kwargs={},
        metadata=RequestMetadata(request_id=f"r{n}", internal_request_id=f"i{n}"),
    )
    replica = await router._choose_replica_for_request(pending)
    replica.given.append(subnet)
    return replica


async def closed_loop(router: CountingRouter, clients: int, calls_each: int, **kw) -> int:
    """`clients` clients, each routing `calls_each` calls back to back; every call is served
    for a moment on its replica (its queue length counts it) and then completes."""

    async def client() -> int:
        for _ in range(calls_each):
            # 5 s for one call to be routed: on this machine it takes milliseconds; a call
            # left waiting by the router never is.
            replica = await asyncio.wait_for(route(router, **kw), timeout=5)
            replica.ongoing += 1
            router.on_send_request(replica.replica_id)
            await asyncio.sleep(0.001)
            replica.ongoing -= 1
            router.decrement_queue_len_cache(replica.replica_id)
        return calls_each

    return sum(await asyncio.gather(*(client() for _ in range(clients))))


@pytest.mark.parametrize("replicas", [1, 2])
def test_every_call_is_routed_under_sustained_concurrent_load(replicas: int):
    async def main() -> None:
        fleet = [FakeReplica(f"r{i}") for i in range(replicas)]
        router = make_router(fleet)
        # 8 clients: more than the 2 x replicas routing tasks Serve runs, as in the stall.
        clients, calls_each = 8, 50
        CountingRouter.asks = 0
        CountingRouter.limit = ASKS_PER_CALL * clients * calls_each
        done = await closed_loop(router, clients, calls_each)
        assert done == clients * calls_each
        assert sum(len(r.given) for r in fleet) == done
        assert CountingRouter.asks <= CountingRouter.limit

    asyncio.run(main())


def test_a_call_left_without_a_task_goes_only_where_its_subnet_may_run():
    """The replica a task finds for the oldest waiting call is never given to a call pinned to
    a subnet that replica is configured without (why the router is not Serve's FIFOMixin)."""

    async def main() -> None:
        anywhere = FakeReplica("any")
        only_e2b = FakeReplica("e2b-only", can_offer=["e2b"])
        router = make_router([anywhere, only_e2b])
        clients, calls_each = 4, 25  # of each subnet: 8 clients in all, as above
        CountingRouter.asks = 0
        CountingRouter.limit = ASKS_PER_CALL * 2 * clients * calls_each
        await asyncio.gather(
            closed_loop(router, clients, calls_each, subnet="full"),
            closed_loop(router, clients, calls_each, subnet="e2b"),
        )
        assert "full" not in only_e2b.given
        assert anywhere.given.count("full") == clients * calls_each

    asyncio.run(main())
