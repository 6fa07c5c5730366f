"""Deadlines for HTTP connections, so an idle or slow client cannot hold one open for ever.

Owns the connection-level timeouts uvicorn's h11 protocol lacks (it only times out a connection
idle after a response):
- idle: a new connection that sends nothing is closed after `keep_alive_timeout_s`, as one idle
  after a response already is;
- headers: once a request's first byte arrives, its headers must be complete within
  `header_timeout_s`, else 408 in OpenAI's envelope and the connection is closed;
- a request whose response is complete while its body is still arriving (a refusal that did not
  read it) gets its connection closed, instead of the body being read and thrown away.
The body's own deadline (`body_timeout_s`) is the guard's (app.py), which reads the body.

Deliberately does not know: routes, tenants, or what the requests ask.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.api.errors import error_body


class DeadlineProtocol(H11Protocol):
    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Idle from the start, not only after a first response.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:
            # Part of a request line or headers: the request has begun, its headers are due.
            if self._header_deadline is None:
                self._header_deadline = self.loop.call_later(
                    self.header_timeout_s, self._headers_late
                )
        else:
            self._cancel_header_deadline()

    def on_response_complete(self) -> None:
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            # The response did not wait for the body: the rest of it is nobody's, and reading it
            # would let a client keep the connection by sending it slowly.
            self.transport.close()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        message = f"the request headers did not arrive within {self.header_timeout_s:g} s"
        body = json.dumps(error_body(408, message, code="request_timeout"), separators=(",", ":"))
        body = body.encode()
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        self.transport.close()
