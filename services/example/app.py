"""The example service: items owned by users, under /api/v1/example/items.

Reads are public (a catalogue anyone may browse); creating, changing and deleting need an
access token from auth, and only an item's owner may change or delete it (403 otherwise).
Every item is answered with its owner's public profile, asked of auth through the
sidecar's upstream listener (owners.py); if auth cannot answer, the request gets a 503
in the error shape, never a 500.

Settings (environment): DATABASE_URL, UPSTREAM_AUTH_URL (the sidecar's listener for auth,
e.g. http://127.0.0.1:20011), AUTH_ISSUER (default "meshvisor-auth"), AUTH_AUDIENCE
(default "meshvisor").
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from pathlib import Path

from aiohttp import web

from services.example import storage
from services.example.identity import DEFAULT_AUDIENCE, DEFAULT_ISSUER, Authenticator
from services.example.owners import AuthUnavailable, OwnerDirectory
from services.example.storage import ItemNotFound, ItemQuery, KeyInProgress, KeyReused, NotOwner
from shared.kit.app import create_app, get_pool, pool_of
from shared.kit.errors import ApiError
from shared.kit.openapi import Routes
from services.example.contract import Item, ItemCreate, ItemPage, ItemUpdate
from shared.kit.web import decode, idempotency_key, json_response, query

MIGRATIONS = Path(__file__).parent / "migrations"
ITEMS = "/api/v1/example/items"
ITEM = ITEMS + "/{item_id}"
PURGE_EVERY = 600.0  # seconds between purges of expired Idempotency-Keys

log = logging.getLogger("meshvisor.example")

AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
OWNERS = web.AppKey("owners", OwnerDirectory)

api = Routes()
_ITEM_ID = {"item_id": uuid.UUID}
_TAGS = ("items",)


@api.post(ITEMS, request=ItemCreate, response=Item, status=201, auth=True, idempotent=True, errors=(401, 409, 503),
          tags=_TAGS, summary="Create an item owned by the caller",
          description="With an `Idempotency-Key` header, a repeat of the same request (by the same user, "
                      "within a day) answers the item the first one created, with `Idempotent-Replayed: true`, "
                      "instead of creating another; the gateway may then also resend it to another instance "
                      "if one fails mid-request. The same key with a different body is a 422; a repeat that "
                      "arrives while the first is still running waits up to 2 s for it, then gets a 409.")
async def create_item(request: web.Request) -> web.Response:
    owner_id = await request.app[AUTHENTICATOR].user_id(request)
    key = idempotency_key(request)
    new = await decode(request, ItemCreate)
    _refuse_nul({"title": new.title, "description": new.description})
    # The owner's profile first: if auth is down the client gets a 503 and nothing was
    # created, so retrying cannot make a duplicate.
    owner = await _owner_profiles(request, [owner_id])
    try:
        item, replayed = await storage.create_item(get_pool(request), owner_id, new, key)
    except KeyReused:
        raise ApiError(422, "Idempotency-Key was already used for a different request",
                       details=[{"field": "Idempotency-Key", "message": "use a new key for a new request"}]) from None
    except KeyInProgress:
        raise ApiError(409, "a request with this Idempotency-Key is still in progress; repeat it later",
                       headers={"Retry-After": "1"}) from None
    item.owner = owner[owner_id]
    return json_response(item, status=201, headers={"Idempotent-Replayed": "true"} if replayed else None)


@api.get(ITEMS, query=ItemQuery, response=ItemPage, errors=(503,), tags=_TAGS,
         summary="List items, newest first",
         description="Filters combine with AND; `q` matches a substring of the title, ignoring case.")
async def list_items(request: web.Request) -> web.Response:
    wanted = query(request, ItemQuery)
    if wanted.min_price is not None and wanted.max_price is not None and wanted.min_price > wanted.max_price:
        raise ApiError(422, "invalid query parameters",
                       details=[{"field": "min_price", "message": "min_price is greater than max_price"}])
    items, total = await storage.list_items(get_pool(request), wanted)
    await _attach_owners(request, items)
    return json_response(ItemPage(items=items, total=total, limit=wanted.limit, offset=wanted.offset))


@api.get(ITEM, params=_ITEM_ID, response=Item, errors=(404, 503), tags=_TAGS, summary="Get an item")
async def get_item(request: web.Request) -> web.Response:
    try:
        item = await storage.get_item(get_pool(request), _item_id(request))
    except ItemNotFound:
        raise _not_found() from None
    await _attach_owners(request, [item])
    return json_response(item)


@api.patch(ITEM, params=_ITEM_ID, request=ItemUpdate, response=Item, auth=True, errors=(401, 403, 404, 503),
           tags=_TAGS, summary="Change some fields of an item (owner only)")
async def update_item(request: web.Request) -> web.Response:
    user_id = await request.app[AUTHENTICATOR].user_id(request)
    item_id = _item_id(request)
    changes = (await decode(request, ItemUpdate)).changes()
    _refuse_nul(changes)
    owner = await _owner_profiles(request, [user_id])  # before writing, as in create
    try:
        item = await storage.update_item(get_pool(request), item_id, user_id, changes)
    except ItemNotFound:
        raise _not_found() from None
    except NotOwner:
        raise _forbidden("change") from None
    item.owner = owner[user_id]
    return json_response(item)


@api.delete(ITEM, params=_ITEM_ID, status=204, auth=True, errors=(401, 403, 404, 503), tags=_TAGS,
            summary="Delete an item (owner only)")
async def delete_item(request: web.Request) -> web.Response:
    user_id = await request.app[AUTHENTICATOR].user_id(request)
    try:
        await storage.delete_item(get_pool(request), _item_id(request), user_id)
    except ItemNotFound:
        raise _not_found() from None
    except NotOwner:
        raise _forbidden("delete") from None
    return web.Response(status=204)


def _item_id(request: web.Request) -> uuid.UUID:
    # An id that is not a UUID names no item: 404, like any other unknown id.
    try:
        return uuid.UUID(request.match_info["item_id"])
    except ValueError:
        raise _not_found() from None


def _refuse_nul(fields: dict) -> None:
    """PostgreSQL text cannot hold U+0000 (valid in JSON): refuse it as a validation error
    naming the field, instead of letting the INSERT fail with a 500."""
    for name, value in fields.items():
        if isinstance(value, str) and "\x00" in value:
            raise ApiError(422, "request validation failed",
                           details=[{"field": name, "message": "must not contain the NUL character"}])


def _not_found() -> ApiError:
    return ApiError(404, "item not found")


def _forbidden(action: str) -> ApiError:
    return ApiError(403, f"only the item's owner may {action} it")


async def _owner_profiles(request: web.Request, owner_ids: list[uuid.UUID]) -> dict:
    try:
        return await request.app[OWNERS].profiles(owner_ids)
    except AuthUnavailable:
        raise ApiError(503, "auth unavailable: owner profiles cannot be fetched now",
                       headers={"Retry-After": "1"}) from None


async def _attach_owners(request: web.Request, items: list[Item]) -> None:
    owners = await _owner_profiles(request, [item.owner_id for item in items])
    for item in items:
        item.owner = owners[item.owner_id]


async def _purge_old_keys_forever(app: web.Application) -> None:
    """Forgets expired Idempotency-Keys every PURGE_EVERY seconds, off the request path
    (every instance does; a second DELETE finds nothing). The database being down only
    postpones it."""
    while True:
        pool = pool_of(app)
        if pool is not None:
            try:
                forgotten = await storage.purge_old_keys(pool)
                if forgotten:
                    log.info("forgot %d expired idempotency keys", forgotten)
            except Exception as exc:
                log.warning("purging expired idempotency keys failed: %s", type(exc).__name__)
        await asyncio.sleep(PURGE_EVERY)


def build(*, auth_url: str | None = None, owner_ttl: float = 30.0, auth_timeout: float = 2.0) -> web.Application:
    """The app; `auth_url` defaults to UPSTREAM_AUTH_URL (checked at start-up, so the app
    can be built, e.g. for its OpenAPI document, without it)."""
    auth_url = auth_url or os.environ.get("UPSTREAM_AUTH_URL", "")
    authenticator = Authenticator(auth_url, issuer=os.environ.get("AUTH_ISSUER", DEFAULT_ISSUER),
                                  audience=os.environ.get("AUTH_AUDIENCE", DEFAULT_AUDIENCE))
    owners = OwnerDirectory(auth_url, ttl=owner_ttl, timeout=auth_timeout)

    async def start_clients(app: web.Application) -> None:
        if not auth_url:
            raise RuntimeError("example needs auth: UPSTREAM_AUTH_URL is not set")
        await authenticator.start()
        await owners.start()

    async def close_clients(app: web.Application) -> None:
        await authenticator.close()
        await owners.close()

    purging: list[asyncio.Task] = []

    async def start_purging(app: web.Application) -> None:
        purging.append(asyncio.create_task(_purge_old_keys_forever(app)))

    async def stop_purging(app: web.Application) -> None:
        for task in purging:
            task.cancel()

    app = create_app("example", routes=api, migrations=MIGRATIONS,
                     on_startup=[start_clients, start_purging], on_cleanup=[close_clients, stop_purging])
    app[AUTHENTICATOR] = authenticator
    app[OWNERS] = owners
    return app
