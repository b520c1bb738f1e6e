"""Password hashing with argon2id (argon2-cffi), off the event loop.

Hashing costs tens of milliseconds of CPU by design; run on the loop it would stall
every other request of the instance, so it runs in a thread (argon2-cffi releases the
GIL while it works).
"""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters

# Verified against when the email is unknown, so that "no such user" and "wrong
# password" take the same time and cannot be told apart.
_DUMMY_HASH = _hasher.hash("not a password anybody has")


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


async def verify_password(password_hash: str | None, password: str) -> bool:
    def check() -> bool:
        try:
            return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(check)


def needs_rehash(password_hash: str) -> bool:
    return _hasher.check_needs_rehash(password_hash)
