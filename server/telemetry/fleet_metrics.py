"""The fleet view an ingress exports when the engines are Ray Serve replicas.

Owns the names and labels of the per-replica metrics (`replica`: the Serve replica's id, `rank`:
its rank), read at scrape time from a `FleetSnapshot` the ingress fills from what its request
router last saw: each replica's headroom, queue, offered subnets and best offered quality (its
resident level), KV usage and the age of its report; and per ingress (`ingress`: every
ingress's own counts, which it posts to the fleet board, so any ingress shows them all): routing
decisions by reason and replica, whether the global tenant limits store answers and what happens
when it does not, calls retried on another replica and calls that failed.

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
class IngressCounters:
    """One ingress process's own counts and state (each ingress posts its own to the board)."""

    decisions: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (reason, replica)
    limits_connected: bool = True
    limits_on_loss: str = "closed"
    limits_loss_decisions: int = 0
    retried: int = 0
    failed: int = 0


@dataclass
class FleetSnapshot:
    reports: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # replica -> stats
    ingresses: Mapping[str, IngressCounters] = field(default_factory=dict)  # ingress -> counts


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
        # Per ingress, labelled: a scrape may reach any ingress, and each shows them all.
        decisions = CounterMetricFamily(
            P + "routing_decisions",
            "Routing decisions by ingress, reason and first-choice replica",
            labels=["ingress", "reason", "replica"],
        )
        connected = GaugeMetricFamily(
            P + "limits_store_connected",
            "1 while the global tenant limits store answers an ingress, 0 after it did not",
            labels=["ingress"],
        )
        mode = GaugeMetricFamily(
            P + "limits_on_loss",
            "What admission does without the limits store (closed: refuse, open: local limits)",
            labels=["ingress", "mode"],
        )
        loss = CounterMetricFamily(
            P + "limits_loss_decisions",
            "Admission checks an ingress decided without the limits store",
            labels=["ingress"],
        )
        retried = CounterMetricFamily(
            P + "calls_retried",
            "Engine calls an ingress retried on another replica",
            labels=["ingress"],
        )
        failed = CounterMetricFamily(
            P + "calls_failed",
            "Engine calls that failed after their first output or retries, by ingress",
            labels=["ingress"],
        )
        for ingress, c in sorted(s.ingresses.items()):
            for (reason, tag), n in sorted(c.decisions.items()):
                decisions.add_metric([ingress, reason, tag], n)
            connected.add_metric([ingress], 1.0 if c.limits_connected else 0.0)
            mode.add_metric([ingress, c.limits_on_loss], 1.0)
            loss.add_metric([ingress], c.limits_loss_decisions)
            retried.add_metric([ingress], c.retried)
            failed.add_metric([ingress], c.failed)
        yield from (decisions, connected, mode, loss, retried, failed)
