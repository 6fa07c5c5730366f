"""The continuous-batching scheduler: which requests compute how many tokens in the next step.

NOTE: there is no separate prefill phase and decode phase. Each request has a number of computed
tokens (`num_computed_tokens`, those whose K/V are cached) and a number of known tokens (prompt
plus output); every step the scheduler tries to bring the first up to the second, within a token
budget. A decode is a request one token behind; a prefill is one many tokens behind, computed in
chunks of at most `max_prefill_chunk`. Running requests are served first, in priority order, so a
long prompt admitted next to running decodes delays them by at most one chunk's work. Waiting
requests are then admitted in the order the policy gives while the budget, the sequence limit
and the KV pool allow; admission stops at the first that does not fit (no overtaking, so a large
request cannot starve). When a running request cannot get its next block, the lowest-priority,
latest request not yet scheduled in this step is preempted: its KV is dropped (its full blocks
stay in the prefix cache) and it waits to be recomputed.

Owns the waiting and running queues and the step plan. Plain Python: testable without torch.
Deliberately does not know: tensors, sampling, detokenization, or where requests come from.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from policies.ordering import OrderPolicy, WaitingRequest
from server.engine.kv_blocks import BlockManager
from server.engine.request import Request, RequestStatus
from server.vocabulary.step import StepSequence

# Gives a waiting request its subnet just before admission (the subnet policy decides then, from
# the load at that moment); returns False if it cannot run now. The scheduler passes itself, so
# the decider can read the queues and KV usage it decides from.
AssignSubnet = Callable[[Request, "Scheduler"], bool]


def named_subnet(req: Request, scheduler: Scheduler) -> bool:
    """The assignment when no policy chooses: every request must name its subnet."""
    return req.subnet is not None


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32  # running requests at most
    max_num_batched_tokens: int = 256  # tokens computed per step at most (the token budget)
    max_prefill_chunk: int = 128  # prompt tokens one request computes per step at most
    max_model_len: int = 8192  # prompt + output tokens at most
    # Prompt tokens a scoring request (prompt_logprobs, echo) computes per step at most: each of
    # its rows keeps a whole vocabulary of logits (262,144 x 4 bytes = 1 MiB for Gemma 3n), so
    # its chunks are bounded by bytes, not by the token budget (assembly.py sets it from the
    # vocabulary).
    max_scored_rows: int = 128

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_prefill_chunk",
            "max_model_len",
            "max_scored_rows",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                "max_num_batched_tokens must be >= max_num_seqs (every running "
                "request's decode must fit in one step)"
            )


@dataclass
class StepPlan:
    sequences: list[StepSequence] = field(default_factory=list)  # the runner's input
    preempted: list[str] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)  # joined the running batch this step

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sequences)

    @property
    def num_decodes(self) -> int:
        return sum(1 for s in self.sequences if s.num_tokens == 1 and s.sample)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        blocks: BlockManager,
        policy: OrderPolicy,
        eos_token_ids: tuple[int, ...] = (),
        assign_subnet: AssignSubnet = named_subnet,
    ):
        self.config = config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.blocks = blocks
        self.policy = policy
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.assign_subnet = assign_subnet

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.check(req)
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def check(self, req: Request) -> None:
        """Raise ValueError if the request could never run (reads configuration only)."""
        total = req.num_prompt_tokens + req.params.max_tokens
        if total > self.config.max_model_len:
            raise ValueError(
                f"prompt ({req.num_prompt_tokens} tokens) plus max_tokens "
                f"({req.params.max_tokens}) exceeds the context length {self.config.max_model_len}"
            )
        need = self.footprint(req, total)
        if need > self.blocks.num_blocks:
            raise ValueError(
                f"this request needs {need} KV blocks at its longest; the pool has "
                f"{self.blocks.num_blocks}"
            )

    def footprint(self, req: Request, num_tokens: int) -> int:
        """Most blocks the request can hold at once: every block of a full-attention layer; for
        a sliding layer, during its longest step (a prefill chunk), the window behind the
        chunk's first query and the chunk itself. (Counting only the window once refused
        nothing that one prefill chunk could not fit: such a request waited forever.)"""
        bs, layout, cfg = self.blocks.block_size, self.blocks.layout, self.config
        full = -(-num_tokens // bs)
        chunk = min(num_tokens, cfg.max_prefill_chunk, cfg.max_num_batched_tokens)
        # Positions [start - window + 1, start + chunk) fall in at most this many blocks.
        window = min(full, -(-(layout.sliding_window - 1 + chunk) // bs) + 1)
        # Before its subnet is chosen, assume the most a subnet can book: every KV layer.
        layers = req.subnet.kv_layers if req.subnet else range(layout.num_kv_layers)
        return sum(window if layer in layout.sliding_layers else full for layer in layers)

    def abort(self, request_id: str) -> Request | None:
        """Stop a request now and free its blocks. Returns it, or None if it is unknown."""
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        self.finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def finish(self, req: Request, status: RequestStatus) -> None:
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free(req)
        req.finish(status)
        self.requests.pop(req.request_id, None)

    # ---- one step ---------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=lambda r: (r.priority, r.events.arrived))
        scheduled: set[str] = set()

        for req in list(self.running):
            if req not in self.running:
                continue  # preempted earlier in this loop to make room
            num_new = self._num_new(req, budget)
            if num_new == 0:
                continue
            while not self.blocks.allocate(req, num_new):
                victims = [r for r in self.running if r.request_id not in scheduled]
                victim = victims[-1]
                self._preempt(victim, plan)
                if victim is req:
                    break
            else:
                plan.sequences.append(self._sequence(req, num_new))
                scheduled.add(req.request_id)
                budget -= num_new

        if not plan.preempted:  # after a preemption, memory is short: admit nobody this step
            self._admit(plan, budget)
        return plan

    def _admit(self, plan: StepPlan, budget: int) -> None:
        by_id = {r.request_id: r for r in self.waiting}
        snapshots = [
            WaitingRequest(
                r.request_id,
                r.events.arrived,
                r.priority,
                r.num_prompt_tokens,
                r.subnet.name if r.subnet else "",
                r.status == RequestStatus.PREEMPTED,
            )
            for r in self.waiting
        ]
        for request_id in self.policy.order(snapshots):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            req = by_id[request_id]
            if not self.assign_subnet(req, self):
                continue  # its pinned subnet is not resident now: others may still run
            self.blocks.admit(req)  # attaches the longest cached prefix
            num_new = self._num_new(req, budget)
            if not self.blocks.allocate(req, num_new):
                self.blocks.free(req)
                req.num_computed_tokens = 0
                break
            self.waiting.remove(req)
            self.running.append(req)
            req.status = RequestStatus.RUNNING
            if req.events.first_scheduled is None:
                req.events.first_scheduled = time.monotonic()
            plan.admitted.append(req)
            plan.sequences.append(self._sequence(req, num_new))
            budget -= num_new

    def _num_new(self, req: Request, budget: int) -> int:
        behind = req.num_tokens - req.num_computed_tokens
        if behind > 1:
            behind = min(behind, self.config.max_prefill_chunk)
            if req.params.prompt_logprobs is not None:
                behind = min(behind, self.config.max_scored_rows)
        return min(behind, budget)

    def _sequence(self, req: Request, num_new: int) -> StepSequence:
        assert req.subnet is not None
        start = req.num_computed_tokens
        return StepSequence(
            request_id=req.request_id,
            subnet=req.subnet,
            token_ids=req.token_slice(start, start + num_new),
            start=start,
            block_table=self.blocks.block_table(req.request_id),
            sample=start + num_new == req.num_tokens,
        )

    def preempt(self, req: Request) -> None:
        """Drop a running request's KV; it waits (first in line) to be recomputed."""
        self._preempt(req, StepPlan())

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        self.running.remove(req)
        self.blocks.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.events.preemptions += 1
        self.waiting.insert(0, req)
        self.num_preemptions += 1
        plan.preempted.append(req.request_id)

    def update(self, plan: StepPlan, sampled: dict[str, int]) -> list[Request]:
        """Apply a step's results: advance computed tokens, append sampled tokens, finish
        requests that hit eos, a stop token, max_tokens or the context length. Returns the
        requests that got a token this step (finished ones included)."""
        touched = []
        now = time.monotonic()
        for seq in plan.sequences:
            req = self.requests.get(seq.request_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens += seq.num_tokens
            self.blocks.commit(req)
            if not seq.sample or seq.request_id not in sampled:
                continue
            token = sampled[seq.request_id]
            req.output_token_ids.append(token)
            req.events.token_times.append(now)
            if req.events.first_token is None:
                req.events.first_token = now
            touched.append(req)
            status = self._stop_status(req, token)
            if status is not None:
                self.finish(req, status)
        return touched

    def _stop_status(self, req: Request, token: int) -> RequestStatus | None:
        p = req.params
        n = len(req.output_token_ids)
        if n >= p.min_tokens:
            if token in p.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if not p.ignore_eos and token in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if n >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
