"""The engine core: requests in, one step at a time, token and text deltas out.

    step():  plan = scheduler.schedule()  ->  result = runner.execute(plan)  ->  scheduler.update()

Owns the glue between the pure scheduler and the torch runner: turning a step plan into the
runner's sequences, detokenizing each new token (stop strings are found here, on text), finishing
requests that stop or fail, releasing the runner's per-request state, and producing
`RequestOutput` deltas. Synchronous and single-threaded; `async_engine.py` runs it in the
background for asyncio callers.

Deliberately does not know: HTTP, tenants, or the model's math.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from policies.ordering import FirstComeFirstServed, OrderPolicy
from policies.snapshots import TierView
from policies.subnet_choice import SubnetPolicy
from server.engine.chooser import SubnetChooser
from server.engine.detokenizer import IncrementalDetokenizer, TokenDecoder
from server.engine.elasticity import Elasticity
from server.engine.kv_blocks import BlockManager, KVLayout
from server.engine.outputs import RequestOutput, TokenLogprob
from server.engine.request import Request, RequestStatus
from server.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from server.runtime.elastic import ElasticRuntime
from server.runtime.kv_cache import KVCache
from server.runtime.runner import DeviceOutOfMemory, ModelRunner, StepSequence
from server.vocabulary.sampling_params import SamplingParams
from server.vocabulary.subnets import Subnet


@dataclass
class StepStats:
    """What one step did, for metrics and benchmarks."""

    num_seqs: int = 0
    num_tokens: int = 0
    num_decodes: int = 0
    num_preempted: int = 0
    seconds: float = 0.0
    ffn_mode: str | None = None
    subnets: dict[str, int] = field(default_factory=dict)  # subnet -> sequences in the step


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        decoder: TokenDecoder,
        vocab_size: int,
        chooser: SubnetChooser | None = None,
    ):
        self.runner = runner
        self.scheduler = scheduler
        self.decoder = decoder
        self.vocab_size = vocab_size
        self.chooser = chooser  # subnet choice at admission; None: every request names one
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self.last_step = StepStats()
        self.num_steps = 0

    @classmethod
    def from_runtime(
        cls,
        rt: ElasticRuntime,
        kv_budget_bytes: int,
        config: SchedulerConfig | None = None,
        block_size: int = 16,
        policy: OrderPolicy | None = None,
        ffn_mode: str = "auto",
        enable_prefix_cache: bool = True,
        subnet_policy: SubnetPolicy | None = None,
        elasticity: Elasticity | None = None,
    ) -> Engine:
        """An engine over a loaded runtime, with as many KV blocks as the byte budget holds."""
        text = rt.store.text
        config = config or SchedulerConfig(max_model_len=text.max_position_embeddings)
        num_blocks = kv_budget_bytes // KVCache.block_bytes(text, block_size, rt.weights.dtype)
        if num_blocks < 1:
            raise ValueError(f"a KV budget of {kv_budget_bytes} bytes holds no block")
        n_kv = text.first_kv_shared_layer
        layout = KVLayout(
            n_kv, frozenset(i for i in range(n_kv) if text.is_sliding(i)), text.sliding_window
        )
        blocks = BlockManager(num_blocks, block_size, layout, enable_prefix_cache)
        eos = rt.tokenizer.stop_ids
        scheduler = Scheduler(config, blocks, policy or FirstComeFirstServed(), eos)
        runner = ModelRunner(rt.model, num_blocks, block_size, eos, ffn_mode)
        chooser = SubnetChooser(rt.subnets, scheduler, subnet_policy, elasticity)
        return cls(runner, scheduler, rt.tokenizer, text.vocab_size_per_layer_input, chooser)

    def calibrate(self, prompt_tokens: int = 32, max_tokens: int = 4) -> None:
        """Seed the step-cost model before real traffic: a few steps on the smallest and the
        largest subnet, alone and batched. Call only while the engine is idle."""
        if self.chooser is None or self.has_work:
            return
        table = self.chooser.table
        ends = sorted(table, key=lambda s: s.effective_params)
        prompt = [self.decoder_bos()] + [(7 * i) % 97 + 200 for i in range(prompt_tokens - 1)]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        for batch in (1, 4):
            for subnet in (ends[0], ends[-1]):
                for i in range(batch):
                    self.add_request(f"calibrate-{subnet.name}-{batch}-{i}", prompt, subnet, params)
                while self.has_work:
                    self.step()
        self.chooser.choices.clear()
        self.chooser.latency = type(self.chooser.latency)()

    def decoder_bos(self) -> int:
        bos = getattr(getattr(self.decoder, "hf", None), "bos_token_id", None)
        return 2 if bos is None else int(bos)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def make_request(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        subnet: Subnet | None,
        params: SamplingParams,
        priority: int = 0,
        tags: dict[str, str] | None = None,
        tier: TierView | None = None,
    ) -> Request:
        """Build and check a request without queueing it (safe from any thread: reads only
        configuration). `subnet` None: the subnet policy chooses at admission; a subnet: pinned.
        Raises ValueError, with the reason, if it could never run."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if subnet is None and self.chooser is None:
            raise ValueError("this engine has no subnet policy: name a subnet")
        params.validate(self.vocab_size, self.scheduler.config.max_model_len)
        req = Request(
            request_id,
            list(prompt_ids),
            subnet,
            params,
            priority,
            tier=tier,
            pinned=subnet is not None,
            tags=dict(tags or {}),
        )
        self.scheduler.check(req)
        return req

    def add(self, req: Request) -> None:
        self.scheduler.add(req)
        self.runner.add_request(req.request_id, req.params, req.prompt_token_ids)
        self._detok[req.request_id] = IncrementalDetokenizer(
            self.decoder, req.params.stop, req.params.include_stop_str_in_output
        )

    def add_request(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        subnet: Subnet | None,
        params: SamplingParams,
        priority: int = 0,
        tags: dict[str, str] | None = None,
        tier: TierView | None = None,
    ) -> Request:
        """Queue a request; raises ValueError (with the reason) if it can never run."""
        req = self.make_request(request_id, prompt_ids, subnet, params, priority, tags, tier)
        self.add(req)
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its KV blocks now; returns its final output."""
        req = self.scheduler.abort(request_id)
        if req is None:
            return None
        return self._final(req, "")

    def step(self) -> list[RequestOutput]:
        elasticity = self.chooser.elasticity if self.chooser else None
        if elasticity is not None:
            elasticity.tick(self.scheduler)
        plan = self.scheduler.schedule()
        stats = StepStats(num_preempted=len(plan.preempted))
        if not plan.chunks:
            self.last_step = stats
            return []
        seqs = [self._sequence(c) for c in plan.chunks]
        try:
            result = self.runner.execute(seqs)
        except DeviceOutOfMemory:
            # Not the requests' fault: shrink the resident widths (moving or preempting what no
            # longer fits) and run the step again, once.
            # Nothing was computed, so nothing moves back: the next schedule() finds the same
            # requests with their blocks already booked (allocation is idempotent).
            if elasticity is None or not elasticity.on_out_of_memory(self.scheduler):
                raise
            return self.step()
        self.num_steps += 1
        stats.num_seqs, stats.num_tokens = len(seqs), plan.num_tokens
        stats.num_decodes, stats.seconds = plan.num_decodes, result.seconds
        stats.ffn_mode = result.ffn_mode
        for s in seqs:
            stats.subnets[s.subnet.name] = stats.subnets.get(s.subnet.name, 0) + 1
        self.last_step = stats
        if self.chooser is not None:
            self.chooser.record_step(result.seconds, [s.subnet for s in seqs], plan.num_tokens)
            self.chooser.admitted(
                [self.scheduler.requests[r] for r in plan.admitted if r in self.scheduler.requests]
            )

        outputs: list[RequestOutput] = []
        for request_id, message in result.errors.items():
            req = self.scheduler.requests.get(request_id)
            if req is not None:
                req.error = message
                self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
                outputs.append(self._final(req, ""))
        sampled = {rid: s.token_id for rid, s in result.samples.items()}
        for req in self.scheduler.update(self._without(plan, result.errors), sampled):
            outputs.append(self._delta(req, result.samples[req.request_id]))
        return outputs

    # ---- internals --------------------------------------------------------------------------

    def _sequence(self, chunk) -> StepSequence:
        req = self.scheduler.requests[chunk.request_id]
        tokens = req.all_token_ids[chunk.start : chunk.start + chunk.num_tokens]
        return StepSequence(
            request_id=req.request_id,
            subnet=req.subnet,
            token_ids=tokens,
            start=chunk.start,
            block_table=self.scheduler.blocks.block_table(req.request_id),
            sample=chunk.sample,
        )

    @staticmethod
    def _without(plan: StepPlan, failed: dict[str, str]) -> StepPlan:
        if not failed:
            return plan
        return StepPlan([c for c in plan.chunks if c.request_id not in failed], plan.preempted)

    def _delta(self, req: Request, sample) -> RequestOutput:
        detok = self._detok[req.request_id]
        delta = detok.push(sample.token_id)
        text = delta.text
        if delta.stopped and not req.is_finished:
            req.stop_reason = delta.stop_reason
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
        logprobs = None
        if req.params.logprobs is not None:
            logprobs = (TokenLogprob(sample.token_id, sample.logprob, sample.top_logprobs),)
        if req.is_finished:
            return self._final(req, text, (sample.token_id,), logprobs)
        return RequestOutput(
            request_id=req.request_id,
            subnet=req.subnet.name if req.subnet else "",
            token_ids=(sample.token_id,),
            text=text,
            logprobs=logprobs,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(req.output_token_ids),
            num_cached_tokens=req.num_cached_tokens,
        )

    def _final(
        self,
        req: Request,
        text: str,
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[TokenLogprob, ...] | None = None,
    ) -> RequestOutput:
        detok = self._detok.pop(req.request_id, None)
        if detok is not None and not detok.stopped:
            # Held-back text (an unfinished character, a possible stop-string start) is final
            # now; completing those held bytes can still reveal a stop string.
            text += detok.finish()
            if detok.stopped and req.status != RequestStatus.FINISHED_ABORTED:
                req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, detok.stop_reason
        self.runner.release(req.request_id)
        ev = req.events
        timings = {"arrived": ev.arrived, "finished": ev.finished or time.monotonic()}
        if ev.first_scheduled is not None:
            timings["first_scheduled"] = ev.first_scheduled
        if ev.first_token is not None:
            timings["first_token"] = ev.first_token
        return RequestOutput(
            request_id=req.request_id,
            subnet=req.subnet.name if req.subnet else "",
            token_ids=token_ids,
            text=text,
            logprobs=logprobs,
            finished=True,
            finish_reason=req.status.finish_reason,
            stop_reason=req.stop_reason,
            error=req.error,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(req.output_token_ids),
            num_cached_tokens=req.num_cached_tokens,
            timings=timings,
            tags=dict(req.tags),
        )
