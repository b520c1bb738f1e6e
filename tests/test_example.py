"""The example service against a real PostgreSQL (tests.pg) and a fake auth.

The fake auth is a small aiohttp app on 127.0.0.1 serving what the real one promises the
example service: the JWKS and `users/{id}` (PublicUser, or 404 in the error shape). It
counts the profile calls, so the owner cache and single flight can be checked.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest
from aiohttp import web

from services.example import app as example_app
from services.example import storage
from services.example.owners import AuthUnavailable, OwnerDirectory
from services.example.storage import like_pattern
from services.auth.tokens import SigningKey, generate_key, issue_access_token, jwks
from tests.pg import postgres_server  # noqa: F401  (fixture)

ITEMS = "/api/v1/example/items"
ISSUER, AUDIENCE = "meshvisor-auth", "meshvisor"


class FakeAuth:
    def __init__(self) -> None:
        self.key = generate_key()
        self.users: dict[str, str] = {}  # id -> name
        self.profile_calls: Counter[str] = Counter()
        self.delay = 0.0
        self.seen_headers: list[dict] = []
        self.app = web.Application()
        self.app.router.add_get("/api/v1/auth/.well-known/jwks.json", self._jwks)
        self.app.router.add_get("/api/v1/auth/users/{id}", self._user)

    def add_user(self, name: str) -> str:
        user_id = str(uuid.uuid4())
        self.users[user_id] = name
        return user_id

    def token(self, user_id: str, *, key: SigningKey | None = None, **overrides) -> str:
        args = {"subject": user_id, "issuer": ISSUER, "audience": AUDIENCE, "ttl": timedelta(minutes=5)}
        args.update(overrides)
        return issue_access_token(key or self.key, **args)

    def auth(self, user_id: str, **overrides) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user_id, **overrides)}"}

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response(jwks([self.key]))

    async def _user(self, request: web.Request) -> web.Response:
        user_id = request.match_info["id"]
        self.profile_calls[user_id] += 1
        self.seen_headers.append(request.headers.copy())  # case-insensitive
        if self.delay:
            await asyncio.sleep(self.delay)
        if user_id not in self.users:
            return web.json_response({"status": 404, "error": "not_found", "message": "no such user",
                                      "request_id": ""}, status=404)
        return web.json_response({"id": user_id, "name": self.users[user_id]})


@pytest.fixture
def database(postgres_server, monkeypatch):  # noqa: F811
    dsn = postgres_server.create_database(f"example_{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("DATABASE_URL", dsn)
    return dsn


@pytest.fixture
async def fake_auth(aiohttp_server, monkeypatch):
    fake = FakeAuth()
    fake.server = await aiohttp_server(fake.app)
    monkeypatch.setenv("UPSTREAM_AUTH_URL", str(fake.server.make_url("")).rstrip("/"))
    return fake


@pytest.fixture
async def client(database, fake_auth, aiohttp_client):
    return await aiohttp_client(example_app.build())


@pytest.fixture
def ada(fake_auth) -> str:
    return fake_auth.add_user("Ada")


@pytest.fixture
def bob(fake_auth) -> str:
    return fake_auth.add_user("Bob")


def assert_error(body: dict, status: int) -> None:
    assert set(body) >= {"status", "error", "message", "request_id"}, body
    assert body["status"] == status, body
    assert "Traceback" not in json.dumps(body)


async def create(client, fake_auth, user_id: str, **fields) -> dict:
    body = {"title": "a thing", **fields}
    resp = await client.post(ITEMS, json=body, headers=fake_auth.auth(user_id))
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def listing(client, **params) -> dict:
    resp = await client.get(ITEMS, params={k: str(v) for k, v in params.items()})
    assert resp.status == 200, await resp.text()
    return await resp.json()


# ---- the resource ----

async def test_create_get_list_update_delete(client, fake_auth, ada):
    item = await create(client, fake_auth, ada, title="  Lamp  ", description="brass", price_cents=1999,
                        tags=["home", "light"])
    assert item["title"] == "Lamp" and item["owner_id"] == ada and item["price_cents"] == 1999
    assert item["owner"] == {"id": ada, "name": "Ada"}
    assert item["tags"] == ["home", "light"] and item["created_at"] == item["updated_at"]

    resp = await client.get(f"{ITEMS}/{item['id']}")  # reads are public
    assert resp.status == 200 and await resp.json() == item

    page = await listing(client)
    assert page == {"items": [item], "total": 1, "limit": 20, "offset": 0}

    resp = await client.patch(f"{ITEMS}/{item['id']}", json={"price_cents": 1500}, headers=fake_auth.auth(ada))
    assert resp.status == 200, await resp.text()
    updated = await resp.json()
    assert updated["price_cents"] == 1500 and updated["title"] == "Lamp" and updated["tags"] == ["home", "light"]
    assert updated["updated_at"] > item["updated_at"] and updated["owner"]["name"] == "Ada"

    # An empty PATCH changes nothing.
    resp = await client.patch(f"{ITEMS}/{item['id']}", json={}, headers=fake_auth.auth(ada))
    assert resp.status == 200 and await resp.json() == updated

    resp = await client.delete(f"{ITEMS}/{item['id']}", headers=fake_auth.auth(ada))
    assert resp.status == 204
    resp = await client.get(f"{ITEMS}/{item['id']}")
    assert resp.status == 404
    assert_error(await resp.json(), 404)
    resp = await client.delete(f"{ITEMS}/{item['id']}", headers=fake_auth.auth(ada))
    assert resp.status == 404


async def test_pagination_is_stable_newest_first(client, fake_auth, ada):
    created = [await create(client, fake_auth, ada, title=f"item {i}") for i in range(5)]
    newest_first = [c["id"] for c in reversed(created)]
    seen = []
    for offset in (0, 2, 4):
        page = await listing(client, limit=2, offset=offset)
        assert page["total"] == 5 and page["limit"] == 2 and page["offset"] == offset
        seen += [i["id"] for i in page["items"]]
    assert seen == newest_first
    page = await listing(client, limit=2, offset=10)
    assert page["items"] == [] and page["total"] == 5


async def test_filters(client, fake_auth, ada, bob):
    lamp = await create(client, fake_auth, ada, title="Brass Lamp", price_cents=5000, tags=["home", "light"])
    chair = await create(client, fake_auth, ada, title="Chair", price_cents=12000, tags=["home"])
    torch = await create(client, fake_auth, bob, title="Torch 100%", price_cents=800, tags=["light", "outdoor"])
    under = await create(client, fake_auth, bob, title="snake_case lamp", price_cents=100)

    def ids(page):
        return {i["id"] for i in page["items"]}

    assert ids(await listing(client, owner_id=ada)) == {lamp["id"], chair["id"]}
    assert ids(await listing(client, owner_id=uuid.uuid4())) == set()
    assert ids(await listing(client, tag="light")) == {lamp["id"], torch["id"]}
    assert ids(await listing(client, q="LAMP")) == {lamp["id"], under["id"]}
    # `%` and `_` are literal characters in q, not wildcards.
    assert ids(await listing(client, q="0%")) == {torch["id"]}
    assert ids(await listing(client, q="%")) == {torch["id"]}
    assert ids(await listing(client, q="e_c")) == {under["id"]}
    assert ids(await listing(client, q="_")) == {under["id"]}
    assert ids(await listing(client, min_price=5000)) == {lamp["id"], chair["id"]}
    assert ids(await listing(client, max_price=800)) == {torch["id"], under["id"]}
    assert ids(await listing(client, min_price=800, max_price=5000)) == {lamp["id"], torch["id"]}
    page = await listing(client, owner_id=ada, tag="home", q="ch", max_price=20000)
    assert ids(page) == {chair["id"]} and page["total"] == 1


def test_like_pattern_escapes_wildcards():
    assert like_pattern("50%_off\\") == "%50\\%\\_off\\\\%"


# ---- owners' profiles ----

async def test_owner_profiles_fetched_once_per_owner(client, fake_auth, ada, bob):
    for i in range(4):
        await create(client, fake_auth, ada, title=f"ada {i}")
    await create(client, fake_auth, bob, title="bob's")
    client.app[example_app.OWNERS]._cache.clear()  # as if the TTL had passed
    fake_auth.profile_calls.clear()

    page = await listing(client)
    assert {i["owner"]["name"] for i in page["items"]} == {"Ada", "Bob"}
    assert fake_auth.profile_calls == {ada: 1, bob: 1}

    # Cached: more reads within the TTL do not ask auth again.
    await listing(client)
    await client.get(f"{ITEMS}/{page['items'][0]['id']}")
    assert fake_auth.profile_calls == {ada: 1, bob: 1}
    # The request id travels with the call to auth.
    assert all("X-Request-Id" in h and "traceparent" in h for h in fake_auth.seen_headers), fake_auth.seen_headers


async def test_concurrent_reads_share_one_call_to_auth(client, fake_auth, ada):
    item = await create(client, fake_auth, ada)
    client.app[example_app.OWNERS]._cache.clear()
    fake_auth.profile_calls.clear()
    fake_auth.delay = 0.2
    responses = await asyncio.gather(*(client.get(f"{ITEMS}/{item['id']}") for _ in range(10)))
    assert [r.status for r in responses] == [200] * 10
    assert fake_auth.profile_calls == {ada: 1}


async def test_owner_unknown_to_auth_is_shown_as_none(client, fake_auth):
    stranger = str(uuid.uuid4())  # a valid token, but auth has no such user (deleted since)
    item = await create(client, fake_auth, stranger)
    assert item["owner"] is None and item["owner_id"] == stranger


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_owner_cache_expires_and_is_bounded(fake_auth):
    users = [fake_auth.add_user(f"user {i}") for i in range(3)]
    clock = FakeClock()
    directory = OwnerDirectory(str(fake_auth.server.make_url("")), ttl=30, max_entries=2, clock=clock)
    await directory.start()
    try:
        first = uuid.UUID(users[0])
        assert (await directory.profile(first)).name == "user 0"
        clock.now = 29
        await directory.profile(first)
        assert fake_auth.profile_calls[users[0]] == 1
        clock.now = 31  # expired: asked again
        await directory.profile(first)
        assert fake_auth.profile_calls[users[0]] == 2
        await directory.profiles([uuid.UUID(users[1]), uuid.UUID(users[2])])  # evicts the oldest
        assert len(directory._cache) == 2 and first not in directory._cache
    finally:
        await directory.close()


async def test_malformed_profile_from_auth_is_unavailable(aiohttp_server):
    async def garbage(request):
        return web.Response(text="<html>oops</html>")

    app = web.Application()
    app.router.add_get("/api/v1/auth/users/{id}", garbage)
    server = await aiohttp_server(app)
    directory = OwnerDirectory(str(server.make_url("")))
    await directory.start()
    try:
        with pytest.raises(AuthUnavailable):
            await directory.profile(uuid.uuid4())
    finally:
        await directory.close()


# ---- who may do what ----

async def test_only_the_owner_may_change_or_delete(client, fake_auth, ada, bob):
    item = await create(client, fake_auth, ada, title="Ada's")
    resp = await client.patch(f"{ITEMS}/{item['id']}", json={"title": "mine now"}, headers=fake_auth.auth(bob))
    assert resp.status == 403
    assert_error(await resp.json(), 403)
    resp = await client.delete(f"{ITEMS}/{item['id']}", headers=fake_auth.auth(bob))
    assert resp.status == 403
    assert_error(await resp.json(), 403)
    resp = await client.get(f"{ITEMS}/{item['id']}")
    assert (await resp.json())["title"] == "Ada's"


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_bad_tokens_are_401(client, fake_auth, ada):
    item = await create(client, fake_auth, ada)
    other = generate_key()
    forged_same_kid = SigningKey(other.private_key)
    forged_same_kid.kid = fake_auth.key.kid  # signed by another key, claiming ours
    alg_none = f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': fake_auth.key.kid})}." \
               f"{_b64({'sub': ada, 'iss': ISSUER, 'aud': AUDIENCE, 'iat': 1, 'exp': 4102444800})}."
    past = datetime.now(timezone.utc) - timedelta(hours=1)
    bad = {
        "none": {},
        "basic": {"Authorization": "Basic YWRhOnB3"},
        "garbage": {"Authorization": "Bearer not-a-jwt"},
        "expired": fake_auth.auth(ada, ttl=timedelta(minutes=5), now=past),
        "forged": {"Authorization": f"Bearer {fake_auth.token(ada, key=forged_same_kid)}"},
        "unknown kid": {"Authorization": f"Bearer {fake_auth.token(ada, key=other)}"},
        "alg none": {"Authorization": f"Bearer {alg_none}"},
        "wrong audience": fake_auth.auth(ada, audience="someone-else"),
        "wrong issuer": fake_auth.auth(ada, issuer="someone-else"),
        "subject not a user id": fake_auth.auth("admin"),
    }
    for name, headers in bad.items():
        for method, path, body in (("POST", ITEMS, {"title": "x"}),
                                   ("PATCH", f"{ITEMS}/{item['id']}", {"title": "x"}),
                                   ("DELETE", f"{ITEMS}/{item['id']}", None)):
            resp = await client.request(method, path, json=body, headers=headers)
            assert resp.status == 401, (name, method, await resp.text())
            assert_error(await resp.json(), 401)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await listing(client))["total"] == 1


# ---- auth unavailable ----

async def test_auth_stopped_is_503_in_the_error_shape(client, fake_auth, ada, database):
    item = await create(client, fake_auth, ada)  # the verifier now holds the key
    await fake_auth.server.close()
    client.app[example_app.OWNERS]._cache.clear()

    for resp in (await client.get(ITEMS), await client.get(f"{ITEMS}/{item['id']}"),
                 await client.post(ITEMS, json={"title": "new"}, headers=fake_auth.auth(ada))):
        assert resp.status == 503, await resp.text()
        body = await resp.json()
        assert_error(body, 503)
        assert "auth unavailable" in body["message"]
    # The create that failed created nothing.
    conn = await asyncpg.connect(database)
    try:
        assert await conn.fetchval("SELECT count(*) FROM items") == 1
    finally:
        await conn.close()
    # Deleting needs no profile: cached keys keep tokens working while auth is down.
    resp = await client.delete(f"{ITEMS}/{item['id']}", headers=fake_auth.auth(ada))
    assert resp.status == 204


async def test_no_cached_key_and_auth_stopped_is_503(client, fake_auth, ada):
    await fake_auth.server.close()
    resp = await client.post(ITEMS, json={"title": "x"}, headers=fake_auth.auth(ada))
    assert resp.status == 503
    body = await resp.json()
    assert_error(body, 503)
    assert "auth unavailable" in body["message"]


async def test_slow_auth_is_503(database, fake_auth, aiohttp_client, ada):
    client = await aiohttp_client(example_app.build(auth_timeout=0.2))
    item = await create(client, fake_auth, ada)
    client.app[example_app.OWNERS]._cache.clear()
    fake_auth.delay = 1.0
    resp = await client.get(f"{ITEMS}/{item['id']}")
    assert resp.status == 503
    assert_error(await resp.json(), 503)


# ---- bad input ----

async def test_bad_bodies_are_4xx_in_the_error_shape(client, fake_auth, ada):
    headers = fake_auth.auth(ada)
    resp = await client.post(ITEMS, data=b"{not json", headers={**headers, "Content-Type": "application/json"})
    assert resp.status == 400
    assert_error(await resp.json(), 400)
    resp = await client.post(ITEMS, data=b"title=x", headers={**headers, "Content-Type": "text/plain"})
    assert resp.status == 415
    assert_error(await resp.json(), 415)
    for body, field in (({"title": "x", "owner_id": str(uuid.uuid4())}, "owner_id"),
                        ({"title": ""}, "title"), ({"title": "   "}, "title"), ({}, "title"),
                        ({"title": "x", "price_cents": -1}, "price_cents"),
                        ({"title": "x", "tags": ["Not A Tag"]}, "tags[0]"),
                        ({"title": 5}, "title")):
        resp = await client.post(ITEMS, json=body, headers=headers)
        assert resp.status == 422, body
        error = await resp.json()
        assert_error(error, 422)
        assert error["details"][0]["field"] == field
    item = await create(client, fake_auth, ada)
    resp = await client.patch(f"{ITEMS}/{item['id']}", json={"id": str(uuid.uuid4())}, headers=headers)
    assert resp.status == 422 and (await resp.json())["details"][0]["field"] == "id"
    resp = await client.patch(f"{ITEMS}/{item['id']}", json={"title": None}, headers=headers)
    assert resp.status == 422


async def test_sql_metacharacters_are_stored_verbatim(client, fake_auth, ada):
    title = "Robert'); DROP TABLE items;-- $1 \\ %_"
    description = "'; SELECT pg_sleep(10); --\" \x27 ${}"
    item = await create(client, fake_auth, ada, title=title, description=description)
    assert item["title"] == title and item["description"] == description
    resp = await client.get(f"{ITEMS}/{item['id']}")
    assert (await resp.json())["title"] == title
    page = await listing(client, q="'); DROP")
    assert [i["id"] for i in page["items"]] == [item["id"]]
    page = await listing(client, q="' OR 1=1 --")
    assert page["total"] == 0
    assert (await listing(client))["total"] == 1  # the table is still there


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "1", "' OR 1=1 --", "%00", "0" * 40])
async def test_invalid_item_ids_are_404(client, fake_auth, ada, bad_id):
    from urllib.parse import quote
    path = f"{ITEMS}/{quote(bad_id, safe='')}"
    for method in ("GET", "PATCH", "DELETE"):
        resp = await client.request(method, path, json={} if method == "PATCH" else None,
                                    headers=fake_auth.auth(ada))
        assert resp.status == 404, (method, await resp.text())
        assert_error(await resp.json(), 404)
    resp = await client.get(f"{ITEMS}/{uuid.uuid4()}")
    assert resp.status == 404


@pytest.mark.parametrize("params", [
    {"limit": "0"}, {"limit": "101"}, {"limit": "abc"}, {"offset": "-1"}, {"owner_id": "nope"},
    {"tag": "UPPER"}, {"min_price": "-5"}, {"max_price": "cheap"}, {"min_price": "10", "max_price": "5"},
    {"q": ""}, {"q": "x" * 201},
])
async def test_bad_query_values_are_422(client, params):
    resp = await client.get(ITEMS, params=params)
    assert resp.status == 422, await resp.text()
    body = await resp.json()
    assert_error(body, 422)
    assert body["details"][0]["field"] == next(iter(params))


# ---- start-up and documentation ----

async def test_migrations_applied_once_by_two_instances_starting_together(database, fake_auth, aiohttp_client, ada):
    first, second = await asyncio.gather(aiohttp_client(example_app.build()), aiohttp_client(example_app.build()))
    item = await create(first, fake_auth, ada)
    resp = await second.get(f"{ITEMS}/{item['id']}")
    assert resp.status == 200
    conn = await asyncpg.connect(database)
    try:
        assert await conn.fetch("SELECT version FROM schema_migrations ORDER BY version") == [
            ("0001_items",), ("0002_idempotency_keys",)]
    finally:
        await conn.close()
    for c in (first, second):
        assert (await c.get("/health")).status == 200


async def test_openapi_documents_the_routes(client):
    doc = await (await client.get("/openapi.json")).json()
    items = doc["paths"][ITEMS]
    assert set(items) == {"get", "post"} and set(doc["paths"][f"{ITEMS}/{{item_id}}"]) == {"get", "patch", "delete"}
    assert items["post"]["security"] == [{"bearerAuth": []}] and "security" not in items["get"]
    assert {p["name"] for p in items["get"]["parameters"]} == {
        "limit", "offset", "owner_id", "tag", "q", "min_price", "max_price"}
    assert [(p["name"], p["in"]) for p in items["post"]["parameters"]] == [("Idempotency-Key", "header")]


async def test_nul_characters_are_422_not_500(client, fake_auth, ada):
    # PostgreSQL text cannot hold U+0000; valid JSON can.
    for body in ({"title": "a\u0000b"}, {"title": "ok", "description": "x\u0000"}):
        resp = await client.post(ITEMS, json=body, headers=fake_auth.auth(ada))
        assert resp.status == 422, await resp.text()
        assert_error(await resp.json(), 422)
    item = await create(client, fake_auth, ada)
    resp = await client.patch(f"{ITEMS}/{item['id']}", json={"description": "\u0000"}, headers=fake_auth.auth(ada))
    assert resp.status == 422
    resp = await client.get(ITEMS, params={"q": "a\u0000"})
    assert resp.status == 422


async def test_idempotency_key_answers_the_first_outcome(client, fake_auth, ada, bob, database):
    """A repeat with the same key creates nothing and answers the first item; concurrent
    repeats too (the key is claimed in the item's transaction); another user's same key is
    a different key; the same key for a different body is a 422."""
    body = {"title": "once", "price_cents": 5}
    key = {"Idempotency-Key": "order-7f3a"}
    first = await client.post(ITEMS, json=body, headers={**fake_auth.auth(ada), **key})
    assert first.status == 201 and "Idempotent-Replayed" not in first.headers
    made = await first.json()
    again = await client.post(ITEMS, json=body, headers={**fake_auth.auth(ada), **key})
    assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert await again.json() == made

    concurrent = {"Idempotency-Key": "burst"}
    replies = await asyncio.gather(*(client.post(ITEMS, json={"title": "burst"}, headers={**fake_auth.auth(ada), **concurrent})
                                     for _ in range(8)))
    assert [r.status for r in replies] == [201] * 8
    assert len({(await r.json())["id"] for r in replies}) == 1

    other = await client.post(ITEMS, json=body, headers={**fake_auth.auth(bob), **key})
    assert other.status == 201 and (await other.json())["id"] != made["id"]

    reused = await client.post(ITEMS, json={"title": "something else"}, headers={**fake_auth.auth(ada), **key})
    assert reused.status == 422
    assert_error(await reused.json(), 422)
    for bad in ("", "x" * 256, "with space", "caf\u00e9"):
        resp = await client.post(ITEMS, json=body, headers={**fake_auth.auth(ada), "Idempotency-Key": bad})
        assert resp.status == 400, (bad, await resp.text())
        assert_error(await resp.json(), 400)

    conn = await asyncpg.connect(database)
    try:
        assert await conn.fetchval("SELECT count(*) FROM items WHERE title IN ('once', 'burst')") == 3
        # A key older than the retention is forgotten: the same request creates anew.
        await conn.execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'order-7f3a'")
    finally:
        await conn.close()
    late = await client.post(ITEMS, json=body, headers={**fake_auth.auth(ada), **key})
    assert late.status == 201 and "Idempotent-Replayed" not in late.headers and (await late.json())["id"] != made["id"]


async def test_a_repeat_waits_for_a_first_request_still_running_then_gets_409(client, fake_auth, ada, database):
    """The first request with a key holds its row until it commits or rolls back. A repeat
    waits for it (storage.KEY_WAIT) and is then told to come back: a 409 in the error shape
    with Retry-After, not a 500 when the statement timeout fires. Once the first rolled
    back (its instance died), the repeat creates the item."""
    conn = await asyncpg.connect(database)
    try:
        first = conn.transaction()
        await first.start()
        await conn.execute("INSERT INTO idempotency_keys (owner_id, key, fingerprint) VALUES ($1, 'slow', '')",
                           uuid.UUID(ada))
        started = time.monotonic()
        resp = await client.post(ITEMS, json={"title": "slow"}, headers={**fake_auth.auth(ada), "Idempotency-Key": "slow"})
        waited = time.monotonic() - started
        assert resp.status == 409, await resp.text()
        assert_error(await resp.json(), 409)
        assert resp.headers["Retry-After"] == "1"
        assert 1.5 < waited < 4, waited
        await first.rollback()
        resp = await client.post(ITEMS, json={"title": "slow"}, headers={**fake_auth.auth(ada), "Idempotency-Key": "slow"})
        assert resp.status == 201 and "Idempotent-Replayed" not in resp.headers
        assert await conn.fetchval("SELECT count(*) FROM items WHERE title = 'slow'") == 1

        # The same when the row held is an expired use of the key (a concurrent reuse of
        # it, or the purge, is deleting it): a 409, not a 500.
        await conn.execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'slow'")
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM idempotency_keys WHERE key = 'slow' FOR UPDATE")
            resp = await client.post(ITEMS, json={"title": "slow"},
                                     headers={**fake_auth.auth(ada), "Idempotency-Key": "slow"})
            assert resp.status == 409, await resp.text()
    finally:
        await conn.close()


async def test_expired_keys_are_purged_in_the_background(database, fake_auth, ada, aiohttp_client, monkeypatch):
    monkeypatch.setattr(example_app, "PURGE_EVERY", 0.2)
    monkeypatch.setattr(storage, "PURGE_BATCH", 2)  # several batches
    client = await aiohttp_client(example_app.build())
    for n in range(5):
        resp = await client.post(ITEMS, json={"title": "kept"}, headers={**fake_auth.auth(ada), "Idempotency-Key": f"old-{n}"})
        assert resp.status == 201
    conn = await asyncpg.connect(database)
    try:
        assert await conn.fetchval("SELECT count(*) FROM idempotency_keys") == 5, "fresh keys are kept"
        await conn.execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'")
        deadline = time.monotonic() + 5
        while await conn.fetchval("SELECT count(*) FROM idempotency_keys") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await conn.fetchval("SELECT count(*) FROM idempotency_keys") == 0
        assert await conn.fetchval("SELECT count(*) FROM items WHERE title = 'kept'") == 5  # items stay
    finally:
        await conn.close()
