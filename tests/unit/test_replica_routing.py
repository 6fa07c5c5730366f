"""The fleet's routing rule (policies/replica_routing.py): pinned subnets, headroom for important
tiers, the rest filled elsewhere, stale reports falling back to power-of-two choices."""

from __future__ import annotations

import random

from policies.replica_routing import (
    ReplicaReport,
    RouteAsk,
    RoutingRules,
    rank_replicas,
)

NOW = 1000.0
ALL = {"full": 60.0, "e2b": 50.0, "mini": 40.0}
RULES = RoutingRules(stale_after_s=2.0, gold_priority=0, min_headroom_bytes=1000)
GOLD = RouteAsk(priority=0)
BRONZE = RouteAsk(priority=10, allowed=("e2b", "mini"))


def report(**kw) -> ReplicaReport:
    base = dict(at=NOW - 0.1, offered=ALL, headroom_bytes=10_000, max_num_seqs=8)
    return ReplicaReport(**{**base, **kw})


MINI_ONLY = frozenset({"mini"})


def test_pinned_goes_only_where_the_subnet_is_offered():
    reports = {"a": report(offered={"mini": 40.0}, can_offer=MINI_ONLY), "b": report(running=7)}
    d = rank_replicas(RouteAsk(priority=5, pinned="full"), ["a", "b"], reports, NOW, RULES)
    assert d.ranks == [["b"]] and d.reason == "pinned"
    # An unknown replica (no report yet) may offer it: after the known ones, never the excluded.
    d = rank_replicas(RouteAsk(priority=5, pinned="full"), ["a", "b", "c"], reports, NOW, RULES)
    assert d.ranks == [["b"], ["c"]]


def test_pinned_not_resident_waits_where_it_could_be_never_where_it_cannot():
    reports = {
        "a": report(offered={"mini": 40.0}, can_offer=MINI_ONLY),
        "b": report(offered={"mini": 40.0}, running=3),  # could grow to "full"
        "c": report(offered={}),
    }
    d = rank_replicas(RouteAsk(priority=5, pinned="full"), ["a", "b", "c"], reports, NOW, RULES)
    assert d.reason == "pinned-nowhere" and d.ranks == [["c", "b"]]
    # Offered nowhere and possible nowhere: no rank; the router retries until a replica joins.
    only = {"a": reports["a"]}
    assert rank_replicas(RouteAsk(priority=5, pinned="full"), ["a"], only, NOW, RULES).ranks == []


def test_gold_prefers_headroom_and_the_best_subnet_then_load():
    reports = {
        "low": report(headroom_bytes=10),  # below min_headroom_bytes
        "busy": report(running=6),
        "idle": report(),
        "narrow": report(offered={"e2b": 50.0}),  # lacks the best subnet the tier allows
    }
    d = rank_replicas(GOLD, list(reports), reports, NOW, RULES)
    assert d.reason == "gold"
    assert d.ranks[0] == ["idle", "busy"]
    assert set(d.ranks[1]) == {"low", "narrow"}


def test_gold_target_excludes_a_replica_whose_queue_would_miss_it():
    ask = RouteAsk(priority=0, target_ttft_s=0.5)
    reports = {
        "slow": report(step_s=0.3, running=8, waiting=8),  # 3 batches ahead x 0.3 s > 0.5 s
        "fast": report(step_s=0.3, running=8, waiting=16),
        "quick": report(step_s=0.1, running=8, waiting=8),  # 3 x 0.1 s fits
    }
    d = rank_replicas(ask, list(reports), reports, NOW, RULES)
    assert d.ranks[0] == ["quick"]


def test_the_headroom_change_moves_gold_traffic():
    before = {"a": report(), "b": report(running=1)}
    assert rank_replicas(GOLD, ["a", "b"], before, NOW, RULES).ranks[0] == ["a", "b"]
    after = {"a": report(headroom_bytes=0), "b": report(running=1)}
    assert rank_replicas(GOLD, ["a", "b"], after, NOW, RULES).ranks == [["b"], ["a"]]


def test_gold_with_no_qualifying_replica_still_goes_somewhere():
    reports = {"a": report(headroom_bytes=0, running=2), "b": report(headroom_bytes=0)}
    d = rank_replicas(GOLD, ["a", "b"], reports, NOW, RULES)
    assert d.reason == "gold-nowhere" and d.ranks == [["b", "a"]]


def test_bronze_fills_replicas_gold_cannot_use_first_while_they_have_room():
    reports = {"roomy": report(), "tight": report(headroom_bytes=0, running=3)}
    d = rank_replicas(BRONZE, ["roomy", "tight"], reports, NOW, RULES)
    assert d.reason == "fill" and d.ranks == [["tight"], ["roomy"]]
    full = {"roomy": report(), "tight": report(headroom_bytes=0, running=8)}
    assert rank_replicas(BRONZE, ["roomy", "tight"], full, NOW, RULES).ranks == [["roomy", "tight"]]


def test_a_stale_report_still_excludes_a_replica_configured_without_the_subnet():
    reports = {"a": report(at=NOW - 60, can_offer=MINI_ONLY), "b": report(at=NOW - 60)}
    ask = RouteAsk(priority=5, pinned="full")
    for seed in range(20):  # the power-of-two fallback never draws "a"
        assert rank_replicas(ask, ["a", "b"], reports, NOW, RULES, random.Random(seed)).ranks == [
            ["b"]
        ]


def test_stale_reports_fall_back_to_power_of_two():
    old = {c: report(at=NOW - 5) for c in "abcd"}
    d = rank_replicas(GOLD, list("abcd"), old, NOW, RULES, random.Random(1))
    assert d.reason == "stale"
    assert len(d.ranks) == 1 and len(d.ranks[0]) == 2 and set(d.ranks[0]) <= set("abcd")
    # Over many draws every replica is picked (not always the same two).
    seen = set()
    for seed in range(50):
        seen.update(rank_replicas(GOLD, list("abcd"), {}, NOW, RULES, random.Random(seed)).ranks[0])
    assert seen == set("abcd")


def test_a_stale_replica_comes_after_fresh_ones():
    reports = {"fresh": report(running=7), "stale": report(at=NOW - 10)}
    assert rank_replicas(GOLD, ["stale", "fresh"], reports, NOW, RULES).ranks == [
        ["fresh"],
        ["stale"],
    ]


def test_reports_round_trip_and_malformed_ones_are_ignored():
    r = report(step_s=0.02, waiting=3, kv_usage=0.5)
    assert ReplicaReport.from_dict(r.to_dict()) == r
    assert ReplicaReport.from_dict({}) is None
    assert ReplicaReport.from_dict({"at": "soon"}) is None
    assert ReplicaReport.from_dict(None) is None


def test_no_candidates_no_ranks():
    assert rank_replicas(GOLD, [], {}, NOW, RULES).ranks == []
