"""The request/response layer of every service: request ids and trace context, one error
shape for every failure, and msgspec decoding and encoding of bodies and queries.

    async def register(request):
        body = await decode(request, RegisterRequest)      # 400/415/413/422 in the shared shape
        ...
        return json_response(profile, status=201)

Middleware order (outermost first): `request_context` (ids in the context, echoed on the
response), then whatever the app adds (metrics), then `errors` (exceptions -> the shape).
"""

from __future__ import annotations

import logging
import re
import secrets
import urllib.parse
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from shared.kit import log as logctx
from shared.kit.errors import ApiError, error_body, validation_details

log = logging.getLogger("meshvisor.web")

T = TypeVar("T")

REQUEST_ID = web.RequestKey("request_id", str)  # the request's id, in the aiohttp request
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# W3C trace context, version 00: 32 hex trace id (not all zeros), 16 hex parent id, flags.
_TRACEPARENT_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_HEADERS_FROM_EXCEPTION = ("Allow", "WWW-Authenticate", "Retry-After", "Location")

_encoder = msgspec.json.Encoder()


def new_request_id() -> str:
    return secrets.token_hex(16)


def valid_request_id(value: str | None) -> bool:
    return value is not None and _REQUEST_ID_RE.fullmatch(value) is not None


def _our_traceparent(incoming: str | None, request_id: str) -> str:
    """The traceparent this service sends to its upstreams: the caller's trace, our own span.

    Without a valid incoming one a trace starts here; its id is the request id when that
    is 32 hex digits, so the two can be matched in logs.
    """
    match = _TRACEPARENT_RE.fullmatch(incoming or "")
    if match and match.group(1).strip("0") and match.group(2).strip("0"):
        trace_id, flags = match.group(1), match.group(3)
    else:
        trace_id = request_id if re.fullmatch(r"[0-9a-f]{32}", request_id) and request_id.strip("0") \
            else new_request_id()
        flags = "01"
    return f"00-{trace_id}-{secrets.token_hex(8)}-{flags}"


def outgoing_headers() -> dict[str, str]:
    """Headers to send on a call to another service, so the request stays one trace."""
    headers = {}
    if rid := logctx.request_id.get():
        headers["X-Request-Id"] = rid
    if tp := logctx.traceparent.get():
        headers["traceparent"] = tp
    return headers


@web.middleware
async def request_context(request: web.Request, handler):
    rid = request.headers.get("X-Request-Id")
    if not valid_request_id(rid):
        rid = new_request_id()  # absent, or unusable (too long, odd characters): replace it
    request[REQUEST_ID] = rid
    rid_token = logctx.request_id.set(rid)
    tp_token = logctx.traceparent.set(_our_traceparent(request.headers.get("traceparent"), rid))
    try:
        return await handler(request)
    finally:
        logctx.request_id.reset(rid_token)
        logctx.traceparent.reset(tp_token)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare signal: every response, streamed ones included, carries the id."""
    rid = request.get(REQUEST_ID)
    if rid:
        response.headers["X-Request-Id"] = rid


def error_json(request: web.Request, status: int, message: str, error: str | None = None,
               details: list[dict] | None = None, headers: dict[str, str] | None = None) -> web.Response:
    """The error shape as an aiohttp response, carrying the request's id."""
    return web.Response(body=error_body(status, message, request.get(REQUEST_ID, ""), error, details), status=status,
                        content_type="application/json", headers=headers)


@web.middleware
async def errors(request: web.Request, handler):
    """Every exception becomes the error shape; only a bug (500) logs a traceback."""
    raw = request.raw_path
    if ("%" in raw or not raw.isascii()) and not _utf8_target(raw):
        return error_json(request, 400, "the request's path or query is not valid UTF-8 once percent-decoded")
    try:
        return await handler(request)
    except ApiError as exc:  # a handler's answer, or a domain error (database, tokens) mapped by its class
        if exc.log_as_warning:  # e.g. PostgreSQL down or restarting: retry later, not a bug
            log.warning("%s in %s %s: %s", exc.message, request.method, request.path, type(exc).__name__)
        return error_json(request, exc.status, exc.message, exc.error, exc.details, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and 204s raised as exceptions are answers, not errors
            raise
        headers = {k: v for k in _HEADERS_FROM_EXCEPTION if (v := exc.headers.get(k))}
        return error_json(request, exc.status, _message_of(request, exc), headers=headers or None)
    except msgspec.ValidationError as exc:  # a handler converting data itself
        return error_json(request, 422, "request validation failed", details=validation_details(exc))
    except Exception:
        # The traceback is for the operator; the client learns only that it was our fault.
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_json(request, 500, "internal server error")


def _utf8_target(raw_path: str) -> bool:
    """Whether a request target (path and query, still percent-encoded) decodes to UTF-8.

    aiohttp and yarl decode an invalid sequence such as `%FF` leniently (left as it is, or
    replaced), so without this check a filter or an id would silently become another
    string than the client sent.
    """
    try:
        urllib.parse.unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeError:  # a bad %-sequence (or raw non-ASCII, should a parser pass it on)
        return False
    return True


def _message_of(request: web.Request, exc: web.HTTPException) -> str:
    """A handler's own text when it gave one; otherwise words for the status."""
    if exc.text and not exc.text.startswith(f"{exc.status}:"):
        return exc.text
    unrouted = request.match_info.route.resource is None  # the router's own 404/405
    if exc.status == 404 and unrouted:
        return f"no route for {request.path}"
    if exc.status == 405 and unrouted:
        return f"method {request.method} not allowed on {request.path}"
    return exc.reason


async def decode(request: web.Request, type_: type[T], *, max_size: int | None = None) -> T:
    """The JSON body of `request` as `type_`, validated by msgspec.

    415 when the body is not declared as JSON, 413 when larger than `max_size` (or the
    app's client_max_size), 400 when it is not JSON at all, 422 when it does not fit.
    """
    if request.content_type != "application/json":
        raise ApiError(415, "the body must be JSON (Content-Type: application/json)")
    if max_size is not None and request.content_length is not None and request.content_length > max_size:
        raise ApiError(413, f"request body over the limit of {max_size} bytes")
    body = await request.read()  # aiohttp raises 413 itself past client_max_size
    if max_size is not None and len(body) > max_size:
        raise ApiError(413, f"request body over the limit of {max_size} bytes")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        raise ApiError(422, "request validation failed", details=validation_details(exc)) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None
    except UnicodeDecodeError:
        # msgspec checks the bytes inside strings as it decodes them and lets this escape
        # (it was a 500). JSON is UTF-8 (RFC 8259), whatever charset the client declared.
        raise ApiError(400, "malformed JSON: the body is not valid UTF-8") from None


IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
# A key is opaque to us: 1 to 255 visible ASCII characters (a UUID is the usual choice).
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def idempotency_key(request: web.Request) -> str | None:
    """The request's Idempotency-Key, if it sent one; 400 for an unusable one."""
    key = request.headers.get(IDEMPOTENCY_KEY_HEADER)
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiError(400, "invalid Idempotency-Key header", details=[
            {"field": IDEMPOTENCY_KEY_HEADER, "message": "1 to 255 visible ASCII characters"}])
    return key


def query(request: web.Request, type_: type[T]) -> T:
    """The query string as `type_` (e.g. Pagination): strings are converted to the field
    types, and a bad value is a 422 naming the parameter."""
    try:
        return msgspec.convert(dict(request.query), type_, strict=False)
    except msgspec.ValidationError as exc:
        raise ApiError(422, "invalid query parameters", details=validation_details(exc)) from None


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """`obj` (Structs, dicts, lists, datetimes, UUIDs...) encoded by msgspec."""
    return web.Response(body=_encoder.encode(obj), status=status, content_type="application/json",
                        headers=headers)
