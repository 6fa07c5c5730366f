"""`POST /v1/chat/completions`, `POST /v1/completions` and `GET /v1/models`.

Owns translating OpenAI requests into engine requests and engine outputs into OpenAI responses.
Everything that can refuse a request happens before the response starts (so a refusal is a real
status code, not an in-band error): the tier's right to the subnet, size limits, sampling
parameters, rate limits, and the engine's own checks (context length, KV pool). Then the request
is either collected (non-streaming) or streamed as server-sent events. A client that goes away
aborts its engine requests at once, streaming or not.

Deliberately does not know: how the engine schedules, or how the subnet was chosen.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from policies.snapshots import TierView
from server.api.errors import APIError, error_body
from server.api.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.api.service import Choice, Service
from server.api.streaming import merge_streams, sse, until_disconnect
from server.engine.async_engine import RequestStream
from server.engine.outputs import RequestOutput
from server.runtime.sampling_params import SamplingParams, SamplingParamsError
from server.runtime.tokenizer import TokenizerError
from server.tenancy import Tenant

router = APIRouter()
SUBNET_HEADER = "x-concentric-subnet"


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


def _unicode(text: str, param: str) -> str:
    """JSON may carry lone UTF-16 surrogates ("\\ud800") that no tokenizer can encode: a 400,
    not the tokenizer's TypeError (a 500)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(
            400, f"{param} is not valid Unicode (it contains a lone surrogate)", param=param
        ) from None
    return text


def _params(
    body: SamplingFields, max_tokens: int, seed: int | None, logprobs: int | None, vocab: int
) -> SamplingParams:
    bias: list[tuple[int, float]] = []
    for key, value in (body.logit_bias or {}).items():
        try:
            bias.append((int(key), float(value)))
        except ValueError:
            raise APIError(
                400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
    params = SamplingParams(
        max_tokens=max_tokens,
        min_tokens=body.min_tokens or 0,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        seed=seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
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


def _submit(
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
            params = _params(body, max_tokens, seed, logprobs, text.vocab_size_per_layer_input)
            if choice.pinned or i == 0:
                sub.streams.append(_add(engine, sub, ids, choice.subnet, params))
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


def _add(engine, sub: Submission, ids: list[int], subnet, params: SamplingParams):
    tags = {**sub.tags, "max_tokens": str(params.max_tokens)}
    return engine.add_request(ids, subnet, params, priority=sub.priority, tags=tags, tier=sub.tier)


async def _start(request: Request, sub: Submission) -> RequestOutput:
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
        raise _error_of(first)
    if sub.deferred:
        engine = svc.require_ready()
        subnet = svc.runtime.subnets[first.subnet]  # type: ignore[union-attr]
        for ids, params in sub.deferred:
            sub.streams.append(_add(engine, sub, ids, subnet, params))
        sub.deferred.clear()
    return first


def _usage(sub: Submission, finals: dict[int, RequestOutput]) -> dict:
    """OpenAI counts each prompt once, however many choices answer it."""
    prompt = sum(sub.prompt_lengths)
    completion = sum(o.num_output_tokens for o in finals.values())
    firsts = [p * sub.n for p in range(len(sub.prompt_lengths))]
    cached = sum(finals[i].num_cached_tokens for i in firsts if i in finals)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _fingerprint(sub: Submission) -> str:
    return f"concentric:{sub.subnet_name}"


def _error_of(out: RequestOutput) -> APIError:
    return APIError(500, f"generation failed: {out.error or out.finish_reason}")


class _Tokens:
    """Token ids to the strings and bytes OpenAI's logprobs show."""

    def __init__(self, svc: Service):
        self.tok = svc.runtime.tokenizer  # type: ignore[union-attr]
        self.cache: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tok.decode([token_id], skip_special_tokens=False)
        return self.cache[token_id]

    def bytes_of(self, token_id: int) -> list[int]:
        """The token's own bytes: a byte-fallback token (<0xE4>) is that one byte, not the
        replacement character its text decodes to."""
        piece = self.tok.hf.convert_ids_to_tokens(token_id)
        if (
            isinstance(piece, str)
            and len(piece) == 6
            and piece.startswith("<0x")
            and piece[-1] == ">"
        ):
            try:
                return [int(piece[3:5], 16)]
            except ValueError:
                pass
        return list(self.text(token_id).encode("utf-8"))

    def chat_entry(self, token_id: int, logprob: float, top) -> dict:
        def one(tid: int, lp: float) -> dict:
            return {"token": self.text(tid), "logprob": lp, "bytes": self.bytes_of(tid)}

        return {**one(token_id, logprob), "top_logprobs": [one(t, lp) for t, lp in top]}


# ---- chat -----------------------------------------------------------------------------------


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    svc: Service = request.app.state.service
    svc.require_ready()
    messages = [
        {
            "role": "system" if m.role == "developer" else m.role,
            "content": _unicode(m.text(), f"messages.{i}.content"),
        }
        for i, m in enumerate(body.messages)
    ]
    try:
        prompt_ids = svc.runtime.tokenizer.encode_chat(messages)  # type: ignore[union-attr]
    except TokenizerError as e:
        raise APIError(400, str(e), param="messages") from None
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    sub = _submit(request, body, [prompt_ids], logprobs, "messages")
    return await _respond(request, sub, body, _chat_stream, _chat_response)


def _chat_response(sub: Submission, body, finals, pieces, tokens: _Tokens) -> dict:
    choices = []
    for i in range(len(sub.streams)):
        out = finals[i]
        entry = {
            "index": i,
            "message": {"role": "assistant", "content": pieces[i][0]},
            "logprobs": None,
            "finish_reason": out.finish_reason,
            "stop_reason": out.stop_reason,
        }
        if body.logprobs:
            entry["logprobs"] = {
                "content": [
                    tokens.chat_entry(lp.token_id, lp.logprob, lp.top) for lp in pieces[i][1]
                ]
            }
        choices.append(entry)
    return {"id": f"chatcmpl-{sub.response_id}", "object": "chat.completion", "choices": choices}


async def _respond(request: Request, sub: Submission, body, streamer, assemble):
    """What both endpoints do once the request is submitted: learn the subnet, then stream
    server-sent events or collect every choice into one JSON body."""
    await _start(request, sub)
    headers = {SUBNET_HEADER: sub.subnet_name}
    tokens = _Tokens(request.app.state.service)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            streamer(sub, body.model, tokens, include_usage),
            media_type="text/event-stream",
            headers=headers,
        )
    finals, pieces = await until_disconnect(request, _collect(sub), sub.streams)
    for i in range(len(sub.streams)):
        if finals[i].finish_reason == "error":
            raise _error_of(finals[i])
    response = assemble(sub, body, finals, pieces, tokens)
    response.update(
        created=sub.created,
        model=body.model,
        system_fingerprint=_fingerprint(sub),
        usage=_usage(sub, finals),
    )
    return JSONResponse(response, headers=headers)


async def _collect(sub: Submission):
    """Every choice to its end: final outputs, and (text, logprobs) per choice."""
    finals: dict[int, RequestOutput] = {}
    pieces: dict[int, tuple[str, list]] = {i: ("", []) for i in range(len(sub.streams))}
    async for i, out in merge_streams(sub.streams):
        text, lps = pieces[i]
        pieces[i] = (text + out.text, lps + list(out.logprobs or ()))
        if out.finished:
            finals[i] = out
    return finals, pieces


async def _chat_stream(
    sub: Submission, model: str, tokens: _Tokens, include_usage: bool
) -> AsyncIterator[str]:
    base = {
        "id": f"chatcmpl-{sub.response_id}",
        "object": "chat.completion.chunk",
        "created": sub.created,
        "model": model,
        "system_fingerprint": _fingerprint(sub),
    }

    def chunk(choices: list, **extra) -> str:
        return sse({**base, "choices": choices, **extra})

    for i in range(len(sub.streams)):
        yield chunk(
            [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
    finals: dict[int, RequestOutput] = {}
    async for i, out in merge_streams(sub.streams):
        if out.finish_reason == "error":
            yield sse(error_body(500, f"generation failed: {out.error}"))
            break
        if not out.text and not out.finished and not out.logprobs:
            continue  # held-back text (an unfinished character or stop-string prefix)
        entry = {
            "index": i,
            "delta": {"content": out.text} if out.text else {},
            "logprobs": None,
            "finish_reason": out.finish_reason if out.finished else None,
        }
        if out.logprobs:
            entry["logprobs"] = {
                "content": [
                    tokens.chat_entry(lp.token_id, lp.logprob, lp.top) for lp in out.logprobs
                ]
            }
        if out.finished:
            entry["stop_reason"] = out.stop_reason
            finals[i] = out
        yield chunk([entry])
    if include_usage and len(finals) == len(sub.streams):
        yield chunk([], usage=_usage(sub, finals))
    yield "data: [DONE]\n\n"


# ---- completions ----------------------------------------------------------------------------


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    svc: Service = request.app.state.service
    svc.require_ready()
    tok = svc.runtime.tokenizer  # type: ignore[union-attr]
    p = body.prompt
    if isinstance(p, str):
        prompts = [tok.encode(_unicode(p, "prompt"))]
    elif all(isinstance(x, int) for x in p):
        prompts = [list(p)]  # type: ignore[arg-type]
    elif all(isinstance(x, str) for x in p):
        prompts = [tok.encode(_unicode(x, "prompt")) for x in p]  # type: ignore[arg-type]
    else:
        prompts = [list(x) for x in p]  # type: ignore[arg-type]
    # Text prompts only: ids past the text vocabulary are image/audio placeholders.
    vocab = svc.runtime.store.text.vocab_size_per_layer_input  # type: ignore[union-attr]
    if any(t < 0 or t >= vocab for ids in prompts for t in ids):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    sub = _submit(request, body, prompts, body.logprobs, "prompt")
    return await _respond(request, sub, body, _completion_stream, _completion_response)


def _completion_response(sub: Submission, body, finals, pieces, tokens: _Tokens) -> dict:
    choices = [
        {
            "index": i,
            "text": pieces[i][0],
            "finish_reason": finals[i].finish_reason,
            "stop_reason": finals[i].stop_reason,
            "logprobs": _completion_logprobs(tokens, pieces[i][1])
            if body.logprobs is not None
            else None,
        }
        for i in range(len(sub.streams))
    ]
    return {"id": f"cmpl-{sub.response_id}", "object": "text_completion", "choices": choices}


def _completion_logprobs(tokens: _Tokens, lps: list, offset: int = 0) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in lps:
        text = tokens.text(lp.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp.logprob)
        # Keyed by text: ids that read alike (byte tokens all read U+FFFD) share an entry, which
        # keeps the first (most likely) id's logprob, so the dict stays sorted and true.
        top: dict[str, float] = {}
        for t, v in lp.top:
            top.setdefault(tokens.text(t), v)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


async def _completion_stream(
    sub: Submission, model: str, tokens: _Tokens, include_usage: bool
) -> AsyncIterator[str]:
    base = {
        "id": f"cmpl-{sub.response_id}",
        "object": "text_completion",
        "created": sub.created,
        "model": model,
        "system_fingerprint": _fingerprint(sub),
    }
    finals: dict[int, RequestOutput] = {}
    offsets = [0] * len(sub.streams)  # per choice: text_offset counts from the choice's start
    async for i, out in merge_streams(sub.streams):
        if out.finish_reason == "error":
            yield sse(error_body(500, f"generation failed: {out.error}"))
            break
        if not out.text and not out.finished and not out.logprobs:
            continue
        logprobs = None
        if out.logprobs:
            logprobs = _completion_logprobs(tokens, list(out.logprobs), offsets[i])
            offsets[i] += sum(len(t) for t in logprobs["tokens"])
        entry = {
            "index": i,
            "text": out.text,
            "finish_reason": out.finish_reason if out.finished else None,
            "logprobs": logprobs,
        }
        if out.finished:
            entry["stop_reason"] = out.stop_reason
            finals[i] = out
        yield sse({**base, "choices": [entry]})
    if include_usage and len(finals) == len(sub.streams):
        yield sse({**base, "choices": [], "usage": _usage(sub, finals)})
    yield "data: [DONE]\n\n"


# ---- models ---------------------------------------------------------------------------------


@router.get("/v1/models")
async def list_models(request: Request):
    svc: Service = request.app.state.service
    svc.require_ready()
    rt = svc.runtime
    created = int(time.time())
    data = [
        {
            "id": svc.model_name,
            "object": "model",
            "created": created,
            "owned_by": "concentric",
            "root": str(svc.checkpoint),
            "parent": None,
            "max_model_len": svc.config.max_model_len or rt.store.text.max_position_embeddings,
            "concentric": {"subnets": len(rt.subnets), "chosen_by": "server"},
        }
    ]
    for s in rt.subnets:
        data.append(
            {
                "id": s.name,
                "object": "model",
                "created": created,
                "owned_by": "concentric",
                "root": svc.model_name,
                "parent": svc.model_name,
                "concentric": {
                    "title": s.title,
                    "effective_params": s.effective_params,
                    "quality": s.quality,
                    "layers": len(s.layers),
                    "skipped_layers": list(s.skipped(len(rt.subnets.full.layers))),
                    "kv_layout": s.kv_key,
                    "official": s.official,
                },
            }
        )
    return {"object": "list", "data": data}
