"""What the engine hands back per request per step: a delta of tokens and text, and how it ended.

Owns the output dataclasses the API layer turns into OpenAI chunks. Plain Python.
Deliberately does not know: HTTP, SSE framing, or token strings (the API maps ids to text).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the most likely alternatives, highest first


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    subnet: str  # the subnet that served the request
    token_ids: tuple[int, ...] = ()  # new since the previous output of this request
    text: str = ""  # new text; never ends inside a UTF-8 character or a stop string
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per new token, when asked for
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # so far
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    timings: dict[str, float] = field(default_factory=dict)  # filled when finished
    tags: dict[str, str] = field(default_factory=dict)  # the request's tags, when finished
