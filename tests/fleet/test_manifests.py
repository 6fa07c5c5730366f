"""The fleet's deployment files, checked with Ray Serve's own schema and the app builder they
name (no cluster is started): configs/ray/serve.yaml, configs/ray/fleet.yaml and the KubeRay
RayService in deploy/rayservice.yaml."""

from __future__ import annotations

import importlib

import pytest
import yaml

pytest.importorskip("ray.serve")

from ray.serve.schema import ServeDeploySchema

from server.config import REPO
from server.fleet.fleet_config import FleetConfigError, load_fleet_config

SERVE_YAML = REPO / "configs" / "ray" / "serve.yaml"
FLEET_YAML = REPO / "configs" / "ray" / "fleet.yaml"
RAYSERVICE = REPO / "deploy" / "rayservice.yaml"


def builder(import_path: str):
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


def serve_configs() -> list[dict]:
    service = yaml.safe_load(RAYSERVICE.read_text())
    return [
        yaml.safe_load(SERVE_YAML.read_text()),
        yaml.safe_load(service["spec"]["serveConfigV2"]),
    ]


@pytest.mark.parametrize("config", serve_configs(), ids=["serve.yaml", "rayservice"])
def test_serve_configs_pass_rays_schema_and_name_our_builder(config: dict):
    schema = ServeDeploySchema.parse_obj(config)
    (app,) = schema.applications
    assert app.route_prefix == "/"
    assert callable(builder(app.import_path))
    # Every argument but the two files is a fleet setting the builder accepts.
    args = {k: v for k, v in app.args.items() if k not in ("config", "fleet_config")}
    fleet_file = REPO / app.args["fleet_config"] if "fleet_config" in app.args else None
    load_fleet_config(fleet_file, **args)


def test_serve_yaml_builds_the_two_deployments():
    from ray.serve import Application

    from server.fleet.application import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT

    (app,) = yaml.safe_load(SERVE_YAML.read_text())["applications"]
    args = {k: str(REPO / v) for k, v in app["args"].items()}
    built = builder(app["import_path"])(args)
    assert isinstance(built, Application)
    ingress = built._bound_deployment
    assert ingress.name == INGRESS_DEPLOYMENT
    (engine,) = [a._bound_deployment for a in ingress.init_args if isinstance(a, Application)]
    assert engine.name == ENGINE_DEPLOYMENT
    fleet = load_fleet_config(FLEET_YAML)
    options = engine._deployment_config
    assert options.max_ongoing_requests == fleet.max_ongoing_requests
    router = options.request_router_config
    assert router.request_router_class.endswith("replica_router.ConcentricRouter") or (
        router.request_router_class.endswith("replica_router:ConcentricRouter")
    )
    assert router.request_routing_stats_period_s == fleet.routing_stats_period_s


def test_rayservice_gives_each_engine_replica_a_gpu():
    service = yaml.safe_load(RAYSERVICE.read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    fleet = load_fleet_config(None, **{k: v for k, v in app["args"].items() if k != "config"})
    assert fleet.replica_num_gpus == 1
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = sum(
        w["maxReplicas"]
        * int(
            w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
        )
        for w in workers
    )
    assert gpus >= fleet.max_replicas, "the workers cannot hold the autoscaler's maximum"
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == "2.58.0"


def test_fleet_settings_are_checked():
    with pytest.raises(FleetConfigError, match="unknown fleet setting"):
        load_fleet_config(None, replica=2)
    with pytest.raises(FleetConfigError, match="limits_on_loss"):
        load_fleet_config(None, limits_on_loss="maybe")
    with pytest.raises(FleetConfigError, match="min_replicas"):
        load_fleet_config(None, max_replicas=4)
