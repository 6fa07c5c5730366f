"""What the engine hands back per request per step: a delta of tokens and text, and how it ended.

Owns the output dataclasses the API layer turns into OpenAI chunks. Plain Python.
Deliberately does not know: HTTP, SSE framing, or token strings (the API maps ids to text).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.vocabulary.step import PromptLogprob


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the most likely alternatives, highest first


@dataclass(frozen=True)
class RequestLatency:
    """A finished request's latencies, in seconds (computed once, by the engine)."""

    e2e_s: float  # arrival to finish
    queue_s: float | None  # arrival to first scheduled; None if it never ran
    ttft_s: float | None  # arrival to first token; None if it produced none
    tpot_s: float | None  # per output token after the first; None with fewer than two


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    subnet: str  # the subnet that served the request
    token_ids: tuple[int, ...] = ()  # new since the previous output of this request
    text: str = ""  # new text; never ends inside a UTF-8 character or a stop string
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per new token, when asked for
    logits: tuple[object, ...] = ()  # one logits row per new token, for keep_logits requests
    # prompt_logprobs requests, in their first output only: one per prompt token, None first.
    prompt_logprobs: tuple[PromptLogprob | None, ...] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    error: str | None = None
    # With finish_reason "error": the engine refused the request before it ran, because it
    # could never run there (too large for the KV pool, say): the client's fault, not a failure.
    refused: bool = False
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # so far
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    latency: RequestLatency | None = None  # when finished
    tags: dict[str, str] = field(default_factory=dict)  # the request's tags, when finished
    downgraded: bool = False  # the policy chose below the best its tier could have had
