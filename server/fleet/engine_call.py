"""One engine request as it travels from the ingress to an engine replica.

Owns the typed payload of `EngineReplica.generate`: what `AsyncEngine.add_request` takes, with the
subnet by name (each replica resolves it in its own table), and what the request router reads to
place it (`route_ask`, and `landmarks`: the prompt's prefixes for prefix-cache affinity,
hashed once per call however often the router weighs it). Plain, picklable data. Also the
heartbeat a replica sends on a quiet call, so the ingress can tell a replica that is slow from
one that is gone (a call to a replica killed outright does not always end with an error).

Deliberately does not know: Ray, HTTP, or how a replica runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from policies.replica_routing import RouteAsk
from policies.snapshots import TierView
from server.vocabulary.prefix_chain import (
    cache_key,
    landmark_depths,
    landmark_id,
    token_chain,
    usable_blocks,
)
from server.vocabulary.sampling_params import SamplingParams

# What a replica sends while a call has no output to send, every HEARTBEAT_S: it is alive.
HEARTBEAT = None
HEARTBEAT_S = 1.0
# The router hashes at most this many blocks of a prompt (landmarks up to 2,048 blocks: 32k
# tokens at 16 per block; a deeper shared prefix still counts as this deep).
MAX_HASHED_BLOCKS = 2048


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

    def landmarks(self, kv_class: str, block_size: int) -> list[int]:
        """The ids of the prompt's prefixes of 1, 2, 4, ... full blocks in `kv_class` (what
        replicas report of their prefix caches). The token chain is hashed once per block size,
        the landmarks once per class, and both kept on the call (routing weighs a call for every
        replica, and again each time it retries)."""
        memo = self.__dict__.setdefault("_chains", {})
        marks = memo.get((kv_class, block_size))
        if marks is None:
            chain = memo.get(block_size)
            if chain is None:
                blocks = min(usable_blocks(len(self.prompt_ids), block_size), MAX_HASHED_BLOCKS)
                chain = memo[block_size] = token_chain(self.prompt_ids, block_size, blocks)
            depths = landmark_depths(len(chain))
            marks = memo[kv_class, block_size] = [
                landmark_id(cache_key(kv_class, chain[d - 1])) for d in depths
            ]
        return marks

    def __getstate__(self) -> dict:
        """Sent to a replica without the router's memo."""
        return {k: v for k, v in self.__dict__.items() if k != "_chains"}
