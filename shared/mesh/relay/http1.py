"""HTTP/1.x heads as the relay reads them: header lookups and message framing, pure
functions over bytes that the client side (requests) and the upstream side (responses)
both call.

Design: a head is never parsed into a dict. The relay keeps the raw head (`head`) and
one lower-cased copy of it (`lower`) and looks up only the few headers it acts on, by
needle (b"\\r\\n<name>:"), built once here rather than per request. Presence is tested
with `find`, not `in`: in Python 3.11 `bytes in bytes` first tries the needle as an
integer, building and discarding a TypeError every time.

Request heads reach `framing` only after llhttp (httptools) has accepted them, so their
Content-Length is present once and numeric; response heads come from our own instances
and are read directly, without a parser, unless their body is chunked.
"""

from __future__ import annotations

MAX_HEAD = 64 * 1024  # larger request heads get 431; a response head not ended within it is refused

# How a message body is delimited (the relay's body modes).
NONE, LENGTH, CHUNKED, EOF = 0, 1, 2, 3

CONNECTION = b"\r\nconnection:"
TRANSFER_ENCODING = b"\r\ntransfer-encoding:"
CONTENT_LENGTH = b"\r\ncontent-length:"
X_REQUEST_ID = b"\r\nx-request-id:"
TRACEPARENT = b"\r\ntraceparent:"
IDEMPOTENCY_KEY = b"\r\nidempotency-key:"
X_FORWARDED_FOR = b"\r\nx-forwarded-for:"
X_FORWARDED_PROTO = b"\r\nx-forwarded-proto:"
X_FORWARDED_HOST = b"\r\nx-forwarded-host:"
HOST = b"\r\nhost:"
_CONNECTION_LEN = len(CONNECTION)
_TRANSFER_ENCODING_LEN = len(TRANSFER_ENCODING)
_CONTENT_LENGTH_LEN = len(CONTENT_LENGTH)


def header(lower: bytes, head: bytes, needle: bytes) -> bytes | None:
    """Value of the header found by `needle` (one of the above) in a raw head, or None.

    `lower` is the lower-cased head, searched; the value is cut from `head` (pass `lower`
    twice when the value's case does not matter).
    """
    i = lower.find(needle)
    if i < 0:
        return None
    start = i + len(needle)
    return head[start:head.find(b"\r\n", start)].strip()


def framing(head: bytes, lower: bytes, http11: bool, bodiless: bool) -> tuple[bool, int, int]:
    """(keep-alive, body mode, Content-Length) of a request or response head.

    Keep-alive follows the Connection header and the version (`http11`: the message is
    HTTP/1.1). A `bodiless` message (a response to HEAD, a 204 or 304) has no body
    whatever its headers say. Chunked wins over Content-Length. EOF: neither is given;
    a response then ends with its connection and a request has no body. Raises
    ValueError for a Content-Length that is not a number.

    Called twice per request (its head and its response's): the three lookups are
    `header` written out, a Python call saved each (about 0.5k instructions).
    """
    i = lower.find(CONNECTION)
    if i < 0:
        keep_alive = http11
    else:
        i += _CONNECTION_LEN
        end = lower.find(b"\r\n", i)
        keep_alive = lower.find(b"close", i, end) < 0 if http11 else lower.find(b"keep-alive", i, end) >= 0
    if bodiless:
        return keep_alive, NONE, 0
    i = lower.find(TRANSFER_ENCODING)
    if i >= 0:
        i += _TRANSFER_ENCODING_LEN
        if lower.find(b"chunked", i, lower.find(b"\r\n", i)) >= 0:
            return keep_alive, CHUNKED, 0
    i = lower.find(CONTENT_LENGTH)
    if i < 0:
        return keep_alive, EOF, 0
    i += _CONTENT_LENGTH_LEN
    remaining = int(head[i:head.find(b"\r\n", i)])  # int() ignores surrounding whitespace, as strip() does
    return keep_alive, LENGTH if remaining else NONE, remaining
