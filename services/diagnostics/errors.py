"""The diagnostics REST API's one error envelope: `{"error", "field", "detail"}` for every 4xx and 5xx.

Invariants: every error a client can receive, FastAPI's and Starlette's own included (unknown route
404, wrong method 405, malformed JSON, wrong content type 415), has this shape; a field path is
written in one notation, `config.mode`, `lp_pi[0][1]`; a byte offset in malformed JSON is reported
as a position in the message, never as a field.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from aisrl.core.types import BatchValidationError

log = logging.getLogger("aisrl.diagnostics")

FIELD_HEADER = "x-field"  # an HTTPException raised with this header names the field it is about
_SOURCES = ("body", "query", "path", "header")


def error_response(
    status: int,
    message: str,
    field: str | None = None,
    detail: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": message, "field": field, "detail": detail or []}, headers=headers
    )


def field_path(loc: tuple | list) -> str:
    """('body', 'lp_pi', 0, 1) -> 'lp_pi[0][1]'; ('body', 'config', 'mode') -> 'config.mode'."""
    path = ""
    for part in loc:
        if part in _SOURCES and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _detail(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"field": field_path(e["loc"]) or None, "msg": e["msg"], "type": e.get("type")} for e in errors]


async def on_request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": None}
    if first.get("type") == "json_invalid":
        # FastAPI's parser puts the byte offset in loc ('body', 17): a position, not a field; pydantic's
        # model_validate_json (large bodies, rest_compute.py) puts "at line L column C" in the reason.
        reason = (first.get("ctx") or {}).get("error", "malformed")
        where = first["loc"][-1] if first["loc"] else None
        if isinstance(where, int):
            reason = f"{reason} at position {where}"
        detail = [{"field": None, "msg": reason, "type": "json_invalid"}]
        return error_response(400, f"body is not valid JSON: {reason}", None, detail)
    field = field_path(first["loc"]) or None
    message = f"{field}: {first['msg']}" if field else first["msg"]
    return error_response(422, message, field, _detail(errors))


async def on_batch_invalid(_: Request, exc: BatchValidationError) -> JSONResponse:
    return error_response(422, str(exc), exc.field, [{"field": exc.field, "msg": exc.message, "type": "value_error"}])


async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = dict(exc.headers or {})
    field = headers.pop(FIELD_HEADER, None)
    return error_response(exc.status_code, str(exc.detail), field, headers=headers or None)


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}", None)


def install_error_handlers(app: FastAPI) -> None:
    """Registers the envelope for validation errors, batch errors, every Starlette HTTP error and the rest."""
    app.add_exception_handler(RequestValidationError, on_request_invalid)  # type: ignore[arg-type]
    app.add_exception_handler(BatchValidationError, on_batch_invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_unexpected)


async def require_json(request: Request) -> None:
    """A dependency of JSON-body routes: any other content type is a 415 naming the one expected."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        raise StarletteHTTPException(
            415,
            f"content-type must be application/json, got {media_type or 'none'}",
            headers={FIELD_HEADER: "content-type"},
        )
