"""The running service: the model, the engine, tenants, limits and metrics, and their lifecycle.

Owns what the routes share: loading the checkpoint in the background (the server answers /health
at once and /ready once the model is loaded), the async engine, the tenancy and the limiter, the
tokenizing pool, the metrics, resolving a request's `model` field to a subnet (and the tier's
right to pin it), giving a choice's limits back when its engine request finishes, and draining
(on SIGTERM: not ready, no new requests, in-flight ones may finish until `drain_timeout_s`; then
the rest are cut short, so the process exits on time).

Deliberately does not know: HTTP request or response shapes (openai_routes.py), or model math.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from policies.ordering import PriorityOrder
from policies.subnet_choice import make_policy
from server.api.errors import APIError
from server.api.limits import Limiter, Reservation
from server.api.prompts import PromptPool
from server.api.tool_calls import ToolTemplate
from server.config import ServerConfig
from server.engine.assembly import assemble_engine, calibrate
from server.engine.async_engine import AsyncEngine
from server.engine.elasticity import Elasticity, ElasticityConfig
from server.engine.engine import Engine
from server.engine.scheduler import SchedulerConfig
from server.runtime.device import allocator_bytes, device_uuid
from server.runtime.elastic import ElasticRuntime
from server.telemetry.headroom import ProbeSampler, make_probe
from server.telemetry.metrics import Metrics
from server.tenancy import Tenancy, Tenant, load_tenancy, open_tenancy
from server.vocabulary.sampling_defaults import SamplingDefaults
from server.vocabulary.subnets import Subnet

log = logging.getLogger("concentric")
DRAINING = "the server is shutting down; retry on another instance"
# How long a drain that ran out of time waits for the requests it cut short to answer (503 or an
# error event): an abort takes effect at the engine's next step boundary.
CUT_GRACE_S = 0.5


@dataclass(frozen=True)
class Choice:
    """The subnet a request named (pinned), or None: the subnet policy chooses at admission."""

    subnet: Subnet | None
    pinned: bool


class Service:
    metrics_class: type[Metrics] = Metrics  # a fleet's ingress renders its replicas' too

    def __init__(self, config: ServerConfig, checkpoint: Path):
        self.config = config
        self.checkpoint = checkpoint
        self.model_name = config.model_name or checkpoint.name
        self.metrics = self.metrics_class()
        self.limiter = Limiter()
        self.runtime: ElasticRuntime | None = None
        self.engine: AsyncEngine | None = None
        self.tenancy: Tenancy | None = None
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self._load_task: asyncio.Task | None = None
        self.sampler: ProbeSampler | None = None
        self.elasticity: Elasticity | None = None
        self.sampling_defaults = SamplingDefaults()
        self.prompts: PromptPool | None = None
        self.tool_template: ToolTemplate | None = None  # for requests with tools
        # Engine request id -> the reservation and choice it gives back when it finishes.
        self.reservations: dict[str, tuple[Reservation, int]] = {}
        self.live: set = set()  # submissions whose responses are not over (submission.py)
        self.closing: asyncio.Event | None = None  # set when a drain gives up waiting

    # ---- lifecycle --------------------------------------------------------------------------

    def check_config(self) -> None:
        """Fail fast on configuration errors (tenants, tiers, subnets) before loading weights."""
        from server.checkpoint.generation_config import sampling_defaults
        from server.checkpoint.store import CheckpointStore
        from server.vocabulary.subnets import load_subnet_table

        store = CheckpointStore.open(self.checkpoint)
        self.tool_template = ToolTemplate.load(self.config.tool_chat_template)
        self.sampling_defaults = sampling_defaults(self.checkpoint, self.config.sampling_defaults)
        table = load_subnet_table(store.text, self._table_csv(), self._custom())
        if self.config.subnet_policy == "fixed" and self.config.fixed_subnet not in table:
            raise ValueError(
                f"fixed_subnet {self.config.fixed_subnet!r} is not a subnet of this checkpoint"
            )
        if self.config.open:
            self.tenancy = open_tenancy()
        else:
            if not self.config.tenants_file or not self.config.tiers_file:
                raise ValueError("tenants_file and tiers_file are required unless --open")
            self.tenancy = load_tenancy(
                Path(self.config.tenants_file), Path(self.config.tiers_file), table.names()
            )
        self.metrics.prepare(list(self.tenancy.tiers))

    async def start(self) -> None:
        if self.tenancy is None:
            self.check_config()
        self.closing = asyncio.Event()
        self._load_task = asyncio.create_task(self._load())

    async def _load(self) -> None:
        try:
            self.runtime = await asyncio.to_thread(self._open_runtime)
            self.prompts = PromptPool(
                self.runtime.tokenizer, self.config.tokenizer_threads, self.config.max_prompt_chars
            )
            self.sampler = self._probe()
            c = self.config
            if c.device.startswith("cuda") or c.memory_budget_bytes:
                self.elasticity = Elasticity(
                    self.runtime.weights,
                    self.runtime.subnets,
                    self.sampler,
                    ElasticityConfig(
                        c.low_water_bytes,
                        c.high_water_bytes,
                        oom_cooldown_s=c.oom_cooldown_s,
                        grow_backoff_s=c.grow_backoff_s,
                    ),
                )
            policy = make_policy(
                self.config.subnet_policy,
                **(
                    {"subnet": self.config.fixed_subnet}
                    if self.config.subnet_policy == "fixed"
                    else {}
                ),
            )
            engine = assemble_engine(
                self.runtime,
                self.config.kv_cache_bytes,
                self._scheduler_config(),
                block_size=self.config.block_size,
                order=PriorityOrder(),
                ffn_mode=self.config.ffn_mode,
                subnet_policy=policy,
                elasticity=self.elasticity,
                compile_backend="inductor" if self.config.compile else None,
                batch_invariant=self.config.batch_invariant,
                paged_attention=self.config.paged_attention,
            )
            if self.config.calibrate:
                await asyncio.to_thread(calibrate, engine, self.runtime.tokenizer.bos_id)
            self.engine = AsyncEngine(engine)
            self.engine.on_step.append(self._observe_step)
            self.engine.on_finished.append(self._finished)
            await self.engine.start()
            if self.sampler is not None:
                self.sampler.start()
            self.metrics.up.set(1)
            self._observe_step(engine)
            self.ready = True
            log.info(
                "model %s loaded from %s; %d subnets; policy %s; ready",
                self.model_name,
                self.checkpoint,
                len(self.runtime.subnets),
                self.config.subnet_policy,
            )
        except Exception as e:  # /ready and /health say it failed; the log says why
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("loading the model failed: %s", self.load_error)

    def _probe(self) -> ProbeSampler | None:
        """The headroom readings `headroom_source` names (None: none); on CUDA, NVML finds the
        device by its UUID and counts this process by its allocator when PIDs do not match."""
        c = self.config
        budget = c.memory_budget_bytes or _host_memory_bytes()
        probe = make_probe(
            c.headroom_source,
            c.device,
            budget,
            device_uuid=lambda: device_uuid(c.device),
            allocator=lambda: allocator_bytes(c.device),
        )
        if probe is None:
            return None
        return ProbeSampler(probe, c.probe_interval_s, self.metrics.observe_memory)

    def _observe_step(self, engine: Engine) -> None:
        self.metrics.observe_step(engine.scheduler, engine.last_step)
        self.metrics.observe_out_of_memory(engine.out_of_memory)
        if engine.chooser is not None:
            self.metrics.observe_choices(engine.chooser)
            offered = sum(1 for s in engine.chooser.table if engine.chooser.offered(s))
            if self.elasticity is not None:
                self.metrics.observe_elasticity(self.elasticity, offered)
            else:
                self.metrics.observe_residency(self.runtime.weights.resident_widths, offered)

    def _finished(self, out) -> None:
        """Every finished request, aborted ones included: metrics, SLA misses, its limits
        released, and its latency for the subnet policy."""
        tier_name = out.tags.get("tier", "none")
        self.metrics.observe_finished(out, tier_name)
        tier = self.tenancy.tiers.get(tier_name) if self.tenancy else None
        lat = out.latency
        if tier is not None and lat is not None and out.finish_reason in ("stop", "length"):
            if tier.target_ttft_s is not None and (lat.ttft_s or 0.0) > tier.target_ttft_s:
                self.metrics.sla_miss(tier_name, "ttft")
            if tier.target_tpot_s is not None and (lat.tpot_s or 0.0) > tier.target_tpot_s:
                self.metrics.sla_miss(tier_name, "tpot")
        held = self.reservations.pop(out.request_id, None)
        if held is not None:
            reservation, choice = held
            reservation.release(choice, out.num_output_tokens)

    def _table_csv(self) -> Path | None:
        return Path(self.config.subnet_table) if self.config.subnet_table else None

    def _custom(self) -> Path | None:
        return Path(self.config.custom_subnets) if self.config.custom_subnets else None

    def _open_runtime(self) -> ElasticRuntime:
        rt = ElasticRuntime.open(
            self.checkpoint,
            self.config.dtype,
            self.config.device,
            self._custom(),
            table_csv=self._table_csv(),
            huge_pages=self.config.huge_pages,
        )
        rt.grammars.prepare()  # structured output's tokenizer description, before traffic
        return rt

    def _scheduler_config(self) -> SchedulerConfig:
        assert self.runtime is not None
        c = self.config
        max_len = c.max_model_len or self.runtime.store.text.max_position_embeddings
        return SchedulerConfig(
            max_num_seqs=c.max_num_seqs,
            max_num_batched_tokens=c.max_num_batched_tokens,
            max_prefill_chunk=c.max_prefill_chunk,
            max_model_len=max_len,
        )

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.sampler is not None:
            self.sampler.stop()
        if self.engine is not None:
            await self.engine.stop()
        if self.prompts is not None:
            self.prompts.close()
        self.metrics.up.set(0)

    async def drain(self, timeout_s: float) -> None:
        """Stop taking requests; let in-flight ones finish for up to timeout_s; then cut the
        rest short (a response not yet started gets 503 with Retry-After, a stream an error
        event and [DONE]) and stop reading request bodies, so the server can exit at once."""
        self.draining = True
        log.warning(
            "draining: /ready is 503, new requests get 503; waiting up to %.0f s for "
            "%d in-flight request(s)",
            timeout_s,
            len(self.live),
        )
        await self._until_idle(timeout_s)
        if self.closing is not None:
            self.closing.set()
        if self.live:
            log.warning("drain timeout: ending %d request(s) early", len(self.live))
            for sub in list(self.live):
                sub.cut()
            await self._until_idle(CUT_GRACE_S)

    async def _until_idle(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.live and loop.time() < deadline:
            await asyncio.sleep(0.02)

    @property
    def in_flight(self) -> int:
        return 0 if self.engine is None else self.engine.num_in_flight

    @property
    def alive(self) -> bool:
        return self.load_error is None and (self.engine is None or self.engine.dead is None)

    # ---- per request ------------------------------------------------------------------------

    def require_ready(self) -> AsyncEngine:
        """The engine, for a new request; else 503 (loading, draining, failed)."""
        if self.draining:
            raise APIError(503, DRAINING, code="draining", headers={"Retry-After": "1"})
        return self.require_engine()

    def require_engine(self) -> AsyncEngine:
        """The engine, for work of a request already admitted (even while draining)."""
        if self.load_error is not None:
            # The reason is in the log; tenants are not told the server's internals.
            raise APIError(503, "the model failed to load", code="unavailable")
        if not self.ready or self.engine is None:
            raise APIError(
                503,
                "the model is still loading; retry shortly",
                code="loading",
                headers={"Retry-After": "2"},
            )
        if self.engine.dead:
            raise APIError(503, "the engine has stopped", code="unavailable")
        return self.engine

    def resolve(self, model: str, tenant: Tenant) -> Choice:
        """The subnet for a request's `model` field: the base model (the server chooses) or one
        subnet (pinned, if the tenant's tier may)."""
        assert self.runtime is not None
        table = self.runtime.subnets
        if model == self.model_name:
            return Choice(None, pinned=False)  # the subnet policy chooses, at admission
        if model in table:
            if not tenant.tier.view().allows(model, table.scores[model]):
                raise APIError(
                    403,
                    f"tier {tenant.tier.name!r} may not use subnet {model!r}; "
                    f"allowed: {', '.join(tenant.tier.subnets)}",
                    param="model",
                    code="subnet_not_allowed",
                )
            return Choice(table[model], pinned=True)
        raise APIError(
            404,
            f"model {model!r} does not exist; use {self.model_name!r} or one of "
            f"its subnets (GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def warn_open(config: ServerConfig) -> None:
    if config.open:
        banner = "=" * 72
        print(
            f"{banner}\n  OPEN MODE: no API keys are checked; every request is served as the\n"
            f"  'default' tenant. For development only. Never expose this port.\n{banner}",
            file=sys.stderr,
            flush=True,
        )


def _host_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * 1024**3
