"""Read-only snapshots a subnet-choice policy decides from. Plain data, no behaviour.

Owns the vocabulary between the engine and the policies: what a policy may know about the
subnets on offer, the requesting tier, the requests running now, the load, the memory headroom,
and the measured cost of a step. The engine builds these between steps; a policy never sees
engine objects, tensors or blocks, so every policy is testable on hand-made snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SubnetView:
    name: str
    quality: float  # `SubnetTable.scores`: measured 100/perplexity, else MMLU %, or a stand-in
    effective_params: int
    resident: bool  # its widths fit in what the accelerator holds now (always true on a CPU)
    kv_key: str  # subnets with equal keys write identical KV


@dataclass(frozen=True)
class TierView:
    name: str
    priority: int  # lower is more important
    subnets: tuple[str, ...]  # what the tier may use ("*": any)
    target_ttft_s: float | None
    target_tpot_s: float | None
    quality_floor: float | None
    quality_ceiling: float | None

    def allows(self, subnet: str, quality: float) -> bool:
        """THE tier rule, used for pinning, choice, elasticity moves and the fixed policy alike:
        the subnet is one the tier names (or it names "*"), and its quality score (the table's,
        or the stand-in `SubnetTable.scores` gives) lies within the tier's floor and ceiling."""
        if "*" not in self.subnets and subnet not in self.subnets:
            return False
        if self.quality_floor is not None and quality < self.quality_floor:
            return False
        return not (self.quality_ceiling is not None and quality > self.quality_ceiling)


@dataclass(frozen=True)
class RunningView:
    subnet: str
    effective_params: int
    tier: TierView | None


@dataclass(frozen=True)
class StepCost:
    """A fitted model of one engine step's duration:

        seconds = base + per_param * (effective params of the widest subnet in the step)
                       + per_token * (tokens computed in the step)

    A decode step reads the widest subnet's weights once whatever the batch (memory-bound);
    tokens add compute (prefill chunks)."""

    base: float
    per_param: float
    per_token: float
    samples: int = 0
    # Recent steps' p95 of (measured / predicted): turns the fitted mean into a p95 estimate,
    # since tiers' targets are p95s.
    p95_factor: float = 1.0

    def predict(self, widest_params: int, tokens: int) -> float:
        return max(0.0, self.base + self.per_param * widest_params + self.per_token * tokens)


@dataclass(frozen=True)
class Load:
    running: tuple[RunningView, ...] = ()
    waiting: int = 0  # requests queued ahead
    waiting_prompt_tokens: int = 0  # their prompt tokens still to compute
    kv_usage: float = 0.0  # fraction of KV blocks held
    token_budget: int = 256  # tokens per step (scheduler)
    prefill_chunk: int = 128
    recent_step_tokens: float = 0.0  # tokens per step lately (decodes plus others' prefill)


@dataclass(frozen=True)
class ChoiceRequest:
    tier: TierView
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class PolicyContext:
    offered: tuple[SubnetView, ...]
    load: Load
    cost: StepCost


@dataclass(frozen=True)
class Decision:
    subnet: str
    priority: int
    reason: str  # one line, for logs and debugging
    downgraded: bool = False  # below the best the tier could have had with no load
    admit: bool = True  # False: wait (admitting it now would slow a more important tier)
