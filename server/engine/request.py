"""A request's state as the engine sees it: tokens, subnet, sampling, status and timestamped events.

Owns the request state machine (one ordered status enum; everything from FINISHED_STOPPED on is
finished, and maps to an OpenAI finish reason) and the events the metrics are derived from
(arrived, first scheduled, first token, every token, preemptions, finished). Plain Python.

Deliberately does not know: KV block ids (kv_blocks.py), tensors, or HTTP.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from policies.snapshots import TierView
from server.vocabulary.sampling_params import SamplingParams
from server.vocabulary.step import PromptLogprob
from server.vocabulary.subnets import Subnet


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # KV dropped; waits to be recomputed
    FINISHED_STOPPED = 3  # eos, a stop token or a stop string
    FINISHED_LENGTH = 4  # max_tokens or the context limit
    FINISHED_ABORTED = 5  # the client went away or asked to stop
    FINISHED_ERROR = 6  # this request failed; the others carry on

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass
class RequestEvents:
    """Monotonic timestamps (time.monotonic) of a request's life, for latency metrics."""

    arrived: float
    first_scheduled: float | None = None
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished: float | None = None
    preemptions: int = 0


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    subnet: Subnet | None  # None until the subnet policy chooses it, at admission
    params: SamplingParams
    priority: int = 0  # lower runs first among equals (as vLLM's `priority`)
    tier: TierView | None = None  # the tenant's tier, for the subnet policy
    pinned: bool = False  # the client named the subnet: no policy choice, never moved
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache (last admission)
    error: str | None = None
    stop_reason: str | int | None = None  # the stop string or token that ended it
    events: RequestEvents = field(default_factory=lambda: RequestEvents(time.monotonic()))
    tags: dict[str, str] = field(default_factory=dict)  # e.g. tenant/tier, for metrics
    downgraded: bool = False  # the policy chose below the best its tier could have had
    keep_logits: bool = False  # return each step's logits row (offline checks only)
    # prompt_logprobs requests: one entry per prompt position (None first, and until scored);
    # handed out once, with the first token, then dropped (None).
    prompt_logprobs: list[PromptLogprob | None] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without concatenating the whole sequence
        (a decode step reads one token of a long context)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:end] + self.output_token_ids[: max(0, end - n)]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def finish(self, status: RequestStatus, now: float | None = None) -> None:
        assert status.finished
        self.status = status
        self.events.finished = time.monotonic() if now is None else now
