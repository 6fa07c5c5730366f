"""The fleet view an ingress exports when the engines are Ray Serve replicas.

Owns the names and labels of the per-replica metrics (`replica`: the Serve replica's id, `rank`:
its rank), read at scrape time from a `FleetSnapshot` the ingress fills from what its request
router last saw: each replica's headroom, queue, offered subnets and best offered quality (its
resident level), KV usage and the age of its report; routing decisions by reason and replica;
whether the global tenant limits store answers, and what happens when it does not; calls
retried on another replica and calls that failed.

Deliberately does not know: Ray, or how the numbers are produced.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

P = "concentric_fleet_"


@dataclass
class FleetSnapshot:
    reports: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # replica -> stats
    decisions: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (reason, replica)
    limits_connected: bool = True
    limits_on_loss: str = "closed"
    limits_loss_decisions: int = 0
    retried: int = 0
    failed: int = 0


class FleetCollector:
    def __init__(self, snapshot: Callable[[], FleetSnapshot]):
        self.snapshot = snapshot

    def describe(self):
        return []  # collected at scrape time only

    def collect(self):
        s = self.snapshot()
        now = time.time()
        labels = ["replica", "rank"]
        gauges = {
            "headroom_bytes": GaugeMetricFamily(
                P + "replica_headroom_bytes", "Memory headroom each replica reported", labels=labels
            ),
            "running": GaugeMetricFamily(
                P + "replica_running_requests", "Requests running on each replica", labels=labels
            ),
            "waiting": GaugeMetricFamily(
                P + "replica_waiting_requests", "Requests waiting on each replica", labels=labels
            ),
            "kv_usage": GaugeMetricFamily(
                P + "replica_kv_usage_ratio", "KV blocks in use on each replica", labels=labels
            ),
            "offered": GaugeMetricFamily(
                P + "replica_offered_subnets", "Subnets each replica offers now", labels=labels
            ),
            "level": GaugeMetricFamily(
                P + "replica_best_offered_quality",
                "Quality score of the best subnet each replica offers (its resident level)",
                labels=labels,
            ),
            "requests": GaugeMetricFamily(
                P + "replica_requests_held",
                "Engine requests each replica holds (streams not finished)",
                labels=labels,
            ),
            "kv_blocks_used": GaugeMetricFamily(
                P + "replica_kv_blocks_used", "KV blocks each replica holds", labels=labels
            ),
            "age": GaugeMetricFamily(
                P + "replica_report_age_seconds", "Age of each replica's last report", labels=labels
            ),
        }
        for tag, r in sorted(s.reports.items()):
            lv = [tag, str(r.get("rank", ""))]
            offered = dict(r.get("offered") or {})
            values = {
                "headroom_bytes": r.get("headroom_bytes"),
                "running": r.get("running"),
                "waiting": r.get("waiting"),
                "kv_usage": r.get("kv_usage"),
                "offered": len(offered),
                "level": max(offered.values()) if offered else 0.0,
                "requests": r.get("requests"),
                "kv_blocks_used": r.get("kv_blocks_used"),
                "age": max(0.0, now - float(r["at"])) if "at" in r else None,
            }
            for key, value in values.items():
                if value is not None:
                    gauges[key].add_metric(lv, float(value))
        yield from gauges.values()
        served = CounterMetricFamily(
            P + "replica_served", "Engine calls each replica finished", labels=labels
        )
        info = GaugeMetricFamily(
            P + "replica_info",
            "Each replica's process (1 while it reports)",
            labels=[*labels, "pid"],
        )
        for tag, r in sorted(s.reports.items()):
            lv = [tag, str(r.get("rank", ""))]
            if r.get("served") is not None:
                served.add_metric(lv, float(r["served"]))
            info.add_metric([*lv, str(r.get("pid", ""))], 1.0)
        yield served
        yield info
        decisions = CounterMetricFamily(
            P + "routing_decisions",
            "Routing decisions of this ingress, by reason and first-choice replica",
            labels=["reason", "replica"],
        )
        for (reason, tag), n in sorted(s.decisions.items()):
            decisions.add_metric([reason, tag], n)
        yield decisions
        yield GaugeMetricFamily(
            P + "limits_store_connected",
            "1 while the global tenant limits store answers, 0 after it did not",
            value=1.0 if s.limits_connected else 0.0,
        )
        mode = GaugeMetricFamily(
            P + "limits_on_loss",
            "What admission does without the limits store (closed: refuse, open: local limits)",
            labels=["mode"],
        )
        mode.add_metric([s.limits_on_loss], 1.0)
        yield mode
        yield CounterMetricFamily(
            P + "limits_loss_decisions",
            "Admission checks decided without the limits store",
            value=s.limits_loss_decisions,
        )
        yield CounterMetricFamily(
            P + "calls_retried", "Engine calls retried on another replica", value=s.retried
        )
        yield CounterMetricFamily(
            P + "calls_failed",
            "Engine calls that failed after their first output or retries",
            value=s.failed,
        )
