"""OpenAI response shapes: complete bodies, stream chunks, logprobs and usage.

Owns turning engine outputs into what OpenAI clients parse: `chat.completion` and
`text_completion` bodies, their server-sent chunks (role first, held-back text skipped, the
usage chunk last when asked for), logprobs in each endpoint's format, usage counted as OpenAI
does, `system_fingerprint` naming the subnet that served the request, and where a chat output
holds tool calls, `message.tool_calls` or OpenAI's streamed `delta.tool_calls` (tool_calls.py
finds them).

Deliberately does not know: admission, limits, or how outputs are produced.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from server.api.errors import error_body
from server.api.service import DRAINING, Service
from server.api.streaming import merge_streams, sse
from server.api.submission import Submission
from server.api.tool_calls import ParsedOutput, ToolPlan, ToolStream, finish_reason, parse_output
from server.engine.outputs import RequestOutput


def usage(sub: Submission, finals: dict[int, RequestOutput]) -> dict:
    """OpenAI counts each prompt once, however many choices answer it."""
    prompt = sum(sub.prompt_lengths)
    completion = 0 if sub.score_only else sum(o.num_output_tokens for o in finals.values())
    firsts = [p * sub.n for p in range(len(sub.prompt_lengths))]
    cached = sum(finals[i].num_cached_tokens for i in firsts if i in finals)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def in_band_error(sub: Submission, out: RequestOutput) -> str | None:
    """The error event a stream ends with (then [DONE]) if this output ends it abnormally:
    the request failed, or a drain cut it short."""
    if out.finish_reason == "error":
        return sse(error_body(500, f"generation failed: {out.error}"))
    if out.finish_reason == "abort" and sub.cut_short:
        return sse(error_body(503, DRAINING, code="draining"))
    return None


def fingerprint(sub: Submission) -> str:
    return f"concentric:{sub.subnet_name}"


class TokenText:
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

    def prompt_logprobs(self, scored) -> list | None:
        """vLLM's `prompt_logprobs`: None for the first token, then per token a dict of id ->
        {logprob, rank, decoded_token}: the prompt's token with its rank, and the top k."""
        if scored is None:
            return None
        out: list = []
        for lp in scored:
            if lp is None:
                out.append(None)
                continue
            entry = {str(lp.token_id): self._vllm(lp.token_id, lp.logprob, lp.rank)}
            for rank, (tid, value) in enumerate(lp.top, start=1):
                entry.setdefault(str(tid), self._vllm(tid, value, rank))
            out.append(entry)
        return out

    def _vllm(self, token_id: int, logprob: float, rank: int) -> dict:
        return {"logprob": logprob, "rank": rank, "decoded_token": self.text(token_id)}


# ---- chat -----------------------------------------------------------------------------------


def chat_body(sub: Submission, body, finals, pieces, tokens: TokenText, plan: ToolPlan) -> dict:
    choices = []
    for i in range(len(sub.streams)):
        out = finals[i]
        parsed = parse_output(pieces[i][0], plan)
        message: dict = {"role": "assistant", "content": parsed.content}
        if parsed.calls:
            message["tool_calls"] = [c.as_openai() for c in parsed.calls]
        else:
            message["content"] = pieces[i][0]
        entry = {
            "index": i,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason(out.finish_reason, parsed),
            "stop_reason": out.stop_reason,
        }
        if body.logprobs:
            entry["logprobs"] = {
                "content": [
                    tokens.chat_entry(lp.token_id, lp.logprob, lp.top) for lp in pieces[i][1]
                ]
            }
        choices.append(entry)
    response = {"id": f"chatcmpl-{sub.response_id}", "object": "chat.completion"}
    response["choices"] = choices
    if body.prompt_logprobs is not None:  # vLLM: one list for the request (its one prompt)
        response["prompt_logprobs"] = tokens.prompt_logprobs(pieces[0][2])
    return response


def tool_call_deltas(calls) -> list[dict]:
    """OpenAI's streamed form of complete calls: per call, its id, type and name (arguments
    empty), then its arguments."""
    deltas = []
    for j, call in enumerate(calls):
        deltas.append(
            {
                "index": j,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
        )
        deltas.append({"index": j, "function": {"arguments": call.arguments}})
    return deltas


async def chat_chunks(
    sub: Submission, model: str, tokens: TokenText, include_usage: bool, plan: ToolPlan
) -> AsyncIterator[str]:
    base = {
        "id": f"chatcmpl-{sub.response_id}",
        "object": "chat.completion.chunk",
        "created": sub.created,
        "model": model,
        "system_fingerprint": fingerprint(sub),
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
    # Per choice, when the output is searched for calls: its text, with calls held back.
    held = {i: ToolStream(plan) for i in range(len(sub.streams))} if plan.parses else {}
    finals: dict[int, RequestOutput] = {}
    async for i, out in merge_streams(sub.streams):
        if (error := in_band_error(sub, out)) is not None:
            yield error
            break
        text = out.text if i not in held else held[i].push(out.text)
        calls: tuple = ()
        if out.finished and i in held:
            parsed = held[i].finish()
            text += parsed.content or ""
            calls = parsed.calls
        if not text and not out.finished and not out.logprobs:
            continue  # held-back text (an unfinished character, stop-string or call prefix)
        entry = {
            "index": i,
            "delta": {"content": text} if text else {},
            "logprobs": None,
            "finish_reason": out.finish_reason if out.finished and not calls else None,
        }
        if out.logprobs:
            entry["logprobs"] = {
                "content": [
                    tokens.chat_entry(lp.token_id, lp.logprob, lp.top) for lp in out.logprobs
                ]
            }
        if out.finished and not calls:
            entry["stop_reason"] = out.stop_reason
        if calls:
            # The text (if any) first, then each call, then the end with its own chunk.
            if text or out.logprobs:
                yield chunk([entry])
            for delta in tool_call_deltas(calls):
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {"tool_calls": [delta]},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            entry = {
                "index": i,
                "delta": {},
                "logprobs": None,
                "finish_reason": finish_reason(out.finish_reason, ParsedOutput(None, calls)),
                "stop_reason": out.stop_reason,
            }
        if out.finished:
            finals[i] = out
        yield chunk([entry])
    if include_usage and len(finals) == len(sub.streams):
        yield chunk([], usage=usage(sub, finals))
    yield "data: [DONE]\n\n"


# ---- completions ----------------------------------------------------------------------------


def completion_body(sub: Submission, body, finals, pieces, tokens: TokenText) -> dict:
    choices = []
    for i in range(len(sub.streams)):
        text, lps, scored = pieces[i]
        logprobs = None
        if sub.echo is not None:
            ids, echoed = sub.echo[i // sub.n]
            if body.logprobs is not None:
                logprobs = echo_logprobs(tokens, ids, echoed, scored)
                _extend(logprobs, completion_logprobs(tokens, lps, len(echoed)))
            text = echoed + text
        elif body.logprobs is not None:
            logprobs = completion_logprobs(tokens, lps)
        choices.append(
            {
                "index": i,
                "text": text,
                "finish_reason": "length" if sub.score_only else finals[i].finish_reason,
                "stop_reason": None if sub.score_only else finals[i].stop_reason,
                "logprobs": logprobs,
                "prompt_logprobs": tokens.prompt_logprobs(scored)
                if body.prompt_logprobs is not None
                else None,
            }
        )
    return {"id": f"cmpl-{sub.response_id}", "object": "text_completion", "choices": choices}


def _extend(into: dict, more: dict) -> None:
    for key, values in more.items():
        into[key].extend(values)


def echo_logprobs(tokens: TokenText, ids: list[int], echoed: str, scored) -> dict:
    """The echoed prompt's share of the legacy logprobs: its first token has no logprob (null,
    and null top_logprobs, as OpenAI and vLLM); `text_offset` indexes the response text, so a
    BOS the server added (not in the prompt text) takes no room."""
    out: dict[str, list] = {k: [] for k in ("tokens", "token_logprobs", "top_logprobs")}
    out["text_offset"] = []
    offset = 0
    for p, tid in enumerate(ids):
        text = tokens.text(tid)
        lp = scored[p] if scored is not None else None
        out["tokens"].append(text)
        out["token_logprobs"].append(None if lp is None else lp.logprob)
        top: dict[str, float] | None = None
        if lp is not None:
            top = {}
            for t, v in lp.top:
                top.setdefault(tokens.text(t), v)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        added = p == 0 and tid == tokens.tok.bos_id and not echoed.startswith(text)
        offset += 0 if added else len(text)
    return out


def completion_logprobs(tokens: TokenText, lps: list, offset: int = 0) -> dict:
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


async def completion_chunks(
    sub: Submission, model: str, tokens: TokenText, include_usage: bool
) -> AsyncIterator[str]:
    base = {
        "id": f"cmpl-{sub.response_id}",
        "object": "text_completion",
        "created": sub.created,
        "model": model,
        "system_fingerprint": fingerprint(sub),
    }
    finals: dict[int, RequestOutput] = {}
    offsets = [0] * len(sub.streams)  # per choice: text_offset counts from the choice's start
    echoing = set(range(len(sub.streams))) if sub.echo is not None else set()
    async for i, out in merge_streams(sub.streams):
        if (error := in_band_error(sub, out)) is not None:
            yield error
            break
        text, lps = ("", None) if sub.score_only else (out.text, out.logprobs)
        echo = i in echoing  # the choice's first chunk starts with the prompt
        if not text and not out.finished and not lps and not echo:
            continue
        logprobs = None
        if echo:
            echoing.discard(i)
            ids, echoed = sub.echo[i // sub.n]  # type: ignore[index]
            if out.logprobs is not None:  # logprobs were asked for
                logprobs = echo_logprobs(tokens, ids, echoed, out.prompt_logprobs)
            text, offsets[i] = echoed + text, len(echoed)
        if lps:
            more = completion_logprobs(tokens, list(lps), offsets[i])
            offsets[i] += sum(len(t) for t in more["tokens"])
            logprobs = more if logprobs is None else (_extend(logprobs, more) or logprobs)
        entry = {
            "index": i,
            "text": text,
            "finish_reason": ("length" if sub.score_only else out.finish_reason)
            if out.finished
            else None,
            "logprobs": logprobs,
        }
        if out.finished:
            entry["stop_reason"] = None if sub.score_only else out.stop_reason
            finals[i] = out
        yield sse({**base, "choices": [entry]})
    if include_usage and len(finals) == len(sub.streams):
        yield sse({**base, "choices": [], "usage": usage(sub, finals)})
    yield "data: [DONE]\n\n"


# ---- models ---------------------------------------------------------------------------------
