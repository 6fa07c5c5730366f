"""The fleet's notice board: every engine replica's latest report, for every ingress to show.

Owns one named Ray actor's state (`FLEET_BOARD`): engine replicas post the report they give the
request router (`record_routing_stats`, every few hundred ms), ingress replicas read all of them
for /metrics. A request router only sees reports when it routes, and only in its own ingress;
the board gives each ingress the whole fleet, idle or not. A replica that stops posting (it died)
is dropped after `forget_after_s`.

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

    def post(self, report: dict[str, Any]) -> None:
        if "replica" in report:
            self._reports[str(report["replica"])] = (self.clock(), dict(report))

    def reports(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        for tag, (posted, _) in list(self._reports.items()):
            if now - posted > self.forget_after_s:
                del self._reports[tag]
        return {tag: report for tag, (_, report) in self._reports.items()}
