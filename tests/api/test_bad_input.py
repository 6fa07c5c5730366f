"""Malformed and unservable requests against a live server: one table, one expectation each.

Proves that every bad request is refused before anything runs, with the right status (400, 404,
405, 413; never a 5xx, never FastAPI's 422), in OpenAI's envelope, with a message that says what
is wrong and, where one parameter is at fault, that parameter in `param`. After the whole table
the server still answers a normal request and /health is 200.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.api.live import MAX_BODY_BYTES, MAX_MODEL_LEN, MODEL, LiveServer, error_of

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "max_tokens": 2, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields}


def _drop(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


def _chunked(size: int) -> Iterator[bytes]:
    """A JSON body of about `size` bytes sent without a Content-Length (chunked)."""
    yield b'{"model": "gemma-3n-tiny", "prompt": "'
    for _ in range(size // 8192 + 1):
        yield b"a" * 8192
    yield b'"}'


@dataclass(frozen=True)
class Bad:
    name: str
    body: Any  # a dict (sent as JSON), bytes (sent as they are), or a callable giving an
    # iterator of bytes (sent chunked, without a Content-Length)
    status: int
    fragment: str  # must appear in the error message
    param: str | None = None  # expected `param`, when one parameter is at fault
    path: str = CHAT
    method: str = "POST"
    content_type: str = "application/json"  # for a bytes body


LONG_TEXT = "word " * MAX_MODEL_LEN  # more tokens than the context holds
CASES = [
    # -- not a request at all
    Bad("malformed JSON", b'{"model": ', 400, "not valid JSON"),
    Bad("not UTF-8", b"\xff\xfe{}", 400, "not valid JSON"),
    Bad("body is a list", b"[1, 2]", 400, "must be a JSON object"),
    Bad("body is a string", b'"hi"', 400, "must be a JSON object"),
    Bad("body is null", b"null", 400, "must be a JSON object"),
    Bad("empty body", b"", 400, "the request body is empty: send a JSON object"),
    Bad(
        "JSON labelled text/plain",
        json.dumps(chat()).encode(),
        400,
        "must be JSON sent with 'Content-Type: application/json', not 'text/plain'",
        content_type="text/plain",
    ),
    Bad(
        "lone surrogate in an unknown parameter's name",
        b'{"model": "gemma-3n-tiny", "messages": [{"role": "user", "content": "hi"}], '
        b'"\\ud800": 1}',
        400,
        "",
    ),
    # -- wrong JSON types (strict: no coercion)
    Bad("temperature as string", chat(temperature="0.5"), 400, "valid number", "temperature"),
    Bad("n as string", chat(n="2"), 400, "valid integer", "n"),
    Bad("n as bool", chat(n=True), 400, "valid integer", "n"),
    Bad("max_tokens as float", chat(max_tokens=1.5), 400, "valid integer", "max_tokens"),
    Bad("stream as string", chat(stream="true"), 400, "valid boolean", "stream"),
    Bad("stop as a number", chat(stop=5), 400, "valid string", "stop.str"),
    Bad("user as a number", chat(user=5), 400, "valid string", "user"),
    Bad(
        "prompt as an object",
        completion(prompt={"a": 1}),
        400,
        "prompt",
        "prompt.str",
        path=COMPLETIONS,
    ),
    # -- required fields, messages
    Bad("missing model", _drop(chat(), "model"), 400, "missing required parameter: 'model'"),
    Bad("empty model", chat(model=""), 400, "at least 1 character", "model"),
    Bad("missing messages", _drop(chat(), "messages"), 400, "'messages'", "messages"),
    Bad("empty messages", chat(messages=[]), 400, "at least 1 item", "messages"),
    Bad(
        "unknown role",
        chat(messages=[{"role": "function", "content": "x"}]),
        400,
        "'system', 'developer', 'user', 'assistant' or 'tool'",
        "messages.0.role",
    ),
    Bad(
        "message without content",
        chat(messages=[{"role": "user"}]),
        400,
        "a message needs content",
        "messages.0.content",
    ),
    Bad(
        "non-text content part",
        chat(
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        ),
        400,
        "must be a string or a list of text parts",
        "messages.0.content",
    ),
    Bad(
        "null content",
        chat(messages=[{"role": "user", "content": None}]),
        400,
        "this server accepts text only",
        "messages.0.content",
    ),
    Bad(
        "unknown field in a message",
        chat(messages=[{"role": "user", "content": "x", "audio": {}}]),
        400,
        "unsupported parameter: 'messages.0.audio'",
        "messages.0.audio",
    ),
    Bad(
        "tool calls in a user message",
        chat(messages=[{"role": "user", "content": "x", "tool_calls": []}]),
        400,
        "only an assistant message may have tool_calls",
        "messages.0.tool_calls",
    ),
    Bad(
        "tool message without tool_call_id",
        chat(messages=[{"role": "tool", "content": "x"}]),
        400,
        "needs the tool_call_id",
        "messages.0.tool_call_id",
    ),
    Bad(
        "roles out of order",
        chat(messages=[{"role": "assistant", "content": "x"}]),
        400,
        "chat template rejected the messages",
        "messages",
    ),
    Bad(
        "lone surrogate in content",
        b'{"model": "gemma-3n-tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
        400,
        "not valid Unicode",
        "messages.0.content",
    ),
    Bad(
        "lone surrogate in prompt",
        b'{"model": "gemma-3n-tiny", "prompt": "a\\udfffb"}',
        400,
        "not valid Unicode",
        "prompt",
        path=COMPLETIONS,
    ),
    # -- parameters this server does not support: named as unsupported
    # -- tools (more in test_tool_calls.py)
    Bad("empty tools", chat(tools=[]), 400, "tools must not be empty", "tools"),
    Bad("tool_choice without tools", chat(tool_choice="auto"), 400, "only allowed", "tool_choice"),
    Bad(
        "response_format of a type this server does not know",
        chat(response_format={"type": "structural_tag"}),
        400,
        "Input should be 'text', 'json_object' or 'json_schema'",
        "response_format.type",
    ),
    Bad(
        "guided_decoding_backend (vLLM's engine choice; this server has one)",
        chat(guided_decoding_backend="outlines"),
        400,
        "unsupported parameter: 'guided_decoding_backend'",
        "guided_decoding_backend",
    ),
    Bad(
        "max_tokens 0 without echo",
        completion(max_tokens=0),
        400,
        "max_tokens 0 is only allowed with echo",
        "max_tokens",
        path=COMPLETIONS,
    ),
    Bad("audio out", chat(modalities=["text", "audio"]), 400, "text only", "modalities"),
    Bad("suffix", completion(suffix="x"), 400, "suffix is not supported", path=COMPLETIONS),
    Bad("best_of", completion(best_of=2), 400, "best_of other than n", path=COMPLETIONS),
    # -- values out of range
    Bad("top_p 0", chat(top_p=0), 400, "greater than 0", "top_p"),
    Bad("temperature 3", chat(temperature=3), 400, "less than or equal to 2", "temperature"),
    Bad("presence_penalty 3", chat(presence_penalty=3), 400, "less than or equal to 2"),
    Bad("top_k negative", chat(top_k=-1), 400, "greater than or equal to 0", "top_k"),
    Bad("repetition_penalty 0", chat(repetition_penalty=0), 400, "greater than 0"),
    Bad("n 0", chat(n=0), 400, "greater than or equal to 1", "n"),
    Bad("n too large", chat(n=9), 400, "n may be at most 8", "n"),
    Bad("max_tokens 0", chat(max_tokens=0), 400, "greater than or equal to 1", "max_tokens"),
    Bad(
        "max_tokens past the tier limit",
        chat(max_tokens=257),
        400,
        "max_tokens 257 exceeds the limit of tier 'premium' (256)",
        "max_tokens",
    ),
    Bad(
        "max_tokens and max_completion_tokens disagree",
        chat(max_tokens=2, max_completion_tokens=3),
        400,
        "disagree",
    ),
    Bad("min_tokens above max_tokens", chat(min_tokens=5), 400, "min_tokens", "min_tokens"),
    Bad(
        "chat prompt longer than the context",
        chat(messages=[{"role": "user", "content": LONG_TEXT}]),
        400,
        f"the context length is {MAX_MODEL_LEN}",
        "messages",
    ),
    Bad(
        "token prompt longer than the context",
        completion(prompt=[2] * 600),
        400,
        f"the prompt has 600 tokens; the context length is {MAX_MODEL_LEN}",
        "prompt",
        path=COMPLETIONS,
    ),
    Bad(
        "max_tokens past the context",
        completion(prompt=[2] * 300, max_tokens=250),
        400,
        f"exceeds the context length {MAX_MODEL_LEN}",
        "max_tokens",
        path=COMPLETIONS,
    ),
    Bad("logit_bias non-integer key", chat(logit_bias={"abc": 1}), 400, "token ids", "logit_bias"),
    Bad("logit_bias id out of range", chat(logit_bias={"99999": 1}), 400, "[0, 512)", "logit_bias"),
    Bad("logit_bias value too large", chat(logit_bias={"5": 200}), 400, "[-100, 100]"),
    Bad(
        "completions logprobs > 20",
        completion(logprobs=21),
        400,
        "less than or equal to 20",
        "logprobs",
        path=COMPLETIONS,
    ),
    Bad("top_logprobs > 20", chat(logprobs=True, top_logprobs=21), 400, "less than or equal to 20"),
    Bad("top_logprobs without logprobs", chat(top_logprobs=2), 400, "requires logprobs"),
    Bad(
        "stream_options without stream",
        chat(stream_options={"include_usage": True}),
        400,
        "only allowed when stream is true",
    ),
    Bad("seed too large", chat(seed=2**64), 400, "less than 18446744073709551616", "seed"),
    Bad("seed too small", chat(seed=-(2**63) - 1), 400, "greater than or equal", "seed"),
    Bad("empty stop string", chat(stop=[""]), 400, "non-empty strings", "stop"),
    Bad("stop strings too long", chat(stop=["x" * 4097]), 400, "at most 4096 characters", "stop"),
    Bad(
        "stop string with a lone surrogate",
        b'{"model": "gemma-3n-tiny", "messages": [{"role": "user", "content": "hi"}], '
        b'"stop": ["a\\udc00"]}',
        400,
        "valid Unicode",
        "stop",
    ),
    Bad(
        "too many logit_bias entries",
        chat(logit_bias={str(i): 1 for i in range(1025)}),
        400,
        "at most 1024 entries",
        "logit_bias",
    ),
    Bad(
        "min_tokens while stop_token_ids cover the vocabulary",
        chat(min_tokens=1, stop_token_ids=list(range(512))),
        400,
        "cover the whole vocabulary",
        "min_tokens",
    ),
    Bad(
        "stop_token_ids out of range",
        chat(stop_token_ids=[99999]),
        400,
        "[0, 512)",
        "stop_token_ids",
    ),
    Bad(
        "prompt token id too large",
        completion(prompt=[2, 99999]),
        400,
        "prompt token ids must be in [0, ",
        "prompt",
        path=COMPLETIONS,
    ),
    Bad(
        "prompt token id negative",
        completion(prompt=[2, -1]),
        400,
        "prompt token ids must be in",
        "prompt",
        path=COMPLETIONS,
    ),
    Bad("empty prompt list", completion(prompt=[]), 400, "must not be empty", path=COMPLETIONS),
    Bad(
        "empty prompt in a batch",
        completion(prompt=[[2, 3], []]),
        400,
        "the prompt is empty",
        "prompt",
        path=COMPLETIONS,
    ),
    # -- routing, size, method
    Bad("unknown model", chat(model="gemma-9000"), 404, "does not exist", "model"),
    Bad("unknown subnet", chat(model="e9b"), 404, "GET /v1/models", "model"),
    Bad(
        "body over max_body_bytes",
        completion(prompt="a" * MAX_BODY_BYTES),
        413,
        f"exceeds {MAX_BODY_BYTES} bytes",
        path=COMPLETIONS,
    ),
    Bad(
        "chunked body over max_body_bytes",
        lambda: _chunked(MAX_BODY_BYTES),
        413,
        f"exceeds {MAX_BODY_BYTES} bytes",
        path=COMPLETIONS,
    ),
    Bad("GET on a POST route", None, 405, "method not allowed", method="GET"),
    Bad("PUT on a POST route", chat(), 405, "method not allowed", method="PUT", path=COMPLETIONS),
]

EXPECTED_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "invalid_request_error",
}


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 25
    assert len({c.name for c in CASES}) == len(CASES)


def _send(client: httpx.Client, case: Bad) -> httpx.Response:
    if isinstance(case.body, dict):
        return client.request(case.method, case.path, json=case.body)
    content = case.body() if callable(case.body) else case.body
    headers = {"content-type": case.content_type} if content is not None else {}
    return client.request(case.method, case.path, content=content, headers=headers)


def test_bad_requests(server: LiveServer) -> None:
    failures = []
    with server.client() as client:
        for case in CASES:
            try:
                r = _send(client, case)
            except httpx.TransportError as e:  # e.g. a 500 that closed the connection
                failures.append(f"{case.name}: {type(e).__name__}: {e}")
                continue
            try:
                assert r.status_code == case.status, f"status {r.status_code}: {r.text[:300]}"
                err = error_of(r)
                assert case.fragment in err["message"], err["message"]
                if case.param is not None:
                    assert err["param"] == case.param, err
                if case.status in EXPECTED_TYPES:
                    assert err["type"] == EXPECTED_TYPES[case.status], err
            except AssertionError as e:
                failures.append(f"{case.name}: {e}")
        assert not failures, "\n".join(failures)

        # Still serving, and healthy.
        ok = client.post(CHAT, json=chat())
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["role"] == "assistant"
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    assert json.loads(httpx.get(server.base_url + "/ready").text)["status"] == "ready"


@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_start_nothing(server: LiveServer, stream: bool) -> None:
    # A refusal happens before the response starts, streaming or not: a real status, and no
    # engine request was queued (nothing finished, nothing aborted).
    before = server.metrics()
    with server.client() as client:
        r = client.post(CHAT, json=chat(max_tokens=257, stream=stream))
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    after = server.metrics()
    assert after["concentric_requests_aborted_total"] == before["concentric_requests_aborted_total"]
    assert after["concentric_requests_running"] == 0


def test_chunked_body_within_the_limit_is_served(server: LiveServer) -> None:
    # Without a Content-Length the server reads the body to check its size; a body under the
    # limit then reaches the route whole, streaming response included.
    body = json.dumps(chat(stream=True, max_tokens=3)).encode()
    parts = iter([body[:10], body[10:]])
    with server.client() as client:
        r = client.post(CHAT, content=parts, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.text.rstrip().endswith("data: [DONE]")
