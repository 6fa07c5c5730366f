"""The fleet's notice board: every engine replica's latest report, for every ingress to show.

Owns one named Ray actor's state (`FLEET_BOARD`): engine replicas post the report they give the
request router (`record_routing_stats`, every few hundred ms) and, less often, the exposition text
of their own metrics registry; ingress replicas read all of them for /metrics. A request router only
sees reports when it routes, and only in its own ingress; the board gives each ingress the whole
fleet, idle or not. A replica that stops posting (it died) (and its metrics) is dropped after
`forget_after_s`.

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
        now = self.clock()
        for tag, (posted, _) in list(self._reports.items()):
            if now - posted > self.forget_after_s:
                del self._reports[tag]
        return {tag: report for tag, (_, report) in self._reports.items()}
