"""Verifying access tokens: Ed25519-signed JWTs issued by auth (services/auth/tokens.py).

auth publishes the public half of its signing key as a JWKS. Every other service
verifies with a `TokenVerifier`, which fetches that JWKS through its sidecar's upstream
listener and caches the keys by key id; auth itself checks its own tokens with
`decode_access_token` and the key in hand.

Only EdDSA is ever accepted: the algorithm comes from our side, never from the token,
which closes the classic `alg: none` and "HS256 keyed with the public key" forgeries.
Error messages never contain the token: they end up in 401 bodies and in logs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from jwt.algorithms import OKPAlgorithm

from shared.kit.errors import ApiError

log = logging.getLogger("meshvisor.tokens")

ALGORITHM = "EdDSA"
# A real access token is a few hundred bytes; anything this large is garbage or abuse
# and not worth base64-decoding.
MAX_TOKEN_LENGTH = 8192


class InvalidToken(ApiError):
    """The token must be refused (401). The reason never contains the token itself."""

    def __init__(self, reason: str) -> None:
        super().__init__(401, reason, headers={"WWW-Authenticate": "Bearer"})
        self.reason = reason


class VerifierUnavailable(ApiError):
    """The keys needed to judge the token cannot be had right now (503): not the caller's
    fault. `str()` says why, for the log."""

    log_as_warning = True

    def __init__(self, detail: str) -> None:
        super().__init__(503, "auth unavailable", headers={"Retry-After": "1"})
        self.args = (detail,)


# --- verification ---------------------------------------------------------------------


class Claims(msgspec.Struct, frozen=True, kw_only=True):
    sub: str
    exp: int
    iat: int
    iss: str
    aud: str | list[str]
    nbf: int | None = None
    jti: str | None = None
    scope: str | None = None
    roles: tuple[str, ...] = ()

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset(self.scope.split()) if self.scope else frozenset()


# RFC 6750 b64token.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def bearer_token(authorization_header: str | None) -> str:
    if authorization_header is None or not authorization_header.strip():
        raise InvalidToken("missing bearer token")
    scheme, _, credentials = authorization_header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise InvalidToken("authorization scheme must be Bearer")
    credentials = credentials.strip()
    if not credentials:
        raise InvalidToken("missing bearer token")
    if not _B64TOKEN.fullmatch(credentials):
        raise InvalidToken("malformed bearer token")
    return credentials


# PyJWT exception -> our reason. Order matters: the specific classes subclass the
# generic ones (ExpiredSignatureError is an InvalidTokenError, and so on).
_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "unsupported algorithm"),
    (jwt.DecodeError, "malformed token"),
)


def _reason_for(error: jwt.PyJWTError) -> str:
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"missing claim {error.claim}"
    for kind, reason in _REASONS:
        if isinstance(error, kind):
            return reason
    return "invalid token"


def decode_access_token(token: str, key: Ed25519PublicKey, *, issuer: str, audience: str,
                        leeway: float = 5) -> Claims:
    """Verify a token against a key already in hand (auth's own); the same checks as
    TokenVerifier.verify, which finds the key through the JWKS instead."""
    _kid_of(token)
    return _claims(token, key, issuer=issuer, audience=audience, leeway=leeway)


def _kid_of(token: str) -> str:
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
        raise InvalidToken("malformed token")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise InvalidToken("malformed token") from None
    # Checked before any key lookup so a forged header cannot even cause a fetch.
    if header.get("alg") != ALGORITHM:
        raise InvalidToken("unsupported algorithm")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidToken("token has no key id")
    return kid


def _claims(token: str, key: Ed25519PublicKey, *, issuer: str, audience: str, leeway: float) -> Claims:
    try:
        payload = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            issuer=issuer,
            audience=audience,
            leeway=leeway,
            options={"require": ["exp", "iat", "sub"]},
        )
    except jwt.PyJWTError as error:
        # `from None`: PyJWT's own messages may quote decoded token bytes.
        raise InvalidToken(_reason_for(error)) from None
    try:
        return msgspec.convert(payload, Claims)
    except msgspec.ValidationError:
        raise InvalidToken("malformed claims") from None


def _public_keys(document: Any) -> dict[str, Ed25519PublicKey]:
    """The usable keys of a JWKS document, by kid; raises ValueError if it is no JWKS."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys: dict[str, Ed25519PublicKey] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            continue
        if entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
            continue
        if entry.get("alg", ALGORITHM) != ALGORITHM or entry.get("use", "sig") != "sig":
            continue
        try:
            key = OKPAlgorithm.from_jwk(entry)
        except (jwt.PyJWTError, ValueError, TypeError):
            continue  # one broken entry must not take the others down
        if isinstance(key, Ed25519PublicKey):
            keys[entry["kid"]] = key
    return keys


class TokenVerifier:
    """Verifies access tokens against the issuer's JWKS, cached by kid.

    Fetch policy:
    - a kid not in the cache triggers a refresh, but at most one per
      `min_refresh_interval` (counted from the last attempt, successful or not), so a
      flood of forged kids cannot hammer auth;
    - once the cache is older than `cache_ttl`, a token with a known kid still verifies
      at once while a refresh runs in the background (removed keys drop out then);
    - if auth is unreachable, cached keys keep working; a token whose kid is not cached
      gets `VerifierUnavailable` (503), since we cannot tell whether it is forged;
    - concurrent callers share one in-flight fetch.

    `session_factory` is called once, lazily, to make the aiohttp session this verifier
    uses and closes in `close()`. `clock` is a monotonic clock (for tests).
    """

    def __init__(
        self,
        jwks_url: str,
        *,
        issuer: str,
        audience: str,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        min_refresh_interval: float = 30.0,
        cache_ttl: float = 300.0,
        leeway: float = 5,
        fetch_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.jwks_url = jwks_url
        # What a token must say, and how the keys are kept fresh (see the fetch policy).
        self.issuer, self.audience, self.leeway = issuer, audience, leeway
        self.min_refresh_interval, self.cache_ttl, self.fetch_timeout = min_refresh_interval, cache_ttl, fetch_timeout
        self._session_factory = session_factory or aiohttp.ClientSession
        self._session: aiohttp.ClientSession | None = None
        self._clock = clock
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last attempt, successful or not
        self._last_fetch_failed = False
        self._inflight: asyncio.Task[None] | None = None
        self.fetch_count = 0  # attempts made; for metrics and tests

    async def verify(self, token: str) -> Claims:
        key = await self._key_for(_kid_of(token))
        return _claims(token, key, issuer=self.issuer, audience=self.audience, leeway=self.leeway)

    async def close(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
            try:
                await self._inflight
            except asyncio.CancelledError:
                pass
            self._inflight = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> TokenVerifier:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- internals --

    async def _key_for(self, kid: str) -> Ed25519PublicKey:
        key = self._keys.get(kid)
        if key is not None:
            if self._is_stale() and self._may_refresh():
                self._start_refresh()  # serve the cached key meanwhile
            return key
        if self._may_refresh():
            await asyncio.shield(self._start_refresh())
        elif self._inflight is not None:
            await asyncio.shield(self._inflight)
        key = self._keys.get(kid)
        if key is not None:
            return key
        if self._last_fetch_failed or self._fetched_at is None:
            raise VerifierUnavailable("signing keys unavailable: JWKS cannot be fetched")
        raise InvalidToken("unknown key id")

    def _is_stale(self) -> bool:
        return self._fetched_at is None or self._clock() - self._fetched_at >= self.cache_ttl

    def _may_refresh(self) -> bool:
        if self._inflight is not None:
            return False
        return self._attempted_at is None or self._clock() - self._attempted_at >= self.min_refresh_interval

    def _start_refresh(self) -> asyncio.Task[None]:
        if self._inflight is None:
            self._attempted_at = self._clock()
            self._inflight = asyncio.ensure_future(self._refresh())
            self._inflight.add_done_callback(self._refresh_done)
        return self._inflight

    def _refresh_done(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _refresh(self) -> None:
        self.fetch_count += 1
        try:
            keys = await self._fetch()
        except Exception as error:  # any failure means "no fresh keys", never a crash
            # Keep the old keys: auth being down must not log everyone out.
            self._last_fetch_failed = True
            log.warning("JWKS fetch failed: %s", type(error).__name__)
            return
        self._keys = keys
        self._fetched_at = self._clock()
        self._last_fetch_failed = False

    async def _fetch(self) -> dict[str, Ed25519PublicKey]:
        if self._session is None:
            self._session = self._session_factory()
        timeout = aiohttp.ClientTimeout(total=self.fetch_timeout)
        async with self._session.get(self.jwks_url, timeout=timeout) as response:
            if response.status != 200:
                raise ValueError(f"JWKS answered {response.status}")
            document = await response.json(content_type=None)
        return _public_keys(document)
