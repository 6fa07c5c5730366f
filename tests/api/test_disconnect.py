"""Clients that go away on a live server: their requests are aborted and free everything.

Proves, through /metrics: 50 streaming requests cancelled mid-generation (each has streamed
tokens, then its connection closes) all end as aborts, and leave no running request and no KV
block held; and a non-streaming request whose client disconnects is aborted as well, without the
server logging an application error for it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable

import httpx

from tests.api.live import MODEL, LiveServer

ABORTED = "concentric_requests_aborted_total"
RUNNING = "concentric_requests_running"
KV_USED = "concentric_kv_cache_blocks_used"
# min_tokens = max_tokens: no request can end on its own before its client leaves.
LONG = {"max_tokens": 200, "min_tokens": 200}


def _wait_for(server: LiveServer, done: Callable[[dict[str, float]], bool], timeout: float = 15):
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if done(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


async def _stream_then_leave(client: httpx.AsyncClient, i: int) -> None:
    body = {
        "model": MODEL if i % 2 else "e2b",
        "messages": [{"role": "user", "content": f"story number {i}"}],
        "stream": True,
        **LONG,
    }
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = 0
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                events += 1
                if events == 3:  # the role chunk and two tokens: it is generating
                    break
    # Leaving the block closes this connection with the response unfinished.


def test_fifty_cancelled_streams_free_everything(server: LiveServer) -> None:
    before = server.metrics()

    async def run() -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=server.base_url, headers=server.headers(), timeout=60, limits=limits
        ) as client:
            await asyncio.gather(*(_stream_then_leave(client, i) for i in range(50)))

    asyncio.run(run())
    after = _wait_for(
        server,
        lambda m: m[ABORTED] >= before[ABORTED] + 50 and m[RUNNING] == 0 and m[KV_USED] == 0,
    )
    assert after[ABORTED] == before[ABORTED] + 50
    assert after[RUNNING] == 0
    assert after["concentric_requests_waiting"] == 0
    assert after[KV_USED] == 0


def test_non_streaming_client_disconnect_aborts(server: LiveServer) -> None:
    before = server.metrics()
    log_before = server.log_text().count("Exception in ASGI application")
    body = json.dumps({"model": MODEL, "prompt": "once upon a time", **LONG}).encode()
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {server.keys['alice']}\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        running = _wait_for(server, lambda m: m[RUNNING] == 1 and m[KV_USED] > 0)
        assert running[RUNNING] == 1 and running[KV_USED] > 0  # it is generating
    after = _wait_for(
        server, lambda m: m[ABORTED] == before[ABORTED] + 1 and m[RUNNING] == 0 and m[KV_USED] == 0
    )
    assert after[ABORTED] == before[ABORTED] + 1
    assert after[RUNNING] == 0 and after[KV_USED] == 0
    assert server.log_text().count("Exception in ASGI application") == log_before
