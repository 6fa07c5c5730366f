"""Submitting an OpenAI request to the engine: every check that can refuse it, then its streams.

Owns what happens before a response starts, so that a refusal is a real status code and never an
in-band error, in an order that puts cheap checks before expensive work and charges the tenant's
limits only for requests that pass every check:
1. `gate`, before tokenizing: the model and the tier's right to it, `n`, max_tokens against the
   tier, the prompt's length in characters, and what the tenant's limits would say now (nothing
   is charged). While its prompt is tokenized the request counts against the tenant's
   concurrency (limits.py), so a tenant cannot pile up unadmitted work.
2. `submit`, after: the prompt's tokens against the tier and the context, the sampling parameters
   of every choice, the engine's own checks (the KV pool); then admission charges the limits (a
   `Reservation`), and the engine requests are queued.
An unpinned request's first choice is admitted by the subnet policy; its other choices (n > 1,
several prompts) follow the subnet it got, so one response is served by one subnet, named before
the first byte.

A submission is closed exactly once, whatever happened (`close`, from the response's end): its
unfinished engine requests are aborted, and choices that never ran are given back to the limiter.
Choices that ran are given back by the service when their engine requests finish. A drain may
`cut` a submission short; its response then ends with 503 (not started) or an error event.

Deliberately does not know: response shapes (responses.py) or HTTP routing (openai_routes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from fastapi import Request

from policies.snapshots import TierView
from server.api.errors import APIError
from server.api.limits import Refusal, Reservation
from server.api.protocol import SamplingFields
from server.api.service import DRAINING, Choice, Service
from server.api.streaming import merge_streams, until_disconnect
from server.engine.async_engine import AsyncEngine, RequestStream
from server.engine.outputs import RequestOutput
from server.tenancy import Tenant, Tier
from server.vocabulary.sampling_defaults import SamplingDefaults
from server.vocabulary.sampling_params import SamplingParams, SamplingParamsError
from server.vocabulary.structured_output import StructuredOutput
from server.vocabulary.subnets import Subnet

OPENAI = SamplingDefaults()


@dataclass(eq=False)
class Submission:
    """One API request as engine requests: choice index -> stream."""

    service: Service
    reservation: Reservation
    choice: Choice
    prompt_lengths: list[int]  # per prompt
    n: int
    tenant: Tenant
    created: int = field(default_factory=lambda: int(time.time()))
    response_id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    streams: list[RequestStream] = field(default_factory=list)  # choice i answers prompt i // n
    # Choices submitted once the first one's subnet is known (they follow it): (i, ids, params)
    deferred: list[tuple[int, list[int], SamplingParams]] = field(default_factory=list)
    subnet_name: str = ""  # the subnet that serves the request, once known
    cut_short: bool = False  # ended by a drain
    closed: bool = False
    # echo (completions): per prompt, its ids and the text the response starts with
    echo: list[tuple[list[int], str]] | None = None
    score_only: bool = False  # echo with max_tokens 0: the one generated token is dropped
    prompt_param: str = "prompt"  # the request field that carries the prompt (for 400s)

    @property
    def tier(self) -> TierView:
        return self.tenant.tier.view()

    def add_choice(
        self, engine: AsyncEngine, i: int, ids: list[int], subnet: Subnet | None, params
    ):
        request_id = uuid.uuid4().hex
        # Registered first: the service gives the choice back when the engine request finishes.
        self.service.reservations[request_id] = (self.reservation, i)
        try:
            stream = engine.add_request(
                ids,
                subnet,
                params,
                request_id=request_id,
                priority=self.tenant.tier.priority,
                tags={"tenant": self.tenant.name, "tier": self.tenant.tier.name},
                tier=self.tier,
            )
        except BaseException:
            del self.service.reservations[request_id]
            raise
        self.streams.append(stream)

    def cut(self) -> None:
        """End the request now (a drain ran out of time): abort its engine requests."""
        self.cut_short = True
        for st in self.streams:
            st.close()

    def close(self) -> None:
        """The response is over, however it ended. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for st in self.streams:
            st.close()  # aborts the request unless it finished
        for i, _, _ in self.deferred:
            self.reservation.release(i, None)  # never ran
        self.deferred.clear()
        self.service.live.discard(self)

    def error_of(self, out: RequestOutput) -> APIError:
        if self.cut_short:
            return APIError(503, DRAINING, code="draining", headers={"Retry-After": "1"})
        if out.refused:  # an engine elsewhere (a fleet's replica) found it could never run
            return APIError(400, out.error or "the request cannot run", param=self.prompt_param)
        return APIError(500, f"generation failed: {out.error or out.finish_reason}")


def sampling_params(
    body: SamplingFields,
    max_tokens: int,
    seed: int | None,
    logprobs: int | None,
    vocab: int,
    eos: Sequence[int],
    defaults: SamplingDefaults = OPENAI,
    structured: StructuredOutput | None = None,
) -> SamplingParams:
    """The request's SamplingParams: its own values, and `defaults` for the sampling fields it
    leaves unset (None), so an explicit value (even OpenAI's default) always wins. `structured`:
    what the output must match (the request's constraint or a compulsory tool call, chosen and
    compiled by the route: openai_routes.py)."""
    bias: list[tuple[int, float]] = []
    for key, value in (body.logit_bias or {}).items():
        try:
            bias.append((int(key), float(value)))
        except ValueError:
            raise APIError(
                400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
    prompt_logprobs = body.prompt_logprobs
    if prompt_logprobs is None and getattr(body, "echo", False):
        prompt_logprobs = logprobs  # echo shows the prompt's logprobs too (as vLLM)
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
        structured=structured,
        prompt_logprobs=prompt_logprobs,
    )
    try:
        params.validate(vocab, eos_token_ids=eos)
    except SamplingParamsError as e:
        raise APIError(400, str(e), param=e.param, code="invalid_value") from None
    return params


def _refuse(svc: Service, tier: Tier, refusal: Refusal | None) -> None:
    if refusal is None:
        return
    svc.metrics.reject(tier.name, refusal.limit)
    if refusal.never:
        raise APIError(
            400,
            f"request too large for the tier ({refusal.limit}): {refusal.message}",
            param="n" if refusal.limit != "tokens_per_minute" else "max_tokens",
            code="request_too_large",
        )
    raise APIError(
        429,
        f"rate limit ({refusal.limit}): {refusal.message}",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(refusal.retry_after)},
    )


async def decide(svc: Service, decision: Callable[..., Refusal | None], *args) -> Refusal | None:
    """A limiter's decision (`peek`, `admit`). One that asks a store in another process (a
    fleet's global limits, up to `limits_timeout_s` when the store does not answer) waits in a
    worker thread, so this process's event loop goes on serving everyone else meanwhile. A local
    limiter decides at once: nothing runs between its decision and what follows it."""
    if svc.limiter.asks_elsewhere:
        return await asyncio.to_thread(decision, *args)
    return decision(*args)


@contextlib.asynccontextmanager
async def gate(
    request: Request, body: SamplingFields, prompts: int, chars: int, prompt_param: str
) -> AsyncIterator[Choice]:
    """The checks that need no tokens (see the module docstring); the block runs while the
    request counts as being prepared. Yields the subnet choice."""
    svc: Service = request.app.state.service
    tenant: Tenant = request.state.tenant
    svc.require_ready()
    choice = svc.resolve(body.model, tenant)
    tier = tenant.tier
    if body.n > svc.config.max_n:
        raise APIError(400, f"n may be at most {svc.config.max_n}", param="n")
    requested = body.output_limit  # type: ignore[attr-defined]
    if requested is not None and requested > tier.max_output_tokens:
        param = "max_completion_tokens" if _uses_completion_tokens(body) else "max_tokens"
        raise APIError(
            400,
            f"{param} {requested} exceeds the limit of tier {tier.name!r} "
            f"({tier.max_output_tokens})",
            param=param,
        )
    assert svc.prompts is not None
    cap = svc.prompts.char_cap(tier.max_prompt_tokens)
    if chars > cap:
        raise APIError(
            400,
            f"the prompt has {chars} characters; at most {cap} are accepted for tier "
            f"{tier.name!r} (whose prompts may have {tier.max_prompt_tokens} tokens)",
            param=prompt_param,
            code="request_too_large",
        )
    requests = prompts * body.n
    # Every choice reserves at least one prompt token and one output token.
    at_least = requests * (1 + (requested or 1))
    _refuse(svc, tier, await decide(svc, svc.limiter.peek, tenant, at_least, requests))
    with svc.limiter.preparing(tenant, requests):
        yield choice


def _uses_completion_tokens(body: SamplingFields) -> bool:
    return getattr(body, "max_completion_tokens", None) is not None


async def submit(
    request: Request,
    body: SamplingFields,
    choice: Choice,
    prompts: Sequence[list[int]],
    logprobs: int | None,
    prompt_param: str,
    structured: StructuredOutput | None = None,
) -> Submission:
    svc: Service = request.app.state.service
    tenant: Tenant = request.state.tenant
    engine = svc.require_ready()
    tier = tenant.tier
    assert svc.runtime is not None
    text = svc.runtime.store.text
    vocab = text.vocab_size_per_layer_input
    eos = svc.runtime.tokenizer.stop_ids
    max_len = svc.config.max_model_len or text.max_position_embeddings
    requested = body.output_limit  # type: ignore[attr-defined]
    plan: list[tuple[list[int], int, SamplingParams]] = []
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
        for k in range(body.n):
            # n choices with a seed: choice k uses seed + k, so they differ yet reproduce.
            seed = None if body.seed is None else (body.seed + k) % 2**64
            params = sampling_params(
                body, max_tokens, seed, logprobs, vocab, eos, svc.sampling_defaults, structured
            )
            if k == 0:
                try:  # the engine's own checks (the KV pool), still before any charge
                    engine.check_request(ids, choice.subnet, params)
                except ValueError as e:
                    raise APIError(400, str(e), param=prompt_param) from None
            plan.append((ids, max_tokens, params))

    tokens = [len(ids) + m for ids, m, _ in plan]
    _refuse(svc, tier, await decide(svc, svc.limiter.admit, tenant, sum(tokens), len(plan)))
    reservation = Reservation(svc.limiter, tenant, tokens, [m for _, m, _ in plan])
    sub = Submission(svc, reservation, choice, [len(ids) for ids in prompts], body.n, tenant)
    sub.prompt_param = prompt_param
    svc.live.add(sub)
    try:
        for i, (ids, _, params) in enumerate(plan):
            if choice.pinned or i == 0:
                sub.add_choice(engine, i, ids, choice.subnet, params)
            else:
                # Unpinned: the policy chooses the first choice's subnet at admission; the
                # others follow it, so one response is served by one subnet.
                sub.deferred.append((i, ids, params))
    except BaseException:
        sub.close()
        raise
    return sub


async def start(request: Request, sub: Submission) -> RequestOutput:
    """Wait for the first output (it names the subnet the request got), then submit the
    choices that follow that subnet. Before any response byte is sent, so the subnet goes into
    the response header, and a request that failed at once gets a real error status. The caller
    closes the submission whatever happens here."""
    first = await until_disconnect(request, sub.streams[0].first(), sub.streams)
    sub.subnet_name = first.subnet or "none"
    if first.finished and first.finish_reason in ("error", "abort") and not first.subnet:
        raise sub.error_of(first)
    if sub.deferred:
        engine = sub.service.require_engine()  # admitted already: even while draining
        subnet = sub.service.runtime.subnets[first.subnet]  # type: ignore[union-attr]
        while sub.deferred:
            i, ids, params = sub.deferred[0]
            sub.add_choice(engine, i, ids, subnet, params)
            del sub.deferred[0]
    return first


async def collect(sub: Submission):
    """Every choice to its end: final outputs, and (text, logprobs, prompt logprobs) per
    choice. A score-only request's generated token is not part of its answer."""
    finals: dict[int, RequestOutput] = {}
    pieces: dict[int, tuple[str, list, tuple | None]] = {
        i: ("", [], None) for i in range(len(sub.streams))
    }
    async for i, out in merge_streams(sub.streams):
        text, lps, prompt_lps = pieces[i]
        if out.prompt_logprobs is not None:
            prompt_lps = out.prompt_logprobs
        if not sub.score_only:
            text, lps = text + out.text, lps + list(out.logprobs or ())
        pieces[i] = (text, lps, prompt_lps)
        if out.finished:
            finals[i] = out
    return finals, pieces
