"""Subnet choice at admission: the engine's side of the policy interface.

Owns building the read-only snapshot a policy decides from (the subnets on offer and whether they
are resident, the running batch and its tiers, the queue, KV usage, the fitted step-cost
model), asking the policy when a waiting request is about to be admitted, and feeding the
step-cost model every step's duration against the widest subnet in it and its token count.

A pinned request (the client named the subnet) is not chosen for: it runs on its subnet when that
subnet is resident, and waits otherwise (whether its tier may pin it was checked when it was
submitted, by the same rule, `TierView.allows`). A request that already generated tokens
(preempted, to be recomputed) keeps its subnet while it is offered.

`assign` is the scheduler's `assign_subnet` hook (given to the scheduler at construction).

Deliberately does not know: how the policy decides (policies/), or tensors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from policies.snapshots import (
    ChoiceRequest,
    Load,
    PolicyContext,
    RunningView,
    SubnetView,
    TierView,
)
from policies.subnet_choice import LargestFitsPolicy, SubnetPolicy
from server.engine.request import Request
from server.engine.scheduler import Scheduler
from server.engine.step_cost import StepCostModel
from server.vocabulary.subnets import Subnet, SubnetTable

DEFAULT_TIER = TierView("default", 0, ("*",), None, None, None, None)


class SubnetChooser:
    def __init__(
        self,
        table: SubnetTable,
        policy: SubnetPolicy | None = None,
        offered: Callable[[Subnet], bool] = lambda subnet: True,
    ):
        self.table = table
        self.policy = policy or LargestFitsPolicy()
        self.offered = offered  # resident now (elasticity), or always
        self.cost = StepCostModel()
        self.choices: Counter[tuple[str, str, bool]] = Counter()  # (subnet, tier, pinned)
        self.downgrades: Counter[str] = Counter()  # tier
        self.deferrals: Counter[str] = Counter()  # tier: admissions put off to protect others
        self.recent_step_tokens = 0.0  # moving average of tokens per step
        self.last_reason: dict[str, str] = {}  # request id -> why (until admitted)

    # ---- the hook the scheduler calls -------------------------------------------------------

    def assign(self, req: Request, scheduler: Scheduler) -> bool:
        if req.pinned:
            return req.subnet is not None and self.offered(req.subnet)
        if req.subnet is not None and req.output_token_ids and self.offered(req.subnet):
            return True  # continues on the subnet that produced its tokens so far
        tier = req.tier or DEFAULT_TIER
        decision = self.policy.choose(
            ChoiceRequest(tier, req.num_tokens, req.params.max_tokens), self.context(scheduler)
        )
        req.priority = decision.priority
        req.downgraded = decision.downgraded
        self.last_reason[req.request_id] = decision.reason
        if not decision.admit:
            # A deferral's subnet is no choice (with nothing its tier allows resident, it is
            # the smallest): keeping it would let a request with tokens continue on it at the
            # next try (the shortcut above), outside its tier.
            req.subnet = None
            self.deferrals[tier.name] += 1
            return False
        req.subnet = self.table[decision.subnet]
        return True

    def context(self, sched: Scheduler) -> PolicyContext:
        offered = tuple(
            SubnetView(
                s.name, self.table.scores[s.name], s.effective_params, self.offered(s), s.kv_key
            )
            for s in self.table
        )
        running = tuple(
            RunningView(r.subnet.name, r.subnet.effective_params, r.tier)
            for r in sched.running
            if r.subnet is not None
        )
        waiting_tokens = sum(r.num_tokens - r.num_computed_tokens for r in sched.waiting)
        load = Load(
            running,
            len(sched.waiting),
            waiting_tokens,
            sched.blocks.usage,
            sched.config.max_num_batched_tokens,
            sched.config.max_prefill_chunk,
            self.recent_step_tokens,
        )
        return PolicyContext(offered, load, self.cost.snapshot())

    # ---- learning ---------------------------------------------------------------------------

    def admitted(self, reqs: list[Request]) -> None:
        for req in reqs:
            tier = (req.tier or DEFAULT_TIER).name
            assert req.subnet is not None
            self.choices[(req.subnet.name, tier, req.pinned)] += 1
            if req.downgraded:
                self.downgrades[tier] += 1
            self.last_reason.pop(req.request_id, None)

    def record_step(self, seconds: float, subnets: list[Subnet], tokens: int) -> None:
        if seconds > 0 and subnets:
            self.cost.record(seconds, max(s.effective_params for s in subnets), tokens)
            self.recent_step_tokens = 0.8 * self.recent_step_tokens + 0.2 * tokens
