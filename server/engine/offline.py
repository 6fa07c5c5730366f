"""Offline generation: prompts in, finished generations out, through the serving engine itself.

Owns the loop that `concentric generate`, the demo, the tests' "alone" runs and the benchmarks
use: add every request to an `Engine`, step it until nothing is left, and collect each request's
tokens, text, logprobs and finish reason. Because it is the same engine (scheduler, KV blocks,
runner, sampler) the server runs, the same seed and parameters give the same tokens here as
through the HTTP API.

Deliberately does not know: tensors (logits rows, when kept, are opaque objects), HTTP, or how
the engine was assembled (assembly.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from server.engine.engine import Engine
from server.engine.outputs import TokenLogprob
from server.vocabulary.sampling_params import SamplingParams
from server.vocabulary.step import PromptLogprob
from server.vocabulary.subnets import Subnet


@dataclass(frozen=True)
class GenerationRequest:
    subnet: Subnet
    prompt_ids: Sequence[int]
    params: SamplingParams


@dataclass
class Generation:
    subnet: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    logits: list[object] = field(default_factory=list)  # one row per token, with keep_logits
    prompt_logprobs: tuple[PromptLogprob | None, ...] | None = None  # with prompt_logprobs
    finish_reason: str | None = None
    error: str | None = None


def greedy(max_tokens: int, **fields) -> SamplingParams:
    """Parameters for a deterministic run of exactly `max_tokens` tokens (eos does not stop
    it), as the oracle comparisons need."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **fields)


def generate(
    engine: Engine, requests: Sequence[GenerationRequest], keep_logits: bool = False
) -> list[Generation]:
    """Run every request to completion on an idle engine; results in request order."""
    if engine.has_work:
        raise RuntimeError("offline generation needs an idle engine")
    ids = [f"offline-{i}" for i in range(len(requests))]
    results = {rid: Generation(r.subnet.name) for rid, r in zip(ids, requests, strict=True)}
    for rid, r in zip(ids, requests, strict=True):
        engine.add_request(rid, r.prompt_ids, r.subnet, r.params, keep_logits=keep_logits)
    while engine.has_work:
        for out in engine.step():
            g = results[out.request_id]
            g.token_ids.extend(out.token_ids)
            g.text += out.text
            g.logprobs.extend(out.logprobs or ())
            g.logits.extend(out.logits)
            if out.prompt_logprobs is not None:
                g.prompt_logprobs = out.prompt_logprobs
            if out.finished:
                g.finish_reason, g.error = out.finish_reason, out.error
    return [results[rid] for rid in ids]
