"""The engine core: requests in, one step at a time, token and text deltas out.

    step():  plan = scheduler.schedule() -> result = runner.execute(plan) -> update(plan, result)

Owns the glue between the pure scheduler and the runner: registering a request with the runner
once, detokenizing each new token (stop strings are found here, on text), finishing requests that
stop or fail, and producing `RequestOutput` deltas, the final one carrying the request's
latencies (computed here, once, for metrics, the subnet policy and SLA accounting alike), and a
prompt_logprobs request's prompt scores (gathered by position as its chunks run, handed out once
with its first token). Two
named steps wrap a step: following the headroom (elasticity, between steps) and recovering from
an out-of-memory step (shrink, then run the step once more). Synchronous and single-threaded;
`async_engine.py` runs it in the background for asyncio callers.

Deliberately does not know: HTTP, tenants, tensors or the model's math (it drives any object
that meets `Runner`), or how the subnet policy decides (chooser.py asks it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from policies.snapshots import TierView
from server.engine.chooser import SubnetChooser
from server.engine.detokenizer import IncrementalDetokenizer, TokenDecoder
from server.engine.elasticity import Elasticity
from server.engine.outputs import RequestLatency, RequestOutput, TokenLogprob
from server.engine.request import Request, RequestStatus
from server.engine.runner_protocol import Runner
from server.engine.scheduler import Scheduler, StepPlan
from server.vocabulary.sampling_params import SamplingParams
from server.vocabulary.step import DeviceOutOfMemory, PromptLogprob, SampleResult, StepResult
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
        runner: Runner,
        scheduler: Scheduler,
        decoder: TokenDecoder,
        vocab_size: int,
        chooser: SubnetChooser | None = None,
        elasticity: Elasticity | None = None,
    ):
        self.runner = runner
        self.scheduler = scheduler
        self.decoder = decoder
        self.vocab_size = vocab_size
        self.chooser = chooser  # subnet choice at admission; None: every request names one
        self.elasticity = elasticity  # resident widths that follow headroom; None: fixed
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self.last_step = StepStats()
        self.num_steps = 0
        self.out_of_memory: dict[str, int] = {}  # steps that ran out of memory, by allocator

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- requests ---------------------------------------------------------------------------

    def make_request(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        subnet: Subnet | None,
        params: SamplingParams,
        priority: int = 0,
        tags: dict[str, str] | None = None,
        tier: TierView | None = None,
        keep_logits: bool = False,
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
            keep_logits=keep_logits,
        )
        self.scheduler.check(req)
        return req

    def add(self, req: Request) -> None:
        self.scheduler.add(req)
        if req.params.prompt_logprobs is not None:
            req.prompt_logprobs = [None] * req.num_prompt_tokens
        try:
            self.runner.add_request(
                req.request_id, req.params, req.prompt_token_ids, req.keep_logits
            )
        except BaseException:
            # The runner refused it (e.g. a structured-output constraint that does not compile):
            # the request must not stay queued without its sampling state.
            self.scheduler.abort(req.request_id)
            raise
        self._detok[req.request_id] = IncrementalDetokenizer(
            self.decoder,
            req.params.stop,
            req.params.include_stop_str_in_output,
            min_tokens=req.params.min_tokens,
        )

    def add_request(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        subnet: Subnet | None,
        params: SamplingParams,
        **options,
    ) -> Request:
        """Queue a request (`options`: make_request's priority, tags, tier, keep_logits);
        raises ValueError (with the reason) if it can never run."""
        req = self.make_request(request_id, prompt_ids, subnet, params, **options)
        self.add(req)
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its KV blocks now; returns its final output."""
        req = self.scheduler.abort(request_id)
        if req is None:
            return None
        return self.final_output(req)

    def fail_running(self, message: str) -> list[RequestOutput]:
        """Fail every running request (a whole step failed unexpectedly); waiting ones stay."""
        outs = []
        for req in list(self.scheduler.running):
            req.error = message
            self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
            outs.append(self.final_output(req))
        return outs

    # ---- one step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        self._follow_headroom()
        plan = self.scheduler.schedule()
        result = self._execute(plan, may_run_out=True)
        if result is None:
            self._shrink_after_out_of_memory()
            plan = self.scheduler.schedule()  # the shrink moved or preempted what no longer fits
            result = self._execute(plan, may_run_out=False)
        return self._update(plan, result)

    def _follow_headroom(self) -> None:
        """Between steps: resident widths follow the headroom (elasticity.py)."""
        if self.elasticity is not None:
            self.elasticity.tick(self.scheduler)

    def _execute(self, plan: StepPlan, may_run_out: bool) -> StepResult | None:
        """The runner's step. None: it ran out of device memory and a shrink can help.

        Returns rather than recovering inside the `except`, so the failed step's frames and
        activations are released before the shrink and the retry run."""
        if not plan.sequences:
            return StepResult()
        try:
            return self.runner.execute(plan.sequences)
        except DeviceOutOfMemory as e:
            self.out_of_memory[e.kind] = self.out_of_memory.get(e.kind, 0) + 1
            if not may_run_out or self.elasticity is None or not self.elasticity.can_shrink:
                raise
        return None

    def _shrink_after_out_of_memory(self) -> None:
        """Not the requests' fault: shrink the resident widths now, moving or preempting what no
        longer fits. Nothing of the failed step was committed, so nothing moves back: the next
        schedule() finds the same requests with their blocks already booked (allocation is
        idempotent)."""
        assert self.elasticity is not None
        self.elasticity.on_out_of_memory(self.scheduler)

    def _update(self, plan: StepPlan, result: StepResult) -> list[RequestOutput]:
        stats = StepStats(num_preempted=len(plan.preempted))
        if not plan.sequences:
            self.last_step = stats
            return []
        self.num_steps += 1
        stats.num_seqs, stats.num_tokens = len(plan.sequences), plan.num_tokens
        stats.num_decodes, stats.seconds = plan.num_decodes, result.seconds
        stats.ffn_mode = result.ffn_mode
        for s in plan.sequences:
            stats.subnets[s.subnet.name] = stats.subnets.get(s.subnet.name, 0) + 1
        self.last_step = stats
        if self.chooser is not None:
            self.chooser.record_step(
                result.seconds, [s.subnet for s in plan.sequences], plan.num_tokens
            )
            self.chooser.admitted(plan.admitted)

        outputs: list[RequestOutput] = []
        for request_id, message in result.errors.items():
            req = self.scheduler.requests.get(request_id)
            if req is not None:
                req.error = message
                self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
                outputs.append(self.final_output(req))
        if result.errors:
            plan = StepPlan(
                [s for s in plan.sequences if s.request_id not in result.errors], plan.preempted
            )
        for rid, scored in result.prompt_logprobs.items():
            req = self.scheduler.requests.get(rid)
            if req is not None and req.prompt_logprobs is not None:
                for lp in scored:  # a recomputed prompt (preemption) overwrites alike
                    req.prompt_logprobs[lp.position] = lp
        sampled = {rid: s.token_id for rid, s in result.samples.items()}
        for req in self.scheduler.update(plan, sampled):
            rid = req.request_id
            outputs.append(self._delta(req, result.samples[rid], result.logits.get(rid)))
        return outputs

    # ---- outputs ----------------------------------------------------------------------------

    def _delta(self, req: Request, sample: SampleResult, logits: object | None) -> RequestOutput:
        detok = self._detok[req.request_id]
        delta = detok.push(sample.token_id)
        if delta.stopped and not req.is_finished:
            req.stop_reason = delta.stop_reason
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
        elif delta.stopped and req.status == RequestStatus.FINISHED_LENGTH:
            # The same token reached max_tokens, but the text ends at the stop string.
            req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, delta.stop_reason
        logprobs = None
        if req.params.logprobs is not None:
            logprobs = (TokenLogprob(sample.token_id, sample.logprob, sample.top_logprobs),)
        kept = () if logits is None else (logits,)
        # The whole prompt is computed by the step that samples the first token.
        scored = None if req.prompt_logprobs is None else tuple(req.prompt_logprobs)
        req.prompt_logprobs = None
        if req.is_finished:
            return self.final_output(req, delta.text, (sample.token_id,), logprobs, kept, scored)
        return RequestOutput(
            request_id=req.request_id,
            subnet=req.subnet.name if req.subnet else "",
            token_ids=(sample.token_id,),
            text=delta.text,
            logprobs=logprobs,
            logits=kept,
            prompt_logprobs=scored,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(req.output_token_ids),
            num_cached_tokens=req.num_cached_tokens,
        )

    def final_output(
        self,
        req: Request,
        text: str = "",
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[TokenLogprob, ...] | None = None,
        logits: tuple[object, ...] = (),
        prompt_logprobs: tuple[PromptLogprob | None, ...] | None = None,
    ) -> RequestOutput:
        """The last output of a finished request: held-back text, how it ended, its latencies.
        Releases the request's runner state."""
        detok = self._detok.pop(req.request_id, None)
        if detok is not None and not detok.stopped:
            # Held-back text (an unfinished character, a possible stop-string start) is final
            # now; completing those held bytes can still reveal a stop string.
            text += detok.finish()
            # (An abort or a failure stays what it was.)
            if detok.stopped and req.status in _STOPPABLE:
                req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, detok.stop_reason
        self.runner.release(req.request_id)
        return RequestOutput(
            request_id=req.request_id,
            subnet=req.subnet.name if req.subnet else "",
            token_ids=token_ids,
            text=text,
            logprobs=logprobs,
            logits=logits,
            prompt_logprobs=prompt_logprobs,
            finished=True,
            finish_reason=req.status.finish_reason,
            stop_reason=req.stop_reason,
            error=req.error,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(req.output_token_ids),
            num_cached_tokens=req.num_cached_tokens,
            latency=_latency(req),
            tags=dict(req.tags),
            downgraded=req.downgraded,
        )


# Finished statuses a stop string found in the final text overrides (the text ends at it).
_STOPPABLE = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)


def _latency(req: Request) -> RequestLatency:
    ev = req.events
    finished = ev.finished if ev.finished is not None else time.monotonic()
    tpot = None
    if ev.first_token is not None and len(req.output_token_ids) > 1:
        tpot = (finished - ev.first_token) / (len(req.output_token_ids) - 1)
    return RequestLatency(
        e2e_s=finished - ev.arrived,
        queue_s=None if ev.first_scheduled is None else ev.first_scheduled - ev.arrived,
        ttft_s=None if ev.first_token is None else ev.first_token - ev.arrived,
        tpot_s=tpot,
    )
