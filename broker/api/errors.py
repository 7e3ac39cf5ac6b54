"""Every error leaves the API in OpenAI's shape: {"error": {message, type, param, code}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker.api.responses import JSON
from broker.errors import BrokerError

log = logging.getLogger(__name__)


def error_response(
    status: int, message: str, *, type_: str, param: str | None = None, code: str | None = None
) -> JSON:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSON(body, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(BrokerError, _broker_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)


async def _broker_error(_: Request, exc: BrokerError) -> JSON:
    return JSON(exc.to_body(), status_code=exc.status_code)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSON:
    first: dict[str, Any] = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return error_response(
            400, "the request body is not valid JSON: " + str(first.get("msg")),
            type_="invalid_request_error", code="invalid_json",
        )
    param = _param_from_loc(first.get("loc", ()))
    if param == "body" and first.get("type") in ("model_attributes_type", "dict_type"):
        return error_response(
            400, "the request body must be a JSON object; send Content-Type: application/json",
            type_="invalid_request_error", param="body", code="invalid_json",
        )
    if first.get("type") == "extra_forbidden":
        message = f"{param} is not a recognised field; remove it"
        code = "unknown_field"
    elif first.get("type") == "missing":
        message = f"{param} is required"
        code = "missing_field"
    else:
        message = f"{param}: {first.get('msg')}"
        code = "invalid_value"
    return error_response(400, message, type_="invalid_request_error", param=param, code=code)


def _param_from_loc(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSON:
    if exc.status_code == 400:
        # FastAPI's own refusal of a body it cannot decode (not UTF-8, say).
        return error_response(
            400, f"the request body is not valid JSON: {exc.detail}",
            type_="invalid_request_error", param="body", code="invalid_json",
        )
    kinds = {404: ("not_found_error", "not_found"), 405: ("invalid_request_error",
                                                        "method_not_allowed")}
    type_, code = kinds.get(exc.status_code, ("invalid_request_error", None))
    message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
    return error_response(exc.status_code, message, type_=type_, code=code)


async def _unexpected_error(request: Request, exc: Exception) -> JSON:
    # The exception text may hold anything; it goes to the log only, by type and route.
    log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path,
              exc_info=log.isEnabledFor(logging.DEBUG))
    return error_response(500, "internal error in the broker; see its logs",
                          type_="server_error", code="internal_error")
