"""One engine request as it travels from the ingress to an engine replica.

Owns the typed payload of `EngineReplica.generate`: what `AsyncEngine.add_request` takes, with the
subnet by name (each replica resolves it in its own table), and what the request router reads to
place it (`route_ask`). Plain, picklable data. Also the heartbeat a replica sends on a quiet
call, so the ingress can tell a replica that is slow from one that is gone (a call to a replica
killed outright does not always end with an error).

Deliberately does not know: Ray, HTTP, or how a replica runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from policies.replica_routing import RouteAsk
from policies.snapshots import TierView
from server.vocabulary.sampling_params import SamplingParams

# What a replica sends while a call has no output to send, every HEARTBEAT_S: it is alive.
HEARTBEAT = None
HEARTBEAT_S = 1.0


@dataclass(frozen=True)
class EngineCall:
    request_id: str
    prompt_ids: tuple[int, ...]
    subnet: str | None  # pinned subnet, or None: the replica's subnet policy chooses
    params: SamplingParams
    priority: int = 0
    tags: dict[str, str] = field(default_factory=dict)
    tier: TierView | None = None

    def route_ask(self) -> RouteAsk:
        tier = self.tier
        return RouteAsk(
            priority=self.priority,
            pinned=self.subnet,
            allowed=tier.subnets if tier is not None else ("*",),
            target_ttft_s=tier.target_ttft_s if tier is not None else None,
        )
