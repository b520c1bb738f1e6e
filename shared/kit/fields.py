"""Field types and helpers that every service's API contract may use (msgspec).

Contracts themselves live with the service that owns them (`services/<name>/contract.py`);
what is here is what they have in common: timestamps, paging, text cleaning, and keeping
secrets out of `repr` (so an input logged or shown in a traceback by mistake does not
leak them).
"""

from __future__ import annotations

import datetime
from typing import Annotated

import msgspec

# The end of the string, in Python's re (msgspec's) as in ECMA's (the OpenAPI document's):
# Python's `$` also matches before a final newline, so "ada@example.com\n" was an address.
END = r"$(?!\n)"
# `\S`: at least one visible character (msgspec searches, it does not anchor), so a blank
# text is a validation error naming the field; surrounding spaces are stripped after.
# No NUL characters anywhere: JSON allows "\u0000" but PostgreSQL text cannot hold it, so
# it must be a 422 here rather than a failed insert (500) later.
VISIBLE_TEXT = r"^[^\x00]*[^\s\x00][^\x00]*$"
NO_NUL = r"^[^\x00]*$"
# msgspec leaves out `format` for datetimes (a naive one has no RFC 3339 form); ours come
# from timestamptz columns and are aware, so the document may promise date-time.
Timestamp = Annotated[datetime.datetime, msgspec.Meta(extra_json_schema={"format": "date-time"})]
Limit = Annotated[int, msgspec.Meta(ge=1, le=100)]
# Bounded: PostgreSQL's OFFSET is a bigint, and a larger number was a 500 (found by
# schemathesis). A billion rows in is far past any page a client means to read.
Offset = Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)]


class Pagination(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """`?limit=&offset=`; shared.kit.web.query() decodes it from a request's query string."""
    limit: Limit = 20
    offset: Offset = 0


def hidden(struct: msgspec.Struct, secret: str) -> str:
    """A repr of `struct` with the field `secret` shown as '***'."""
    shown = ", ".join(f"{f}={getattr(struct, f)!r}" for f in struct.__struct_fields__ if f != secret)
    return f"{type(struct).__name__}({shown}{', ' if shown else ''}{secret}='***')"


def clean_text(text: str) -> str:
    return text.strip()  # never blank: VISIBLE_TEXT wants a visible character
