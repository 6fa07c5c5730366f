"""Which waiting request the scheduler should try to admit first.

Owns the ordering decision, over read-only snapshots of waiting requests. The scheduler owns the
mechanism (budgets, blocks, preemption) and asks this interface only for an order; a policy never
sees the engine's objects, tensors or blocks. Plain Python, no torch.

Deliberately does not know: KV blocks, subnets' costs, or how admission is carried out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class WaitingRequest:
    """What an ordering policy may look at."""

    request_id: str
    arrival: float  # monotonic seconds
    priority: int  # lower first, among policies that honour it
    num_prompt_tokens: int
    subnet: str
    preempted: bool  # was running, lost its KV, and waits to be recomputed


class OrderPolicy(Protocol):
    name: str

    def order(self, waiting: Sequence[WaitingRequest]) -> list[str]:
        """Request ids in the order admission should be tried."""
        ...


class FirstComeFirstServed:
    """Arrival order; requests that were preempted go first (they already waited once)."""

    name = "fcfs"

    def order(self, waiting: Sequence[WaitingRequest]) -> list[str]:
        return [w.request_id for w in sorted(waiting, key=lambda w: (not w.preempted, w.arrival))]


class PriorityOrder:
    """Priority (lower first), then arrival: vLLM's `--scheduling-policy priority`."""

    name = "priority"

    def order(self, waiting: Sequence[WaitingRequest]) -> list[str]:
        return [w.request_id for w in sorted(waiting, key=lambda w: (w.priority, w.arrival))]
