"""The auth service: accounts, passwords, tokens (routes under /api/v1/auth).

Access tokens are short-lived EdDSA JWTs signed with one key that every auth instance
shares (it lives in auth's database); other services verify them against the JWKS
published here. Refresh tokens are random strings, stored as hashes, usable once.
"""

from __future__ import annotations

import logging
import os
import uuid
from datetime import timedelta
from pathlib import Path

from aiohttp import web

from services.auth import passwords, storage
from services.auth.contract import (LoginRequest, LogoutRequest, PublicUser, RefreshRequest, RegisterRequest, TokenPair,
                                    UserProfile)
from services.auth.tokens import SigningKey, hash_refresh_token, issue_access_token, jwks, new_refresh_token
from shared.kit.app import create_app, get_pool, pool_of
from shared.kit.errors import ApiError
from shared.kit.openapi import Routes
from shared.kit.tokens import bearer_token, decode_access_token
from shared.kit.web import decode, json_response

log = logging.getLogger("meshvisor.auth")

PREFIX = "/api/v1/auth"
ISSUER = os.environ.get("AUTH_ISSUER", "meshvisor-auth")
AUDIENCE = os.environ.get("AUTH_AUDIENCE", "meshvisor")
ACCESS_TTL = timedelta(seconds=int(os.environ.get("AUTH_ACCESS_TTL", "900")))
REFRESH_TTL = timedelta(days=int(os.environ.get("AUTH_REFRESH_DAYS", "30")))
# Failed logins allowed per 15-minute window, per account and per client address.
MAX_FAILURES_PER_ACCOUNT = int(os.environ.get("AUTH_MAX_FAILURES_PER_ACCOUNT", "5"))
MAX_FAILURES_PER_ADDRESS = int(os.environ.get("AUTH_MAX_FAILURES_PER_ADDRESS", "30"))
BAD_LOGIN = "invalid email or password"  # the same words for an unknown email and a wrong password

class KeyHolder:
    """The app's signing key: filled at start-up, or on first use if PostgreSQL was down."""

    key: SigningKey | None = None


KEY = web.AppKey("signing_key", KeyHolder)
api = Routes()


async def _key(request: web.Request) -> SigningKey:
    holder = request.app[KEY]
    if holder.key is None:
        holder.key = await storage.signing_key(get_pool(request))
    return holder.key


def _profile(user: storage.User) -> UserProfile:
    return UserProfile(id=user.id, email=user.email, name=user.name, created_at=user.created_at)


async def _token_pair(request: web.Request, user_id: uuid.UUID) -> TokenPair:
    key = await _key(request)
    refresh = new_refresh_token()
    await storage.store_refresh_token(get_pool(request), hash_refresh_token(refresh), user_id, REFRESH_TTL)
    access = issue_access_token(key, subject=str(user_id), issuer=ISSUER, audience=AUDIENCE, ttl=ACCESS_TTL)
    return TokenPair(access_token=access, refresh_token=refresh, expires_in=int(ACCESS_TTL.total_seconds()))


def _client_address(request: web.Request) -> str:
    """The address the gateway saw: the last X-Forwarded-For entry is the one it added
    itself; earlier entries are whatever the client claimed."""
    forwarded = request.headers.get("X-Forwarded-For", "")
    if forwarded:
        return forwarded.rsplit(",", 1)[-1].strip()
    return request.remote or "unknown"


@api.post(f"{PREFIX}/register", request=RegisterRequest, response=UserProfile, status=201,
          summary="Create an account", errors=(409,))
async def register(request: web.Request) -> web.Response:
    body = await decode(request, RegisterRequest)
    password_hash = await passwords.hash_password(body.password)
    try:
        user = await storage.create_user(get_pool(request), body.email, body.name, password_hash)
    except storage.EmailTaken:
        raise ApiError(409, "an account with this email already exists") from None
    log.info("account created", extra={"fields": {"user_id": str(user.id)}})
    return json_response(_profile(user), status=201)


@api.post(f"{PREFIX}/login", request=LoginRequest, response=TokenPair,
          summary="Exchange email and password for an access and a refresh token", errors=(401, 429))
async def login(request: web.Request) -> web.Response:
    body = await decode(request, LoginRequest)
    pool = get_pool(request)
    account, address = f"email:{body.email}", f"ip:{_client_address(request)}"
    if (await storage.login_failures(pool, account) >= MAX_FAILURES_PER_ACCOUNT
            or await storage.login_failures(pool, address) >= MAX_FAILURES_PER_ADDRESS):
        raise ApiError(429, "too many failed logins; try again later",
                       headers={"Retry-After": str(int(storage.LOGIN_WINDOW.total_seconds()))})
    user = await storage.user_by_email(pool, body.email)
    if not await passwords.verify_password(user.password_hash if user else None, body.password):
        await storage.record_login_failure(pool, [account, address])
        raise ApiError(401, BAD_LOGIN, headers={"WWW-Authenticate": "Bearer"})
    await storage.clear_login_failures(pool, account)
    if passwords.needs_rehash(user.password_hash):  # parameters got stronger since it was set
        await storage.update_password_hash(pool, user.id, await passwords.hash_password(body.password))
    return json_response(await _token_pair(request, user.id))


@api.post(f"{PREFIX}/refresh", request=RefreshRequest, response=TokenPair,
          summary="Trade a refresh token (used once) for a new pair", errors=(401,))
async def refresh(request: web.Request) -> web.Response:
    body = await decode(request, RefreshRequest)
    user_id = await storage.use_refresh_token(get_pool(request), hash_refresh_token(body.refresh_token))
    if user_id is None:
        raise ApiError(401, "refresh token is invalid, expired or already used")
    return json_response(await _token_pair(request, user_id))


@api.post(f"{PREFIX}/logout", request=LogoutRequest, status=204, summary="Revoke a refresh token")
async def logout(request: web.Request) -> web.Response:
    body = await decode(request, LogoutRequest)
    # Unknown or already revoked tokens get the same answer: logging out is idempotent.
    await storage.revoke_refresh_token(get_pool(request), hash_refresh_token(body.refresh_token))
    return web.Response(status=204)


@api.get(f"{PREFIX}/me", response=UserProfile, auth=True, summary="The account of the access token")
async def me(request: web.Request) -> web.Response:
    key = await _key(request)
    # InvalidToken becomes a 401 in the error middleware.
    claims = decode_access_token(bearer_token(request.headers.get("Authorization")), key.private_key.public_key(),
                                 issuer=ISSUER, audience=AUDIENCE)
    try:
        user_id = uuid.UUID(claims.sub)
    except ValueError:
        raise ApiError(401, "invalid access token", headers={"WWW-Authenticate": "Bearer"}) from None
    user = await storage.user_by_id(get_pool(request), user_id)
    if user is None:
        raise ApiError(401, "the account of this token no longer exists")
    return json_response(_profile(user))


@api.get(f"{PREFIX}/users/{{id}}", response=PublicUser, params={"id": uuid.UUID}, errors=(404,),
         summary="A user's public profile (for other services)")
async def user(request: web.Request) -> web.Response:
    try:
        user_id = uuid.UUID(request.match_info["id"])
    except ValueError:
        raise ApiError(404, "no such user") from None
    found = await storage.user_by_id(get_pool(request), user_id)
    if found is None:
        raise ApiError(404, "no such user")
    return json_response(PublicUser(id=found.id, name=found.name),
                         headers={"Cache-Control": "max-age=30"})


@api.get(f"{PREFIX}/.well-known/jwks.json", summary="Public keys that verify access tokens")
async def public_keys(request: web.Request) -> web.Response:
    return json_response(jwks([await _key(request)]), headers={"Cache-Control": "max-age=300"})


async def _load_key(app: web.Application) -> None:
    pool = pool_of(app)
    if pool is not None:  # else loaded on the first request once PostgreSQL is back
        app[KEY].key = await storage.signing_key(pool)


def build() -> web.Application:
    app = create_app("auth", routes=api, database=True, migrations=Path(__file__).parent / "migrations",
                     on_startup=[_load_key])
    app[KEY] = KeyHolder()
    return app
