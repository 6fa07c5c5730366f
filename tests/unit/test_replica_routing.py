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


# ---- prefix-cache affinity ----------------------------------------------------------------

KV = {"full": "kv-full", "e2b": "kv-e2b", "mini": "kv-mini"}


class Prompt:
    """A prompt of `blocks` usable blocks whose landmark ids are (KV class, depth index)."""

    def __init__(self, blocks: int, tag: str = "p"):
        self.blocks, self.tag = blocks, tag

    def landmarks(self, kv_class: str, block_size: int) -> list[int]:
        n = (self.blocks * 16 // block_size).bit_length()  # depths 1, 2, 4, ... <= blocks
        return [hash((self.tag, kv_class, j)) for j in range(n)]


def holding(prompt: Prompt, kv_class: str, depth_index: int, **kw) -> ReplicaReport:
    """A replica whose cache holds the prompt's prefix up to landmark `depth_index`."""
    marks = prompt.landmarks(kv_class, 16)[: depth_index + 1]
    return report(kv_classes=KV, block_size=16, cached=frozenset(marks), **kw)


def test_a_replica_holding_the_prompts_prefix_is_tried_first():
    p = Prompt(8)  # 128 tokens: landmarks at 1, 2, 4, 8 blocks
    reports = {
        "cold": report(kv_classes=KV, block_size=16),
        "warm": holding(p, "kv-e2b", 2, running=2),  # 4 blocks = 64 tokens, a little busier
    }
    d = rank_replicas(BRONZE, ["cold", "warm"], reports, NOW, RULES, prompt=p)
    assert d.ranks == [["warm"], ["cold"]] and d.prefix and d.reason == "fill"
    # Without the prompt (or with affinity demanding more than 64 tokens): load decides.
    assert rank_replicas(BRONZE, ["cold", "warm"], reports, NOW, RULES).ranks == [["cold", "warm"]]
    strict = RoutingRules(2.0, 0, 1000, affinity_min_tokens=65)
    d = rank_replicas(BRONZE, ["cold", "warm"], reports, NOW, strict, prompt=p)
    assert d.ranks == [["cold", "warm"]] and not d.prefix


def test_a_prefix_counts_only_in_a_kv_class_the_replica_would_serve_it_with():
    p = Prompt(8)
    # Cached under "full"'s class, which bronze may not use: no affinity.
    reports = {"cold": report(kv_classes=KV, block_size=16), "warm": holding(p, "kv-full", 3)}
    d = rank_replicas(BRONZE, ["cold", "warm"], reports, NOW, RULES, prompt=p)
    assert not d.prefix and d.ranks == [["cold", "warm"]]
    # Pinned to "full": exactly that class counts.
    pinned = RouteAsk(priority=5, pinned="full")
    d = rank_replicas(pinned, ["cold", "warm"], reports, NOW, RULES, prompt=p)
    assert d.ranks == [["warm"], ["cold"]] and d.reason == "pinned" and d.prefix
    # A class the tier allows but the replica does not offer now: it would not serve it so.
    narrow = {**reports, "warm": holding(p, "kv-e2b", 3, offered={"mini": 40.0})}
    d = rank_replicas(BRONZE, ["cold", "warm"], narrow, NOW, RULES, prompt=p)
    assert not d.prefix


def test_the_longest_prefix_wins_and_a_tie_everywhere_leaves_it_to_load():
    p = Prompt(16)
    reports = {
        "short": holding(p, "kv-mini", 2),  # 4 blocks
        "long": holding(p, "kv-e2b", 4, running=1),  # 16 blocks
        "none": report(kv_classes=KV, block_size=16),
    }
    d = rank_replicas(BRONZE, list(reports), reports, NOW, RULES, prompt=p)
    assert d.ranks[0] == ["long"] and sorted(d.ranks[1]) == ["none", "short"]
    both = {"a": holding(p, "kv-e2b", 4, running=1), "b": holding(p, "kv-mini", 4)}
    d = rank_replicas(BRONZE, ["a", "b"], both, NOW, RULES, prompt=p)
    assert d.ranks == [["b", "a"]] and not d.prefix


def test_a_hot_prefix_does_not_pile_onto_one_replica():
    p = Prompt(8)
    reports = {"cold": report(kv_classes=KV, block_size=16), "warm": holding(p, "kv-e2b", 3)}
    for queued, first in ((4, ["warm"]), (5, ["cold", "warm"])):  # affinity_max_imbalance 4
        busy = {**reports, "warm": holding(p, "kv-e2b", 3, running=queued)}
        d = rank_replicas(BRONZE, ["cold", "warm"], busy, NOW, RULES, prompt=p)
        assert d.ranks[0] == first, queued


def test_affinity_never_moves_a_request_across_ranks():
    p = Prompt(8)
    reports = {
        "roomy": report(kv_classes=KV, block_size=16),
        "warm-no-headroom": holding(p, "kv-full", 3, headroom_bytes=0),
    }
    d = rank_replicas(GOLD, list(reports), reports, NOW, RULES, prompt=p)
    assert d.ranks == [["roomy"], ["warm-no-headroom"]] and not d.prefix
    # Stale reports: no affinity either (power-of-two over the candidates).
    old = {c: holding(p, "kv-full", 3, at=NOW - 10) for c in "ab"}
    d = rank_replicas(GOLD, ["a", "b"], old, NOW, RULES, random.Random(0), prompt=p)
    assert d.reason == "stale" and not d.prefix


def test_reports_with_a_prefix_cache_round_trip():
    r = holding(Prompt(4), "kv-e2b", 2, step_s=0.02)
    assert ReplicaReport.from_dict(r.to_dict()) == r
