"""Draining on SIGTERM, on a server process of its own.

Proves: after SIGTERM, /ready is 503 at once (while /health stays 200), a new request gets 503 in
OpenAI's envelope, a streaming request already in flight runs to its normal end with exactly the
text it would have had anyway, and the process exits once that request is done.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.api.live import MODEL, LiveServer, error_of, reference, sse_events, start_server, text_of

if TYPE_CHECKING:
    from server.runtime.elastic import ElasticRuntime


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
        assert server.proc.poll() is None  # still serving the stream

        events = sse_events([first, *lines])  # raises unless data: [DONE] came
        done = time.monotonic()
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert text == text_of(rt, ref.tokens)
    server.proc.wait(timeout=20)  # exits once the in-flight request is done...
    assert time.monotonic() - done < 10  # ...not at the end of drain_timeout_s (30 s)
