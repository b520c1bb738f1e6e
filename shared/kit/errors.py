"""The one error shape every part of meshvisor answers with:

    {"status": 502, "error": "bad_gateway", "message": "...", "request_id": "..."}

(`details` is added for validation errors.) This module builds it as raw HTTP bytes
for the relay; the aiohttp middleware for the services builds on `error_body`. The same
`Error` Struct is the schema the OpenAPI documents give for every error response.

`ApiError` is the one exception base that maps to HTTP: a handler raises it, and so do
the kit's own domain errors (an unavailable database, an invalid or unverifiable token),
which subclass it with their status, message and headers. The request layer
(shared.kit.web) knows only this base, not the database or the tokens.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Annotated

import msgspec


class FieldError(msgspec.Struct, kw_only=True):
    field: Annotated[str, msgspec.Meta(description="Path of the field in the body, e.g. `email` or `tags[2]`")]
    message: str


class Error(msgspec.Struct, omit_defaults=True):
    status: int
    error: Annotated[str, msgspec.Meta(description="Machine-readable code, e.g. `validation_error`")]
    message: str
    request_id: str = ""
    details: list[FieldError] | None = None


_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    422: "validation_error",
    429: "too_many_requests",
    431: "headers_too_large",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


def code_for(status: int) -> str:
    return _CODES.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_"))


def error_body(status: int, message: str, request_id: str = "", error: str | None = None,
               details: list[dict] | None = None) -> bytes:
    return msgspec.json.encode(Error(status, error or code_for(status), message, request_id, details))


def error_response(status: int, message: str, request_id: str = "", *, close: bool = False,
                   error: str | None = None) -> bytes:
    """A complete HTTP/1.1 response carrying the error shape."""
    body = error_body(status, message, request_id, error)
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        + (f"X-Request-Id: {request_id}\r\n" if request_id else "")
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    )
    return head.encode("latin-1") + body


class ApiError(Exception):
    """Raised by a handler to answer with the error shape: `raise ApiError(409, "email already registered")`.

    The middleware of shared/kit/web.py turns it into a response; `error` defaults to the
    code of the status (e.g. 409 -> "conflict"). Domain errors that a request may run into
    subclass it (shared.kit.db.DatabaseUnavailable, shared.kit.tokens.InvalidToken, ...);
    their `str()` may say more than `message`, for the operator's log only.
    """

    # A failure of ours or of a dependency (5xx) is logged as a warning by the middleware;
    # a client's mistake (4xx) is not.
    log_as_warning = False

    def __init__(self, status: int, message: str, error: str | None = None,
                 details: list[dict] | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error = error or code_for(status)
        self.details = details
        self.headers = headers


def validation_details(exc: msgspec.ValidationError) -> list[dict]:
    """msgspec's message as `details`: [{"field": "email", "message": "Expected `str` ..."}].

    msgspec reports where in the document it failed as a JSON path (`$.items[0].title`);
    clients want the field name, so the `$.` prefix goes. For a missing or unknown field
    msgspec names it in the message instead, at the path of the object that holds it.
    """
    text = str(exc)
    message, sep, path = text.rpartition(" - at `")
    if not sep:
        message, path = text, "$"
    path = path.rstrip("`")
    field = path[2:] if path.startswith("$.") else path[1:]  # "$" -> "", "$[0]" -> "[0]"
    for marker in ("missing required field `", "contains unknown field `"):
        if marker in message:
            name = message.split(marker, 1)[1].split("`", 1)[0]
            field = f"{field}.{name}" if field else name
            break
    return [{"field": field, "message": message}]
