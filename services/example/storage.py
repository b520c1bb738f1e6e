"""Items in the example service's own PostgreSQL database.

Every value reaches SQL as a query parameter; the only SQL text assembled at run time is
the list of columns of a partial update, and those names come from a fixed whitelist, never
from the request. Functions here know nothing about HTTP: they raise `ItemNotFound` and
`NotOwner`, which the routes turn into 404 and 403.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Annotated

import asyncpg
import msgspec

from shared.kit import db
from services.example.contract import Item, ItemCreate, PriceCents, Tag
from shared.kit.fields import Pagination

_COLUMNS = "id, owner_id, title, description, price_cents, tags, created_at, updated_at"
# The columns a client may change (ItemUpdate's fields), as SQL identifiers.
_UPDATABLE = ("title", "description", "price_cents", "tags")


class ItemNotFound(Exception):
    pass


class NotOwner(Exception):
    pass


class KeyReused(Exception):
    """An Idempotency-Key already used by this owner for a different request."""


class KeyInProgress(Exception):
    """The first request with this Idempotency-Key has not finished yet."""


# How long an Idempotency-Key is remembered (purge_old_keys forgets older ones).
KEY_RETENTION = "24 hours"
# How long a repeat waits for the first request with its key to commit or roll back before
# it is told to come back (409): longer than a create takes, well below the statement
# timeout, so a stuck first attempt never turns its repeats into 500s.
KEY_WAIT = "2s"


class ItemQuery(Pagination, kw_only=True):
    """`GET /items` query parameters: pagination plus filters, all optional and combined with AND."""
    owner_id: Annotated[uuid.UUID, msgspec.Meta(description="Only items of this user")] | None = None
    tag: Annotated[Tag, msgspec.Meta(description="Only items carrying this tag")] | None = None
    # No NUL: PostgreSQL text cannot hold it, so it could never match (and would be a 500).
    q: Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00]*$",
                                   description="Case-insensitive substring of the title")] | None = None
    min_price: Annotated[PriceCents, msgspec.Meta(description="Lowest price_cents, inclusive")] | None = None
    max_price: Annotated[PriceCents, msgspec.Meta(description="Highest price_cents, inclusive")] | None = None


def like_pattern(text: str) -> str:
    """`text` as an ILIKE pattern matching it anywhere, with its own wildcards made literal
    (used with `ESCAPE '\\'`): a search for "50%" finds "50%", not "500"."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _item(row: asyncpg.Record) -> Item:
    return Item(id=row["id"], owner_id=row["owner_id"], title=row["title"], description=row["description"],
                price_cents=row["price_cents"], tags=list(row["tags"]), created_at=row["created_at"],
                updated_at=row["updated_at"])


async def create_item(pool: asyncpg.Pool, owner_id: uuid.UUID, new: ItemCreate,
                      idempotency_key: str | None = None) -> tuple[Item, bool]:
    """The new item, and whether it is a replay: with an `idempotency_key` this owner
    already used for the same request, the item that request created is answered and
    nothing is written. The key is claimed in the item's own transaction, so a concurrent
    repeat waits for the first to commit (or roll back) and never creates a second item.
    """
    # Not through db.run: an insert is not idempotent, so it must not be retried blindly.
    async with db.acquire(pool) as conn:
        async with conn.transaction():
            if idempotency_key is not None:
                fingerprint = hashlib.sha256(msgspec.json.encode(new)).digest()
                replay = await _claim_key(conn, owner_id, idempotency_key, fingerprint)
                if replay is not None:
                    return replay, True
            row = await conn.fetchrow(
                f"INSERT INTO items (owner_id, title, description, price_cents, tags) "
                f"VALUES ($1, $2, $3, $4, $5) RETURNING {_COLUMNS}",
                owner_id, new.title, new.description, new.price_cents, new.tags,
            )
            item = _item(row)
            if idempotency_key is not None:
                await conn.execute("UPDATE idempotency_keys SET response = $3 WHERE owner_id = $1 AND key = $2",
                                   owner_id, idempotency_key, msgspec.json.encode(item))
    return item, False


async def _claim_key(conn: asyncpg.Connection, owner_id: uuid.UUID, key: str, fingerprint: bytes) -> Item | None:
    """Claims `key` for this transaction (None), or returns the item its first use created.

    A repeat arriving while the first is still running waits (at most KEY_WAIT) on the
    first one's row lock: when the first commits, its item is the answer; when it rolls
    back (its instance died mid-request), the repeat claims the key and creates the item.
    """
    await conn.execute(f"SET LOCAL lock_timeout = '{KEY_WAIT}'")
    try:
        row = await _claim_or_read(conn, owner_id, key, fingerprint)
    except asyncpg.LockNotAvailableError:  # the key's row is held by another transaction
        raise KeyInProgress(key) from None
    if row is None:
        return None
    if row["fingerprint"] != fingerprint:
        raise KeyReused(key)
    return msgspec.json.decode(row["response"], type=Item)


async def _claim_or_read(conn: asyncpg.Connection, owner_id: uuid.UUID, key: str,
                         fingerprint: bytes) -> asyncpg.Record | None:
    """None once the key is claimed; else the row of its first use (fingerprint, response)."""
    # An expired use of the key is forgotten first (its row may be locked too: a
    # concurrent reuse, or the purge).
    await conn.execute(f"DELETE FROM idempotency_keys WHERE owner_id = $1 AND key = $2 "
                       f"AND created_at < now() - interval '{KEY_RETENTION}'", owner_id, key)
    for _ in range(2):  # twice: a key at the end of its retention may be purged between the two queries
        claimed = await conn.fetchval(
            "INSERT INTO idempotency_keys (owner_id, key, fingerprint) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING RETURNING true", owner_id, key, fingerprint)
        if claimed:
            return None
        row = await conn.fetchrow("SELECT fingerprint, response FROM idempotency_keys WHERE owner_id = $1 AND key = $2",
                                  owner_id, key)
        if row is not None:
            return row
    raise KeyInProgress(key)  # the row came and went twice: some other request is busy with it


# Expired keys are deleted this many at a time: each batch is a short statement, well
# inside the statement timeout, however many keys expired since the last purge.
PURGE_BATCH = 5000


async def purge_old_keys(pool: asyncpg.Pool) -> int:
    """Forgets keys older than KEY_RETENTION; the number forgotten."""
    forgotten = 0
    while True:
        status = await db.run(pool, lambda conn: conn.execute(
            f"DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY(SELECT ctid FROM idempotency_keys "
            f"WHERE created_at < now() - interval '{KEY_RETENTION}' LIMIT {PURGE_BATCH}))"))
        deleted = int(status.split()[-1])
        forgotten += deleted
        if deleted < PURGE_BATCH:
            return forgotten


async def get_item(pool: asyncpg.Pool, item_id: uuid.UUID) -> Item:
    row = await db.run(pool, lambda conn: conn.fetchrow(f"SELECT {_COLUMNS} FROM items WHERE id = $1", item_id))
    if row is None:
        raise ItemNotFound(item_id)
    return _item(row)


def _where(query: ItemQuery) -> tuple[str, list]:
    conditions: list[str] = []
    args: list = []

    def param(value) -> str:
        args.append(value)
        return f"${len(args)}"

    if query.owner_id is not None:
        conditions.append(f"owner_id = {param(query.owner_id)}")
    if query.tag is not None:
        conditions.append(f"tags @> ARRAY[{param(query.tag)}]::text[]")
    if query.q is not None:
        conditions.append(f"title ILIKE {param(like_pattern(query.q))} ESCAPE '\\'")
    if query.min_price is not None:
        conditions.append(f"price_cents >= {param(query.min_price)}")
    if query.max_price is not None:
        conditions.append(f"price_cents <= {param(query.max_price)}")
    return (" WHERE " + " AND ".join(conditions) if conditions else ""), args


async def list_items(pool: asyncpg.Pool, query: ItemQuery) -> tuple[list[Item], int]:
    """One page of the matching items, newest first, and how many match in all."""
    where, args = _where(query)
    n = len(args)

    async def fetch(conn: asyncpg.Connection):
        # One snapshot, so the total agrees with the page.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            total = await conn.fetchval(f"SELECT count(*) FROM items{where}", *args)
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM items{where} ORDER BY created_at DESC, id LIMIT ${n + 1} OFFSET ${n + 2}",
                *args, query.limit, query.offset,
            )
        return rows, total

    rows, total = await db.run(pool, fetch)
    return [_item(r) for r in rows], total


async def _lock_owned(conn: asyncpg.Connection, item_id: uuid.UUID, owner_id: uuid.UUID) -> None:
    """Locks the item for this transaction; raises unless it exists and `owner_id` owns it."""
    found = await conn.fetchval("SELECT owner_id FROM items WHERE id = $1 FOR UPDATE", item_id)
    if found is None:
        raise ItemNotFound(item_id)
    if found != owner_id:
        raise NotOwner(item_id)


async def update_item(pool: asyncpg.Pool, item_id: uuid.UUID, owner_id: uuid.UUID, changes: dict) -> Item:
    """Applies `changes` (ItemUpdate.changes(): column -> value) if `owner_id` owns the item."""
    unknown = set(changes) - set(_UPDATABLE)
    if unknown:  # a programming error, never client input: ItemUpdate forbids unknown fields
        raise ValueError(f"not updatable: {sorted(unknown)}")
    columns = [c for c in _UPDATABLE if c in changes]
    async with db.acquire(pool) as conn, conn.transaction():
        await _lock_owned(conn, item_id, owner_id)
        if not columns:  # an empty PATCH changes nothing, not even updated_at
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM items WHERE id = $1", item_id)
        else:
            assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(columns, start=2))
            row = await conn.fetchrow(
                f"UPDATE items SET {assignments}, updated_at = now() WHERE id = $1 RETURNING {_COLUMNS}",
                item_id, *(changes[c] for c in columns),
            )
    return _item(row)


async def delete_item(pool: asyncpg.Pool, item_id: uuid.UUID, owner_id: uuid.UUID) -> None:
    async with db.acquire(pool) as conn, conn.transaction():
        await _lock_owned(conn, item_id, owner_id)
        await conn.execute("DELETE FROM items WHERE id = $1", item_id)
