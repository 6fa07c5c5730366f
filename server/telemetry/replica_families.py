"""The engine replicas' own metric families in the ingress's /metrics, one series per replica.

Owns `FleetMetrics`, the ingress's `Metrics` when the engines are Ray Serve replicas: what it
renders is its own families merged, family by family, with every engine replica's (the text
each replica's registry renders, which the ingress keeps from the fleet board), each replica's
series labelled with its `replica` (Serve's replica id) and `rank`. One scrape target (the
ingress's port, as for one process) then gives the whole fleet, and the dashboard's queries
work unchanged (`sum by (tier)` adds the replicas up; `{replica=~"$replica"}` picks some).

Merged, not appended: a family may appear once in an exposition (a second `# TYPE` line for a
name fails the whole scrape), and both sides define every family (the same `Metrics` class).
The ingress's own series keep their labels (no `replica`): what only it counts (admission
refusals, the fleet view); the engine's per-request families it does not observe at all
(ingress.py), so nothing is counted twice.

Deliberately does not know: Ray, the fleet board, or how the texts arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from server.telemetry.metrics import Metrics

# replica id -> (its rank, the exposition text its registry rendered)
ReplicaTexts = Mapping[str, tuple[str, str]]


def merge_families(own: Iterable[Metric], replicas: ReplicaTexts) -> list[Metric]:
    """`own` families with each replica's samples added (labelled), in `own`'s order; families
    only replicas have follow. A replica text that does not parse is left out, whole."""
    merged: dict[str, Metric] = {}
    for family in own:
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        copy.samples = list(family.samples)
        merged[family.name] = copy
    for tag, (rank, text) in sorted(replicas.items()):
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError:
            continue
        extra = {"replica": tag, "rank": rank}
        for family in families:
            target = merged.get(family.name)
            # The text format has a counter's or histogram's `_created` series as a gauge family
            # of its own; ours keeps them in the family they belong to (rendered apart again).
            base = merged.get(family.name.removesuffix("_created"))
            if family.name.endswith("_created") and base is not None and base.type != "gauge":
                target = base
            elif target is None:
                target = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            elif target.type != family.type:
                continue  # the same name with another type: not ours to reconcile
            target.samples.extend(
                Sample(s.name, {**s.labels, **extra}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            )
    return list(merged.values())


class _Merged:
    def __init__(self, collect: Callable[[], list[Metric]]):
        self.collect = collect


class FleetMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__()
        self.replica_texts: Callable[[], ReplicaTexts] = dict

    def render(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(
            _Merged(lambda: merge_families(self.registry.collect(), self.replica_texts()))
        )
        return generate_latest(registry)
