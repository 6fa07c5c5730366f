"""Server-sent events, merging several choices' streams, and noticing clients that go away.

Owns the mechanics under the routes: SSE framing (`data: <json>` per event, one line whatever
the text holds, `data: [DONE]` at the end), interleaving the outputs of `n` engine requests as
they come, and aborting every engine request of an API request the moment its client
disconnects. For a streaming response the server framework cancels the generator on disconnect,
which closes the engine streams (each aborts itself when closed early); a non-streaming request
is watched for disconnects while it runs.
`ClosingStream` runs a callback when a streamed response is over, however it ended: also when
the client left before the body began, when the generator never runs at all.

Deliberately does not know: OpenAI's chunk shapes (openai_routes.py) or the engine's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.errors import APIError
from server.engine.async_engine import RequestStream
from server.engine.outputs import RequestOutput

T = TypeVar("T")
_DONE = object()


# Characters that Python's str.splitlines, and so httpx's `iter_lines`, take for line ends besides
# CR and LF, and that JSON leaves as they are (it escapes the other controls). Escaped in an event,
# so that a client reading the stream line by line with either never cuts an event in two.
_LINE_ENDS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: dict[str, Any]) -> str:
    """One event: `data: <json>` on one line, whatever the text holds (UTF-8 otherwise)."""
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).translate(_LINE_ENDS)
    return f"data: {data}\n\n"


async def merge_streams(
    streams: Sequence[RequestStream],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) from all streams, in arrival order, until every one finishes."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        finally:
            await queue.put((i, _DONE))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, out = await queue.get()
            if out is _DONE:
                remaining -= 1
                continue
            yield i, out
    finally:
        for t in tasks:  # cancelled: each stream's iterator closes and aborts its request
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnect(
    request: Request, work: Awaitable[T], streams: Sequence[RequestStream]
) -> T:
    """Run `work`; if the client disconnects first, abort its streams and raise APIError(499).

    The disconnect is awaited, not polled: once the body is read, the server's next message
    for the request is its disconnect, so a client that left (even before the work began)
    releases its engine requests within one loop iteration rather than one poll interval."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        for s in streams:
            s.close()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # A response nobody reads (the server drops it), rather than CancelledError, which
        # the server would log as an ASGI application error with a traceback.
        raise APIError(499, "the client closed the request", code="client_disconnected")
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            for s in streams:
                s.close()


async def _disconnected(request: Request) -> None:
    """Return when the client has gone (the body was read in full before the app ran)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClosingStream(StreamingResponse):
    """A streaming response that calls `on_close` once it is over, whatever happened."""

    def __init__(self, content, on_close: Callable[[], None], **kw: Any):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
