"""The API contracts between the services and their clients, as msgspec Structs.

Inputs (`...Request`, `ItemCreate`, `ItemUpdate`) forbid unknown fields, so a typo in a
client is a 422 naming the field rather than a silently ignored value; their constraints
(lengths, patterns, ranges) are checked by msgspec while decoding and also appear in the
OpenAPI document. Outputs are plain Structs the handlers fill in.

Secrets (passwords, refresh tokens) are left out of `repr`, so an input logged or shown
in a traceback by mistake does not leak them.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Annotated

import msgspec

# A pragmatic address check: local part, "@", a domain with at least one dot. Deliverability
# is the mail server's business; this only keeps obvious garbage out. Every address it lets
# through must also be an RFC 5321 address, since the OpenAPI document promises `format:
# email` (schemathesis holds us to it): the local part is a dot-atom (no leading, trailing or
# doubled dot) of at most 64 characters (checked after decoding: a regex for both at once
# needs a lookahead, which fuzzers cannot generate from).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
# The end of the string, in Python's re (msgspec's) as in ECMA's (the OpenAPI document's):
# Python's `$` also matches before a final newline, so "ada@example.com\n" was an address.
END = r"$(?!\n)"
EMAIL_PATTERN = ("^" + _ATEXT + r"+(?:\." + _ATEXT + r"+)*@"
                 r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
                 + END)
MAX_EMAIL_LOCAL_PART = 64

Email = Annotated[str, msgspec.Meta(pattern=EMAIL_PATTERN, max_length=254,
                                    extra_json_schema={"format": "email"})]
# Long enough to resist guessing, bounded so that hashing a huge body cannot pin a CPU.
Password = Annotated[str, msgspec.Meta(min_length=8, max_length=128, extra_json_schema={"format": "password"})]
# `\S`: at least one visible character (msgspec searches, it does not anchor), so a blank
# name is a validation error naming the field; surrounding spaces are stripped after.
# No NUL characters anywhere: JSON allows "\u0000" but PostgreSQL text cannot hold it, so
# it must be a 422 here rather than a failed insert (500) later.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=r"^[^\x00]*[^\s\x00][^\x00]*$")]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=r"^[^\x00]*$")]
Title = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00]*[^\s\x00][^\x00]*$")]
Description = Annotated[str, msgspec.Meta(max_length=5000, pattern=r"^[^\x00]*$")]
PriceCents = Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000_00)]
Tag = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9-]*" + END, min_length=1, max_length=32)]
Tags = Annotated[list[Tag], msgspec.Meta(max_length=20)]
# msgspec leaves out `format` for datetimes (a naive one has no RFC 3339 form); ours come
# from timestamptz columns and are aware, so the document may promise date-time.
Timestamp = Annotated[datetime.datetime, msgspec.Meta(extra_json_schema={"format": "date-time"})]
Limit = Annotated[int, msgspec.Meta(ge=1, le=100)]
# Bounded: PostgreSQL's OFFSET is a bigint, and a larger number was a 500 (found by
# schemathesis). A billion rows in is far past any page a client means to read.
Offset = Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)]


def _hidden(struct: msgspec.Struct, secret: str) -> str:
    shown = ", ".join(f"{f}={getattr(struct, f)!r}" for f in struct.__struct_fields__ if f != secret)
    return f"{type(struct).__name__}({shown}{', ' if shown else ''}{secret}='***')"


def _clean_name(name: str) -> str:
    return name.strip()  # never blank: the pattern of Name and Title wants a visible character


def _clean_email(email: str) -> str:
    if len(email.partition("@")[0]) > MAX_EMAIL_LOCAL_PART:
        # Raised in __post_init__, which msgspec turns into a ValidationError without a
        # location for a top-level Struct: the message names the field the way msgspec would.
        raise ValueError(f"Expected `str` with at most {MAX_EMAIL_LOCAL_PART} characters before the `@`"
                         " - at `$.email`")
    return email.lower()  # one account per address, whatever its case


# ---- users and tokens (auth) ----

class RegisterRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    email: Email
    password: Password
    name: Name

    def __post_init__(self) -> None:
        self.email = _clean_email(self.email)
        self.name = _clean_name(self.name)

    def __repr__(self) -> str:
        return _hidden(self, "password")


class LoginRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    email: Email
    # No minimum here: a login with a short password is a wrong password (401), not a
    # validation error that would tell the caller something about the rules.
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=128, extra_json_schema={"format": "password"})]

    def __post_init__(self) -> None:
        self.email = _clean_email(self.email)

    def __repr__(self) -> str:
        return _hidden(self, "password")


class RefreshRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    refresh_token: Token

    def __repr__(self) -> str:
        return _hidden(self, "refresh_token")


class LogoutRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    refresh_token: Token

    def __repr__(self) -> str:
        return _hidden(self, "refresh_token")


class TokenPair(msgspec.Struct, kw_only=True):
    access_token: str
    refresh_token: str
    expires_in: Annotated[int, msgspec.Meta(description="Seconds until the access token expires")]
    token_type: str = "Bearer"

    def __repr__(self) -> str:
        return f"TokenPair(token_type={self.token_type!r}, expires_in={self.expires_in!r}, ...)"


class UserProfile(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    email: str
    name: str
    created_at: Timestamp


class PublicUser(msgspec.Struct, kw_only=True):
    """What other services may know about a user: no email."""
    id: uuid.UUID
    name: str


# ---- items (example) ----

class ItemCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    title: Title
    description: Description = ""
    price_cents: PriceCents = 0
    tags: Tags = []

    def __post_init__(self) -> None:
        self.title = _clean_name(self.title)


class ItemUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A partial update: a field left out keeps its value (UNSET is not the same as null)."""
    title: Title | msgspec.UnsetType = msgspec.UNSET
    description: Description | msgspec.UnsetType = msgspec.UNSET
    price_cents: PriceCents | msgspec.UnsetType = msgspec.UNSET
    tags: Tags | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        if self.title is not msgspec.UNSET:
            self.title = _clean_name(self.title)

    def changes(self) -> dict:
        """The fields the client sent, by name."""
        return {f: v for f in self.__struct_fields__ if (v := getattr(self, f)) is not msgspec.UNSET}


class Item(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    owner_id: uuid.UUID
    title: str
    description: str
    price_cents: int
    tags: list[str]
    created_at: Timestamp
    updated_at: Timestamp
    # None when auth could not be asked in time and the caller accepted a partial answer.
    owner: PublicUser | None = None


class ItemPage(msgspec.Struct, kw_only=True):
    items: list[Item]
    total: int
    limit: int
    offset: int


class Pagination(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """`?limit=&offset=`; shared.web.query() decodes it from a request's query string."""
    limit: Limit = 20
    offset: Offset = 0


# ---- the error shape (documentation of shared.errors.ErrorBody) ----

class FieldError(msgspec.Struct, kw_only=True):
    field: Annotated[str, msgspec.Meta(description="Path of the field in the body, e.g. `email` or `tags[2]`")]
    message: str


class Error(msgspec.Struct, kw_only=True, omit_defaults=True):
    status: int
    error: Annotated[str, msgspec.Meta(description="Machine-readable code, e.g. `validation_error`")]
    message: str
    request_id: str = ""
    details: list[FieldError] | None = None
