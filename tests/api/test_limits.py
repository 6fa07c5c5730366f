"""Per-tenant admission limits on a live server: requests per minute, tokens per minute and
concurrency.

Proves that exceeding each limit gives 429 in OpenAI's envelope with a `Retry-After` header and a
message naming the limit, and that the next request the limit allows succeeds. The tiers (see
live.py) are sized so each refusal and recovery takes a few seconds at most: token buckets hold a
minute's allowance and refill at allowance/60 per second.
"""

from __future__ import annotations

import time

import httpx

from tests.api.live import MODEL, LiveServer, error_of

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def _rejections(server: LiveServer, tier: str, limit: str) -> float:
    """concentric_requests_rejected_total for one tier and limit (0 before the first)."""
    text = httpx.get(server.base_url + "/metrics").text
    line = f'concentric_requests_rejected_total{{reason="{limit}",tier="{tier}"}} '
    return next((float(x[len(line) :]) for x in text.splitlines() if x.startswith(line)), 0.0)


def _refused(r: httpx.Response, limit: str) -> int:
    """Check a 429 names `limit`; return its Retry-After."""
    assert r.status_code == 429, r.text
    err = error_of(r)
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
    assert f"rate limit ({limit})" in err["message"]
    retry_after = int(r.headers["retry-after"])
    assert retry_after >= 1
    return retry_after


def test_requests_per_minute_refuses_with_retry_after(server: LiveServer) -> None:
    # rpm-2: a bucket of 2 requests refilled at 1 per 30 s.
    before = _rejections(server, "rpm-2", "requests_per_minute")
    with server.client("rpm2") as c:
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        third = c.post("/v1/chat/completions", json=CHAT)
    retry_after = _refused(third, "requests_per_minute")
    # One request's worth at 2/60 per second: 30 s, less the little the two requests took
    # (exact rounding is unit-tested with a fake clock).
    assert 25 <= retry_after <= 30
    assert "allows 2 requests per minute" in error_of(third)["message"]
    assert _rejections(server, "rpm-2", "requests_per_minute") == before + 1


def test_requests_per_minute_next_allowed_request_succeeds(server: LiveServer) -> None:
    # rpm-60: 60 requests of allowance, 1 more per second. One request of 60 choices (15 prompts
    # x n=4; each choice is charged as a request) empties the bucket; it is streamed so the next
    # request follows its admission at once, whatever its generation takes.
    burst = {"model": MODEL, "prompt": [[2, 300, 301]] * 15, "n": 4, "max_tokens": 1}
    with server.client("rpm60") as c, server.client("rpm60") as c2:
        with c.stream("POST", "/v1/completions", json={**burst, "stream": True}) as first:
            assert first.status_code == 200
            two = {**CHAT, "n": 2}  # needs 2 requests' allowance: ~2 s away
            retry_after = _refused(c2.post("/v1/chat/completions", json=two), "requests_per_minute")
            first.read()
        assert 1 <= retry_after <= 2
        time.sleep(retry_after)
        after = c2.post("/v1/chat/completions", json=two)
        assert after.status_code == 200, after.text
        assert len(after.json()["choices"]) == 2


def test_tokens_per_minute_refuses_then_admits(server: LiveServer) -> None:
    # tpm-120: 120 tokens of allowance, 2 more per second. A request reserves its prompt plus its
    # max_tokens: 109 + 1 leaves 10, so the next 14 + 1 is 5 short (2.5 s).
    before = _rejections(server, "tpm-120", "tokens_per_minute")
    with server.client("tpm") as c:
        big = {"model": MODEL, "prompt": [2] + [300] * 108, "max_tokens": 1}
        first = c.post("/v1/completions", json=big)
        assert first.status_code == 200 and first.json()["usage"]["prompt_tokens"] == 109
        small = {"model": MODEL, "prompt": [2] + [300] * 13, "max_tokens": 1}
        refused = c.post("/v1/completions", json=small)
        retry_after = _refused(refused, "tokens_per_minute")
        assert "allows 120 tokens per minute" in error_of(refused)["message"]
        assert "reserves 15" in error_of(refused)["message"]
        assert 1 <= retry_after <= 3  # 2.5 s less the time the first one took, rounded up
        assert _rejections(server, "tpm-120", "tokens_per_minute") == before + 1
        time.sleep(retry_after)
        assert c.post("/v1/completions", json=small).status_code == 200


def test_concurrency_refuses_while_a_stream_is_open(server: LiveServer) -> None:
    # solo: one request in flight. A stream held open blocks the next; once it ends, one passes.
    long = {**CHAT, "max_tokens": 24, "min_tokens": 24, "stream": True}
    before = _rejections(server, "solo", "concurrency")
    with server.client("solo") as c, server.client("solo") as c2:
        with c.stream("POST", "/v1/chat/completions", json=long) as held:
            assert held.status_code == 200
            lines = held.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # it is running
            refused = c2.post("/v1/chat/completions", json=CHAT)
            assert _refused(refused, "concurrency") == 1
            assert "allows 1 at once" in error_of(refused)["message"]
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        assert c2.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert _rejections(server, "solo", "concurrency") == before + 1
