"""Issuing access tokens (auth's side): the signing key, its JWKS, access and refresh tokens.

auth holds one `SigningKey` (stored in its database as PEM so every auth instance signs
with the same key) and publishes its public half as a JWKS; every other service verifies
with shared.kit.tokens. Only EdDSA is used. Refresh tokens are opaque random strings,
not JWTs; the database only keeps their hash.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from shared.kit.tokens import ALGORITHM

# Claims the issuer sets itself; letting callers override them would let a bug in a
# route mint tokens for another subject, audience or lifetime.
_REGISTERED_CLAIMS = frozenset({"iss", "sub", "aud", "exp", "nbf", "iat", "jti"})


# --- keys -----------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 thumbprint of an OKP public JWK: SHA-256 over its required members
    (crv, kty, x) in lexicographic order, no whitespace, base64url without padding."""
    canonical = json.dumps(
        {"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"]}, separators=(",", ":"), sort_keys=True
    )
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


class SigningKey:
    """An Ed25519 private key and its key id (the RFC 7638 thumbprint of its public JWK),
    so the kid is a pure function of the key and survives PEM export and import."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self.private_key = private_key
        self._public = OKPAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
        self.kid = jwk_thumbprint(self._public)

    @classmethod
    def from_pem(cls, pem: str | bytes) -> SigningKey:
        data = pem.encode("ascii") if isinstance(pem, str) else pem
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("PEM does not hold an Ed25519 private key")
        return cls(key)

    def private_pem(self) -> str:
        # Unencrypted PKCS#8: the auth database is the secret store here, and every
        # auth instance must be able to load it without a passphrase.
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii")

    def public_jwk(self) -> dict[str, str]:
        return {
            "kty": self._public["kty"],
            "crv": self._public["crv"],
            "x": self._public["x"],
            "kid": self.kid,
            "alg": ALGORITHM,
            "use": "sig",
        }

    def __repr__(self) -> str:  # never show key material
        return f"SigningKey(kid={self.kid!r})"


def generate_key() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate())


def jwks(keys: Iterable[SigningKey]) -> dict[str, list[dict[str, str]]]:
    return {"keys": [key.public_jwk() for key in keys]}


# --- issuing --------------------------------------------------------------------------


def issue_access_token(
    key: SigningKey,
    *,
    subject: str,
    issuer: str,
    audience: str,
    ttl: timedelta,
    claims: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> str:
    if ttl <= timedelta(0):
        raise ValueError("ttl must be positive")
    extra = dict(claims or {})
    clashing = _REGISTERED_CLAIMS & extra.keys()
    if clashing:
        raise ValueError(f"claims may not override registered claims: {sorted(clashing)}")
    if now is None:
        now = datetime.now(timezone.utc)
    elif now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    issued_at = int(now.timestamp())
    payload = {
        **extra,
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + int(ttl.total_seconds()),
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(payload, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid})


def new_refresh_token() -> str:
    return secrets.token_urlsafe(32)


def hash_refresh_token(token: str) -> str:
    # A plain hash suffices (no salt or slow KDF): the token carries 256 random bits,
    # so there is nothing to brute-force, and lookups by hash must be deterministic.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
