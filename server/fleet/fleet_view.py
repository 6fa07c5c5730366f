"""What the request routers of this process decided: routing decisions by reason and
first-choice replica (the ingress's /metrics reads them).

Owns that process-wide state. Deliberately does not know: how routing decides, or Ray.
"""

from __future__ import annotations

import threading
from collections import Counter


class FleetView:
    """The routing decisions of this process's routers (for /metrics)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.decisions: Counter[tuple[str, str]] = Counter()  # (reason, replica tag)


FLEET = FleetView()
