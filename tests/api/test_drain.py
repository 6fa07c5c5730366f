"""Draining on SIGTERM, on a server process of its own.

Proves: after SIGTERM, /ready is 503 at once (while /health stays 200), a new request gets 503 in
OpenAI's envelope with Retry-After, a streaming request already in flight runs to its normal end
with exactly the text it would have had anyway, and the process exits once that request is done.
And when requests outlive `drain_timeout_s`: the process exits within a second of it; requests
whose response had not started (queued, streaming or not) get 503 in the envelope with
Retry-After; running streams end with an error event and `data: [DONE]`; nothing is logged as an
error or with a traceback.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.api.live import MODEL, LiveServer, error_of, reference, sse_events, start_server, text_of

if TYPE_CHECKING:
    from server.runtime.elastic import ElasticRuntime

# Deadlines of a second or two (exit within a second of drain_timeout_s): see `alone` in dev.sh.
pytestmark = pytest.mark.alone


@pytest.fixture
def own_server(tiny_dir: Path, tmp_path: Path) -> Iterator[LiveServer]:
    live = start_server(tmp_path / "drain", tiny_dir)
    try:
        yield live
    finally:
        live.stop()


def test_sigterm_drains_then_exits(own_server: LiveServer, rt: ElasticRuntime) -> None:
    server = own_server
    messages = [{"role": "user", "content": "Describe a lighthouse."}]
    ref = reference(rt, "e2b", rt.tokenizer.encode_chat(messages), 40)
    # Precondition: this prompt runs the full 40 tokens (no stop id), long enough to still be
    # generating while the checks below happen.
    assert ref.finish_reason == "length"
    body = {
        "model": "e2b",
        "messages": messages,
        "max_tokens": 40,
        "temperature": 0,
        "stream": True,
    }
    with server.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))

        server.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        while httpx.get(server.base_url + "/ready").status_code != 503:
            assert time.monotonic() - t0 < 2, "/ready did not turn 503"
            time.sleep(0.02)
        assert httpx.get(server.base_url + "/ready").json() == {"status": "draining"}
        assert httpx.get(server.base_url + "/health").status_code == 200
        late = httpx.post(
            server.base_url + "/v1/chat/completions",
            json={"model": MODEL, "messages": messages, "max_tokens": 1},
            headers=server.headers(),
        )
        assert late.status_code == 503
        err = error_of(late)
        assert err["code"] == "draining" and "shutting down" in err["message"]
        assert err["type"] == "service_unavailable"
        assert late.headers["retry-after"] == "1"
        assert server.proc.poll() is None  # still serving the stream

        events = sse_events([first, *lines])  # raises unless data: [DONE] came
        done = time.monotonic()
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert text == text_of(rt, ref.tokens)
    server.proc.wait(timeout=20)  # exits once the in-flight request is done...
    assert time.monotonic() - done < 10  # ...not at the end of drain_timeout_s (30 s)


def _wait_for(server: LiveServer, gauge: str, value: float, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while server.metrics()[gauge] < value:
        assert time.monotonic() < deadline, f"{gauge} never reached {value}:\n{server.log_text()}"
        time.sleep(0.05)


def _raw_post(server: LiveServer, tenant: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {server.keys[tenant]}\r\n".encode()
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_requests_outliving_the_drain_are_ended_on_time(tiny_dir: Path, tmp_path: Path) -> None:
    drain_s = 1.0
    # Two sequences per step: two long streams run, everything after them queues.
    server = start_server(tmp_path / "cut", tiny_dir, drain_timeout_s=drain_s, max_num_seqs=2)
    try:
        # min_tokens = max_tokens = 250 (premium's most): 250 steps of a 35-layer model, far
        # longer than the drain on any CPU (it would take steps under 4 ms).
        long = {"model": MODEL, "max_tokens": 250, "min_tokens": 250}
        running = [
            _raw_post(server, "alice", {**long, "prompt": f"r{i}", "stream": True})
            for i in range(2)
        ]
        _wait_for(server, "concentric_requests_running", 2)
        queued = [
            _raw_post(server, "carol", {**long, "prompt": "q", "stream": s})
            for s in (False, False, True)
        ]
        _wait_for(server, "concentric_requests_waiting", 3)

        replies: dict[int, bytes] = {}
        readers = [
            threading.Thread(target=lambda i=i, s=s: replies.__setitem__(i, _read_all(s)))
            for i, s in enumerate(running + queued)
        ]
        for r in readers:
            r.start()
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=30)
        exited = time.monotonic() - start
        for r in readers:
            r.join(10)
    finally:
        server.stop()
    # Before: about 2 x drain_timeout_s + 5 s, and queued requests got a plain-text 500.
    assert exited < drain_s + 1.0, exited
    for i in range(2):  # the running streams (a 200: they had their first token) end with
        text = replies[i].decode()  # the error event, then [DONE]
        assert text.startswith("HTTP/1.1 200")
        events = [line for line in text.splitlines() if line.startswith("data:")]
        assert events[-1] == "data: [DONE]", events[-3:]
        error = json.loads(events[-2][len("data:") :])
        assert error["error"]["code"] == "draining", error
    for i in range(2, 5):  # the queued ones: a real 503 in the envelope
        head, _, body = replies[i].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), replies[i][:200]
        assert b"retry-after: 1" in head.lower()
        assert json.loads(body)["error"]["code"] == "draining"
    log = server.log_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
