"""Token issuing and verification (shared/kit/tokens.py) against a JWKS served by a small
aiohttp app on 127.0.0.1. Time-based refresh rules run on a fake monotonic clock; every
wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
from datetime import datetime, timedelta, timezone

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.auth.tokens import SigningKey, generate_key, hash_refresh_token, issue_access_token, jwks, new_refresh_token
from shared.kit.tokens import Claims, InvalidToken, TokenVerifier, VerifierUnavailable, bearer_token

T = 10.0  # upper bound for any single wait
ISSUER = "meshvisor-auth"
AUDIENCE = "meshvisor"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class JwksServer:
    """The auth side: publishes `keys`, counts fetches, can answer slowly or fail."""

    def __init__(self, keys: list[SigningKey]) -> None:
        self.keys = keys
        self.fetches = 0
        self.status = 200
        self.gate: asyncio.Event | None = None  # when set, fetches wait for it
        self.document: dict | None = None  # served instead of `keys` when set

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), T)
        if self.status != 200:
            return web.json_response({"error": "down"}, status=self.status)
        return web.json_response(self.document if self.document is not None else jwks(self.keys))


@pytest.fixture
def key() -> SigningKey:
    return generate_key()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def served(aiohttp_server, key):
    """(JwksServer, its TestServer, the JWKS url)."""
    state = JwksServer([key])
    app = web.Application()
    app.router.add_get("/api/v1/auth/.well-known/jwks.json", state.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    return state, server, str(server.make_url("/api/v1/auth/.well-known/jwks.json"))


@pytest.fixture
async def verifier(served, clock):
    _, _, url = served
    v = TokenVerifier(url, issuer=ISSUER, audience=AUDIENCE, clock=clock, fetch_timeout=T)
    yield v
    await v.close()


def issue(key: SigningKey, **overrides) -> str:
    args = dict(subject="user-1", issuer=ISSUER, audience=AUDIENCE, ttl=timedelta(minutes=10))
    args.update(overrides)
    return issue_access_token(key, **args)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def claims_for(**overrides) -> dict:
    now = int(datetime.now(timezone.utc).timestamp())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": now, "nbf": now, "exp": now + 600}
    payload.update(overrides)
    return payload


def unsigned_token(header: dict, payload: dict, signature: bytes = b"") -> str:
    return ".".join(
        [b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode()), b64url(signature)]
    )


async def assert_rejected(verifier: TokenVerifier, token: str, reason: str) -> InvalidToken:
    with pytest.raises(InvalidToken) as caught:
        await asyncio.wait_for(verifier.verify(token), T)
    message = str(caught.value)
    assert reason in message
    # Neither the token nor any of its parts may leak into a 401 body or a log line.
    assert token not in message and token not in repr(caught.value)
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in message
    return caught.value


# --- issuing and keys ------------------------------------------------------------------


async def test_round_trip(verifier, key):
    token = issue(key, claims={"scope": "items:read items:write", "roles": ["admin"]})
    assert jwt.get_unverified_header(token)["kid"] == key.kid
    claims = await asyncio.wait_for(verifier.verify(token), T)
    assert isinstance(claims, Claims)
    assert claims.sub == "user-1"
    assert claims.iss == ISSUER and claims.aud == AUDIENCE
    assert claims.exp - claims.iat == 600
    assert claims.nbf == claims.iat
    assert claims.jti and len(claims.jti) == 32
    assert claims.roles == ("admin",)
    assert claims.scopes == {"items:read", "items:write"}


async def test_each_token_gets_its_own_jti(verifier, key):
    first, second = await asyncio.gather(verifier.verify(issue(key)), verifier.verify(issue(key)))
    assert first.jti != second.jti


def test_issuing_refuses_bad_arguments(key):
    with pytest.raises(ValueError):
        issue(key, ttl=timedelta(0))
    with pytest.raises(ValueError):
        issue(key, claims={"sub": "someone-else"})
    with pytest.raises(ValueError):
        issue(key, now=datetime(2030, 1, 1))  # naive


def test_pem_round_trip_keeps_kid(key):
    pem = key.private_pem()
    assert pem.startswith("-----BEGIN PRIVATE KEY-----")
    loaded = SigningKey.from_pem(pem)
    assert loaded.kid == key.kid
    assert loaded.public_jwk() == key.public_jwk()
    assert SigningKey.from_pem(pem.encode()).kid == key.kid
    assert pem not in repr(key)


def test_pem_of_another_key_type_is_refused():
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError):
        SigningKey.from_pem(rsa_pem)


def test_kid_is_the_rfc7638_thumbprint(key):
    raw = key.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    x = b64url(raw)
    # RFC 7638 section 3: required members only, lexicographic order, no whitespace.
    canonical = '{"crv":"Ed25519","kty":"OKP","x":"' + x + '"}'
    expected = b64url(hashlib.sha256(canonical.encode()).digest())
    assert key.kid == expected
    assert key.public_jwk() == {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": expected, "alg": "EdDSA", "use": "sig"}
    assert generate_key().kid != key.kid


def test_jwks_document(key):
    other = generate_key()
    assert jwks([key, other]) == {"keys": [key.public_jwk(), other.public_jwk()]}
    assert all("d" not in k for k in jwks([key])["keys"])  # no private member


def test_refresh_tokens():
    token = new_refresh_token()
    assert len(b64url_decode(token)) == 32
    assert new_refresh_token() != token
    digest = hash_refresh_token(token)
    assert digest == hashlib.sha256(token.encode()).hexdigest()
    assert len(digest) == 64 and token not in digest


# --- rejections --------------------------------------------------------------------------


async def test_expired_rejected_with_leeway(verifier, key):
    now = datetime.now(timezone.utc)
    await assert_rejected(verifier, issue(key, now=now - timedelta(hours=1)), "token expired")
    # Within the 5 s leeway a just-expired token still passes (clock skew between hosts).
    just_expired = issue(key, now=now - timedelta(seconds=62), ttl=timedelta(seconds=60))
    assert (await verifier.verify(just_expired)).sub == "user-1"


async def test_not_yet_valid_rejected(verifier, key):
    future = datetime.now(timezone.utc) + timedelta(hours=1)
    await assert_rejected(verifier, issue(key, now=future), "not yet valid")
    # nbf alone in the future (iat now) is also refused.
    token = jwt.encode(claims_for(nbf=claims_for()["iat"] + 3600), key.private_key, algorithm="EdDSA",
                       headers={"kid": key.kid})
    await assert_rejected(verifier, token, "not yet valid")


async def test_wrong_issuer_and_audience_rejected(verifier, key):
    await assert_rejected(verifier, issue(key, issuer="someone-else"), "wrong issuer")
    await assert_rejected(verifier, issue(key, audience="another-app"), "wrong audience")


@pytest.mark.parametrize("missing", ["exp", "iat", "sub", "iss", "aud"])
async def test_required_claims(verifier, key, missing):
    payload = claims_for()
    del payload[missing]
    token = jwt.encode(payload, key.private_key, algorithm="EdDSA", headers={"kid": key.kid})
    await assert_rejected(verifier, token, f"missing claim {missing}")


async def test_tampered_payload_rejected(verifier, key):
    header, payload, signature = issue(key).split(".")
    claims = json.loads(b64url_decode(payload))
    claims["sub"] = "admin"
    forged = ".".join([header, b64url(json.dumps(claims).encode()), signature])
    await assert_rejected(verifier, forged, "bad signature")


async def test_tampered_signature_rejected(verifier, key):
    header, payload, signature = issue(key).split(".")
    raw = bytearray(b64url_decode(signature))
    raw[0] ^= 0x01
    await assert_rejected(verifier, ".".join([header, payload, b64url(bytes(raw))]), "bad signature")


async def test_signed_by_another_key_with_our_kid_rejected(verifier, key):
    impostor = generate_key()
    token = jwt.encode(claims_for(), impostor.private_key, algorithm="EdDSA", headers={"kid": key.kid})
    await assert_rejected(verifier, token, "bad signature")


async def test_alg_none_rejected(served, verifier, key):
    state, _, _ = served
    token = unsigned_token({"alg": "none", "typ": "JWT", "kid": key.kid}, claims_for())
    await assert_rejected(verifier, token, "unsupported algorithm")
    token = unsigned_token({"alg": "None", "kid": key.kid}, claims_for())
    await assert_rejected(verifier, token, "unsupported algorithm")
    assert state.fetches == 0  # refused before any key lookup


async def test_hs256_with_public_key_as_secret_rejected(verifier, key):
    await verifier.verify(issue(key))  # the verifier holds the real public key
    public = key.private_key.public_key()
    secrets_to_try = [
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        key.public_jwk()["x"].encode(),
    ]
    for secret in secrets_to_try:
        header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
        unsigned = unsigned_token(header, claims_for()).rsplit(".", 1)[0]
        signature = hmac.new(secret, unsigned.encode(), hashlib.sha256).digest()
        await assert_rejected(verifier, unsigned + "." + b64url(signature), "unsupported algorithm")


async def test_rs256_rejected(verifier, key):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims_for(), rsa_key, algorithm="RS256", headers={"kid": key.kid})
    await assert_rejected(verifier, token, "unsupported algorithm")


@pytest.mark.parametrize(
    "garbage",
    ["", "abc", "a.b", "a.b.c", "....", "eyJhbGciOiJFZERTQSJ9.!!!.###", "x" * 10000],
)
async def test_malformed_rejected(verifier, garbage):
    with pytest.raises(InvalidToken) as caught:
        await asyncio.wait_for(verifier.verify(garbage), T)
    assert caught.value.reason in {"malformed token", "unsupported algorithm", "token has no key id"}
    if garbage:
        assert garbage not in str(caught.value)


async def test_token_without_kid_rejected(verifier, key):
    token = jwt.encode(claims_for(), key.private_key, algorithm="EdDSA")
    await assert_rejected(verifier, token, "token has no key id")


async def test_claims_of_the_wrong_type_rejected(verifier, key):
    token = jwt.encode(claims_for(roles="admin"), key.private_key, algorithm="EdDSA", headers={"kid": key.kid})
    await assert_rejected(verifier, token, "malformed claims")


# --- key cache and refresh ------------------------------------------------------------------


async def test_unknown_kid_refreshes_once_then_verifies_after_rotation(served, verifier, clock, key):
    state, _, _ = served
    await verifier.verify(issue(key))
    assert state.fetches == 1
    await verifier.verify(issue(key))
    assert state.fetches == 1  # cached

    rotated = generate_key()
    state.keys = [key, rotated]  # auth publishes the new key
    clock.advance(verifier.min_refresh_interval)
    claims = await verifier.verify(issue(rotated, subject="user-2"))
    assert claims.sub == "user-2"
    assert state.fetches == 2  # exactly one refresh for the unknown kid
    await verifier.verify(issue(rotated))
    await verifier.verify(issue(key))
    assert state.fetches == 2


async def test_unknown_kid_after_refresh_rejected(served, verifier, key):
    state, _, _ = served
    stranger = generate_key()
    await assert_rejected(verifier, issue(stranger), "unknown key id")
    assert state.fetches == 1


async def test_flood_of_random_kids_is_rate_limited(served, verifier, clock, key):
    state, _, _ = served

    def forged() -> str:
        return jwt.encode(claims_for(), key.private_key, algorithm="EdDSA",
                          headers={"kid": secrets.token_urlsafe(16)})

    async def rejected(token: str) -> None:
        with pytest.raises(InvalidToken, match="unknown key id"):
            await verifier.verify(token)

    await asyncio.wait_for(asyncio.gather(*(rejected(forged()) for _ in range(50))), T)
    assert state.fetches == 1
    clock.advance(verifier.min_refresh_interval / 2)
    for _ in range(50):
        await asyncio.wait_for(rejected(forged()), T)
    assert state.fetches == 1  # still inside the interval
    clock.advance(verifier.min_refresh_interval / 2)
    for _ in range(50):
        await asyncio.wait_for(rejected(forged()), T)
    assert state.fetches == 2  # one more per interval, no more
    await verifier.verify(issue(key))  # the genuine key is still served from the cache
    assert state.fetches == 2


async def test_cache_ttl_expiry_refreshes_in_background(served, verifier, clock, key):
    state, _, _ = served
    await verifier.verify(issue(key))
    clock.advance(verifier.cache_ttl)
    replacement = generate_key()
    state.keys = [replacement]  # auth dropped the old key
    # The stale but known key still verifies at once; the refresh runs meanwhile.
    await verifier.verify(issue(key))
    await wait_for_fetches(state, 2)
    await wait_until_idle(verifier)
    await assert_rejected(verifier, issue(key), "unknown key id")
    assert (await verifier.verify(issue(replacement))).sub == "user-1"
    assert state.fetches == 2


async def test_jwks_down_with_cached_key_still_verifies(served, verifier, clock, key):
    state, server, _ = served
    await verifier.verify(issue(key))
    await server.close()
    clock.advance(verifier.cache_ttl)
    assert (await asyncio.wait_for(verifier.verify(issue(key)), T)).sub == "user-1"
    await wait_until_idle(verifier)
    clock.advance(verifier.min_refresh_interval)
    assert (await asyncio.wait_for(verifier.verify(issue(key)), T)).sub == "user-1"
    await wait_until_idle(verifier)
    # An unknown kid cannot be judged while auth is down.
    clock.advance(verifier.min_refresh_interval)
    with pytest.raises(VerifierUnavailable):
        await asyncio.wait_for(verifier.verify(issue(generate_key())), T)


async def test_jwks_down_with_no_key_is_unavailable(served, verifier, clock, key):
    state, server, _ = served
    await server.close()
    with pytest.raises(VerifierUnavailable):
        await asyncio.wait_for(verifier.verify(issue(key)), T)
    # Within the interval no new attempt is made, and the answer stays 503.
    with pytest.raises(VerifierUnavailable):
        await asyncio.wait_for(verifier.verify(issue(key)), T)
    assert verifier.fetch_count == 1


async def test_jwks_error_status_is_unavailable_then_recovers(served, verifier, clock, key):
    state, _, _ = served
    state.status = 500
    with pytest.raises(VerifierUnavailable):
        await asyncio.wait_for(verifier.verify(issue(key)), T)
    state.status = 200
    clock.advance(verifier.min_refresh_interval)
    assert (await asyncio.wait_for(verifier.verify(issue(key)), T)).sub == "user-1"
    assert state.fetches == 2


async def test_broken_jwks_entries_are_skipped(served, verifier, key):
    state, _, _ = served
    broken = {"kty": "OKP", "crv": "Ed25519", "x": "not-base64!", "kid": "broken"}
    wrong_alg = {**generate_key().public_jwk(), "alg": "RS256"}
    no_kid = {k: v for k, v in generate_key().public_jwk().items() if k != "kid"}
    state.document = {"keys": [broken, wrong_alg, no_kid, "junk", key.public_jwk()]}
    assert (await verifier.verify(issue(key))).sub == "user-1"


async def test_jwks_that_is_not_a_jwks_is_unavailable(served, verifier, key):
    state, _, _ = served
    state.document = {"not": "keys"}
    with pytest.raises(VerifierUnavailable):
        await asyncio.wait_for(verifier.verify(issue(key)), T)


async def test_concurrent_verifies_share_one_fetch(served, verifier, key):
    state, _, _ = served
    state.gate = asyncio.Event()
    tokens = [issue(key, subject=f"user-{i}") for i in range(20)]
    pending = asyncio.gather(*(verifier.verify(t) for t in tokens))
    await wait_for_fetches(state, 1)
    await asyncio.sleep(0.05)  # let every verify reach the in-flight fetch
    state.gate.set()
    results = await asyncio.wait_for(pending, T)
    assert [c.sub for c in results] == [f"user-{i}" for i in range(20)]
    assert state.fetches == 1


async def test_cancelled_caller_does_not_cancel_the_shared_fetch(served, verifier, key):
    state, _, _ = served
    state.gate = asyncio.Event()
    first = asyncio.ensure_future(verifier.verify(issue(key)))
    second = asyncio.ensure_future(verifier.verify(issue(key)))
    await wait_for_fetches(state, 1)
    first.cancel()
    state.gate.set()
    assert (await asyncio.wait_for(second, T)).sub == "user-1"
    assert state.fetches == 1


# --- bearer header ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc.def.ghi", "abc.def.ghi"),
        ("BEARER abc-_~+/=", "abc-_~+/="),
        ("  Bearer   abc.def.ghi  ", "abc.def.ghi"),
    ],
)
def test_bearer_token_accepts(header, expected):
    assert bearer_token(header) == expected


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing bearer token"),
        ("", "missing bearer token"),
        ("   ", "missing bearer token"),
        ("Bearer", "missing bearer token"),
        ("Bearer    ", "missing bearer token"),
        ("Basic dXNlcjpwYXNz", "authorization scheme must be Bearer"),
        ("Token abc.def.ghi", "authorization scheme must be Bearer"),
        ("Bearerabc.def.ghi", "authorization scheme must be Bearer"),
        ("Bearer abc def", "malformed bearer token"),
        ("Bearer abc\tdef", "malformed bearer token"),
        ("Bearer abc.def.ghi,secretstuff", "malformed bearer token"),
        ("Bearer =abc", "malformed bearer token"),
    ],
)
def test_bearer_token_rejects(header, reason):
    with pytest.raises(InvalidToken) as caught:
        bearer_token(header)
    assert str(caught.value) == reason
    if header and header.strip():
        credentials = header.strip().partition(" ")[2].strip()
        if credentials:
            assert credentials not in str(caught.value)


# --- helpers -------------------------------------------------------------------------------


async def wait_for_fetches(state: JwksServer, count: int) -> None:
    for _ in range(int(T / 0.01)):
        if state.fetches >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {count} JWKS fetches, saw {state.fetches}")


async def wait_until_idle(verifier: TokenVerifier) -> None:
    """Wait for a background refresh to finish (bounded)."""
    for _ in range(int(T / 0.01)):
        if verifier._inflight is None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("JWKS refresh never finished")


async def test_session_factory_is_used_once_and_closed(served, clock, key):
    _, _, url = served
    made: list[aiohttp.ClientSession] = []

    def factory() -> aiohttp.ClientSession:
        made.append(aiohttp.ClientSession())
        return made[-1]

    async with TokenVerifier(url, issuer=ISSUER, audience=AUDIENCE, session_factory=factory,
                             min_refresh_interval=0, clock=clock) as v:
        await v.verify(issue(key))
        await assert_rejected(v, issue(generate_key()), "unknown key id")
        assert v.fetch_count == 2
    assert len(made) == 1 and made[0].closed
