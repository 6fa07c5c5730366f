"""Submitting an OpenAI request to the engine: every check that can refuse it, then its streams.

Owns what happens before a response starts, so that a refusal is a real status code and never an
in-band error: the tier's right to the subnet, size caps, sampling parameters, the tenant's rate
limits, and the engine's own checks (context length, KV pool). An unpinned request's first choice
is admitted by the subnet policy; its other choices (n > 1, several prompts) follow the subnet it
got, so one response is served by one subnet, named before the first byte.

Deliberately does not know: response shapes (responses.py) or HTTP routing (openai_routes.py).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from fastapi import Request

from policies.snapshots import TierView
from server.api.errors import APIError
from server.api.protocol import SamplingFields
from server.api.service import Choice, Service
from server.api.streaming import merge_streams, until_disconnect
from server.engine.async_engine import RequestStream
from server.engine.outputs import RequestOutput
from server.tenancy import Tenant
from server.vocabulary.sampling_defaults import SamplingDefaults
from server.vocabulary.sampling_params import SamplingParams, SamplingParamsError

OPENAI = SamplingDefaults()


@dataclass
class Submission:
    """One API request as engine requests: choice index -> stream."""

    streams: list[RequestStream]  # choice i answers prompt i // n
    choice: Choice
    prompt_lengths: list[int]  # per prompt
    n: int
    created: int
    response_id: str
    # Choices submitted once the first one's subnet is known (they follow it): (ids, params)
    deferred: list[tuple[list[int], SamplingParams]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    tier: TierView | None = None
    priority: int = 0
    subnet_name: str = ""  # the subnet that serves the request, once known


def sampling_params(
    body: SamplingFields,
    max_tokens: int,
    seed: int | None,
    logprobs: int | None,
    vocab: int,
    defaults: SamplingDefaults = OPENAI,
) -> SamplingParams:
    """The request's SamplingParams: its own values, and `defaults` for the sampling fields it
    leaves unset (None), so an explicit value (even OpenAI's default) always wins."""
    bias: list[tuple[int, float]] = []
    for key, value in (body.logit_bias or {}).items():
        try:
            bias.append((int(key), float(value)))
        except ValueError:
            raise APIError(
                400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
    params = defaults.params(
        max_tokens=max_tokens,
        min_tokens=body.min_tokens or 0,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        seed=seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=tuple(bias),
        stop=body.stop_strings(),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        logprobs=logprobs,
    )
    try:
        params.validate(vocab)
    except SamplingParamsError as e:
        raise APIError(400, str(e), param=e.param, code="invalid_value") from None
    return params


def submit(
    request: Request,
    body: SamplingFields,
    prompts: Sequence[list[int]],
    logprobs: int | None,
    prompt_param: str,
) -> Submission:
    svc: Service = request.app.state.service
    tenant: Tenant = request.state.tenant
    engine = svc.require_ready()
    choice = svc.resolve(body.model, tenant)
    tier = tenant.tier
    assert svc.runtime is not None
    text = svc.runtime.store.text
    max_len = svc.config.max_model_len or text.max_position_embeddings
    if body.n > svc.config.max_n:
        raise APIError(400, f"n may be at most {svc.config.max_n}", param="n")
    requested = body.output_limit  # type: ignore[attr-defined]
    if requested is not None and requested > tier.max_output_tokens:
        raise APIError(
            400,
            f"max_tokens {requested} exceeds tier {tier.name!r}'s limit of "
            f"{tier.max_output_tokens}",
            param="max_tokens",
        )
    plan: list[tuple[list[int], int]] = []
    for ids in prompts:
        if not ids:
            raise APIError(400, "the prompt is empty", param=prompt_param)
        if len(ids) > tier.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; tier {tier.name!r} allows "
                f"{tier.max_prompt_tokens}",
                param=prompt_param,
            )
        if len(ids) >= max_len:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; the context length is {max_len}",
                param=prompt_param,
            )
        room = max_len - len(ids)
        max_tokens = requested if requested is not None else min(tier.max_output_tokens, room)
        if max_tokens > room:
            raise APIError(
                400,
                f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) "
                f"exceeds the context length {max_len}",
                param="max_tokens",
            )
        for _ in range(body.n):
            plan.append((ids, max_tokens))
    reserved = sum(len(ids) + m for ids, m in plan)
    refusal = svc.limiter.admit(tenant, reserved, requests=len(plan))
    if refusal is not None and refusal.never:
        svc.metrics.reject(tier.name, refusal.limit)
        raise APIError(
            400,
            f"request too large for the tier ({refusal.limit}): {refusal.message}",
            param="n" if refusal.limit != "tokens_per_minute" else "max_tokens",
            code="request_too_large",
        )
    if refusal is not None:
        svc.metrics.reject(tier.name, refusal.limit)
        raise APIError(
            429,
            f"rate limit ({refusal.limit}): {refusal.message}",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(refusal.retry_after)},
        )
    sub = Submission(
        [],
        choice,
        [len(ids) for ids in prompts],
        body.n,
        int(time.time()),
        uuid.uuid4().hex[:24],
        tier=tier.view(),
        priority=tier.priority,
        tags={"tenant": tenant.name, "tier": tier.name},
    )
    try:
        for i, (ids, max_tokens) in enumerate(plan):
            # n choices with a seed: choice i uses seed + i, so they differ yet reproduce.
            seed = None if body.seed is None else (body.seed + i % body.n) % 2**64
            params = sampling_params(
                body,
                max_tokens,
                seed,
                logprobs,
                text.vocab_size_per_layer_input,
                svc.sampling_defaults,
            )
            if choice.pinned or i == 0:
                sub.streams.append(add_choice(engine, sub, ids, choice.subnet, params))
            else:
                # Unpinned: the policy chooses the first choice's subnet at admission; the
                # others follow it, so one response is served by one subnet.
                sub.deferred.append((ids, params))
    except (ValueError, APIError) as e:
        for st in sub.streams:
            engine.abort(st.request_id)  # their release happens when their aborts finish
        for _ in range(len(plan) - len(sub.streams)):
            svc.limiter.release(tenant, 0)
        if isinstance(e, APIError):
            raise
        raise APIError(400, str(e), param=prompt_param) from None
    return sub


def add_choice(engine, sub: Submission, ids: list[int], subnet, params: SamplingParams):
    tags = {**sub.tags, "max_tokens": str(params.max_tokens)}
    return engine.add_request(ids, subnet, params, priority=sub.priority, tags=tags, tier=sub.tier)


async def start(request: Request, sub: Submission) -> RequestOutput:
    """Wait for the first output (it names the subnet the request got), then submit the
    choices that follow that subnet. Before any response byte is sent, so the subnet goes into
    the response header, and a request that failed at once gets a real error status."""
    svc: Service = request.app.state.service
    first = await until_disconnect(request, sub.streams[0].first(), sub.streams)
    sub.subnet_name = first.subnet or "none"
    if first.finish_reason in ("error", "abort") and not first.subnet:
        for _ in sub.deferred:  # never submitted
            svc.limiter.release(request.state.tenant, 0)
        sub.deferred.clear()
        for st in sub.streams:
            st.close()
        raise error_of(first)
    if sub.deferred:
        engine = svc.require_ready()
        subnet = svc.runtime.subnets[first.subnet]  # type: ignore[union-attr]
        for ids, params in sub.deferred:
            sub.streams.append(add_choice(engine, sub, ids, subnet, params))
        sub.deferred.clear()
    return first


async def collect(sub: Submission):
    """Every choice to its end: final outputs, and (text, logprobs) per choice."""
    finals: dict[int, RequestOutput] = {}
    pieces: dict[int, tuple[str, list]] = {i: ("", []) for i in range(len(sub.streams))}
    async for i, out in merge_streams(sub.streams):
        text, lps = pieces[i]
        pieces[i] = (text + out.text, lps + list(out.logprobs or ()))
        if out.finished:
            finals[i] = out
    return finals, pieces


def error_of(out: RequestOutput) -> APIError:
    return APIError(500, f"generation failed: {out.error or out.finish_reason}")
