"""A live fleet: `concentric serve --fleet-config` with two engine replicas and two ingress
replicas on Ray Serve (tiny model, 2 CPUs), driven through its one HTTP port.

The two engine replicas are configured differently, so routing is observable from the outside:
rank 0 offers every subnet but `e2b`, rank 1 only `e2b` and `e2.49b-block`. A replica that is
sent a pinned request for a subnet it does not offer would hold it forever (it waits for the
subnet), so a misrouted pinned request shows up as a timeout. Headroom is scripted through the
fleet's `headroom_script` file. What each replica served is read from the fleet view in the
ingress's /metrics (every replica's own count, in its reports), not from the router's decisions.
The fleet autoscales between 2 and 3 engine replicas; only the last test loads it enough to.

Slow to start (~30-60 s: Ray, Serve, four processes loading the model); every test shares it.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve")

from tests.api.live import MODEL, REPO, error_of, sse_events
from tests.fleet.live_fleet import Fleet, metric_samples, start_fleet

# Four server processes on two cores, and an autoscaling test that loads every core with 40
# clients on 60 s timeouts: see `alone` in dev.sh.
pytestmark = pytest.mark.alone

GOLD_SUBNET = "e2.49b-block"  # offered by both replicas
ONLY_ON_1 = "e2b"
TIERS = {
    # Routed by headroom (priority 0 <= gold_priority); its best allowed subnet is on both.
    "gold": {
        "priority": 0,
        "subnets": [GOLD_SUBNET],
        "max_concurrent": 64,
        "requests_per_minute": 100_000,
        "tokens_per_minute": 100_000_000,
    },
    # 10 requests per minute: one bucket for the whole fleet, whichever ingress a request hits.
    "ten": {"priority": 5, "requests_per_minute": 10, "max_concurrent": 64},
    "bronze": {
        "priority": 10,
        "subnets": ["*"],
        "max_concurrent": 12,
        "requests_per_minute": 100_000,
        "tokens_per_minute": 100_000_000,
    },
}
TENANTS = {"gina": "gold", "tess": "ten", "bert": "bronze"}
MAX_NUM_SEQS = 4
AUTOSCALE_TARGET = 8  # ongoing requests per engine replica


@pytest.fixture(scope="module")
def fleet(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    from server.checkpoint.store import CheckpointStore
    from server.vocabulary.subnets import DEFAULT_TABLE_CSV, load_subnet_table

    folder = tmp_path_factory.mktemp("fleet")
    names = load_subnet_table(CheckpointStore.open(tiny_dir).text, DEFAULT_TABLE_CSV, None).names()
    script = folder / "headroom.json"
    script.write_text(json.dumps({"0": 10**10, "1": 10**10}))
    live = start_fleet(
        folder,
        server={
            "checkpoint": str(tiny_dir),
            "kv_cache_bytes": 16 * 1024 * 1024,
            "max_num_seqs": MAX_NUM_SEQS,
            "max_num_batched_tokens": 256,
            "max_model_len": 512,
        },
        fleet={
            "replicas": 2,
            # Autoscaling between 2 and 3 replicas on ongoing requests: the other tests keep
            # under 8 per replica; the last one goes above it (short delays, to see both moves).
            "min_replicas": 2,
            "max_replicas": 3,
            "target_ongoing_requests": AUTOSCALE_TARGET,
            "upscale_delay_s": 0.0,
            "downscale_delay_s": 3.0,
            "look_back_period_s": 1.5,
            "autoscaling_metrics_interval_s": 0.5,
            "replica_num_cpus": 0.5,
            "ingress_replicas": 2,
            "ingress_num_cpus": 0.25,
            "stale_after_s": 2.0,
            "gold_priority": 0,
            "min_headroom_bytes": 10**9,
            "retries": 4,
            "retry_pause_s": 0.5,
            "silence_s": 10.0,
            "headroom_script": str(script),
            "replica_offer": {
                "0": [n for n in names if n != ONLY_ON_1],
                "1": [ONLY_ON_1, GOLD_SUBNET],
            },
        },
        tiers=TIERS,
        tenants=TENANTS,
        ready=lambda f: set(f.pids()) == {0, 1} and f.chat("bert").status_code == 200,
    )
    try:
        yield live
    finally:
        live.stop(timeout=60)


def test_openai_client_through_the_ingress(fleet: Fleet):
    client = fleet.openai("bert")
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.system_fingerprint.startswith("concentric:")
    assert 1 <= r.usage.completion_tokens <= 4
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")
    # The same errors as one process: an unknown model is a 404 in OpenAI's envelope.
    bad = fleet.chat("bert", model="nope")
    assert bad.status_code == 404 and error_of(bad)["param"] == "model"
    # Authentication is the ingress's own.
    assert httpx.get(f"{fleet.base_url}/v1/models", timeout=10).status_code == 401


def test_the_dashboards_fleet_panels_have_per_replica_data(fleet: Fleet):
    """Every metric the dashboard's fleet panels query is served, per replica where it is a
    replica's (the selector's `replica` label on both replicas)."""
    dashboard = json.loads((REPO / "configs" / "grafana" / "concentric.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "concentric_fleet_replica_info" in variables["replica"]["definition"]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    names = {n for e in exprs for n in re.findall(r"concentric_fleet_\w+", e)}
    assert len(names) >= 4, names  # headroom, resident level, queue, routing decisions
    fleet.chat("bert")  # at least one routing decision
    # The ingress that answers the scrape may not be the one that routed: it shows the other's
    # counts once they reach it through the fleet board (posted and read twice a second).
    deadline = time.monotonic() + 10
    text = fleet.fleet_metrics()
    while not metric_samples(text, "concentric_fleet_routing_decisions_total"):
        assert time.monotonic() < deadline, text
        time.sleep(0.2)
        text = fleet.fleet_metrics()
    tags = {lb["replica"] for lb, _ in metric_samples(text, "concentric_fleet_replica_info")}
    assert len(tags) == 2, text
    for name in sorted(names):
        samples = metric_samples(text, name)
        assert samples, f"{name}: no series\n{text}"
        if name.startswith("concentric_fleet_replica_"):
            assert {lb["replica"] for lb, _ in samples} == tags, (name, samples)
    # Each engine replica's own families too, labelled by replica (relayed about once a second):
    # the selector picks the engine panels' series as well.
    fleet.wait_for(
        "every replica's engine metrics, and the request's TTFT, in the ingress's /metrics",
        lambda: (
            {
                lb.get("replica")
                for lb, _ in metric_samples(fleet.fleet_metrics(), "concentric_engine_up")
            }
            == tags
            and sum(
                v
                for _, v in metric_samples(
                    fleet.fleet_metrics(), "concentric_time_to_first_token_seconds_count"
                )
            )
            >= 1
        ),
        10,  # a few relays: replicas post every second, the ingress reads every second
    )


def test_tier_limit_holds_across_the_fleet(fleet: Fleet):
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda _: fleet.chat("tess", max_tokens=1), range(20)))
    elapsed = time.monotonic() - start
    ok = [r for r in codes if r.status_code == 200]
    refused = [r for r in codes if r.status_code == 429]
    assert len(ok) + len(refused) == 20, [r.status_code for r in codes]
    # 10 per minute for the tenant, across two ingress replicas (not 10 each); the bucket refills
    # one request per 6 s, so a slow machine may let one more through per 6 s elapsed.
    assert 10 <= len(ok) <= 10 + int(elapsed / 6), (len(ok), elapsed)
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert "requests_per_minute" in error_of(refused[0])["message"]


def test_pinned_requests_land_only_where_the_subnet_is_offered(fleet: Fleet):
    before = fleet.served()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        only0 = list(pool.map(lambda _: fleet.chat("bert", model="full"), range(6)))
        only1 = list(pool.map(lambda _: fleet.chat("bert", model=ONLY_ON_1), range(6)))
    assert [r.status_code for r in only0 + only1] == [200] * 12
    assert {r.json()["system_fingerprint"] for r in only0} == {"concentric:full"}
    assert {r.json()["system_fingerprint"] for r in only1} == {f"concentric:{ONLY_ON_1}"}

    now = fleet.served()
    assert (now[0] - before[0], now[1] - before[1]) == (6, 6)


def test_gold_traffic_follows_a_scripted_headroom_change(fleet: Fleet):
    def gold_burst() -> tuple[float, float]:
        before = fleet.served()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            codes = [r.status_code for r in pool.map(lambda _: fleet.chat("gina"), range(8))]
        assert codes == [200] * 8
        now = fleet.served()
        return now[0] - before[0], now[1] - before[1]

    try:
        fleet.set_headroom(r0=0, r1=10**10)  # replica 0 runs out of headroom
        assert gold_burst() == (0, 8)
        fleet.set_headroom(r0=10**10, r1=0)  # ... and now replica 1
        assert gold_burst() == (8, 0)
    finally:
        fleet.set_headroom(r0=10**10, r1=10**10)


def test_a_prompts_prefix_draws_its_requests_to_the_replica_that_holds_it(fleet: Fleet):
    """Prefix-cache affinity by KV class: gold requests (one subnet, so one KV class) sharing a
    long prefix follow the first one's replica, and reuse its cached K/V there. With both
    replicas equally fit and idle, routing without affinity would put each on either replica
    (all 8 on the first's: 1 in 256)."""
    system = "You answer briefly. " + " ".join(f"fact{i}" for i in range(60))

    def ask(question: str) -> httpx.Response:
        r = fleet.chat(
            "gina",
            messages=[
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ],
        )
        assert r.status_code == 200, r.text
        return r

    try:
        fleet.set_headroom(r0=10**10, r1=0)  # the first request can only go to replica 0
        before = fleet.served()
        first = ask("first question")
        assert first.json()["usage"]["prompt_tokens"] >= 2 * 64  # longer than two landmarks
        fleet.set_headroom(r0=10**10, r1=10**10)  # both fit for gold again
        after_first = fleet.served()
        assert after_first[0] - before[0] == 1
        usages = [ask(f"question {i}").json()["usage"] for i in range(8)]
        now = fleet.served()
        assert (now[0] - after_first[0], now[1] - after_first[1]) == (8, 0)
        # ... and there each reused the shared prefix (at least one 64-token landmark of it).
        assert all(u["prompt_tokens_details"]["cached_tokens"] >= 64 for u in usages), usages
        fleet.wait_for(
            "routing decisions by prefix in the fleet's metrics",
            lambda: any(
                lb["reason"] == "gold-prefix" and v >= 1
                for lb, v in metric_samples(
                    fleet.fleet_metrics(), "concentric_fleet_routing_decisions_total"
                )
            ),
            10,
        )
    finally:
        fleet.set_headroom(r0=10**10, r1=10**10)


def test_a_real_prometheus_sees_every_replica_through_the_ingress(
    fleet: Fleet, tmp_path_factory: pytest.TempPathFactory
):
    """Prometheus scraping the fleet's one port: the dashboard's fleet panels have a series per
    replica, and its engine panels, with the replica selector on one replica, show that
    replica's own data (every panel follows the selector)."""
    from tests.api.test_prometheus import promql, start_prometheus

    dashboard = json.loads((REPO / "configs" / "grafana" / "concentric.json").read_text())
    targets = {(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])}
    fleet_exprs = sorted(e for _, e in targets if "concentric_fleet_" in e)
    engine_exprs = sorted(
        e
        for title, e in targets
        if title in ("Throughput (tokens per second)", "KV cache usage", "Queue and batch")
        or title.startswith("Time to first token p50")
    )
    assert len(fleet_exprs) >= 6 and len(engine_exprs) >= 8
    assert all('replica=~"$replica"' in e for e in fleet_exprs + engine_exprs)

    def traffic() -> None:  # tokens on both replicas: "full" only on 0, e2b only on 1
        for model in ("full", ONLY_ON_1):
            r = fleet.chat("bert", model=model, max_tokens=4, min_tokens=4)
            assert r.status_code == 200, r.text

    prom = start_prometheus(
        tmp_path_factory.mktemp("fleet-prometheus"), fleet.base_url.removeprefix("http://")
    )
    try:
        traffic()
        tags = sorted(
            lb["replica"]
            for lb, _ in metric_samples(fleet.fleet_metrics(), "concentric_fleet_replica_info")
        )
        assert len(tags) == 2, tags

        def query(expr: str, replica: str) -> list[dict]:
            """`expr` as Grafana sends it with the selector on `replica` (a regex)."""
            return prom.query(promql(expr.replace("$replica", replica)))

        def wait(what: str, check, timeout: float = 30) -> None:
            deadline = time.monotonic() + timeout
            while not check():
                assert time.monotonic() < deadline, f"{what}: {prom.target_health()}"
                time.sleep(0.5)

        wait("Prometheus scraping the ingress", lambda: prom.query('up{job="concentric"} == 1'))
        # A rate needs a second sample that grew: more traffic once the series exist.
        wait("every replica's series", lambda: len(query(engine_exprs[0], ".*")) >= 1)
        traffic()

        def finite(result: list[dict]) -> bool:
            return any(math.isfinite(float(x["value"][1])) for x in result)

        for expr in fleet_exprs:
            per_replica = "concentric_fleet_replica_" in expr
            wait(
                f"{expr}: a series per replica",
                lambda e=expr, p=per_replica: (
                    {x["metric"].get("replica") for x in query(e, ".*")} >= set(tags)
                    if p
                    else bool(query(e, ".*"))
                ),
            )
        for tag in tags:
            for expr in engine_exprs:
                wait(f"{expr} for replica {tag}", lambda e=expr, t=tag: finite(query(e, t)))
            # The selector keeps the other replica out.
            usage = query('concentric_kv_cache_usage_ratio{replica=~"$replica"}', tag)
            assert {x["metric"]["replica"] for x in usage} == {tag}, usage
    finally:
        prom.stop()


def test_killing_a_replica_loses_no_request_that_had_not_started(fleet: Fleet):
    pids = fleet.pids()
    victim = pids[1]
    # A stream on replica 1 (the only one offering e2b), running when the replica dies.
    stream = httpx.stream(
        "POST",
        f"{fleet.base_url}/v1/chat/completions",
        json={
            "model": ONLY_ON_1,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 400,
            "min_tokens": 400,
            "stream": True,
        },
        headers=fleet.headers("bert"),
        timeout=60,
    )
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        with stream as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert "chat.completion.chunk" in first
            # 11 non-streamed bronze requests: bronze fills replica 1 first (it cannot serve
            # gold's best subnet, so it is where other tiers go while it has room), 3 run
            # beside the stream, the rest wait there without a token. When the replica dies,
            # those are retried on replica 0.
            futures = [
                pool.submit(fleet.chat, "bert", max_tokens=64, min_tokens=64) for _ in range(11)
            ]
            fleet.wait_for(
                "requests queued on replica 1",
                lambda: fleet.by_rank("concentric_fleet_replica_requests_held").get(1, 0) >= 6,
                30,
            )
            os.kill(victim, signal.SIGKILL)
            events = sse_events([first, *lines])
        results = [f.result(timeout=90) for f in futures]
    # The stream was running: it ends with an error event, then [DONE] (sse_events checks it).
    assert "error" in events[-1], events[-1]
    failed = [r for r in results if r.status_code != 200]
    # Only requests that had produced tokens on the dead replica may fail (at most the ones
    # running there: MAX_NUM_SEQS, the stream among them); every waiting one was retried.
    assert len(failed) <= MAX_NUM_SEQS - 1, [(r.status_code, r.text) for r in failed]
    assert all(r.status_code == 500 for r in failed)
    assert len(results) - len(failed) >= 11 - (MAX_NUM_SEQS - 1)
    # A replacement replica joins; nothing is left held anywhere, and the tenant's 12
    # concurrency slots are all free again (12 at once are admitted).
    fleet.wait_for(
        "a replacement replica",
        lambda: len(fleet.pids()) == 2 and victim not in fleet.pids().values(),
        120,
    )
    fleet.wait_for(
        "no request or KV block held",
        lambda: (
            set(fleet.by_rank("concentric_fleet_replica_requests_held").values()) == {0}
            and set(fleet.by_rank("concentric_fleet_replica_kv_blocks_used").values()) == {0}
        ),
        30,
    )
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        again = list(pool.map(lambda _: fleet.chat("bert", max_tokens=2), range(12)))
    assert [r.status_code for r in again] == [200] * 12, [
        (r.status_code, r.text) for r in again if r.status_code != 200
    ]
    # The replacement (rank 1 again) gets traffic: requests for the subnet only it offers.
    # (Unpinned ones may all go to replica 0 until Serve relays the newcomer's first report.)
    pinned = fleet.chat("bert", model=ONLY_ON_1)
    assert pinned.status_code == 200, pinned.text
    assert pinned.json()["system_fingerprint"] == f"concentric:{ONLY_ON_1}"
    assert fleet.served().get(1, 0) >= 1
    metrics = fleet.fleet_metrics()
    # Whichever ingress answers shows every ingress's count (they post them to the fleet board).
    retried = metric_samples(metrics, "concentric_fleet_calls_retried_total")
    assert sum(v for _, v in retried) >= 1, metrics


def test_the_fleet_grows_under_load_and_shrinks_when_it_is_gone(fleet: Fleet):
    """Autoscaling on ongoing requests between the bounds (2 and 3 replicas): 40 clients, each
    sending its next request as soon as it has the last one's answer, against a target of 8
    ongoing requests per replica, call for a third replica (not all 40 are ongoing at the
    engine replicas: on this 2-core machine 32 such clients kept about 20 there, the rest being
    parsed, templated or answered at the ingress; 2 x 8 is the line). The third joins and
    serves; with the load gone, the fleet is two replicas again. Every request is answered
    whole. (Runs last: the third replica offers every subnet, which the routing tests above do
    not expect.)"""
    assert len(fleet.pids()) == 2
    stop = threading.Event()
    answered: list[httpx.Response] = []

    def client() -> None:
        while not stop.is_set():
            answered.append(fleet.chat("gina", max_tokens=48, min_tokens=48))

    with concurrent.futures.ThreadPoolExecutor(5 * AUTOSCALE_TARGET) as pool:
        clients = [pool.submit(client) for _ in range(5 * AUTOSCALE_TARGET)]
        try:
            fleet.wait_for("a third replica", lambda: len(fleet.pids()) == 3, 90)
            fleet.wait_for(
                "the third replica serving",
                lambda: fleet.by_rank("concentric_fleet_replica_served_total").get(2, 0) >= 1,
                90,
            )
        finally:
            stop.set()
        for c in clients:
            c.result(timeout=120)
    assert all(r.status_code == 200 for r in answered), [
        r.text for r in answered if r.status_code != 200
    ]
    assert {r.json()["usage"]["completion_tokens"] for r in answered} == {48}
    fleet.wait_for("back to two replicas", lambda: len(fleet.pids()) == 2, 90)
    assert fleet.chat("bert").status_code == 200
