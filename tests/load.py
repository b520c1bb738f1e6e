"""A bounded, mixed load through the gateway, run in a thread while a test injects a fault.

Reads list items and get single ones; writes create items, each with an Idempotency-Key
so the gateway may resend one an instance dropped mid-request. Every answer is recorded:
what clients saw is what the fault tests assert on, and every acknowledged write is
checked against the database afterwards.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from dataclasses import dataclass, field

import aiohttp

ITEMS = "/api/v1/example/items"


@dataclass
class Outcome:
    method: str
    path: str
    status: int | str  # the HTTP status, or the client-side error
    seconds: float
    body: dict | None = None


@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)
    created: dict[str, str] = field(default_factory=dict)  # acknowledged writes: item id -> title
    seconds: float = 0.0

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def writes(self) -> int:
        return sum(o.method == "POST" for o in self.outcomes)

    def failed(self, allowed: tuple[int, ...] = ()) -> list[Outcome]:
        """Answers that were neither a success nor one of `allowed`."""
        return [o for o in self.outcomes
                if not (isinstance(o.status, int) and (200 <= o.status < 300 or o.status in allowed))]

    def with_status(self, status: int) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == status]

    def summary(self) -> str:
        codes: dict[str, int] = {}
        for o in self.outcomes:
            codes[str(o.status)] = codes.get(str(o.status), 0) + 1
        slowest = max((o.seconds for o in self.outcomes), default=0.0)
        return (f"{self.sent} requests ({self.writes} writes) in {self.seconds:.1f}s, statuses {codes}, "
                f"slowest {slowest * 1000:.0f} ms")


class Load:
    """Paced load: `workers` clients, together about `rate` requests/s, until stop() or
    `max_seconds` (and, as a safety net, twice the requests that rate allows in that time),
    whichever comes first: a test never loops unbounded.

    A bound reached before stop() is a test bug (the fault would have been injected into
    no load at all): stop() then fails, as it does when a worker crashed."""

    def __init__(self, url: str, token: str, *, workers: int = 6, rate: float = 150.0, write_share: float = 0.3,
                 max_requests: int | None = None, max_seconds: float = 90.0, timeout: float = 10.0) -> None:
        self.url = url
        self.token = token
        self.workers = workers
        self.interval = workers / rate
        self.write_share = write_share
        self.max_requests = max_requests if max_requests is not None else int(2 * rate * max_seconds)
        self.max_seconds = max_seconds
        self.timeout = timeout
        self.result = LoadResult()
        self.ended_by = ""  # why the load ended: "stop", "max_requests", "max_seconds"
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="load", daemon=True)
        self._random = random.Random(7)

    def start(self) -> Load:
        self._thread.start()
        return self

    def run_for(self, seconds: float) -> None:
        """Let the load run `seconds` more (the thread keeps going meanwhile)."""
        time.sleep(seconds)
        self.assert_running()

    def assert_running(self) -> None:
        """Fails when the load ended before stop() (a bound reached, a worker crashed)."""
        if self._error is not None:
            raise AssertionError("the load crashed") from self._error
        assert self._thread.is_alive(), f"the load ended early ({self.ended_by}) after {self.count()} requests"

    def stop(self) -> LoadResult:
        self.assert_running()
        self._stop.set()
        self._thread.join(self.timeout + 10)
        assert not self._thread.is_alive(), "load did not stop"
        if self._error is not None:
            raise AssertionError("the load crashed") from self._error
        return self.result

    def count(self) -> int:
        return len(self.result.outcomes)

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc_info) -> None:
        """Ends the load however the test ended, so a failed test's load never runs into the next one."""
        self._stop.set()
        self._thread.join(self.timeout + 10)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # kept for stop(), which the test calls in its own thread
            self._error = exc

    async def _run(self) -> None:
        started = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(self.url, timeout=timeout) as session:
            await asyncio.gather(*(self._worker(session, started, n) for n in range(self.workers)))
        self.result.seconds = time.monotonic() - started
        if self._stop.is_set():
            self.ended_by = "stop"
        elif len(self.result.outcomes) >= self.max_requests:
            self.ended_by = "max_requests"
        else:
            self.ended_by = "max_seconds"

    async def _worker(self, session: aiohttp.ClientSession, started: float, number: int) -> None:
        await asyncio.sleep(self.interval * number / self.workers)  # spread the workers out
        auth = {"Authorization": f"Bearer {self.token}"}
        while (not self._stop.is_set() and len(self.result.outcomes) < self.max_requests
               and time.monotonic() - started < self.max_seconds):
            began = time.monotonic()
            known = list(self.result.created)
            roll = self._random.random()
            if roll < self.write_share:
                title = f"load {uuid.uuid4().hex[:12]}"
                await self._one(session, "POST", ITEMS, json={"title": title, "price_cents": 100},
                                headers={**auth, "Idempotency-Key": str(uuid.uuid4())}, created=title)
            elif known and roll < self.write_share + 0.35:
                await self._one(session, "GET", f"{ITEMS}/{self._random.choice(known)}")
            else:
                await self._one(session, "GET", f"{ITEMS}?limit=5")
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - began)))

    async def _one(self, session: aiohttp.ClientSession, method: str, path: str, *, created: str = "",
                   **kwargs) -> None:
        began = time.monotonic()
        body = None
        try:
            async with session.request(method, path, **kwargs) as resp:
                status: int | str = resp.status
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            status = f"{type(exc).__name__}: {exc}"
        self.result.outcomes.append(Outcome(method, path, status, time.monotonic() - began, body))
        if created and status == 201 and isinstance(body, dict):
            self.result.created[body["id"]] = created
