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

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        t: Mapping[str, float] = out.timings
        self.finished.labels(finish_reason=out.finish_reason or "unknown", **labels).inc()
        if out.finish_reason == "abort":
            self.aborted.inc()
        self.prompt_tokens.labels(**labels).inc(out.num_prompt_tokens)
        self.cached_tokens.labels(**labels).inc(out.num_cached_tokens)
        self.generation_tokens.labels(**labels).inc(out.num_output_tokens)
        if "arrived" in t and "finished" in t:
            self.e2e.labels(**labels).observe(t["finished"] - t["arrived"])
        if "first_scheduled" in t:
            self.queue.labels(**labels).observe(t["first_scheduled"] - t["arrived"])
        if "first_token" in t:
            self.ttft.labels(**labels).observe(t["first_token"] - t["arrived"])
            if out.num_output_tokens > 1:
                per_token = (t["finished"] - t["first_token"]) / (out.num_output_tokens - 1)
                self.tpot.labels(**labels).observe(per_token)

    def reject(self, tier: str, reason: str) -> None:
        self.rejections.labels(tier=tier, reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
