"""Every Prometheus metric Concentric exports, defined in one place.

Owns names, units, labels and buckets. One prefix (`concentric_`), base units in names
(`_seconds`, `_tokens`, `_bytes`, `_total`), low-cardinality labels only (subnet, tier,
finish_reason, reason, limit): never a request or tenant id. Latency histograms use vLLM's bucket
lists, so dashboards built for it read ours alike.

The engine and API never touch prometheus_client: they call `observe_step` (gauges, after each
engine step) and `observe_finished` (histograms and counters, once per finished request) with
their own plain objects. Deliberately does not know: how those numbers are produced.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.vocabulary.step import ALLOCATION_FAILURE_KINDS

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
TPOT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
REQUEST_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
STEP_TOKEN_BUCKETS = tuple(2**i for i in range(15))

PREFIX = "concentric_"


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        lat = ("subnet", "tier")
        p = PREFIX
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Time to first token",
            lat,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            p + "time_per_output_token_seconds",
            "Mean time per output token after the first, per request",
            lat,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            p + "e2e_request_latency_seconds",
            "Arrival to finish",
            lat,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            p + "request_queue_time_seconds",
            "Arrival to first scheduled",
            lat,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            p + "prompt_tokens_total", "Prompt tokens processed", lat, registry=r
        )
        self.cached_tokens = Counter(
            p + "prompt_cached_tokens_total",
            "Prompt tokens served from the prefix cache",
            lat,
            registry=r,
        )
        self.generation_tokens = Counter(
            p + "generation_tokens_total", "Tokens generated", lat, registry=r
        )
        self.finished = Counter(
            p + "requests_finished_total",
            "Finished requests",
            ("subnet", "tier", "finish_reason"),
            registry=r,
        )
        self.rejections = Counter(
            p + "requests_rejected_total",
            "Requests refused before they started",
            ("tier", "reason"),
            registry=r,
        )
        self.aborted = Counter(
            p + "requests_aborted_total", "Requests aborted (client went away or asked)", registry=r
        )
        self.running = Gauge(p + "requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge(p + "requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_blocks_used = Gauge(p + "kv_cache_blocks_used", "KV blocks held", registry=r)
        self.kv_blocks_total = Gauge(
            p + "kv_cache_blocks_total", "KV blocks in the pool", registry=r
        )
        self.kv_usage = Gauge(p + "kv_cache_usage_ratio", "Fraction of KV blocks held", registry=r)
        self.prefix_queries = Counter(
            p + "prefix_cache_queried_tokens",
            "Prompt tokens looked up in the prefix cache",
            registry=r,
        )
        self.prefix_hits = Counter(
            p + "prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache", registry=r
        )
        self.preemptions = Counter(
            p + "preemptions", "Requests preempted (KV dropped, to be recomputed)", registry=r
        )
        self._seen = {"queries": 0, "hits": 0, "preemptions": 0}  # cumulative values read so far
        self.step_tokens = Histogram(
            p + "step_tokens",
            "Tokens computed per engine step",
            buckets=STEP_TOKEN_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            p + "step_duration_seconds",
            "Engine step duration",
            ("ffn_mode",),
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.up = Gauge(p + "engine_up", "1 while the engine loop runs", registry=r)
        # elasticity
        self.device_memory = Gauge(
            p + "device_memory_bytes",
            "Accelerator memory (NVML; on a CPU the configured budget)",
            ("kind", "source"),
            registry=r,
        )
        self.device_utilization = Gauge(
            p + "device_utilization_ratio", "Accelerator busy fraction (NVML)", registry=r
        )
        self.resident_width = Gauge(
            p + "resident_ffn_width",
            "Mean resident FFN width of a group of layers",
            ("layers",),
            registry=r,
        )
        self.resident_bytes = Gauge(
            p + "resident_ffn_bytes", "Accelerator bytes held by resident FFN rows", registry=r
        )
        self.residency_level = Gauge(
            p + "residency_level", "Resident-width level (0 = smallest)", registry=r
        )
        self.residency_changes = Counter(
            p + "residency_changes", "Resident-width resizes", ("direction",), registry=r
        )
        self.grow_failures = Counter(
            p + "residency_grow_failures",
            "Background grows abandoned because building them failed (backed off; no request "
            "saw them)",
            registry=r,
        )
        self.out_of_memory = Counter(
            p + "out_of_memory_steps",
            "Steps that ran out of memory (shrunk and retried), by the allocator that failed",
            ("kind",),
            registry=r,
        )
        self.subnet_offered = Gauge(
            p + "subnets_offered", "Subnets new requests may get", registry=r
        )
        self.choices = Counter(
            p + "subnet_choices",
            "Subnets requests were admitted with",
            ("subnet", "tier", "pinned"),
            registry=r,
        )
        self.downgrades = Counter(
            p + "subnet_downgrades",
            "Requests given less than their tier's best at no load",
            ("tier",),
            registry=r,
        )
        self.moves = Counter(
            p + "subnet_moves",
            "Running requests moved to a smaller subnet of the same KV layout",
            registry=r,
        )
        self.sla_misses = Counter(
            p + "sla_misses",
            "Finished requests over their tier's target (ttft or tpot)",
            ("tier", "target"),
            registry=r,
        )
        self._counted: dict[str, dict] = {
            "choices": {},
            "downgrades": {},
            "elastic": {},
            "oom": {},
        }

    def observe_step(self, scheduler, last_step) -> None:
        """Gauges from the scheduler and block manager; called after each engine step."""
        blocks = scheduler.blocks
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        self.kv_blocks_total.set(blocks.num_blocks)
        self.kv_blocks_used.set(blocks.num_blocks - blocks.num_free_blocks)
        self.kv_usage.set(blocks.usage)
        for key, counter, value in (
            ("queries", self.prefix_queries, blocks.prefix_queries),
            ("hits", self.prefix_hits, blocks.prefix_hits),
            ("preemptions", self.preemptions, scheduler.num_preemptions),
        ):
            if value > self._seen[key]:
                counter.inc(value - self._seen[key])
                self._seen[key] = value
        if last_step.num_tokens:
            self.step_tokens.observe(last_step.num_tokens)
            self.step_seconds.labels(last_step.ffn_mode or "single").observe(last_step.seconds)

    def observe_finished(self, out, tier: str) -> None:
        """Per-request histograms and counters, from a finished `RequestOutput`."""
        labels = {"subnet": out.subnet or "none", "tier": tier}
        self.finished.labels(finish_reason=out.finish_reason or "unknown", **labels).inc()
        if out.finish_reason == "abort":
            self.aborted.inc()
        self.prompt_tokens.labels(**labels).inc(out.num_prompt_tokens)
        self.cached_tokens.labels(**labels).inc(out.num_cached_tokens)
        self.generation_tokens.labels(**labels).inc(out.num_output_tokens)
        lat = out.latency
        if lat is None:
            return
        self.e2e.labels(**labels).observe(lat.e2e_s)
        if lat.queue_s is not None:
            self.queue.labels(**labels).observe(lat.queue_s)
        if lat.ttft_s is not None:
            self.ttft.labels(**labels).observe(lat.ttft_s)
        if lat.tpot_s is not None:
            self.tpot.labels(**labels).observe(lat.tpot_s)

    def observe_memory(self, snap) -> None:
        """A headroom probe reading (telemetry/headroom.py's MemorySnapshot): the device's
        total/used/free, this process's share, and its allocator's reserved and allocated."""
        for kind in ("total", "used", "free", "process", "reserved", "allocated"):
            self.device_memory.labels(kind=kind, source=snap.source).set(
                getattr(snap, f"{kind}_bytes")
            )
        if snap.utilization is not None:
            self.device_utilization.set(snap.utilization)

    def observe_choices(self, chooser) -> None:
        """Cumulative choice and downgrade counts of the engine's subnet chooser."""
        self._inc_from(
            self._counted["choices"],
            chooser.choices,
            lambda k: self.choices.labels(subnet=k[0], tier=k[1], pinned=str(k[2]).lower()),
        )
        self._inc_from(
            self._counted["downgrades"],
            chooser.downgrades,
            lambda k: self.downgrades.labels(tier=k),
        )

    def observe_residency(
        self,
        widths: tuple[int, ...],
        offered: int,
        resident_bytes: int = 0,
        level: int | None = None,
    ) -> None:
        for start in range(0, len(widths), 5):  # Gemma 3n's blocks of 4 sliding + 1 full layer
            group = widths[start : start + 5]
            self.resident_width.labels(layers=f"{start}-{start + len(group) - 1}").set(
                sum(group) / len(group)
            )
        self.resident_bytes.set(resident_bytes)
        if level is not None:
            self.residency_level.set(level)
        self.subnet_offered.set(offered)

    def observe_elasticity(self, el, offered: int) -> None:
        widths = el.resident_widths
        for start in range(0, len(widths), 5):  # Gemma 3n's blocks of 4 sliding + 1 full layer
            group = widths[start : start + 5]
            self.resident_width.labels(layers=f"{start}-{start + len(group) - 1}").set(
                sum(group) / len(group)
            )
        self.resident_bytes.set(el.weights.resident_bytes)
        self.residency_level.set(el.current)
        self.subnet_offered.set(offered)
        c = el.counters
        self._inc_from(
            self._counted["elastic"],
            {
                "grow": c.grows,
                "shrink": c.shrinks + c.oom_shrinks,
                "moves": c.moves,
                "grow_failures": c.grow_failures,
            },
            lambda k: (
                {"moves": self.moves, "grow_failures": self.grow_failures}.get(k)
                or self.residency_changes.labels(direction=k)
            ),
        )

    def observe_out_of_memory(self, counts: dict[str, int]) -> None:
        """The engine's cumulative out-of-memory steps by allocator kind."""
        self._inc_from(self._counted["oom"], counts, lambda k: self.out_of_memory.labels(kind=k))

    @staticmethod
    def _inc_from(seen: dict, current, metric_of) -> None:
        for key, value in current.items():
            delta = value - seen.get(key, 0)
            if delta > 0:
                metric_of(key).inc(delta)
                seen[key] = value

    def sla_miss(self, tier: str, target: str) -> None:
        self.sla_misses.labels(tier=tier, target=target).inc()

    def prepare(self, tiers: list[str]) -> None:
        """Create the bounded label sets at zero, so rates read 0 (not "no data") before the
        first event: every tier's misses, downgrades and refusals, both resize directions, every
        allocator that can run out of memory."""
        for tier in tiers:
            self.downgrades.labels(tier=tier)
            for target in ("ttft", "tpot"):
                self.sla_misses.labels(tier=tier, target=target)
            for reason in ("concurrency", "requests_per_minute", "tokens_per_minute"):
                self.rejections.labels(tier=tier, reason=reason)
        for direction in ("grow", "shrink"):
            self.residency_changes.labels(direction=direction)
        for kind in ALLOCATION_FAILURE_KINDS:
            self.out_of_memory.labels(kind=kind)

    def reject(self, tier: str, reason: str) -> None:
        self.rejections.labels(tier=tier, reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
