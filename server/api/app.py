"""The FastAPI application: routes, the guards in front of them, and the probes.

Owns assembly. Every route requires an API key except `/health`, `/ready` and (when configured
open) `/metrics`; that includes `/v1/models`, the OpenAPI document and unknown paths, so nothing
is reachable unguarded. The key identifies the tenant (OpenAI's `Authorization: Bearer`; two
Authorization headers are refused, as are a Content-Length beside Transfer-Encoding or two
Content-Lengths). A guarded request's body is read by the guard, counted as it arrives: over the
configured size it is a 413 at once, slower than `body_timeout_s` a 408. While draining, every
guarded route answers 503 with Retry-After. Errors from anywhere come out in OpenAI's envelope;
the open probes never show exception text (the log has it). Paths are matched exactly: no
redirect to a trailing-slash variant (whose Location would echo the client's Host header).

Deliberately does not know: request semantics (openai_routes.py) or model loading (service.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import __version__
from server.api import errors, tokenization
from server.api.errors import error_response
from server.api.openai_routes import router
from server.api.service import DRAINING, Service

PROBES = ("/health", "/ready")


class Guard:
    """ASGI middleware: framing, authentication, drain, body size and time. Pure ASGI so
    streaming is untouched."""

    def __init__(self, app: ASGIApp, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        svc = self.service
        headers = _headers(scope["headers"])
        # Ambiguous framing is refused before anything else, so no proxy in front of us can
        # read a different request than we do (request smuggling).
        lengths = headers.get(b"content-length", [])
        if len(lengths) > 1 or (lengths and headers.get(b"transfer-encoding")):
            return await _reply(
                scope,
                send,
                400,
                "a request may carry one Content-Length, or Transfer-Encoding, not both",
                code="bad_framing",
                close=True,
            )
        open_path = path in PROBES or (path == "/metrics" and svc.config.metrics_open)
        if open_path:
            return await self.app(scope, receive, send)
        authorization = headers.get(b"authorization", [])
        if len(authorization) > 1:
            # A proxy that checked the first header and a server that used the last would
            # disagree about who is asking.
            return await _reply(
                scope, send, 400, "send one Authorization header", code="invalid_api_key"
            )
        key = _bearer(authorization[0]) if authorization else None
        tenant = svc.tenancy.authenticate(key) if svc.tenancy else None
        if tenant is None:
            message = (
                "missing API key: send 'Authorization: Bearer <key>'"
                if key is None
                else "invalid API key"
            )
            return await _reply(
                scope,
                send,
                401,
                message,
                code="invalid_api_key",
                headers={"www-authenticate": "Bearer"},
            )
        scope.setdefault("state", {})["tenant"] = tenant
        if svc.draining:
            return await _draining(scope, send)
        limit = svc.config.max_body_bytes
        too_large = f"the request body exceeds {limit} bytes"
        if lengths and (not lengths[0].isdigit() or int(lengths[0]) > limit):
            return await _reply(scope, send, 413, too_large, code="request_too_large", close=True)
        # The body is read here, in full, whatever the headers announced: bytes are counted as
        # they arrive (chunked bodies have no length; a Content-Length can be wrong) and the
        # whole read has a deadline. A failure is a status before the app sees anything.
        # (Raising from inside the app's body read would reach FastAPI, which turns any error
        # there into a 400 "error parsing the body".)
        body = await _read_body(receive, limit, svc.config.body_timeout_s, svc.closing)
        if body == _TOO_LARGE:
            return await _reply(scope, send, 413, too_large, code="request_too_large", close=True)
        if body == _TOO_SLOW:
            return await _reply(
                scope,
                send,
                408,
                f"the request body did not arrive within {svc.config.body_timeout_s:g} s",
                code="request_timeout",
                close=True,
            )
        if body == _CLOSING:
            return await _draining(scope, send)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, body, tracked)
        except asyncio.CancelledError:
            # Shutting down after a drain: uvicorn cancels what is still running (a request
            # still being tokenized, a stream whose client stopped reading). Expected: no
            # traceback, and a 503 if the response had not begun.
            if svc.closing is None or not svc.closing.is_set():
                raise
            if not started:
                await _draining(scope, send)


_TOO_LARGE, _TOO_SLOW, _CLOSING = "too large", "too slow", "closing"


async def _read_body(
    receive: Receive, limit: int, timeout_s: float, closing: asyncio.Event | None
) -> Receive | str:
    """Read a request's body in full and return a receive() that replays it; or why not."""
    chunks: list[bytes] = []
    seen = 0

    async def read() -> list[Message]:
        nonlocal seen
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return [message]  # the client left before the body was complete
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                raise _Oversized
            chunks.append(chunk)
            if not message.get("more_body", False):
                return [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    reading = asyncio.ensure_future(read())
    waits: set[asyncio.Future] = {reading}
    if closing is not None:
        waits.add(asyncio.ensure_future(closing.wait()))
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout_s, return_when="FIRST_COMPLETED")
    finally:
        for w in waits:
            w.cancel()
    if reading not in done:
        return _CLOSING if closing is not None and closing.is_set() else _TOO_SLOW
    if isinstance(reading.exception(), _Oversized):
        return _TOO_LARGE
    pending = reading.result()

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


class _Oversized(Exception):
    pass


def _headers(raw: list[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    """Every value of each header (names are lower case in ASGI)."""
    out: dict[bytes, list[bytes]] = {}
    for name, value in raw:
        out.setdefault(name, []).append(value)
    return out


def _bearer(value: bytes) -> str:
    scheme, _, token = value.decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ""


async def _draining(scope: Scope, send: Send) -> None:
    await _reply(scope, send, 503, DRAINING, code="draining", headers={"retry-after": "1"})


async def _reply(
    scope: Scope,
    send: Send,
    status: int,
    message: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    close: bool = False,
) -> None:
    """An error reply from the guard. `close`: the request's body was not read, so the
    connection cannot carry another request."""
    headers = {**(headers or {}), **({"connection": "close"} if close else {})}
    response = error_response(status, message, code=code, headers=headers)
    await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def create_app(service: Service) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="Concentric",
        version=__version__,
        lifespan=lifespan,
        description="Elastic Gemma 3n inference: OpenAI-compatible API.",
        redirect_slashes=False,
    )
    app.state.service = service
    errors.install(app)
    app.include_router(router)
    app.include_router(tokenization.router)
    errors.document(app)

    @app.get("/health")
    async def health() -> Response:
        """Liveness: 503 if the engine loop died or the model failed to load."""
        if not service.alive:
            # Unauthenticated: say what failed, never the exception text (it is in the log).
            reason = "model load failed" if service.load_error else "engine stopped"
            return JSONResponse({"status": "dead", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: 503 until the model is loaded, and while draining."""
        if service.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not service.ready:
            state = "failed" if service.load_error else "loading"
            return JSONResponse({"status": state}, status_code=503)
        return JSONResponse({"status": "ready", "model": service.model_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(
            service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    app.add_middleware(Guard, service=service)
    return app
