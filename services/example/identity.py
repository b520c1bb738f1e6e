"""Who is calling: the user id in a verified access token from auth.

One `TokenVerifier` per process (its JWKS cache is shared by every request), made at
start-up and closed at clean-up. Its two failures are mapped here to the error shape,
since shared/kit/web.py knows nothing about tokens: a token that must be refused is a 401
(with `WWW-Authenticate`, RFC 6750), and keys that cannot be fetched to judge it a 503.
"""

from __future__ import annotations

import uuid

from aiohttp import web

from shared.kit.errors import ApiError
from shared.kit.tokens import InvalidToken, TokenVerifier, VerifierUnavailable, bearer_token

JWKS_PATH = "/api/v1/auth/.well-known/jwks.json"
DEFAULT_ISSUER = "meshvisor-auth"
DEFAULT_AUDIENCE = "meshvisor"


class Authenticator:
    def __init__(self, auth_url: str, *, issuer: str = DEFAULT_ISSUER, audience: str = DEFAULT_AUDIENCE) -> None:
        self.jwks_url = auth_url.rstrip("/") + JWKS_PATH
        self.issuer = issuer
        self.audience = audience
        self.verifier: TokenVerifier | None = None

    async def start(self) -> None:
        # Two seconds: a request waiting on a JWKS fetch should fail fast, not hang.
        self.verifier = TokenVerifier(self.jwks_url, issuer=self.issuer, audience=self.audience, fetch_timeout=2.0)

    async def close(self) -> None:
        if self.verifier is not None:
            await self.verifier.close()
            self.verifier = None

    async def user_id(self, request: web.Request) -> uuid.UUID:
        """The caller's user id; raises ApiError 401 or 503."""
        if self.verifier is None:
            raise ApiError(503, "token verification not ready")
        try:
            claims = await self.verifier.verify(bearer_token(request.headers.get("Authorization")))
        except InvalidToken as exc:
            raise _unauthorized(exc.reason) from None
        except VerifierUnavailable:
            raise ApiError(503, "auth unavailable: cannot verify the token now",
                           headers={"Retry-After": "1"}) from None
        try:
            return uuid.UUID(claims.sub)
        except ValueError:
            raise _unauthorized("token subject is not a user id") from None


def _unauthorized(reason: str) -> ApiError:
    # RFC 6750: a request without credentials gets the bare challenge, a bad token the error.
    challenge = "Bearer" if reason == "missing bearer token" else \
        f'Bearer error="invalid_token", error_description="{reason}"'
    return ApiError(401, f"unauthorized: {reason}", headers={"WWW-Authenticate": challenge})
