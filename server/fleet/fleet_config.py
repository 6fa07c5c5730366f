"""How a fleet of Concentric replicas on Ray Serve is laid out and behaves.

Owns the fleet's settings (replica count and autoscaling bounds, each engine replica's
resources, routing rules, what global limits do on losing their store, retries, per-replica
offers), their checks, and reading them from a YAML file (`--fleet-config`) under the server's
own settings. Everything a single process does is still `ServerConfig`'s.

Deliberately does not know: Ray's API, or how replicas are routed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from server.fleet.tenant_limits import LOSS_MODES


class FleetConfigError(ValueError):
    pass


@dataclass
class FleetConfig:
    replicas: int = 1
    """Engine replicas (one device each). With max_replicas above it: the autoscaler's start."""
    min_replicas: int | None = None
    """Autoscaling bounds on ongoing requests (None: a fixed `replicas`)."""
    max_replicas: int | None = None
    target_ongoing_requests: float = 16.0
    """Autoscaling: the ongoing requests per engine replica it aims for."""
    upscale_delay_s: float = 30.0
    """Autoscaling: how long the load must call for more replicas before one is added."""
    downscale_delay_s: float = 600.0
    """Autoscaling: how long the load must call for fewer replicas before one is removed."""
    look_back_period_s: float = 30.0
    """Autoscaling: the window over which ongoing requests are averaged."""
    autoscaling_metrics_interval_s: float = 10.0
    """Autoscaling: how often replicas and callers report their ongoing requests (Ray Serve
    2.58 reads it from the deployment; the window must be longer)."""
    replica_num_cpus: float = 1.0
    """CPUs each engine replica reserves (on a GPU machine, also one GPU: replica_num_gpus)."""
    replica_num_gpus: float = 0.0
    max_ongoing_requests: int = 64
    """Requests one engine replica takes at once (beyond it they queue at the router)."""
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.5
    routing_stats_period_s: float = 0.2
    """How often every engine replica reports to the router."""
    stale_after_s: float = 2.0
    """Reports older than this are not trusted (routing falls back to power-of-two choices)."""
    gold_priority: int = 0
    """Tiers with priority at most this are routed by headroom (lower is more important)."""
    min_headroom_bytes: int = 0
    """Memory headroom a replica needs to be chosen for such a tier's request."""
    affinity_min_tokens: int = 64
    """Prefix-cache affinity: a replica holding at least this much of a prompt's prefix (in a
    KV class it would serve the request with) is tried first within its routing rank."""
    affinity_max_imbalance: int = 4
    """... unless its queue is more than this many requests longer than the rank's shortest."""
    limits_on_loss: str = "closed"
    """When the global tenant limits store does not answer: "closed" (429) or "open" (this
    ingress's own limits)."""
    limits_timeout_s: float = 1.0
    retries: int = 2
    """A call that failed before its first output is retried on another replica this often."""
    silence_s: float = 30.0
    """A call with no output and no heartbeat (replicas send one a second) this long is given up
    as a lost replica (then retried if it had no output yet)."""
    retry_pause_s: float = 0.2
    """Pause before such a retry (the router learns of a dead replica meanwhile)."""
    replica_offer: dict[str, list[str]] = field(default_factory=dict)
    """Replica rank -> the only subnets it offers (heterogeneous replicas); absent: all."""
    headroom_script: str | None = None
    """A JSON file of replica rank -> headroom bytes, overriding the measured headroom (tests,
    benchmarks)."""
    ray_address: str | None = None
    """An existing Ray cluster to join (None: start one on this machine)."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise FleetConfigError(f"replicas must be at least 1, got {self.replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise FleetConfigError("set min_replicas and max_replicas together (autoscaling)")
        if self.max_replicas is not None and not (
            1 <= (self.min_replicas or 0) <= self.replicas <= self.max_replicas
        ):
            raise FleetConfigError("need 1 <= min_replicas <= replicas <= max_replicas")
        if self.limits_on_loss not in LOSS_MODES:
            raise FleetConfigError(f"limits_on_loss must be one of {', '.join(LOSS_MODES)}")
        for name in (
            "routing_stats_period_s",
            "stale_after_s",
            "limits_timeout_s",
            "look_back_period_s",
            "autoscaling_metrics_interval_s",
        ):
            if not getattr(self, name) > 0:
                raise FleetConfigError(f"{name} must be positive")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            if not getattr(self, name) >= 0:
                raise FleetConfigError(f"{name} must not be negative")
        if self.look_back_period_s <= self.autoscaling_metrics_interval_s:
            raise FleetConfigError(
                "look_back_period_s must be longer than autoscaling_metrics_interval_s"
            )
        if self.affinity_min_tokens < 0 or self.affinity_max_imbalance < 0:
            raise FleetConfigError("affinity_min_tokens and affinity_max_imbalance: >= 0")
        if self.max_ongoing_requests < 1 or self.ingress_replicas < 1 or self.retries < 0:
            raise FleetConfigError("max_ongoing_requests, ingress_replicas >= 1; retries >= 0")
        self.replica_offer = {str(k): list(v) for k, v in (self.replica_offer or {}).items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def autoscaling(self) -> dict[str, Any] | None:
        if self.max_replicas is None:
            return None
        # Ray warns that this setting will move to environment variables; set only when asked.
        interval = (
            {"metrics_interval_s": self.autoscaling_metrics_interval_s}
            if self.autoscaling_metrics_interval_s != 10.0
            else {}
        )
        return {
            **interval,
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "initial_replicas": self.replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
        }


KNOWN = {f.name for f in fields(FleetConfig)}


def load_fleet_config(path: str | Path | None, **overrides: Any) -> FleetConfig:
    data: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise FleetConfigError(f"{path}: expected a mapping of fleet settings")
    data.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(data) - KNOWN
    if unknown:
        raise FleetConfigError(f"unknown fleet setting(s): {', '.join(sorted(unknown))}")
    try:
        return FleetConfig(**data)
    except TypeError as e:  # a wrongly typed value
        raise FleetConfigError(str(e)) from None
