"""Errors in OpenAI's envelope, for every status the server returns.

Owns the shape `{"error": {"message", "type", "param", "code"}}` and the mapping from our failures
to it: request validation is 400 (never FastAPI's 422), and the field that failed is `param`;
an unknown parameter is named as unsupported; malformed JSON, an empty body or a body sent with
another Content-Type say so. The envelope is ASCII JSON: a message may quote client text, and
client text may hold lone surrogates that UTF-8 cannot carry. Every other layer raises
`APIError` (or lets a library error reach the handlers here) and never builds a response itself.

Deliberately does not know: routes, tenants or the engine.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }


class ErrorJSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return ErrorJSON(error_body(status, message, param, code), status_code=status, headers=headers)


def _describe(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One clear message (and the parameter) for pydantic's validation errors."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    if kind == "extra_forbidden":
        return (
            f"unsupported parameter: {'.'.join(loc)!r} is not supported by this server",
            ".".join(loc),
        )
    if kind == "missing" and not loc:
        return "the request body is empty: send a JSON object", None
    if kind == "missing":
        return f"missing required parameter: {'.'.join(loc)!r}", ".".join(loc)
    param = ".".join(loc) or None
    where = f"{param}: " if param else ""
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    first = {**first, "msg": msg}
    if not loc and kind in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None
    return f"{where}{first.get('msg', 'invalid value')}", param


_DOCUMENTED = {
    "400": "Invalid request: the parameter at fault is named in `param`",
    "401": "Missing or invalid API key",
    "403": "The tenant's tier may not use this subnet",
    "404": "Unknown model",
    "413": "Request body too large",
    "429": "A rate limit of the tenant's tier; see Retry-After",
    "503": "Loading, draining or unavailable",
}


def document(app: FastAPI) -> None:
    """Make the OpenAPI document say what the server really answers: OpenAI's error envelope
    for 400/401/403/404/413/429/503, never FastAPI's 422."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        components["Error"] = {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                        "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                    },
                }
            },
        }
        ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        for path, operations in schema.get("paths", {}).items():
            for op in operations.values():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                if path.startswith("/v1/"):
                    for code, text in _DOCUMENTED.items():
                        responses.setdefault(code, {"description": text, "content": ref})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        kind = request.headers.get("content-type")
        if kind is not None and not _is_json(kind):
            # FastAPI parses a body as JSON only when it is labelled so (or not at all).
            return error_response(
                400,
                f"the request body must be JSON sent with 'Content-Type: application/json', "
                f"not {kind!r}",
                code="invalid_content_type",
            )
        message, param = _describe(list(e.errors()))
        return error_response(400, message, param, "invalid_value" if param else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        message = e.detail if isinstance(e.detail, str) else "request failed"
        if e.status_code == 404:
            message = "no such route"
        elif e.status_code == 405:
            message = "method not allowed on this route"
        return error_response(e.status_code, message, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(e).__name__}")
