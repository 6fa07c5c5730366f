"""`POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info`, in vLLM's shapes.

Owns the routes: a completions prompt or chat messages to the ids the server would run
(`{"count", "max_model_len", "tokens", "token_strs"}`), ids back to text (`{"prompt"}`), and the
tokenizer's special tokens and chat template, so that a client (an evaluation harness such as
lm-eval's remote tokenizer) can count and align tokens exactly as the server does. They
are authenticated like every route; tokenizing and decoding run in the tokenizing pool, off the
event loop with the tenant's fair share (prompts.py), after the same character cap as a
completion's prompt. Nothing is generated, so nothing is charged to the tenant's rate limits (as
vLLM, which does not count them either).

Deliberately does not know: the engine, sampling, or response shapes of the OpenAI routes.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.errors import APIError
from server.api.openai_routes import chat_messages, unicode_text
from server.api.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizePromptRequest
from server.api.service import Service
from server.checkpoint.tokenizer import TokenizerError
from server.tenancy import Tenant

router = APIRouter()


def _checked(request: Request, model: str | None, chars: int, param: str) -> Service:
    svc: Service = request.app.state.service
    tenant: Tenant = request.state.tenant
    svc.require_ready()
    if model is not None:
        svc.resolve(model, tenant)  # 404 for an unknown model, 403 for a subnet not allowed
    assert svc.prompts is not None
    cap = svc.prompts.char_cap(tenant.tier.max_prompt_tokens)
    if chars > cap:
        raise APIError(
            400,
            f"the text has {chars} characters; at most {cap} are accepted for tier "
            f"{tenant.tier.name!r}",
            param=param,
            code="request_too_large",
        )
    return svc


@router.post("/tokenize")
async def tokenize(body: TokenizeChatRequest | TokenizePromptRequest, request: Request):
    tenant: Tenant = request.state.tenant
    if isinstance(body, TokenizePromptRequest):
        text = unicode_text(body.prompt, "prompt")
        svc = _checked(request, body.model, len(text), "prompt")
        pool = svc.prompts
        assert pool is not None
        if body.add_special_tokens:
            [ids] = await pool.encode(tenant.name, [text])
        else:
            ids = await pool.encode_bare(tenant.name, text)
    else:
        messages = chat_messages(body.messages)
        chars = sum(len(m["content"]) for m in messages)
        svc = _checked(request, body.model, chars, "messages")
        pool = svc.prompts
        assert pool is not None
        try:
            ids = await pool.encode_chat(tenant.name, messages, body.add_generation_prompt)
        except TokenizerError as e:
            raise APIError(400, str(e), param="messages") from None
        if body.add_special_tokens:
            ids = [svc.runtime.tokenizer.bos_id, *ids]  # type: ignore[union-attr]
    rt = svc.runtime
    assert rt is not None
    strs = None
    if body.return_token_strs:
        strs = rt.tokenizer.hf.convert_ids_to_tokens(ids)
    return {
        "count": len(ids),
        "max_model_len": svc.config.max_model_len or rt.store.text.max_position_embeddings,
        "tokens": ids,
        "token_strs": strs,
    }


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    """What vLLM's /tokenizer_info gives a client that tokenizes through this server."""
    svc = _checked(request, None, 0, "")
    rt = svc.runtime
    assert rt is not None
    hf = rt.tokenizer.hf
    return {
        "tokenizer_class": type(hf).__name__,
        "bos_token": hf.bos_token,
        "eos_token": hf.eos_token,
        "pad_token": hf.pad_token,
        "unk_token": hf.unk_token,
        "chat_template": hf.chat_template,
        "model_max_length": svc.config.max_model_len or rt.store.text.max_position_embeddings,
    }


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    tenant: Tenant = request.state.tenant
    svc = _checked(request, body.model, 0, "tokens")
    rt = svc.runtime
    assert rt is not None and svc.prompts is not None
    vocab = rt.tokenizer.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is not in [0, {vocab})", param="tokens")
    return {"prompt": await svc.prompts.decode(tenant.name, body.tokens)}
