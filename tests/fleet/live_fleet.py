"""A live fleet for tests: `concentric serve --fleet-config` on Ray Serve (tiny model), started
as a subprocess from settings given as data, and what tests read of it (the ingress's /metrics,
each replica's counts by rank).

Deliberately does not know: what a test asserts.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.api.live import MODEL, REPO, LiveServer, free_port

PERIOD_S = 0.2  # routing stats period of the fleets the tests start


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for labels, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        out.append((dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return out


class Fleet(LiveServer):
    script: Path | None = None

    def fleet_metrics(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=10).text

    def by_rank(self, name: str) -> dict[int, float]:
        return {
            int(lb["rank"]): v for lb, v in metric_samples(self.fleet_metrics(), name) if lb["rank"]
        }

    def pids(self) -> dict[int, int]:
        return {
            int(lb["rank"]): int(lb["pid"])
            for lb, _ in metric_samples(self.fleet_metrics(), "concentric_fleet_replica_info")
        }

    def wait_for(self, what: str, check, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s\n{self.fleet_metrics()}")
            time.sleep(0.2)

    def served(self) -> dict[int, float]:
        """Each replica's count of finished calls, once nothing is in flight and the board
        (replicas post every 0.2 s, the ingress reads it every 0.5 s) has caught up."""
        self.wait_for(
            "the fleet idle",
            lambda: set(self.by_rank("concentric_fleet_replica_requests_held").values()) == {0},
            30,
        )
        time.sleep(1.5)
        return self.by_rank("concentric_fleet_replica_served_total")

    def set_headroom(self, **by_rank: int) -> None:
        tmp = self.script.with_suffix(".tmp")
        tmp.write_text(json.dumps({k.removeprefix("r"): v for k, v in by_rank.items()}))
        tmp.replace(self.script)  # atomic: a replica never reads half a file
        time.sleep(6 * PERIOD_S)  # every replica reported it, the router has seen it

    def chat(self, tenant: str, model: str = MODEL, **kw) -> httpx.Response:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 2,
            "temperature": 0,
            **kw,
        }
        return httpx.post(
            f"{self.base_url}/v1/chat/completions",
            json=body,
            headers=self.headers(tenant),
            timeout=60,
        )


def start_fleet(
    folder: Path,
    server: Mapping[str, Any],
    fleet: Mapping[str, Any],
    tiers: Mapping[str, Any],
    tenants: Mapping[str, str],
    ready: Callable[[Fleet], bool],
    timeout: float = 180,
) -> Fleet:
    """Write the settings into `folder`, start the fleet, and wait until `ready(fleet)` holds
    (the caller stops it: `fleet.stop()`)."""
    (folder / "tiers.yaml").write_text(yaml.safe_dump({"tiers": dict(tiers)}))
    keyed = {n: {"tier": t, "keys": [{"env": f"K_{n.upper()}"}]} for n, t in tenants.items()}
    (folder / "tenants.yaml").write_text(yaml.safe_dump({"tenants": keyed}))
    settings = {
        "model_name": MODEL,
        "tenants_file": "tenants.yaml",
        "tiers_file": "tiers.yaml",
        "custom_subnets": None,
        "log_level": "warning",
        **server,
    }
    (folder / "server.yaml").write_text(yaml.safe_dump(settings))
    (folder / "fleet.yaml").write_text(
        yaml.safe_dump({"routing_stats_period_s": PERIOD_S, **fleet})
    )
    keys = {n: f"sk-{n}-{secrets.token_hex(8)}" for n in tenants}
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCENTRIC_")}
    env.update({f"K_{n.upper()}": k for n, k in keys.items()})
    env.update(
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO),
        RAY_USAGE_STATS_ENABLED="0",
    )
    port = free_port()
    log = folder / "fleet.log"
    log_file = log.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "server", "serve",
            "--config", str(folder / "server.yaml"),
            "--fleet-config", str(folder / "fleet.yaml"),
            "--port", str(port),
        ],
        cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
    )  # fmt: skip
    live = Fleet(f"http://127.0.0.1:{port}", keys, proc, log, _log_file=log_file)
    script = fleet.get("headroom_script")
    live.script = Path(script) if script else None
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the fleet exited ({proc.returncode}):\n{live.log_text()}")
            try:
                if ready(live):
                    return live
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the fleet was not ready in {timeout:g} s:\n{live.log_text()}")
            time.sleep(1)
    except BaseException:
        live.stop(timeout=60)
        raise
