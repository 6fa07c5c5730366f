"""The fleet's ingress: Concentric's own API (the same FastAPI app, routes, auth, errors, validation
and tokenization) as a Ray Serve deployment whose engine is the engine deployment.

Owns `FleetService`, the `Service` of an ingress replica: it reads the checkpoint's tokenizer,
configuration and subnet table but no weights (`CheckpointView`), its engine is a `RemoteEngine`
over the engine deployment's handle, its limiter a `GlobalLimiter` over the one named limits actor,
and its /metrics add the fleet view (per-replica reports, routing decisions, the limits store's
state) and every engine replica's own metric families, labelled by replica
(telemetry/replica_families.py). It does not observe the engine's per-request metrics itself: the
replicas do, from the same outputs (counting them here too would count every request twice).
`IngressReplica` is the deployment class that builds the app at replica start.

What a request cannot be checked for here (the engine replica's KV pool size) is checked by the
replica; a refusal there comes back as an error before any response byte.

Deliberately does not know: how replicas are chosen (replica_router.py) or run (engine_replica.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.api.app import create_app
from server.api.prompts import PromptPool
from server.api.service import Service
from server.checkpoint.store import CheckpointStore
from server.checkpoint.tokenizer import TextTokenizer
from server.config import ServerConfig
from server.fleet.fleet_actor import NAMESPACE, fleet_actor
from server.fleet.fleet_board import FLEET_BOARD
from server.fleet.fleet_config import FleetConfig
from server.fleet.fleet_view import FLEET
from server.fleet.remote_engine import RemoteEngine
from server.fleet.tenant_limits import LIMITS_ACTOR, GlobalLimiter, LimitsStore
from server.telemetry.fleet_metrics import FleetCollector, FleetSnapshot, IngressCounters
from server.telemetry.replica_families import FleetMetrics
from server.vocabulary.measured_quality import read_measured_quality
from server.vocabulary.sampling_params import SamplingParams
from server.vocabulary.subnets import Subnet, SubnetTable, load_subnet_table

log = logging.getLogger("concentric.fleet")


@dataclass
class CheckpointView:
    """What the API needs of a checkpoint, without its weights."""

    store: CheckpointStore
    subnets: SubnetTable
    tokenizer: TextTokenizer
    weights: None = None

    @classmethod
    def open(cls, checkpoint: Path, custom: Path | None, table_csv: Path | None) -> CheckpointView:
        store = CheckpointStore.open(checkpoint)
        measured = read_measured_quality(store.folder)
        subnets = load_subnet_table(store.text, table_csv, custom, measured)
        return cls(store, subnets, TextTokenizer(store.folder))


class FleetService(Service):
    metrics_class = FleetMetrics

    def __init__(self, config: ServerConfig, checkpoint: Path, fleet: FleetConfig, engines):
        super().__init__(config, checkpoint)
        self.fleet = fleet
        self.engines = engines  # the engine deployment's handle
        self.limiter = _global_limiter(fleet)  # type: ignore[assignment]
        self.metrics.registry.register(FleetCollector(self.fleet_snapshot))
        self.board_reports: dict[str, dict[str, Any]] = {}
        self.board_metrics: dict[str, tuple[str, str]] = {}  # replica -> (rank, its metrics)
        self.board_ingresses: dict[str, dict[str, Any]] = {}  # ingress -> its counters
        self.ingress_id = _ingress_id()
        self.metrics.replica_texts = lambda: self.board_metrics  # type: ignore[attr-defined]
        self._board_task: asyncio.Task | None = None

    async def _load(self) -> None:
        try:
            view = await asyncio.to_thread(
                CheckpointView.open, self.checkpoint, self._custom(), self._table_csv()
            )
            self.runtime = view  # type: ignore[assignment]
            self.prompts = PromptPool(
                view.tokenizer, self.config.tokenizer_threads, self.config.max_prompt_chars
            )
            # The limits actor may still be starting (the first ingress creates it).
            if not await asyncio.to_thread(self.limiter.wait_connected, 30.0):
                log.warning("the tenant limits store does not answer yet")
            engine = RemoteEngine(
                self.engines,
                self._check,
                retries=self.fleet.retries,
                retry_pause_s=self.fleet.retry_pause_s,
                silence_s=self.fleet.silence_s,
            )
            engine.on_finished.append(self._finished)
            self.engine = engine  # type: ignore[assignment]
            self._board_task = asyncio.create_task(self._read_board())
            self.metrics.up.set(1)
            self.ready = True
            log.info("ingress for %s ready (%s)", self.model_name, self.checkpoint)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("the ingress failed to start: %s", self.load_error)

    async def _read_board(self) -> None:
        """Every replica's latest report from the fleet board, twice a second (for /metrics);
        this ingress's own counters onto it, and every ingress's off it, as often."""
        import ray

        board = None
        reads = 0
        while True:
            try:
                if board is None:
                    board = ray.get_actor(FLEET_BOARD, namespace=NAMESPACE)
                board.post_ingress.remote(self.ingress_id, vars(self.own_counters()))
                self.board_reports = await board.reports.remote()
                self.board_ingresses = await board.ingresses.remote()
                if reads % 2 == 0:  # replicas post their metrics once a second
                    self.board_metrics = await board.metrics.remote()
                reads += 1
            except Exception:  # not created yet (no replica has reported), or restarting
                board = None
            await asyncio.sleep(0.5)

    def _finished(self, out) -> None:
        """Only give the request's limits back: its metrics are the replica's (see above)."""
        held = self.reservations.pop(out.request_id, None)
        if held is not None:
            reservation, choice = held
            reservation.release(choice, out.num_output_tokens)

    async def stop(self) -> None:
        if self._board_task is not None:
            self._board_task.cancel()
        await super().stop()

    def _check(self, prompt_ids: Sequence[int], subnet: Subnet | None, params: SamplingParams):
        """The engine's checks that need no engine: parameters and the context length."""
        text = self.runtime.store.text  # type: ignore[union-attr]
        max_len = self.config.max_model_len or text.max_position_embeddings
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        params.validate(text.vocab_size_per_layer_input, max_len)
        if len(prompt_ids) + params.max_tokens > max_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                f"exceeds the context length {max_len}"
            )

    def own_counters(self) -> IngressCounters:
        with FLEET.lock:
            decisions = dict(FLEET.decisions)
        lim = self.limiter
        engine = self.engine
        return IngressCounters(
            decisions,
            limits_connected=getattr(lim, "connected", True),
            limits_on_loss=getattr(lim, "on_loss", "closed"),
            limits_loss_decisions=getattr(lim, "loss_decisions", 0),
            retried=getattr(engine, "retried", 0),
            failed=getattr(engine, "failed", 0),
        )

    def fleet_snapshot(self) -> FleetSnapshot:
        """The board's view, with this ingress's own counters as they are now."""
        ingresses = {tag: IngressCounters(**c) for tag, c in self.board_ingresses.items()}
        ingresses[self.ingress_id] = self.own_counters()
        return FleetSnapshot(dict(self.board_reports), ingresses)


def _ingress_id() -> str:
    """This ingress's Serve replica id (a process's own id outside Serve)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not inside a Serve replica (tests of the service alone)
        return f"pid-{os.getpid()}"


def _global_limiter(fleet: FleetConfig) -> GlobalLimiter:
    """A GlobalLimiter over the named limits actor (created by whichever ingress asks first)."""
    import ray

    state: dict[str, Any] = {}

    def actor():
        if "actor" not in state:
            state["actor"] = fleet_actor(ray, LimitsStore, LIMITS_ACTOR)
        return state["actor"]

    def call(method: str, *args):
        try:
            return ray.get(getattr(actor(), method).remote(*args), timeout=fleet.limits_timeout_s)
        except Exception:
            state.pop("actor", None)  # look it up again next time (it may have been replaced)
            raise

    def send(method: str, *args) -> None:
        getattr(actor(), method).remote(*args)

    return GlobalLimiter(call, send, fleet.limits_on_loss)


class IngressReplica:
    """The ingress deployment's class (wrapped by `serve.ingress()` when deployed)."""

    def __init__(self, engines, config: dict[str, Any], checkpoint: str, fleet: dict[str, Any]):
        logging.basicConfig(level=config.get("log_level", "info").upper())
        self.service = FleetService(
            ServerConfig(**config), Path(checkpoint), FleetConfig(**fleet), engines
        )
        self.service.check_config()

    def __serve_build_asgi_app__(self):
        return create_app(self.service)
