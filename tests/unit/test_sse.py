"""SSE framing (server/api/streaming.py): an event is one `data:` line to every line splitter a
client may use, and its JSON carries the text unchanged."""

from __future__ import annotations

import json

import httpx

from server.api.streaming import sse


def test_an_event_is_one_line_whatever_the_text_holds() -> None:
    # NEL, LINE SEPARATOR and PARAGRAPH SEPARATOR are line ends to str.splitlines and to httpx's
    # iter_lines (a model can generate them; JSON leaves them raw); CR, LF and the other
    # controls are escaped by JSON itself. Other characters stay UTF-8.
    text = "a\x85b\u2028c\u2029d\r\ne\x1cf\x0bg\x0ch é ✓"
    event = sse({"choices": [{"delta": {"content": text}}]})
    assert event.startswith("data: ") and event.endswith("\n\n") and "é ✓" in event
    readers = {
        "str.splitlines": event.splitlines(),
        "httpx iter_lines": list(httpx.Response(200, content=event.encode()).iter_lines()),
    }
    for reader, lines in readers.items():
        data = [line for line in lines if line]
        assert len(data) == 1, (reader, data)
        assert json.loads(data[0][len("data: ") :])["choices"][0]["delta"]["content"] == text
