"""A real Prometheus scraping a live Concentric: every query of the Grafana dashboard has data.

Proves: `configs/prometheus/prometheus.yml` is a configuration Prometheus accepts (`promtool
check config`); the dashboard (`configs/grafana/concentric.json`) is well formed (every panel has
a Prometheus datasource and at least one target with an expression, refIds unique, the
datasource variable defined); and, with Debian's `prometheus` scraping the session's live server
every second while it serves the traffic a dashboard is for (the subnet policy choosing, pinned
subnets, chat and completions, streamed and not, SLA misses and downgrades of a tier whose
targets nothing meets, a 429 refusal, a stream its client abandons), every expression of every
panel returns at least one series with a finite value, and the special events show up as such.

Prometheus and promtool come from Debian's package, which `./dev.sh test` installs when it is
missing. Where it cannot, these tests fail (never skip): CI must prove the dashboard's queries.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.api.live import MODEL, REPO, LiveServer, free_port, sse_events, wait_ready

DASHBOARD = REPO / "configs" / "grafana" / "concentric.json"
PROMETHEUS_CONFIG = REPO / "configs" / "prometheus" / "prometheus.yml"
DATASOURCE_VARIABLE = "${DS_PROMETHEUS}"
# Grafana's variables, as the dashboard would get them with a 1 s scrape interval. The rate window
# is wider than Grafana's (4 scrapes), so the whole test's traffic stays inside it.
GRAFANA_VARIABLES = {
    "__rate_interval": "30s",
    "__interval": "5s",
    "__range": "5m",
    "replica": ".*",  # the replica selector on "All"
}
# The fleet panels' metrics: only an ingress in front of engine replicas serves them (their data
# is checked by tests/fleet against a live fleet), so a single process leaves those panels empty.
FLEET_METRICS = "concentric_fleet_"
# What the traffic must have caused, as Prometheus saw it (a comparison keeps only true series).
EVENTS = {
    "the subnet policy chose a subnet": 'concentric_subnet_choices_total{pinned="false"} > 0',
    "a pinned subnet was admitted": 'concentric_subnet_choices_total{pinned="true"} > 0',
    "an SLA miss (ttft)": 'concentric_sla_misses_total{tier="strict",target="ttft"} > 0',
    "an SLA miss (tpot)": 'concentric_sla_misses_total{tier="strict",target="tpot"} > 0',
    "a downgrade": 'concentric_subnet_downgrades_total{tier="strict"} > 0',
    "a 429 refusal": 'concentric_requests_rejected_total{tier="strict",reason="concurrency"} > 0',
    "an abandoned stream": (
        'concentric_requests_finished_total{tier="strict",finish_reason="abort"} > 0'
    ),
}
CHAT = "/v1/chat/completions"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not installed. `./dev.sh test` installs Debian's `prometheus` package "
            "(prometheus and promtool) when it is missing, as root or with passwordless sudo; "
            "its output says why it could not. By hand: apt-get install prometheus",
            pytrace=False,
        )
    return path


# ---- the dashboard ---------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _targets() -> list[tuple[str, str]]:
    """(panel title and refId, expr) of every target of every panel."""
    return [
        (f"{panel.get('title')!r} {target.get('refId')}", target.get("expr", ""))
        for panel in _dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def promql(expr: str) -> str:
    """The dashboard's expression with Grafana's variables replaced as Grafana would."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in GRAFANA_VARIABLES:
            raise AssertionError(f"unknown Grafana variable ${name} in {expr!r}: add it here")
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    assert dashboard.get("title") and dashboard.get("uid")
    # Panels name their datasource through this variable, so a provisioned Grafana resolves it to
    # its Prometheus whatever that datasource's uid is.
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    ds = variables.get(DATASOURCE_VARIABLE[2:-1])
    assert ds is not None and ds["type"] == "datasource" and ds["query"] == "prometheus", ds
    panels = dashboard["panels"]
    assert panels, "the dashboard has no panels"
    ids = [p.get("id") for p in panels]
    assert len(set(ids)) == len(ids), f"panel ids repeat: {ids}"
    for panel in panels:
        where = f"panel {panel.get('title')!r}"
        assert panel.get("title") and panel.get("gridPos"), where
        assert panel.get("datasource") == {"type": "prometheus", "uid": DATASOURCE_VARIABLE}, where
        targets = panel.get("targets")
        assert targets, f"{where} has no targets"
        refs = [t.get("refId") for t in targets]
        assert all(refs) and len(set(refs)) == len(refs), f"{where}: refIds {refs}"
        for t in targets:
            assert isinstance(t.get("expr"), str) and t["expr"].strip(), f"{where}: no expr"
            assert t.get("datasource", panel["datasource"]) == panel["datasource"], where
            promql(t["expr"])  # only variables this test (and Grafana) knows


def test_prometheus_config_is_valid() -> None:
    promtool = _tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- a real Prometheus -----------------------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    _log_file: Any = field(default=None, repr=False)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of `expr` now; a PromQL error fails the test, naming `expr`."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        assert body["data"]["resultType"] == "vector", f"{expr}: {body['data']['resultType']}"
        return body["data"]["result"]

    def target_health(self) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()
        return [
            {k: t.get(k) for k in ("scrapeUrl", "health", "lastError")}
            for t in body["data"]["activeTargets"]
        ]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log_file is not None:
            self._log_file.close()


def start_prometheus(folder: Path, target: str, timeout: float = 30) -> Prometheus:
    """Prometheus on a free loopback port (never 9090: a packaged service may hold that),
    scraping `target` (host:port) every second, with its own empty storage."""
    binary = _tool("prometheus")
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                # The timeout must not exceed the interval (its default, 10 s, would).
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "concentric",
                        "metrics_path": "/metrics",
                        "static_configs": [{"targets": [target]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    log = folder / "prometheus.log"
    log_file = log.open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        cwd=folder,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log, _log_file=log_file)
    wait_ready("prometheus", proc, f"{prom.url}/-/ready", prom.stop, prom.log_text, timeout)
    return prom


@pytest.fixture(scope="module")
def prometheus(
    server: LiveServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    prom = start_prometheus(
        tmp_path_factory.mktemp("prometheus"), server.base_url.removeprefix("http://")
    )
    try:
        yield prom
    finally:
        prom.stop()


# ---- traffic ---------------------------------------------------------------------------------


def _ok(response: httpx.Response) -> httpx.Response:
    assert response.status_code == 200, response.text
    return response


def _post_retrying_429(client: httpx.Client, path: str, body: dict[str, Any]) -> None:
    """A request of the one-at-a-time tenant: the previous wave's abandoned stream may still
    hold its slot for a moment (it is released when its abort finishes)."""
    deadline = time.monotonic() + 15
    while (r := client.post(path, json=body)).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.1)
    _ok(r)


def _wave(server: LiveServer) -> None:
    """One of everything the dashboard plots. Each request makes at least two tokens
    (min_tokens), so it has a time per output token."""
    short = {"max_tokens": 4, "min_tokens": 4}
    msgs = [{"role": "user", "content": "Tell me about Prometheus"}]
    with server.client("alice") as alice:
        # The base model: the subnet policy chooses. Non-streamed and streamed.
        _ok(alice.post(CHAT, json={"model": MODEL, "messages": msgs, **short}))
        r = _ok(
            alice.post(
                "/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": "Once upon a time",
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    **short,
                },
            )
        )
        assert sse_events(r.text.splitlines())
        # Pinned subnets, streamed and not. The repeated prompt is served from the prefix cache.
        r = _ok(alice.post(CHAT, json={"model": "e2b", "messages": msgs, "stream": True, **short}))
        assert sse_events(r.text.splitlines())
        _ok(alice.post("/v1/completions", json={"model": "full", "prompt": "Hi", **short}))
    strict_body = {"model": MODEL, "messages": msgs, **short}
    # No keep-alive: leaving the stream early must close its connection, which aborts it.
    with (
        server.client("strict", limits=httpx.Limits(max_keepalive_connections=0)) as strict,
        server.client("strict") as other,
    ):
        # Over the strict tier's 1 ms targets: an SLA miss of both kinds, and a downgrade.
        _post_retrying_429(strict, CHAT, strict_body)
        long = {**strict_body, "stream": True, "max_tokens": 200, "min_tokens": 200}
        with strict.stream("POST", CHAT, json=long) as stream:
            assert stream.status_code == 200
            # Held in a variable: a line iterator dropped early (a `break` out of a for loop)
            # closes the connection at once, and the server would abort the stream before the
            # second request below arrives.
            lines = stream.iter_lines()
            events = 0
            while events < 3:  # the role chunk and two tokens: it is generating
                events += next(lines).startswith("data:")
            # The tier allows one request at a time: a second one now is refused.
            refused = other.post(CHAT, json=strict_body)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        # Leaving the block abandons the stream mid-generation.


def _wait_until(
    prom: Prometheus,
    exprs: list[str],
    done: Callable[[list[dict[str, Any]]], bool],
    timeout: float,
) -> dict[str, list[dict[str, Any]]]:
    """Poll every expression until `done` holds for each; the last results of those for which it
    never did."""
    deadline = time.monotonic() + timeout
    pending = {e: prom.query(e) for e in exprs}
    while True:
        pending = {e: r for e, r in pending.items() if not done(r)}
        if not pending or time.monotonic() > deadline:
            return pending
        time.sleep(0.5)
        pending = {e: prom.query(e) for e in pending}


def _has_series(result: list[dict[str, Any]]) -> bool:
    return bool(result)


def _has_finite_value(result: list[dict[str, Any]]) -> bool:
    # A rate with no increase inside its window makes histogram_quantile NaN: Grafana draws no
    # line. A finite value means the panel shows the traffic.
    return any(math.isfinite(float(s["value"][1])) for s in result)


def test_every_dashboard_query_returns_data(server: LiveServer, prometheus: Prometheus) -> None:
    targets = [(where, expr) for where, expr in _targets() if FLEET_METRICS not in expr]
    exprs = sorted({promql(expr) for _, expr in targets})
    # A series that first appears in a scrape has no increase yet: rate() needs a later sample
    # that grew. So a first wave creates every labelled series, Prometheus scrapes them, and a
    # second wave makes them grow inside the rate window. The first wave runs while Prometheus
    # gets to its first scrape (its scrape manager applies new targets every 5 s).
    _wave(server)
    up = _wait_until(prometheus, ['up{job="concentric"} == 1'], _has_series, timeout=15)
    assert not up, f"Prometheus cannot scrape the server: {prometheus.target_health()}"
    _wait_until(prometheus, exprs + list(EVENTS.values()), _has_series, timeout=15)
    _wave(server)
    missing = _wait_until(prometheus, exprs, _has_finite_value, timeout=20)
    events = _wait_until(prometheus, list(EVENTS.values()), _has_series, timeout=5)
    failures = [
        f"{where}: {expr}\n    -> {missing[promql(expr)]}"
        for where, expr in targets
        if promql(expr) in missing
    ] + [f"no {what}: {expr}" for what, expr in EVENTS.items() if expr in events]
    assert not failures, "dashboard queries without data:\n" + "\n".join(failures)
