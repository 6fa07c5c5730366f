"""The Ray Serve request router of the engine deployment: a thin shell around
`policies.replica_routing.rank_replicas`.

Owns translating Ray's view (candidate `RunningReplica`s with the `routing_stats` each replica
reported, the `PendingRequest` whose first argument is an `EngineCall`) into the rule's plain
inputs and its ranks back into replicas; which waiting request a chosen replica is given; and
counting, in this process (the ingress, where the handle's router runs), its decisions by reason
and replica for the ingress's /metrics (fleet_view.py). Ray pickles this module by value into
every caller: module-level state lives in fleet_view, referenced by module.

Every request must be served by whichever routing task gets to it. Serve (2.58) runs up to
2 x replicas routing tasks per handle; each takes a waiting request to route, but a task exits
as soon as there are more tasks than waiting requests (counted lazily, served ones included),
dropping the request it took, and the remaining tasks then run with no request of their own.
Serve's own routers (FIFOMixin) give such a task's replica to the oldest waiting request. The
base class gives it to nobody: the dropped request then waits forever, and the task, finding a
replica with room in its queue-length cache without ever suspending, loops on
`choose_replicas` without yielding the router's event loop, starving every other request (the
fleet stalled under sustained load; tests/fleet/test_router_loop.py). So a task without a
waiting request of its own chooses for the oldest waiting request (`_waiting`), and a
replica goes to the request it was chosen for, else to the oldest waiting request it may serve
(`_fulfill_next_pending_request`): never to one whose pinned subnet it is configured without,
which is why this is not FIFOMixin (it hands the replica to the oldest request, whatever it is).
This reads Serve's own pending-request queue and overrides its hook, as FIFOMixin does: both are
private to Serve 2.58 (pinned); tests/fleet/test_router_loop.py runs Serve's real routing loop,
so an upgrade that changes them fails there.

Deliberately does not know: how the ranking is decided (policies/replica_routing.py).
"""

from __future__ import annotations

import random
import time

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from policies.replica_routing import (
    ReplicaReport,
    RouteAsk,
    RoutingRules,
    may_serve,
    rank_replicas,
)
from server.fleet import fleet_view
from server.fleet.engine_call import EngineCall


class ConcentricRouter(RequestRouter):
    def initialize_state(
        self,
        stale_after_s: float = 2.0,
        gold_priority: int = 0,
        min_headroom_bytes: int = 0,
        affinity_min_tokens: int = 64,
        affinity_max_imbalance: int = 4,
    ) -> None:
        self.rules = RoutingRules(
            stale_after_s,
            gold_priority,
            min_headroom_bytes,
            affinity_min_tokens,
            affinity_max_imbalance,
        )
        self.rng = random.Random()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        rules = getattr(self, "rules", RoutingRules())
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        reports = {tag: ReplicaReport.from_dict(r.routing_stats) for tag, r in by_id.items()}
        rng = getattr(self, "rng", random)
        now = time.time()
        if pending_request is None or pending_request.future.done():
            # This task's own request is gone or served: choose for the oldest one still
            # waiting that some replica may serve (`_fulfill_next_pending_request` gives it the
            # replica). With none waiting, any replica: Serve then sees the queue is empty and
            # ends the task (with no replica at all it would keep it alive, backing off).
            pending_request, decision = None, None
            for waiting in self._waiting():
                pending_request = waiting
                decision = rank_replicas(
                    _ask_of(waiting), list(by_id), reports, now, rules, rng, _call_of(waiting)
                )
                if decision.ranks:
                    break
            if decision is None:
                return [list(candidate_replicas)]
        else:
            decision = rank_replicas(
                _ask_of(pending_request),
                list(by_id),
                reports,
                now,
                rules,
                rng,
                _call_of(pending_request),
            )
        if pending_request is not None:
            # Our ranks already hold every candidate worth trying: when none of them takes the
            # request (all full, or no rank at all), Serve must back off (sleep) before asking
            # again. Serve's own routers set this once they have offered all replicas; without
            # it, its retry loop calls this method again at once, and with no rank to try that
            # loop never yields the router's event loop.
            pending_request.routing_context.should_backoff = True
        if decision.ranks and decision.ranks[0]:
            with fleet_view.FLEET.lock:
                # The first rank's least loaded replica is where it most likely goes.
                reason = decision.reason + ("-prefix" if decision.prefix else "")
                fleet_view.FLEET.decisions[(reason, str(decision.ranks[0][0]))] += 1
        return [[by_id[t] for t in rank] for rank in decision.ranks]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """Serve's hook after a routing task found `replica` with room: give it to the request
        it was chosen for if that one still waits, else to the oldest waiting request it may
        serve (the one `choose_replicas` chose for, unless others were served meanwhile)."""
        if request_metadata is not None:
            own = self._pending_requests_by_id.get(request_metadata.internal_request_id)
            if own is not None and not own.future.done():
                self._give(own, replica)
                return
        report = ReplicaReport.from_dict(replica.routing_stats)
        for waiting in self._waiting():
            if may_serve(_ask_of(waiting), report):
                self._give(waiting, replica)
                return

    def _give(self, pending: PendingRequest, replica: RunningReplica) -> None:
        self._record_queue_wait_time(pending)
        pending.future.set_result(replica)
        self._remove_pending_request_from_indices(pending)

    def _waiting(self):
        """The requests not yet given a replica, oldest first. Serve's queue keeps served and
        cancelled ones until they reach its front (it cleans up lazily): skip those."""
        return (p for p in self._pending_requests_to_fulfill if not p.future.done())


def _call_of(pending: PendingRequest | None) -> EngineCall | None:
    if pending is not None and pending.args and isinstance(pending.args[0], EngineCall):
        return pending.args[0]
    return None  # not an engine call (health, metrics)


def _ask_of(pending: PendingRequest | None) -> RouteAsk:
    call = _call_of(pending)
    # Not an engine call: any replica.
    return call.route_ask() if call is not None else RouteAsk(priority=1 << 30)
