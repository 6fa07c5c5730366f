"""`POST /v1/chat/completions`, `POST /v1/completions` and `GET /v1/models`.

Owns the routes: parsing each endpoint's prompt into token ids, handing the request to
submission.py (every check that can refuse it, before the response starts), then either
streaming server-sent events or collecting every choice into one body (responses.py). A client
that goes away aborts its engine requests at once, streaming or not.

Deliberately does not know: how the engine schedules, or how the subnet is chosen.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest, CompletionRequest
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
from server.api.streaming import until_disconnect
from server.api.submission import Submission, collect, error_of, start, submit
from server.checkpoint.tokenizer import TokenizerError

router = APIRouter()
SUBNET_HEADER = "x-concentric-subnet"


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
    sub = submit(request, body, [prompt_ids], logprobs, "messages")
    return await _respond(request, sub, body, chat_chunks, chat_body)


async def _respond(request: Request, sub: Submission, body, streamer, assemble):
    """What both endpoints do once the request is submitted: learn the subnet, then stream
    server-sent events or collect every choice into one JSON body."""
    await start(request, sub)
    headers = {SUBNET_HEADER: sub.subnet_name}
    tokens = TokenText(request.app.state.service)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            streamer(sub, body.model, tokens, include_usage),
            media_type="text/event-stream",
            headers=headers,
        )
    finals, pieces = await until_disconnect(request, collect(sub), sub.streams)
    for i in range(len(sub.streams)):
        if finals[i].finish_reason == "error":
            raise error_of(finals[i])
    response = assemble(sub, body, finals, pieces, tokens)
    response.update(
        created=sub.created,
        model=body.model,
        system_fingerprint=fingerprint(sub),
        usage=usage(sub, finals),
    )
    return JSONResponse(response, headers=headers)


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
    sub = submit(request, body, prompts, body.logprobs, "prompt")
    return await _respond(request, sub, body, completion_chunks, completion_body)


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
                },
            }
        )
    return {"object": "list", "data": data}
