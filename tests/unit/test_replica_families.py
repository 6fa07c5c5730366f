"""The ingress's /metrics with every engine replica's own families (telemetry/replica_families.py):
one family per name (a repeated `# TYPE` fails a scrape), each replica's series labelled with
its replica id and rank, the ingress's own series as they were."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from server.engine.outputs import RequestLatency, RequestOutput
from server.telemetry.metrics import Metrics
from server.telemetry.replica_families import FleetMetrics


def replica(finished: int) -> str:
    m = Metrics()
    m.prepare(["gold"])
    m.up.set(1)
    for _ in range(finished):
        out = RequestOutput(
            "r",
            "full",
            finished=True,
            finish_reason="stop",
            num_prompt_tokens=3,
            num_output_tokens=2,
            latency=RequestLatency(0.0, 0.2, 0.5, 0.05),
        )
        m.observe_finished(out, "gold")
    return m.render().decode()


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name
    ]


def test_replicas_families_merge_into_the_ingress_exposition():
    ingress = FleetMetrics()
    ingress.prepare(["gold"])
    ingress.rejections.labels(tier="gold", reason="concurrency").inc()  # only the ingress counts
    texts = {"rep-a": ("0", replica(2)), "rep-b": ("1", replica(3))}
    ingress.replica_texts = lambda: texts
    text = ingress.render().decode()

    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types)), "a family appears twice"
    finished = samples(text, "concentric_requests_finished_total")
    by_replica = {lb.get("replica"): v for lb, v in finished}
    assert by_replica == {"rep-a": 2.0, "rep-b": 3.0}
    assert {lb["rank"] for lb, _ in finished} == {"0", "1"}
    counts = samples(text, "concentric_time_to_first_token_seconds_count")
    assert sum(v for _, v in counts) == 5.0
    up = {lb.get("replica"): v for lb, v in samples(text, "concentric_engine_up")}
    assert up == {None: 0.0, "rep-a": 1.0, "rep-b": 1.0}  # the ingress's own, and each replica's
    refused = samples(text, "concentric_requests_rejected_total")
    assert ({"tier": "gold", "reason": "concurrency"}, 1.0) in refused


def test_a_replica_text_that_does_not_parse_is_left_out():
    ingress = FleetMetrics()
    ingress.replica_texts = lambda: {"bad": ("0", "not { a metric"), "ok": ("1", replica(1))}
    text = ingress.render().decode()
    assert {lb.get("replica") for lb, _ in samples(text, "concentric_engine_up")} == {None, "ok"}
