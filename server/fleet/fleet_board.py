"""The fleet's notice board: every engine replica's latest report, for every ingress to show.

Owns one named Ray actor's state (`FLEET_BOARD`): engine replicas post the report they give the
request router (`record_routing_stats`, every few hundred ms) and, less often, the exposition text
of their own metrics registry; ingress replicas post their own counters (routing decisions,
retries, the limits store's state) and read all of it for /metrics, so that a scrape through the
HTTP proxy, which may reach any ingress, shows every ingress's counters, not one's. A request
router only sees reports when it routes, and only in its own ingress; the board gives each
ingress the whole fleet, idle or not. A replica or ingress that stops posting (it died) is
dropped, with its metrics, after `forget_after_s`.

Deliberately does not know: routing, Ray's API (the ingress and replicas wrap it), or metrics.
"""

from __future__ import annotations

import time
from typing import Any

FLEET_BOARD = "concentric-fleet-board"


class FleetBoard:
    def __init__(self, forget_after_s: float = 6.0, clock=time.time):
        self.forget_after_s = forget_after_s
        self.clock = clock
        self._reports: dict[str, tuple[float, dict[str, Any]]] = {}  # replica -> (posted, it)
        self._metrics: dict[str, tuple[str, str]] = {}  # replica -> (rank, exposition text)
        self._ingresses: dict[str, tuple[float, dict[str, Any]]] = {}  # ingress -> (posted, it)

    def post(self, report: dict[str, Any]) -> None:
        if "replica" in report:
            self._reports[str(report["replica"])] = (self.clock(), dict(report))

    def post_metrics(self, replica: str, rank: str, text: str) -> None:
        self._metrics[str(replica)] = (str(rank), text)

    def metrics(self) -> dict[str, tuple[str, str]]:
        """Each replica's (rank, metrics text), for the replicas that still report."""
        live = self.reports()
        for tag in list(self._metrics):
            if tag not in live:
                del self._metrics[tag]
        return dict(self._metrics)

    def reports(self) -> dict[str, dict[str, Any]]:
        return self._recent(self._reports)

    def post_ingress(self, ingress: str, state: dict[str, Any]) -> None:
        self._ingresses[str(ingress)] = (self.clock(), dict(state))

    def ingresses(self) -> dict[str, dict[str, Any]]:
        """Each ingress's latest counters, for the ingresses that still post."""
        return self._recent(self._ingresses)

    def _recent(self, posts: dict[str, tuple[float, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
        """The posts not older than `forget_after_s`; older ones are dropped for good."""
        now = self.clock()
        for tag, (posted, _) in list(posts.items()):
            if now - posted > self.forget_after_s:
                del posts[tag]
        return {tag: post for tag, (_, post) in posts.items()}
