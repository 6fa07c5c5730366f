"""`POST /v1/chat/completions`, `POST /v1/completions` and `GET /v1/models`.

Owns the routes: each endpoint's prompt, first as text for the checks that need no tokens
(submission.gate), then as token ids from the tokenizing pool (prompts.py), handing the request
to submission.py (every check that can refuse it, before the response starts; a structured-output
constraint is compiled just before, off the event loop), then either
streaming server-sent events or collecting every choice into one body (responses.py). A client
that goes away aborts its engine requests at once, streaming or not. A chat request with tools
or tool messages is rendered with the tool template, and a compulsory call constrains the output
to its schema (tool_calls.py).

Deliberately does not know: how the engine schedules, or how the subnet is chosen.
"""

from __future__ import annotations

import json
import time
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.api.constraints import compile_constraint, requested_constraint
from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from server.api.responses import (
    TokenText,
    chat_body,
    chat_chunks,
    completion_body,
    completion_chunks,
    fingerprint,
    usage,
)
from server.api.service import Service
from server.api.streaming import ClosingStream, until_disconnect
from server.api.submission import Submission, collect, gate, start, submit
from server.api.tool_calls import plan_of, renderer, template_messages, uses_tools
from server.checkpoint.tokenizer import TokenizerError
from server.tenancy import Tenant
from server.vocabulary.structured_output import StructuredOutput

router = APIRouter()
SUBNET_HEADER = "x-concentric-subnet"


def unicode_text(text: str, param: str) -> str:
    """JSON may carry lone UTF-16 surrogates ("\\ud800") that no tokenizer can encode: a 400,
    not the tokenizer's TypeError (a 500)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(
            400, f"{param} is not valid Unicode (it contains a lone surrogate)", param=param
        ) from None
    return text


def _refuse_conflicts(body: ChatCompletionRequest | CompletionRequest) -> None:
    conflict = body.conflict()
    if conflict is not None:
        raise APIError(400, conflict[1], param=conflict[0])


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The messages as the chat template takes them (a developer message is a system one)."""
    return [
        {
            "role": "system" if m.role == "developer" else m.role,
            "content": unicode_text(m.text(), f"messages.{i}.content"),
        }
        for i, m in enumerate(messages)
    ]


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    _refuse_conflicts(body)
    svc: Service = request.app.state.service
    tenant: Tenant = request.state.tenant
    plan = plan_of(body)  # 400s for wrong tools, before anything else is done
    constraint = output_constraint(body, plan)
    render = tools = None
    if uses_tools(body):
        messages = _unicode_all(template_messages(body.messages), "messages")
        tools = _unicode_all([f.as_prompt() for f in plan.functions], "tools") or None
        assert svc.tool_template is not None
        render = renderer(svc.tool_template, plan)
    else:
        messages = chat_messages(body.messages)
    chars = sum(len(m["content"]) for m in messages)
    if render is not None:  # every string of the messages and tools is rendered into the prompt
        chars = _chars(messages) + _chars(tools)
    async with gate(request, body, 1, chars, "messages") as choice:
        # Every turn costs the template's markup too, so the message count is bounded before
        # templating (pure Python) runs.
        if len(messages) > tenant.tier.max_prompt_tokens // 2 + 1:
            raise APIError(
                400,
                f"{len(messages)} messages; tier {tenant.tier.name!r} allows prompts of "
                f"{tenant.tier.max_prompt_tokens} tokens, and each message adds some",
                param="messages",
            )
        try:
            prompt_ids = await svc.prompts.encode_chat(  # type: ignore[union-attr]
                tenant.name, messages, tools=tools, render=render
            )
        except TokenizerError as e:
            raise APIError(400, str(e), param="messages") from None
        _text_ids(svc, [prompt_ids], "messages")
        await compile_constraint(svc, tenant.name, constraint)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        structured = constraint[0] if constraint is not None else None
        sub = await submit(request, body, choice, [prompt_ids], logprobs, "messages", structured)
    return await _respond(
        request, sub, body, partial(chat_chunks, plan=plan), partial(chat_body, plan=plan)
    )


def output_constraint(body: ChatCompletionRequest, plan) -> tuple[StructuredOutput, str] | None:
    """What a chat request's output must match, and the field that asked: its own constraint
    (response_format, guided_*), or the call that tool_choice makes compulsory. Not both: the
    call's format is fixed, so a second constraint could only contradict it."""
    asked = requested_constraint(body)
    schema = plan.call_schema()
    if schema is None:
        return asked
    if asked is not None:
        raise APIError(
            400,
            f"tool_choice forces a tool call, whose format is fixed; {asked[1]} cannot "
            "constrain the same output (send one of them)",
            param="tool_choice",
        )
    return StructuredOutput("json_schema", json.dumps(schema)), "tool_choice"


def _unicode_all(value, param: str):
    """`unicode_text` for every string in nested dicts and lists (their keys too)."""
    if isinstance(value, str):
        return unicode_text(value, param)
    if isinstance(value, dict):
        for k, v in value.items():
            _unicode_all(k, param)
            _unicode_all(v, param)
    elif isinstance(value, list):
        for v in value:
            _unicode_all(v, param)
    return value


def _chars(value) -> int:
    """Characters in every string of nested dicts and lists."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_chars(k) + _chars(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    return 0


def _text_ids(svc: Service, prompts: list[list[int]], param: str) -> None:
    """Text prompts only: ids past the text vocabulary are image/audio placeholders."""
    vocab = svc.runtime.store.text.vocab_size_per_layer_input  # type: ignore[union-attr]
    if any(t < 0 or t >= vocab for ids in prompts for t in ids):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", param=param)


async def _respond(request: Request, sub: Submission, body, streamer, assemble):
    """What both endpoints do once the request is submitted: learn the subnet, then stream
    server-sent events or collect every choice into one JSON body. The submission is closed
    when the response is over, however it ends (a stream closes it when it is done sending)."""
    streaming = False
    try:
        await start(request, sub)
        headers = {SUBNET_HEADER: sub.subnet_name}
        tokens = TokenText(request.app.state.service)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            response = ClosingStream(
                streamer(sub, body.model, tokens, include_usage),
                on_close=sub.close,
                media_type="text/event-stream",
                headers=headers,
            )
            streaming = True
            return response
        finals, pieces = await until_disconnect(request, collect(sub), sub.streams)
        for i in range(len(sub.streams)):
            if finals[i].finish_reason in ("error", "abort"):
                raise sub.error_of(finals[i])
        response = assemble(sub, body, finals, pieces, tokens)
        response.update(
            created=sub.created,
            model=body.model,
            system_fingerprint=fingerprint(sub),
            usage=usage(sub, finals),
        )
        return JSONResponse(response, headers=headers)
    finally:
        if not streaming:
            sub.close()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    _refuse_conflicts(body)
    svc: Service = request.app.state.service
    tenant: Tenant = request.state.tenant
    p = body.prompt
    texts: list[str] = []
    if isinstance(p, str):
        texts = [unicode_text(p, "prompt")]
    elif all(isinstance(x, str) for x in p):
        texts = [unicode_text(x, "prompt") for x in p]  # type: ignore[arg-type]
    given: list[list[int]] = []
    if not texts:
        given = [list(p)] if all(isinstance(x, int) for x in p) else [list(x) for x in p]  # type: ignore[arg-type,misc]
    chars = sum(len(t) for t in texts)
    constraint = requested_constraint(body)
    async with gate(request, body, len(texts) or len(given), chars, "prompt") as choice:
        prompts = await svc.prompts.encode(tenant.name, texts) if texts else given  # type: ignore[union-attr]
        _text_ids(svc, prompts, "prompt")
        await compile_constraint(svc, tenant.name, constraint)
        structured = constraint[0] if constraint is not None else None
        sub = await submit(request, body, choice, prompts, body.logprobs, "prompt", structured)
    if body.echo:
        # The response starts with each prompt: as sent (text), or its ids decoded.
        tok = svc.runtime.tokenizer  # type: ignore[union-attr]
        shown = texts or [tok.decode(ids, skip_special_tokens=False) for ids in prompts]
        sub.echo = list(zip(prompts, shown, strict=True))
        sub.score_only = body.score_only
    return await _respond(request, sub, body, completion_chunks, completion_body)


@router.get("/v1/models")
async def list_models(request: Request):
    svc: Service = request.app.state.service
    svc.require_ready()
    rt = svc.runtime
    created = int(time.time())
    # The values a request gets for sampling fields it leaves unset (every model shares them).
    defaults = svc.sampling_defaults.as_dict()
    data = [
        {
            "id": svc.model_name,
            "object": "model",
            "created": created,
            "owned_by": "concentric",
            "root": svc.model_name,  # never the checkpoint's path on the server
            "parent": None,
            "max_model_len": svc.config.max_model_len or rt.store.text.max_position_embeddings,
            "concentric": {
                "subnets": len(rt.subnets),
                "chosen_by": "server",
                "sampling_defaults": defaults,
            },
        }
    ]
    for s in rt.subnets:
        measured = rt.subnets.measured.get(s.name)
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
                    # Measured held-out quality (100 / perplexity) where the checkpoint has
                    # it, else the table's MMLU; `quality_source` says which.
                    "quality": measured.score if measured else s.quality,
                    "quality_source": "measured" if measured else "table",
                    "heldout_perplexity": measured.perplexity if measured else None,
                    "layers": len(s.layers),
                    "skipped_layers": list(s.skipped(len(rt.subnets.full.layers))),
                    "kv_layout": s.kv_key,
                    "official": s.official,
                    "sampling_defaults": defaults,
                },
            }
        )
    return {"object": "list", "data": data}
