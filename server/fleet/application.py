"""The Ray Serve application: an ingress deployment in front of an engine deployment, and
`concentric serve --replicas N`, which runs it on this machine.

Owns the deployments' options (replicas or autoscaling bounds, each engine replica's device
share, `max_ongoing_requests`, the request router and how often replicas report to it), the
builder `serve run` / `serve deploy` import (`app_builder`, see configs/ray/serve.yaml), and the
local launcher: start Ray with this machine's resources, deploy, serve HTTP on the configured
host and port until SIGTERM or Ctrl-C, then shut Serve and Ray down.

The engine replicas' settings are the server's (`ServerConfig`, one YAML); the fleet's are
`FleetConfig` (`--fleet-config`, `--replicas`).

Deliberately does not know: the API (ingress.py) or the engine (engine_replica.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from server.config import ServerConfig, load_config
from server.fleet.engine_replica import EngineReplica
from server.fleet.fleet_actor import NAMESPACE
from server.fleet.fleet_config import FleetConfig, load_fleet_config
from server.fleet.ingress import IngressReplica

log = logging.getLogger("concentric.fleet")
APP_NAME = "concentric"
ENGINE_DEPLOYMENT = "ConcentricEngine"
INGRESS_DEPLOYMENT = "ConcentricIngress"
ROUTER = "server.fleet.replica_router:ConcentricRouter"


def build_application(config: ServerConfig, checkpoint: Path, fleet: FleetConfig):
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    settings = asdict(config)
    fleet_settings = fleet.to_dict()
    scaling: dict[str, Any] = (
        {"autoscaling_config": fleet.autoscaling}
        if fleet.autoscaling is not None
        else {"num_replicas": fleet.replicas}
    )
    engine = serve.deployment(
        EngineReplica,
        name=ENGINE_DEPLOYMENT,
        max_ongoing_requests=fleet.max_ongoing_requests,
        ray_actor_options={
            "num_cpus": fleet.replica_num_cpus,
            "num_gpus": fleet.replica_num_gpus,
        },
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER,
            request_router_kwargs={
                "stale_after_s": fleet.stale_after_s,
                "gold_priority": fleet.gold_priority,
                "min_headroom_bytes": fleet.min_headroom_bytes,
                "affinity_min_tokens": fleet.affinity_min_tokens,
                "affinity_max_imbalance": fleet.affinity_max_imbalance,
            },
            request_routing_stats_period_s=fleet.routing_stats_period_s,
            request_routing_stats_timeout_s=max(1.0, 5 * fleet.routing_stats_period_s),
        ),
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=config.drain_timeout_s,
        **scaling,
    )
    ingress = serve.deployment(
        serve.ingress()(IngressReplica),
        name=INGRESS_DEPLOYMENT,
        num_replicas=fleet.ingress_replicas,
        # The ingress only tokenizes and relays: it takes every request, the engine
        # replicas' max_ongoing_requests and the tenants' limits bound the work.
        max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": fleet.ingress_num_cpus},
    )
    engines = engine.bind(settings, str(checkpoint), fleet_settings)
    return ingress.bind(engines, settings, str(checkpoint), fleet_settings)


def app_builder(args: dict[str, Any]):
    """For `serve run` / `serve deploy`: args `config` (server YAML) and `fleet_config` (fleet
    YAML), both optional, plus any fleet setting (e.g. `replicas: 2`)."""
    from server.tools.dev_model import default_dev_checkpoint

    args = dict(args or {})
    config = load_config(args.pop("config", None))
    fleet = load_fleet_config(args.pop("fleet_config", None), **args)
    checkpoint = Path(config.checkpoint) if config.checkpoint else default_dev_checkpoint()
    return build_application(config, checkpoint, fleet)


def serve_fleet(config: ServerConfig, fleet: FleetConfig) -> None:
    """`concentric serve --replicas N`: run the fleet on this machine (or join `ray_address`)."""
    import ray
    from ray import serve

    from server.api.service import Service, warn_open
    from server.tools.dev_model import default_dev_checkpoint

    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    checkpoint = Path(config.checkpoint) if config.checkpoint else default_dev_checkpoint()
    Service(config, checkpoint).check_config()  # configuration errors before Ray starts
    warn_open(config)
    # Workers import this code base as the driver does (a checkout run with PYTHONPATH).
    env = {
        k: v
        for k, v in os.environ.items()
        if k in ("PYTHONPATH", "OMP_NUM_THREADS") or k.startswith("RAY_SERVE_")
    }
    # Serve's router asks a replica its queue length before sending it a request, and gives
    # up on it after 0.1 s by default: too short for a replica whose CPU share is busy
    # computing (its answer comes late, the request is held back again and again).
    env.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
    ray.init(
        address=fleet.ray_address,
        namespace=NAMESPACE,
        include_dashboard=False,
        runtime_env={"env_vars": env} if env else None,
        log_to_driver=config.log_level == "debug",
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(
            build_application(config, checkpoint, fleet),
            name=APP_NAME,
            route_prefix="/",
            blocking=False,
        )
        log.info(
            "fleet of %d engine replica(s) serving on http://%s:%d",
            fleet.replicas,
            config.host,
            config.port,
        )
        print(f"concentric fleet ready on http://{config.host}:{config.port}", flush=True)
        stop.wait()
    finally:
        log.info("shutting the fleet down")
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
