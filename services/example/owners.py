"""Owners' public profiles, asked of auth (`GET /api/v1/auth/users/{id}`) through the
sidecar's upstream listener, never read from auth's database.

Every item in a response carries its owner's profile, so a page of 20 items could mean 20
calls to auth. Three things keep that cheap:
- a short TTL cache (bounded, least recently used out first): a renamed user shows up
  within `ttl` seconds, which is fine for a display name;
- single flight: concurrent requests for one id share one call;
- `profiles()` asks for each distinct id once, concurrently.

Failures are not cached: when auth is unreachable, answers garbage or is slower than
`timeout`, `AuthUnavailable` is raised and the route answers 503. An unknown user (404) is
cached as None: the item is shown without an owner rather than failing the whole list.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable

import aiohttp
import msgspec

from services.auth.contract import PublicUser
from shared.kit.web import outgoing_headers

log = logging.getLogger("meshvisor.example.owners")

USERS_PATH = "/api/v1/auth/users/{id}"


class AuthUnavailable(Exception):
    """auth could not tell us who a user is (unreachable, timed out, or a bad answer)."""


class OwnerDirectory:
    def __init__(self, auth_url: str, *, ttl: float = 30.0, max_entries: int = 1024, timeout: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.auth_url = auth_url.rstrip("/")
        self.ttl = ttl
        self.max_entries = max_entries
        self.timeout = timeout
        self._clock = clock
        self._cache: OrderedDict[uuid.UUID, tuple[float, PublicUser | None]] = OrderedDict()
        self._inflight: dict[uuid.UUID, asyncio.Task[PublicUser | None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.fetch_count = 0  # calls made to auth; for tests and debugging

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def close(self) -> None:
        pending = list(self._inflight.values())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def profiles(self, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, PublicUser | None]:
        """The profile of each distinct id (None for a user auth does not know)."""
        distinct = list(dict.fromkeys(ids))
        found = await asyncio.gather(*(self.profile(i) for i in distinct))
        return dict(zip(distinct, found))

    async def profile(self, user_id: uuid.UUID) -> PublicUser | None:
        cached = self._cache.get(user_id)
        if cached is not None:
            expires, profile = cached
            if self._clock() < expires:
                self._cache.move_to_end(user_id)
                return profile
            del self._cache[user_id]
        task = self._inflight.get(user_id)
        if task is None:
            # A task of its own, so one caller giving up (client gone) does not cancel the
            # call the other callers wait for.
            task = asyncio.ensure_future(self._fetch_and_cache(user_id))
            self._inflight[user_id] = task
            task.add_done_callback(lambda _t: self._inflight.pop(user_id, None))
        return await asyncio.shield(task)

    async def _fetch_and_cache(self, user_id: uuid.UUID) -> PublicUser | None:
        profile = await self._fetch(user_id)
        self._cache[user_id] = (self._clock() + self.ttl, profile)
        self._cache.move_to_end(user_id)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return profile

    async def _fetch(self, user_id: uuid.UUID) -> PublicUser | None:
        if self._session is None:
            raise AuthUnavailable("owner directory not started")
        self.fetch_count += 1
        url = self.auth_url + USERS_PATH.format(id=user_id)
        try:
            async with self._session.get(url, headers=outgoing_headers()) as response:
                if response.status == 404:
                    return None
                if response.status != 200:
                    raise AuthUnavailable(f"auth answered {response.status}")
                profile = msgspec.json.decode(await response.read(), type=PublicUser)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("auth unreachable for a user profile: %s", type(exc).__name__)
            raise AuthUnavailable(type(exc).__name__) from None
        except msgspec.DecodeError:  # ValidationError included: not the profile we were promised
            log.warning("auth answered a malformed user profile")
            raise AuthUnavailable("malformed profile") from None
        if profile.id != user_id:
            raise AuthUnavailable("auth answered for another user")
        return profile
