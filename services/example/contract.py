"""example's API contract, as msgspec Structs: items, their pages and updates.

Inputs forbid unknown fields (a typo is a 422 naming the field); constraints are checked
while decoding and appear in the OpenAPI document. An item's `owner` is auth's
`PublicUser`: auth's public contract, not its database.
"""

from __future__ import annotations

import uuid
from typing import Annotated

import msgspec

from services.auth.contract import PublicUser
from shared.kit.fields import END, NO_NUL, VISIBLE_TEXT, Timestamp, clean_text

Title = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=VISIBLE_TEXT)]
Description = Annotated[str, msgspec.Meta(max_length=5000, pattern=NO_NUL)]
PriceCents = Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000_00)]
Tag = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9-]*" + END, min_length=1, max_length=32)]
Tags = Annotated[list[Tag], msgspec.Meta(max_length=20)]


class ItemCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    title: Title
    description: Description = ""
    price_cents: PriceCents = 0
    tags: Tags = []

    def __post_init__(self) -> None:
        self.title = clean_text(self.title)


class ItemUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A partial update: a field left out keeps its value (UNSET is not the same as null)."""
    title: Title | msgspec.UnsetType = msgspec.UNSET
    description: Description | msgspec.UnsetType = msgspec.UNSET
    price_cents: PriceCents | msgspec.UnsetType = msgspec.UNSET
    tags: Tags | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        if self.title is not msgspec.UNSET:
            self.title = clean_text(self.title)

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
