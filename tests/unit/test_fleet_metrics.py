"""The fleet view's per-ingress counters: every ingress's, labelled, from whichever ingress renders.

Plain Python (no Ray): the board's bookkeeping and the collector's output for a snapshot.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from server.fleet.fleet_board import FleetBoard
from server.telemetry.fleet_metrics import FleetCollector, FleetSnapshot, IngressCounters


def render(snapshot: FleetSnapshot) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(lambda: snapshot))
    return generate_latest(registry).decode()


def test_every_ingress_counts_appear_labelled_by_ingress() -> None:
    text = render(
        FleetSnapshot(
            ingresses={
                "a": IngressCounters({("fill", "r0"): 3}, retried=1),
                "b": IngressCounters({("gold", "r1"): 2}, limits_connected=False, failed=4),
            }
        )
    )
    assert (
        'concentric_fleet_routing_decisions_total{ingress="a",reason="fill",replica="r0"} 3.0'
        in text
    )
    assert (
        'concentric_fleet_routing_decisions_total{ingress="b",reason="gold",replica="r1"} 2.0'
        in text
    )
    assert 'concentric_fleet_calls_retried_total{ingress="a"} 1.0' in text
    assert 'concentric_fleet_calls_failed_total{ingress="b"} 4.0' in text
    assert 'concentric_fleet_limits_store_connected{ingress="a"} 1.0' in text
    assert 'concentric_fleet_limits_store_connected{ingress="b"} 0.0' in text


def test_the_board_keeps_each_ingress_latest_counters_until_it_stops_posting() -> None:
    now = [100.0]
    board = FleetBoard(forget_after_s=6.0, clock=lambda: now[0])
    board.post_ingress("a", {"retried": 1})
    board.post_ingress("b", {"retried": 2})
    board.post_ingress("a", {"retried": 5})
    assert board.ingresses() == {"a": {"retried": 5}, "b": {"retried": 2}}
    now[0] += 4.0
    board.post_ingress("b", {"retried": 3})
    now[0] += 3.0  # a posted 7 s ago, b 3 s ago
    assert board.ingresses() == {"b": {"retried": 3}}
