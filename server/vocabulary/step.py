"""One sequence's share of an engine step: the one record the scheduler hands the runner.

Owns `StepSequence`. The scheduler builds it when it books the step (it knows the request's
tokens, its subnet and its blocks); the runner packs a list of them into tensors
(`server/runtime/batch.py`). A request's sampling parameters and prompt are not here: they are
registered with the runner once, when the request is added, and never re-sent.

Deliberately does not know: tensors, sampling parameters, or request state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from server.vocabulary.subnets import Subnet


@dataclass(frozen=True)
class StepSequence:
    request_id: str
    subnet: Subnet
    token_ids: Sequence[int]  # the tokens computed this step (a prompt chunk, or the last token)
    start: int  # position of token_ids[0]: the number of tokens already in the KV cache
    # Per KV-owning layer (0..first_kv_shared_layer-1), the block ids of every token block so far
    # (-1 where a sliding layer released one). The block manager's live table: valid this step.
    block_table: Sequence[Sequence[int]]
    sample: bool  # reaches the last known token: the next token is sampled from its logits

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SampleResult:
    """The token sampled for one sequence, with its log-probabilities when asked for."""

    token_id: int
    logprob: float | None  # the chosen token's log-probability; None unless logprobs requested
    top_logprobs: tuple[tuple[int, float], ...]  # top-k (id, logprob), highest first


@dataclass(frozen=True)
class PromptLogprob:
    """A prompt token's log-probability given the tokens before it (vLLM's prompt_logprobs)."""

    position: int  # of the token in the prompt (>= 1: the first token has no context)
    token_id: int
    logprob: float
    rank: int  # as vLLM: how many ids score at least as high (1: it is the most likely)
    top: tuple[tuple[int, float], ...]  # the top k (id, logprob), highest first


@dataclass
class StepResult:
    """What the runner returns for one step."""

    samples: dict[str, SampleResult] = field(default_factory=dict)  # request id -> its token
    errors: dict[str, str] = field(default_factory=dict)  # request id -> why it failed
    seconds: float = 0.0  # wall time of the step
    ffn_mode: str | None = None  # how mixed FFN widths ran ("grouped"/"masked"); None: one width
    # request id -> this step's logits row (an opaque tensor), only for requests registered with
    # keep_logits (offline checks against the oracle); empty otherwise.
    logits: dict[str, object] = field(default_factory=dict)
    # request id -> the prompt logprobs this step computed (requests with prompt_logprobs only)
    prompt_logprobs: dict[str, list[PromptLogprob]] = field(default_factory=dict)


# Who can report an allocation failure (server/runtime/device.py classifies them by these names).
ALLOCATION_FAILURE_KINDS = (
    "torch",
    "host",
    "cublas",
    "cudnn",
    "cusolver",
    "cusparse",
    "cufft",
    "cuda",
    "other",
)


class DeviceOutOfMemory(RuntimeError):
    """A step ran out of accelerator (or host) memory: not any request's fault. The engine
    shrinks the resident widths and runs the step again. `kind` names the allocator that
    failed (the runtime's classification: "torch", "cublas", "cudnn", "cuda", "host", ...)."""

    def __init__(self, message: str, kind: str = "unknown"):
        super().__init__(message)
        self.kind = kind
