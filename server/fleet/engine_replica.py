"""One engine replica of the fleet: a whole Concentric engine on one device, as a Ray Serve
deployment class.

Owns, per replica: loading the model and running its `AsyncEngine` (through the same `Service`
one process uses, so residency, elasticity, the subnet policy, SLA accounting and metrics are the
same), serving `EngineCall`s as streams of `RequestOutput` (`generate`), and the report the
request router reads every few hundred milliseconds (`record_routing_stats`): the subnets it
offers now with their quality, memory headroom, queue depth, predicted step time, KV usage, and
the landmarks of its prefix cache with each subnet's KV class (prefix-cache affinity).

Per-replica settings (`FleetConfig.replica_offer`, by replica rank) let an operator run
heterogeneous replicas: a replica whose `offer` lists subnets runs only those (pinned requests
for others are not routed to it; its policy chooses among those). `headroom_script` (a JSON file
of rank -> bytes) overrides the measured headroom, for tests and benchmarks that script it.

A request is aborted (its KV freed) when the ingress cancels the call (the client left).

Deliberately does not know: HTTP, tenants' limits (the ingress charged them), or other replicas.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from policies.replica_routing import ReplicaReport
from server.api.service import Service
from server.config import ServerConfig
from server.engine.outputs import RequestOutput
from server.fleet.engine_call import HEARTBEAT, HEARTBEAT_S, EngineCall
from server.fleet.fleet_actor import fleet_actor
from server.fleet.fleet_board import FLEET_BOARD, FleetBoard

# The replica's metrics go to the board every this many reports (every second at the default
# 0.2 s period): Prometheus scrapes every few seconds, and the text is tens of KB.
METRICS_EVERY = 5
# Landmarks of the prefix cache a report carries at most, most recently used first (8 bytes
# each; a pool of tens of thousands of blocks holds a few thousand prompts' landmarks).
REPORTED_LANDMARKS = 4096

log = logging.getLogger("concentric.fleet")


def replica_rank() -> int:
    """This replica's rank in its deployment (0 outside Ray Serve)."""
    try:
        from ray import serve

        return int(serve.get_replica_context().rank.rank)
    except Exception:
        return 0


def replica_tag() -> str:
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_tag)
    except Exception:
        return f"local-{os.getpid()}"


class EngineReplica:
    async def __init__(self, config: dict[str, Any], checkpoint: str, fleet: dict[str, Any]):
        logging.basicConfig(level=config.get("log_level", "info").upper())
        self.config = ServerConfig(**config)
        self.tag = replica_tag()
        self.pid = os.getpid()
        self.replica_offer = {
            str(k): frozenset(v) for k, v in (fleet.get("replica_offer") or {}).items()
        }
        self._rank: tuple[float, int] = (0.0, 0)  # (read at, rank)
        self.headroom_script = fleet.get("headroom_script")
        self.served = 0  # calls that reached their final output here
        self._board_task: asyncio.Task | None = None
        self.service = Service(self.config, Path(checkpoint))
        self.service.check_config()
        await self.service.start()
        while not self.service.ready:
            if self.service.load_error:
                raise RuntimeError(f"engine replica failed to load: {self.service.load_error}")
            await asyncio.sleep(0.05)
        chooser = self.service.engine.engine.chooser  # type: ignore[union-attr]
        if self.replica_offer and chooser is not None:
            measured = chooser.offered

            def offered(s) -> bool:
                allowed = self.offer
                return (allowed is None or s.name in allowed) and measured(s)

            chooser.offered = offered
        period = float(fleet.get("routing_stats_period_s", 0.2))
        self._board_task = asyncio.get_running_loop().create_task(self._post_to_board(period))
        log.info("engine replica %s (pid %d) ready", self.tag, self.pid)

    async def generate(self, call: EngineCall):
        """The request's outputs, to its final one. Cancelling the call aborts the request."""
        svc = self.service
        try:
            engine = svc.require_ready()
            table = svc.runtime.subnets  # type: ignore[union-attr]
            subnet = table[call.subnet] if call.subnet is not None else None
            stream = engine.add_request(
                call.prompt_ids,
                subnet,
                call.params,
                request_id=call.request_id,
                priority=call.priority,
                tags=call.tags,
                tier=call.tier,
            )
        except Exception as e:  # refused here: the ingress sees it as the first output
            yield RequestOutput(
                request_id=call.request_id,
                subnet="",
                finished=True,
                finish_reason="error",
                error=str(getattr(e, "message", e)),
                # A request that can never run here (the KV pool, which the ingress cannot
                # see) is the client's 400; anything else (not loaded, draining) a failure.
                refused=isinstance(e, ValueError),
                tags=dict(call.tags),
            )
            return
        outputs = stream.__aiter__()
        pending: asyncio.Future | None = None
        try:
            yield HEARTBEAT  # taken: from now on the ingress expects word every HEARTBEAT_S
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(outputs.__anext__())
                done, _ = await asyncio.wait({pending}, timeout=HEARTBEAT_S)
                if not done:
                    # Still waiting (queued, or a long step): say this replica is alive, so
                    # the ingress can tell a quiet replica from a dead one.
                    yield HEARTBEAT
                    continue
                try:
                    out = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                if out.finished:
                    self.served += 1
                yield out
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
            stream.close()  # cancelled (the client left): abort, free the KV

    @property
    def rank(self) -> int:
        """This replica's rank: Serve assigns it after the constructor and may change it (a
        replacement takes a dead replica's rank), so it is read again every half second."""
        at, rank = self._rank
        now = time.monotonic()
        if now - at > 0.5:
            self._rank = (now, rank := replica_rank())
        return rank

    @property
    def offer(self) -> frozenset[str] | None:
        """The only subnets this replica offers (its rank's `replica_offer`), or None: all."""
        return self.replica_offer.get(str(self.rank))

    def record_routing_stats(self) -> dict[str, Any]:
        """What the router reads (plain data, no Ray calls: Serve runs this on the replica)."""
        return {**self.report().to_dict(), **self.identity(), **self.holdings()}

    async def _post_to_board(self, period_s: float) -> None:
        """The same report on the fleet board (for every ingress's /metrics), every period,
        from this task: looking the board up blocks, so it runs in a thread; posting is not
        waited for. The board is a view: routing does not depend on it."""
        import ray

        board = None
        posts = 0
        while True:
            try:
                if board is None:
                    board = await asyncio.to_thread(_fleet_board, ray)
                report = self.record_routing_stats()
                report.pop("cached", None)  # for routing only: the board shows the rest
                board.post.remote(report)
                if posts % METRICS_EVERY == 0:
                    board.post_metrics.remote(self.tag, self.rank, self.metrics_text())
                posts += 1
            except Exception as e:
                board = None
                log.debug("fleet board post failed: %s", e)
            await asyncio.sleep(period_s)

    def metrics_text(self) -> str:
        """This replica's own metrics (its engine's, as one process exports them)."""
        return self.service.metrics.render().decode()

    def identity(self) -> dict[str, Any]:
        return {"rank": self.rank, "replica": self.tag, "pid": self.pid}

    def report(self) -> ReplicaReport:
        svc = self.service
        core = svc.engine.engine  # type: ignore[union-attr]
        sched = core.scheduler
        chooser = core.chooser
        table = svc.runtime.subnets  # type: ignore[union-attr]
        offer = self.offer
        offered = {
            s.name: float(table.scores[s.name])
            for s in table
            if (chooser.offered(s) if chooser is not None else True)
            and (offer is None or s.name in offer)
        }
        step_s = None
        if chooser is not None and offered:
            cost = chooser.cost.snapshot()
            if cost.samples:
                widest = max(table[n].effective_params for n in offered)
                step_s = cost.predict(widest, max(1, len(sched.running))) * cost.p95_factor
        return ReplicaReport(
            at=time.time(),
            offered=offered,
            can_offer=offer,
            headroom_bytes=self._headroom(),
            running=len(sched.running),
            waiting=len(sched.waiting),
            max_num_seqs=sched.config.max_num_seqs,
            step_s=step_s,
            kv_usage=float(sched.blocks.usage),
            kv_classes={s.name: s.kv_key for s in table},
            block_size=sched.blocks.block_size,
            cached=frozenset(sched.blocks.cached_landmarks(REPORTED_LANDMARKS)),
        )

    def _headroom(self) -> int | None:
        if self.headroom_script:
            try:
                script = json.loads(Path(self.headroom_script).read_text())
                if str(self.rank) in script:
                    return int(script[str(self.rank)])
            except (OSError, ValueError):
                pass
        sampler = self.service.sampler
        latest = getattr(sampler, "latest", None) if sampler is not None else None
        return None if latest is None else int(latest.free_bytes)

    def holdings(self) -> dict[str, Any]:
        """What this replica holds now (leak checks: both go back to 0 when idle)."""
        core = self.service.engine.engine  # type: ignore[union-attr]
        blocks = core.scheduler.blocks
        return {
            "requests": self.service.engine.num_in_flight,  # type: ignore[union-attr]
            "kv_blocks_used": blocks.num_blocks - blocks.num_free_blocks,
            "served": self.served,
        }

    def check_health(self) -> None:
        if not self.service.alive:
            raise RuntimeError("the engine loop stopped")

    async def __del__(self) -> None:
        if self._board_task is not None:
            self._board_task.cancel()
        await self.service.stop()


def _fleet_board(ray):
    """The fleet board actor, created by whichever replica asks first (blocking: a GCS call)."""
    return fleet_actor(ray, FleetBoard, FLEET_BOARD)
