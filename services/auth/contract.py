"""auth's API contract, as msgspec Structs: what clients send and get back.

Inputs (`...Request`) forbid unknown fields, so a typo in a client is a 422 naming the
field rather than a silently ignored value; their constraints (lengths, patterns) are
checked by msgspec while decoding and also appear in the OpenAPI document. Outputs are
plain Structs the handlers fill in. `PublicUser` is what other services may read about a
user (example shows item owners with it).

Secrets (passwords, refresh tokens) are left out of `repr` (shared.kit.fields.hidden).
"""

from __future__ import annotations

import uuid
from typing import Annotated

import msgspec

from shared.kit.fields import END, NO_NUL, VISIBLE_TEXT, Timestamp, clean_text, hidden

# A pragmatic address check: local part, "@", a domain with at least one dot. Deliverability
# is the mail server's business; this only keeps obvious garbage out. Every address it lets
# through must also be an RFC 5321 address, since the OpenAPI document promises `format:
# email` (schemathesis holds us to it): the local part is a dot-atom (no leading, trailing or
# doubled dot) of at most 64 characters (checked after decoding: a regex for both at once
# needs a lookahead, which fuzzers cannot generate from).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
EMAIL_PATTERN = ("^" + _ATEXT + r"+(?:\." + _ATEXT + r"+)*@"
                 r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
                 + END)
MAX_EMAIL_LOCAL_PART = 64

Email = Annotated[str, msgspec.Meta(pattern=EMAIL_PATTERN, max_length=254,
                                    extra_json_schema={"format": "email"})]
# Long enough to resist guessing, bounded so that hashing a huge body cannot pin a CPU.
Password = Annotated[str, msgspec.Meta(min_length=8, max_length=128, extra_json_schema={"format": "password"})]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=VISIBLE_TEXT)]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=NO_NUL)]


def _clean_email(email: str) -> str:
    if len(email.partition("@")[0]) > MAX_EMAIL_LOCAL_PART:
        # Raised in __post_init__, which msgspec turns into a ValidationError without a
        # location for a top-level Struct: the message names the field the way msgspec would.
        raise ValueError(f"Expected `str` with at most {MAX_EMAIL_LOCAL_PART} characters before the `@`"
                         " - at `$.email`")
    return email.lower()  # one account per address, whatever its case


class RegisterRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    email: Email
    password: Password
    name: Name

    def __post_init__(self) -> None:
        self.email = _clean_email(self.email)
        self.name = clean_text(self.name)

    def __repr__(self) -> str:
        return hidden(self, "password")


class LoginRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    email: Email
    # No minimum here: a login with a short password is a wrong password (401), not a
    # validation error that would tell the caller something about the rules.
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=128, extra_json_schema={"format": "password"})]

    def __post_init__(self) -> None:
        self.email = _clean_email(self.email)

    def __repr__(self) -> str:
        return hidden(self, "password")


class RefreshRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    refresh_token: Token

    def __repr__(self) -> str:
        return hidden(self, "refresh_token")


class LogoutRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    refresh_token: Token

    def __repr__(self) -> str:
        return hidden(self, "refresh_token")


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
