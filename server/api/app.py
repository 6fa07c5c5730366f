"""The FastAPI application: routes, the guards in front of them, and the probes.

Owns assembly. Every route requires an API key except `/health`, `/ready` and (when configured
open) `/metrics`; that includes `/v1/models`, the OpenAPI document and unknown paths, so nothing
is reachable unguarded. The key identifies the tenant (OpenAI's `Authorization: Bearer`). Bodies
over the configured size get 413 before they are read in full; while draining, every guarded
route answers 503. Errors from anywhere come out in OpenAI's envelope.

Deliberately does not know: request semantics (openai_routes.py) or model loading (service.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import __version__
from server.api import errors
from server.api.errors import error_body
from server.api.openai_routes import router
from server.api.service import Service

PROBES = ("/health", "/ready")


class Guard:
    """ASGI middleware: body size, authentication, drain. Pure ASGI so streaming is untouched."""

    def __init__(self, app: ASGIApp, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        svc = self.service
        open_path = path in PROBES or (path == "/metrics" and svc.config.metrics_open)
        if not open_path:
            headers = dict(scope["headers"])
            tenant = svc.tenancy.authenticate(_bearer(headers)) if svc.tenancy else None
            if tenant is None:
                message = (
                    "missing API key: send 'Authorization: Bearer <key>'"
                    if _bearer(headers) is None
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
                return await _reply(
                    scope,
                    send,
                    503,
                    "the server is shutting down; retry on another instance",
                    code="draining",
                )
            length = headers.get(b"content-length")
            limit = svc.config.max_body_bytes
            too_large = f"the request body exceeds {limit} bytes"
            if length is not None and (not length.isdigit() or int(length) > limit):
                return await _reply(scope, send, 413, too_large, code="request_too_large")
            if length is None:
                # No length given (chunked): read the body here, so an oversized one is a 413
                # before the app sees it. (Raising from inside the app's body read would reach
                # FastAPI, which turns any error there into a 400 "error parsing the body".)
                buffered = await _buffered(receive, limit)
                if buffered is None:
                    return await _reply(scope, send, 413, too_large, code="request_too_large")
                receive = buffered
        await self.app(scope, receive, send)


async def _buffered(receive: Receive, limit: int) -> Receive | None:
    """Read a body of unknown length in full and replay it; None if it exceeds `limit`. The
    replay then hands on the server's later messages (a disconnect) as they come."""
    chunks: list[bytes] = []
    seen = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            pending = [message]  # the client left before the body was complete
            break
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
            break

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def _bearer(headers: dict[bytes, bytes]) -> str | None:
    value = headers.get(b"authorization")
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ""


async def _reply(
    scope: Scope,
    send: Send,
    status: int,
    message: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    response = JSONResponse(
        error_body(status, message, code=code), status_code=status, headers=headers
    )
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
    )
    app.state.service = service
    errors.install(app)
    app.include_router(router)
    errors.document(app)

    @app.get("/health")
    async def health() -> Response:
        """Liveness: 503 if the engine loop died or the model failed to load."""
        if not service.alive:
            reason = service.load_error or (service.engine.dead if service.engine else "unknown")
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
