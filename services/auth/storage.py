"""auth's database: users, refresh tokens, the shared signing key, failed-login counts.

Every query is here, so the handlers read as the API they implement. Refresh tokens are
stored only as hashes; the signing key is created once, by whichever instance gets there
first, and read by all of them, so tokens stay valid across instances and restarts.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from shared.kit.db import acquire
from services.auth.tokens import SigningKey, generate_key

LOGIN_WINDOW = timedelta(minutes=15)


class EmailTaken(Exception):
    pass


@dataclass(frozen=True)
class User:
    id: uuid.UUID
    email: str
    name: str
    password_hash: str
    created_at: datetime


def _user(row: asyncpg.Record | None) -> User | None:
    return User(**dict(row)) if row is not None else None


async def create_user(pool: asyncpg.Pool, email: str, name: str, password_hash: str) -> User:
    async with acquire(pool) as conn:
        try:
            row = await conn.fetchrow(
                "INSERT INTO users (email, name, password_hash) VALUES (lower($1), $2, $3)"
                " RETURNING id, email, name, password_hash, created_at",
                email, name, password_hash,
            )
        except asyncpg.UniqueViolationError:
            raise EmailTaken() from None
    return _user(row)


async def user_by_email(pool: asyncpg.Pool, email: str) -> User | None:
    async with acquire(pool) as conn:
        return _user(await conn.fetchrow(
            "SELECT id, email, name, password_hash, created_at FROM users WHERE lower(email) = lower($1)", email))


async def user_by_id(pool: asyncpg.Pool, user_id: uuid.UUID) -> User | None:
    async with acquire(pool) as conn:
        return _user(await conn.fetchrow(
            "SELECT id, email, name, password_hash, created_at FROM users WHERE id = $1", user_id))


async def update_password_hash(pool: asyncpg.Pool, user_id: uuid.UUID, password_hash: str) -> None:
    async with acquire(pool) as conn:
        await conn.execute("UPDATE users SET password_hash = $2 WHERE id = $1", user_id, password_hash)


async def store_refresh_token(pool: asyncpg.Pool, token_hash: str, user_id: uuid.UUID, ttl: timedelta) -> None:
    async with acquire(pool) as conn:
        await conn.execute(
            "INSERT INTO refresh_tokens (token_hash, user_id, expires_at) VALUES ($1, $2, now() + $3)",
            token_hash, user_id, ttl,
        )


async def use_refresh_token(pool: asyncpg.Pool, token_hash: str) -> uuid.UUID | None:
    """Revoke a live refresh token and return its user: each one can be used once
    (rotation), so a stolen token that was already used is worthless."""
    async with acquire(pool) as conn:
        return await conn.fetchval(
            "UPDATE refresh_tokens SET revoked_at = now()"
            " WHERE token_hash = $1 AND revoked_at IS NULL AND expires_at > now() RETURNING user_id",
            token_hash,
        )


async def revoke_refresh_token(pool: asyncpg.Pool, token_hash: str) -> bool:
    async with acquire(pool) as conn:
        status = await conn.execute(
            "UPDATE refresh_tokens SET revoked_at = now() WHERE token_hash = $1 AND revoked_at IS NULL",
            token_hash,
        )
    return status.endswith(" 1")


async def signing_key(pool: asyncpg.Pool) -> SigningKey:
    """The key every instance signs with: created by the first instance, read by the rest."""
    async with acquire(pool) as conn:
        pem = await conn.fetchval("SELECT private_pem FROM signing_keys ORDER BY created_at LIMIT 1")
        if pem is None:
            async with conn.transaction():
                # Instances starting together: the lock lets exactly one of them create it.
                await conn.execute("LOCK TABLE signing_keys IN EXCLUSIVE MODE")
                pem = await conn.fetchval("SELECT private_pem FROM signing_keys ORDER BY created_at LIMIT 1")
                if pem is None:
                    key = generate_key()
                    await conn.execute("INSERT INTO signing_keys (kid, private_pem) VALUES ($1, $2)",
                                       key.kid, key.private_pem())
                    return key
    return SigningKey.from_pem(pem)


def _window(now_expr: str = "now()") -> str:
    seconds = int(LOGIN_WINDOW.total_seconds())
    return f"to_timestamp(floor(extract(epoch FROM {now_expr}) / {seconds}) * {seconds})"


async def login_failures(pool: asyncpg.Pool, subject: str) -> int:
    """Failed logins of `subject` ('email:...' or 'ip:...') in the current window."""
    async with acquire(pool) as conn:
        return await conn.fetchval(
            f"SELECT coalesce(sum(failures), 0) FROM login_failures WHERE subject = $1 AND window_start = {_window()}",
            subject,
        )


async def record_login_failure(pool: asyncpg.Pool, subjects: list[str]) -> None:
    async with acquire(pool) as conn:
        await conn.executemany(
            f"INSERT INTO login_failures (subject, window_start, failures) VALUES ($1, {_window()}, 1)"
            " ON CONFLICT (subject, window_start) DO UPDATE SET failures = login_failures.failures + 1",
            [(s,) for s in subjects],
        )
        # Old windows are of no use: keep the table small.
        await conn.execute(f"DELETE FROM login_failures WHERE window_start < {_window()} - interval '1 day'")


async def clear_login_failures(pool: asyncpg.Pool, subject: str) -> None:
    async with acquire(pool) as conn:
        await conn.execute("DELETE FROM login_failures WHERE subject = $1", subject)
