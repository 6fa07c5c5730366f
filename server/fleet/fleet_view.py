"""What the request routers of this process saw: each engine replica's latest report and the
routing decisions, by reason and replica (the ingress's /metrics reads them).

Owns that process-wide state. Deliberately does not know: how routing decides, or Ray.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any


class FleetView:
    """What the routers of this process saw: latest reports and decisions (for /metrics)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reports: dict[str, dict[str, Any]] = {}  # replica tag -> its routing stats
        self.decisions: Counter[tuple[str, str]] = Counter()  # (reason, replica tag)

    def seen(self, stats: dict[str, Any]) -> None:
        if stats and "replica" in stats:
            with self.lock:
                self.reports[str(stats["replica"])] = dict(stats)

    def forget_except(self, live: set[str]) -> None:
        with self.lock:
            for tag in list(self.reports):
                if tag not in live:
                    del self.reports[tag]


FLEET = FleetView()
