"""The auth service against a real PostgreSQL (tests.pg), driven over HTTP in-process."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from datetime import timedelta

import jwt
import pytest

from services.auth import app as auth_app
from services.auth.tokens import generate_key, issue_access_token
from shared.kit.tokens import TokenVerifier
from tests.pg import postgres_server  # noqa: F401  (fixture)

P = "/api/v1/auth"


@pytest.fixture
def database(postgres_server, monkeypatch):  # noqa: F811
    dsn = postgres_server.create_database(f"auth_{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("DATABASE_URL", dsn)
    return dsn


@pytest.fixture
async def client(database, aiohttp_client):
    return await aiohttp_client(auth_app.build())


def assert_error(body: dict, status: int) -> None:
    assert set(body) >= {"status", "error", "message", "request_id"} and body["status"] == status
    assert "Traceback" not in json.dumps(body)


async def register(client, email="ada@example.com", password="correct horse", name="Ada") -> dict:
    resp = await client.post(f"{P}/register", json={"email": email, "password": password, "name": name})
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def login(client, email="ada@example.com", password="correct horse"):
    return await client.post(f"{P}/login", json={"email": email, "password": password})


async def test_register_login_me_refresh_logout(client):
    profile = await register(client, email="Ada@Example.com")
    assert profile["email"] == "ada@example.com" and profile["name"] == "Ada" and "password" not in json.dumps(profile)
    resp = await login(client)
    assert resp.status == 200
    pair = await resp.json()
    assert pair["token_type"] == "Bearer" and pair["expires_in"] == 900
    me = await client.get(f"{P}/me", headers={"Authorization": f"Bearer {pair['access_token']}"})
    assert me.status == 200 and (await me.json())["id"] == profile["id"]

    # Refresh tokens rotate: each can be used once.
    resp = await client.post(f"{P}/refresh", json={"refresh_token": pair["refresh_token"]})
    assert resp.status == 200
    second = await resp.json()
    again = await client.post(f"{P}/refresh", json={"refresh_token": pair["refresh_token"]})
    assert again.status == 401
    assert (await client.post(f"{P}/logout", json={"refresh_token": second["refresh_token"]})).status == 204
    revoked = await client.post(f"{P}/refresh", json={"refresh_token": second["refresh_token"]})
    assert revoked.status == 401
    assert_error(await revoked.json(), 401)


async def test_public_profile_and_jwks_verify_tokens(client):
    profile = await register(client)
    resp = await client.get(f"{P}/users/{profile['id']}")
    assert resp.status == 200 and await resp.json() == {"id": profile["id"], "name": "Ada"}
    for unknown in (str(uuid.uuid4()), "not-a-uuid"):
        resp = await client.get(f"{P}/users/{unknown}")
        assert resp.status == 404
        assert_error(await resp.json(), 404)
    pair = await (await login(client)).json()
    # Another service verifies with the published keys only.
    verifier = TokenVerifier(str(client.make_url(f"{P}/.well-known/jwks.json")),
                             issuer="meshvisor-auth", audience="meshvisor")
    try:
        claims = await verifier.verify(pair["access_token"])
        assert claims.sub == profile["id"]
    finally:
        await verifier.close()


async def test_bad_input_gets_documented_4xx(client):
    await register(client)
    resp = await client.post(f"{P}/register", json={"email": "ADA@example.com", "password": "another one", "name": "A2"})
    assert resp.status == 409
    assert_error(await resp.json(), 409)
    cases = [
        ({"email": "not-an-email", "password": "long enough", "name": "x"}, 422, "email"),
        ({"email": "b@example.com", "password": "short", "name": "x"}, 422, "password"),
        ({"email": "b@example.com", "password": "long enough"}, 422, "name"),
        ({"email": "b@example.com", "password": "long enough", "name": "x", "admin": True}, 422, "admin"),
    ]
    for body, status, field in cases:
        resp = await client.post(f"{P}/register", json=body)
        data = await resp.json()
        assert resp.status == status, (body, data)
        assert_error(data, status)
        assert field in json.dumps(data["details"])
    resp = await client.post(f"{P}/register", data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400
    resp = await client.post(f"{P}/login", data=b"email=a", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status in (400, 415)
    assert_error(await resp.json(), resp.status)


async def test_wrong_password_and_unknown_email_look_the_same(client):
    await register(client)
    wrong = await login(client, password="wrong password")
    unknown = await login(client, email="nobody@example.com")
    assert wrong.status == unknown.status == 401
    assert (await wrong.json())["message"] == (await unknown.json())["message"]


async def test_login_attempts_are_rate_limited_per_account(client):
    await register(client)
    statuses = [(await login(client, password=f"wrong {n}")).status for n in range(auth_app.MAX_FAILURES_PER_ACCOUNT)]
    assert statuses == [401] * auth_app.MAX_FAILURES_PER_ACCOUNT
    blocked = await login(client)  # even the right password, for this window
    assert blocked.status == 429 and "Retry-After" in blocked.headers
    assert_error(await blocked.json(), 429)
    other = await register(client, email="bob@example.com")
    assert (await login(client, email="bob@example.com")).status == 200, other


async def test_forged_expired_and_alg_none_tokens_are_401(client):
    profile = await register(client)
    await login(client)
    forged = issue_access_token(generate_key(), subject=profile["id"], issuer="meshvisor-auth",
                                audience="meshvisor", ttl=timedelta(minutes=5))
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    payload = base64.urlsafe_b64encode(json.dumps(
        {"sub": profile["id"], "iss": "meshvisor-auth", "aud": "meshvisor", "iat": int(time.time()),
         "exp": int(time.time()) + 600}).encode()).rstrip(b"=").decode()
    holder = client.app[auth_app.KEY]
    expired = jwt.encode({"sub": profile["id"], "iss": "meshvisor-auth", "aud": "meshvisor",
                          "iat": int(time.time()) - 3600, "exp": int(time.time()) - 60},
                         holder.key.private_key, algorithm="EdDSA", headers={"kid": holder.key.kid})
    for token in (forged, f"{header}.{payload}.", expired, "garbage", ""):
        resp = await client.get(f"{P}/me", headers={"Authorization": f"Bearer {token}"})
        data = await resp.json()
        assert resp.status == 401, token
        assert_error(data, 401)
        assert not token or token not in json.dumps(data)
    assert (await client.get(f"{P}/me")).status == 401


async def test_two_instances_share_one_signing_key(database, aiohttp_client):
    first, second = await asyncio.gather(aiohttp_client(auth_app.build()), aiohttp_client(auth_app.build()))
    await register(first)
    pair = await (await login(first)).json()
    me = await second.get(f"{P}/me", headers={"Authorization": f"Bearer {pair['access_token']}"})
    assert me.status == 200, "a token from one instance is valid at the other"
    keys_a = await (await first.get(f"{P}/.well-known/jwks.json")).json()
    keys_b = await (await second.get(f"{P}/.well-known/jwks.json")).json()
    assert keys_a == keys_b and len(keys_a["keys"]) == 1


async def test_openapi_lists_every_endpoint(client):
    doc = await (await client.get("/openapi.json")).json()
    assert doc["openapi"] == "3.0.3"
    for path in ("register", "login", "refresh", "logout", "me", "users/{id}", ".well-known/jwks.json"):
        assert f"{P}/{path}" in doc["paths"], path


async def test_login_attempts_are_rate_limited_per_client_address(client, monkeypatch):
    """Guessing across many accounts from one address is stopped too; the address is the
    last X-Forwarded-For entry (the one the gateway added), not what the client claims."""
    monkeypatch.setattr(auth_app, "MAX_FAILURES_PER_ADDRESS", 3)
    await register(client)
    attacker = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}
    for n in range(3):
        resp = await client.post(f"{P}/login", json={"email": f"user{n}@example.com", "password": "guess"},
                                 headers=attacker)
        assert resp.status == 401
    resp = await client.post(f"{P}/login", json={"email": "ada@example.com", "password": "correct horse"},
                             headers=attacker)
    assert resp.status == 429
    # A spoofed first entry does not dodge the limit; another real address is not blocked.
    spoofed = {"X-Forwarded-For": "192.0.2.99, 203.0.113.7"}
    assert (await client.post(f"{P}/login", json={"email": "ada@example.com", "password": "correct horse"},
                              headers=spoofed)).status == 429
    other = {"X-Forwarded-For": "203.0.113.8"}
    assert (await client.post(f"{P}/login", json={"email": "ada@example.com", "password": "correct horse"},
                              headers=other)).status == 200
