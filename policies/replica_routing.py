"""Which engine replica a request should go to, from what each replica last reported.

Owns the fleet-level routing rule, as plain data in and ranks out (best first; the caller tries
the least-queued replica of each rank in turn, as Ray Serve's request routers do):
- a pinned subnet goes to replicas that offer it now (resident, and not excluded by the
  replica's configuration), then to those that could (configured for it, not resident now: it
  waits there for the subnet, as in one process), then to replicas whose offer is unknown (no
  fresh report); never to a replica configured without it (configuration does not change, so
  a stale report still says so). With none of these there is no rank (the caller retries
  routing, with backoff, until such a replica joins);
- an important tier (priority at most `gold_priority`; lower is more important) goes first to
  replicas that offer the best subnet its tier allows anywhere in the fleet, have at least
  `min_headroom_bytes` of memory headroom, and whose predicted wait (queue depth times predicted
  step time) meets the tier's time-to-first-token target; least loaded first;
- other tiers fill the rest: first replicas that do not qualify for important work (so the
  headroom stays for it), then the others; least loaded first;
- prefix-cache affinity by KV class, inside each of those ranks: a replica that holds the
  longest cached prefix of the prompt in a KV class it would serve the request with (the pinned
  subnet's class; else the classes of the subnets it offers that the tier allows) is tried
  first, when that prefix is at least `affinity_min_tokens` long, not every replica of the rank
  holds as much, and its queue is at most `affinity_max_imbalance` requests longer than the
  rank's shortest (a hot prefix must not pile every request onto one replica). Affinity never
  moves a request across ranks: the rules above come first;
- reports older than `stale_after_s` are not trusted: with no fresh report at all the rule
  falls back to power-of-two choices (two random replicas, the less queued one is tried first).

Deliberately does not know: Ray, how a replica measures what it reports, or tenants' limits.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class ReplicaReport:
    """What one engine replica reports every few hundred milliseconds."""

    at: float  # wall-clock time of the report (time.time()), to judge staleness
    offered: Mapping[str, float] = field(default_factory=dict)  # subnet -> quality, on offer now
    can_offer: frozenset[str] | None = None  # what it is configured to offer at all (None: any)
    headroom_bytes: int | None = None  # memory headroom now; None: not measured
    running: int = 0
    waiting: int = 0
    max_num_seqs: int = 1
    step_s: float | None = None  # predicted seconds of one step of its current batch
    kv_usage: float = 0.0  # fraction of KV blocks in use
    kv_classes: Mapping[str, str] = field(default_factory=dict)  # subnet -> its KV class
    block_size: int = 0  # tokens per KV block (its prefix cache's granularity)
    cached: frozenset[int] = frozenset()  # landmark ids of the prefixes in its prefix cache

    @property
    def queue_depth(self) -> int:
        return self.running + self.waiting

    def to_dict(self) -> dict:
        return {
            "at": self.at,
            "offered": dict(self.offered),
            "can_offer": None if self.can_offer is None else sorted(self.can_offer),
            "headroom_bytes": self.headroom_bytes,
            "running": self.running,
            "waiting": self.waiting,
            "max_num_seqs": self.max_num_seqs,
            "step_s": self.step_s,
            "kv_usage": self.kv_usage,
            "kv_classes": dict(self.kv_classes),
            "block_size": self.block_size,
            "cached": list(self.cached),
        }

    @classmethod
    def from_dict(cls, d: Mapping | None) -> ReplicaReport | None:
        """The report in a replica's routing stats; None if it has none (yet) or it is malformed."""
        if not d or "at" not in d:
            return None
        try:
            return cls(
                at=float(d["at"]),
                offered={str(k): float(v) for k, v in dict(d.get("offered") or {}).items()},
                can_offer=None
                if d.get("can_offer") is None
                else frozenset(str(n) for n in d["can_offer"]),
                headroom_bytes=None
                if d.get("headroom_bytes") is None
                else int(d["headroom_bytes"]),
                running=int(d.get("running", 0)),
                waiting=int(d.get("waiting", 0)),
                max_num_seqs=max(1, int(d.get("max_num_seqs", 1))),
                step_s=None if d.get("step_s") is None else float(d["step_s"]),
                kv_usage=float(d.get("kv_usage", 0.0)),
                kv_classes={str(k): str(v) for k, v in dict(d.get("kv_classes") or {}).items()},
                block_size=int(d.get("block_size", 0)),
                cached=frozenset(int(x) for x in d.get("cached") or ()),
            )
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True)
class RouteAsk:
    """What the router knows of one request."""

    priority: int  # the tier's; lower is more important
    pinned: str | None = None  # the subnet the client named, if any
    allowed: tuple[str, ...] = ("*",)  # subnets the tier may use ("*": any)
    target_ttft_s: float | None = None

    def allows(self, subnet: str) -> bool:
        return "*" in self.allowed or subnet in self.allowed


class PrefixProbe(Protocol):
    """A request's prompt, as landmarks: the ids of its prefixes of 1, 2, 4, ... full blocks of
    `block_size` tokens in KV class `kv_class` (server/vocabulary/prefix_chain.py)."""

    def landmarks(self, kv_class: str, block_size: int) -> Sequence[int]: ...


@dataclass(frozen=True)
class RoutingRules:
    stale_after_s: float = 2.0
    gold_priority: int = 0  # tiers with priority <= this are routed by headroom
    min_headroom_bytes: int = 0
    affinity_min_tokens: int = 64  # a shorter cached prefix does not pull a request
    affinity_max_imbalance: int = 4  # requests more queued than the rank's least queued


@dataclass(frozen=True)
class Decision:
    ranks: list[list[Hashable]]
    reason: str  # "pinned" | "pinned-nowhere" | "gold" | "gold-nowhere" | "fill" | "stale" | "none"
    prefix: bool = False  # the first rank is a replica holding the prompt's prefix


def rank_replicas(
    ask: RouteAsk,
    candidates: Sequence[Hashable],
    reports: Mapping[Hashable, ReplicaReport | None],
    now: float,
    rules: RoutingRules = RoutingRules(),
    rng: random.Random | None = None,
    prompt: PrefixProbe | None = None,
) -> Decision:
    """Ranks of `candidates` (replica ids) for `ask`, best first, and why. With `prompt`,
    ranks are split by prefix-cache affinity (the module's docstring)."""
    if not candidates:
        return Decision([], "none")
    if ask.pinned is not None:
        candidates = [c for c in candidates if may_serve(ask, reports.get(c))]
        if not candidates:
            return Decision([], "pinned-nowhere")
    fresh = {
        c: r
        for c in candidates
        if (r := reports.get(c)) is not None and now - r.at <= rules.stale_after_s
    }
    unknown = [c for c in candidates if c not in fresh]
    if not fresh:
        return Decision(_power_of_two(candidates, reports, rng or random), "stale")

    def load(c: Hashable) -> tuple[float, int]:
        r = fresh[c]
        return (r.queue_depth / r.max_num_seqs, r.queue_depth)

    def ranked(*groups: list) -> list[list]:
        return [g for g in groups if g]

    def decided(ranks: list[list], reason: str) -> Decision:
        if prompt is None:
            return Decision(ranks, reason)
        held = {c: cached_tokens(ask, fresh[c], prompt) for c in fresh}
        out: list[list] = []
        for rank in ranks:
            out.extend(_by_affinity(rank, held, fresh, rules))
        return Decision(out, reason, prefix=len(out) > len(ranks) and out[0] != ranks[0])

    if ask.pinned is not None:
        pinned = ask.pinned
        offering = sorted((c for c in fresh if pinned in fresh[c].offered), key=load)
        could = sorted((c for c in fresh if pinned not in fresh[c].offered), key=load)
        ranks = ranked(offering, could, unknown)
        return decided(ranks, "pinned" if offering else "pinned-nowhere")

    if ask.priority <= rules.gold_priority:
        best = _best_allowed(ask, fresh.values())
        good = sorted((c for c in fresh if _qualifies(fresh[c], best, ask, rules)), key=load)
        rest = sorted((c for c in fresh if c not in good), key=load)
        return decided(ranked(good, rest, unknown), "gold" if good else "gold-nowhere")

    # Other tiers fill what important work does not need: replicas that would not qualify for it
    # (no headroom, the best subnet not offered) first, while they have room for more.
    best = _best_allowed(RouteAsk(priority=rules.gold_priority), fresh.values())
    spare = [
        c
        for c in fresh
        if not _qualifies(fresh[c], best, RouteAsk(priority=0), rules)
        and fresh[c].queue_depth < fresh[c].max_num_seqs
    ]
    rest = [c for c in fresh if c not in spare]
    return decided(ranked(sorted(spare, key=load), sorted(rest, key=load), unknown), "fill")


def cached_tokens(ask: RouteAsk, report: ReplicaReport, prompt: PrefixProbe) -> int:
    """How much of the prompt `report`'s replica holds in its prefix cache in a KV class it
    would serve `ask` with: the deepest landmark it holds, in tokens (a lower bound, within a
    factor of two, of the prefix it would reuse; 0 without the facts)."""
    if not report.cached or report.block_size < 1:
        return 0
    if ask.pinned is not None:
        subnets: list[str] = [ask.pinned]
    else:
        subnets = [n for n in report.offered if ask.allows(n)]
    classes = {report.kv_classes[n] for n in subnets if n in report.kv_classes}
    best = 0
    for kv_class in sorted(classes):
        depth = 0
        for j, lid in enumerate(prompt.landmarks(kv_class, report.block_size)):
            if lid not in report.cached:
                break  # a deeper prefix cannot be reused without this one
            depth = 1 << j
        best = max(best, depth)
    return best * report.block_size


def _by_affinity(
    rank: list, held: Mapping[Hashable, int], fresh: Mapping[Hashable, ReplicaReport], rules
) -> list[list]:
    """`rank` split in two when some of its replicas should be tried first for the prefix."""
    known = [c for c in rank if c in fresh]
    if not known:
        return [rank]
    most = max(held[c] for c in known)
    if most < max(1, rules.affinity_min_tokens):
        return [rank]
    holders = [c for c in known if held[c] == most]
    if len(holders) == len(rank):
        return [rank]  # every replica holds as much: load decides
    shortest = min(fresh[c].queue_depth for c in known)
    holders = [
        c for c in holders if fresh[c].queue_depth <= shortest + rules.affinity_max_imbalance
    ]
    if not holders:
        return [rank]
    return [holders, [c for c in rank if c not in holders]]


def may_serve(ask: RouteAsk, report: ReplicaReport | None) -> bool:
    """Whether the replica may be given the request at all: exactly the replicas some rank of
    `rank_replicas` holds. Only a pinned subnet rules a replica out, when the replica is
    configured without it (configuration does not change: even a stale report says it)."""
    if ask.pinned is None or report is None or report.can_offer is None:
        return True
    return ask.pinned in report.can_offer


def _best_allowed(ask: RouteAsk, reports) -> str | None:
    """The best-quality subnet the tier allows that some replica offers now."""
    scores: dict[str, float] = {}
    for r in reports:
        for name, q in r.offered.items():
            if ask.allows(name):
                scores[name] = q
    return max(scores, key=lambda n: (scores[n], n)) if scores else None


def _qualifies(r: ReplicaReport, best: str | None, ask: RouteAsk, rules: RoutingRules) -> bool:
    if best is not None and best not in r.offered:
        return False
    if r.headroom_bytes is not None and r.headroom_bytes < rules.min_headroom_bytes:
        return False
    if ask.target_ttft_s is not None and r.step_s is not None:
        # A new request waits roughly one step per batch ahead of it (continuous batching
        # admits it at the next step when there is room, else after the queue ahead drains).
        batches_ahead = 1 + r.waiting // r.max_num_seqs + (r.running >= r.max_num_seqs)
        if batches_ahead * r.step_s > ask.target_ttft_s:
            return False
    return True


def _power_of_two(
    candidates: Sequence[Hashable], reports: Mapping[Hashable, ReplicaReport | None], rng
) -> list[list[Hashable]]:
    """Ray Serve's default: two random replicas, one rank (the caller tries the less queued)."""
    if len(candidates) <= 2:
        pair = list(candidates)
        rng.shuffle(pair)
        return [pair]
    return [rng.sample(list(candidates), 2)]
