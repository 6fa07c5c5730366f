"""The Ray Serve request router of the engine deployment: a thin shell around
`policies.replica_routing.rank_replicas`.

Owns translating Ray's view (candidate `RunningReplica`s with the `routing_stats` each replica
reported, the `PendingRequest` whose first argument is an `EngineCall`) into the rule's plain
inputs and its ranks back into replicas; and counting, in this process (the ingress, where the
handle's router runs), its decisions by reason and replica for the ingress's /metrics
(fleet_view.py). Ray pickles this module
by value into every caller: module-level state lives in fleet_view, referenced by module.

Deliberately does not know: how the ranking is decided (policies/replica_routing.py).
"""

from __future__ import annotations

import random
import time

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from policies.replica_routing import ReplicaReport, RouteAsk, RoutingRules, rank_replicas
from server.fleet import fleet_view
from server.fleet.engine_call import EngineCall


class ConcentricRouter(RequestRouter):
    # Not FIFOMixin: it hands a replica chosen for one request to the oldest pending request,
    # which would send a pinned request to a replica chosen for another (one that may never
    # offer its subnet). The base class gives each request the replica chosen for it.

    def initialize_state(
        self, stale_after_s: float = 2.0, gold_priority: int = 0, min_headroom_bytes: int = 0
    ) -> None:
        self.rules = RoutingRules(stale_after_s, gold_priority, min_headroom_bytes)
        self.rng = random.Random()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        rules = getattr(self, "rules", RoutingRules())
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        reports = {tag: ReplicaReport.from_dict(r.routing_stats) for tag, r in by_id.items()}
        ask = _ask_of(pending_request)
        decision = rank_replicas(
            ask, list(by_id), reports, time.time(), rules, getattr(self, "rng", random)
        )
        if pending_request is not None:
            # Our ranks already hold every candidate worth trying: when none of them takes the
            # request, Serve must back off (sleep) before asking again. Serve's own routers set
            # this once they have offered all replicas; without it, its retry loop calls this
            # method again at once, never yielding the router's event loop, which then cannot
            # read the replicas' queue lengths: routing stalls for good under load.
            pending_request.routing_context.should_backoff = True
        if decision.ranks and decision.ranks[0]:
            with fleet_view.FLEET.lock:
                # The first rank's least loaded replica is where it most likely goes.
                fleet_view.FLEET.decisions[(decision.reason, str(decision.ranks[0][0]))] += 1
        return [[by_id[t] for t in rank] for rank in decision.ranks]


def _ask_of(pending: PendingRequest | None) -> RouteAsk:
    if pending is not None and pending.args and isinstance(pending.args[0], EngineCall):
        return pending.args[0].route_ask()
    return RouteAsk(priority=1 << 30)  # not an engine call (health, metrics): any replica
