"""The blocking-query loop every Consul watch of the mesh runs: services and their
instances (shared.mesh.discovery), the Connect leaf and roots (shared.mesh.identity), the
intentions (shared.mesh.authorize).

A watch asks once without blocking, then keeps a blocking query open (`index` + `wait`)
and updates its value when Consul answers with a change. If Consul is unreachable it keeps
serving the last known value, says so once (`problem` says it meanwhile), and retries
quickly so that an agent restart is noticed within seconds.

After an agent restart its catalog is being rebuilt: a restarted dev agent knows nothing
until every sidecar's anti-entropy has registered again, and a restarted server may report
checks critical until they next run. A restart is what an outage looks like from here: at
least two queries in a row failed (a restart takes longer than one retry), or one failed
and the agent came back with a lower index (a new process). For REBUILD_GRACE seconds an
entry missing from the answer is then kept rather than dropped (the relays still eject an
instance that really is gone); new ones are added at once, and the plain answer applies
when the grace ends. A single failed query alone (one timeout, one 500) is not a restart
and must not hold on to entries that were removed meanwhile.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import consul.aio

from shared.backoff import Backoff
from shared.mesh.consul import MAX_WAIT, REQUEST_TIMEOUT, Log, LogTarget, OutageReporter, Reply, call, describe, duration

# At most one query per this many seconds, even when the index changes all the time
# (Consul's advice: rate-limit the loop rather than sleep blindly).
MIN_QUERY_INTERVAL = 0.05

# The shortest blocking wait we ask for.
MIN_WAIT = 0.1

# Retries after an error: short, because an agent restart must be noticed within seconds.
RETRY_FIRST = 0.2
RETRY_MAX = 2.0

# How long after an agent restart a missing instance or service is kept (see above):
# sidecars re-register within a few seconds (their anti-entropy retries every second).
REBUILD_GRACE = 10.0

LOGGER = "meshvisor.discovery"

T = TypeVar("T")


def next_index(previous: int, returned: int) -> int:
    """The index to block on next, following Consul's rules for blocking clients.

    An index that went backwards (a restored snapshot, a restarted dev agent) means start
    over: 0, so the next query does not block. An index of 0 after a real answer is a
    Consul bug that would turn the loop into busy polling: clamp it to 1, which is always
    safe to wait on.
    """
    if returned < previous:
        return 0
    return max(returned, 1)


class BlockingWatch(Generic[T]):
    """The loop shared by every watch: query, block, apply, retry; subclasses say what."""

    def __init__(
        self,
        client: consul.aio.Consul,
        *,
        wait: float,
        on_change: Callable[[T], None] | None,
        log: LogTarget,
        what: str,
        stale: bool = True,
    ) -> None:
        self._client = client
        # Catalog and health reads may come from any server (spares the leader); the
        # agent's own cached endpoints (leaf, roots) take no consistency mode.
        self._stale = stale
        # Consul reads a wait of 0 as its default of 5 minutes; keep it to what was meant.
        self.wait = min(max(wait, MIN_WAIT), MAX_WAIT)
        self._on_change = on_change
        self._log = Log(log, LOGGER)
        self._what = what
        self._outage = OutageReporter(self._log, what)
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.index = 0
        self.queries = 0  # requests made: for metrics and for tests that check we block
        self.rebuild_grace = REBUILD_GRACE
        self._rebuild_until = -math.inf  # loop time: until then, missing entries are kept

    # -- what a subclass provides

    def _path(self) -> str:
        raise NotImplementedError

    def _params(self) -> list[tuple[str, str]]:
        return []

    def _apply(self, data: Any, keep_missing: bool) -> T | None:
        """Take a decoded answer; return the new value if it changed, else None.

        With `keep_missing`, entries of the current value absent from the answer stay.
        """
        raise NotImplementedError

    def _describe_kept(self) -> str:
        raise NotImplementedError

    # -- lifecycle

    @property
    def rebuilding(self) -> bool:
        """Whether missing entries are being kept, the agent having restarted (see above)."""
        return asyncio.get_running_loop().time() < self._rebuild_until

    @property
    def problem(self) -> str:
        """Why the value may be out of date (the last failure while Consul is unavailable), or ""."""
        return self._outage.problem

    @property
    def ready(self) -> bool:
        """True once a first answer arrived."""
        return self._ready.is_set()

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"watch {self._what}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def wait_ready(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    # -- the loop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        retry = Backoff(RETRY_FIRST, RETRY_MAX)
        last_start = -math.inf
        failures = 0  # queries failed in a row
        index_before = 0  # the index when they started failing
        while True:
            pause = last_start + MIN_QUERY_INTERVAL - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            last_start = loop.time()
            try:
                reply = await self._query()
                data = reply.json()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._outage.failed(exc, self._describe_kept())
                if failures == 0:
                    index_before = self.index
                failures += 1
                # The agent may come back as a new process whose indexes restarted low:
                # blocking on our old, higher index would then hang for the whole wait.
                self.index = 0
                await asyncio.sleep(retry.next())
                continue
            if failures and self.ready and (failures >= 2 or reply.index < index_before):
                # Not on indexes going backwards alone: a stale read from a lagging
                # server does that too, and must not delay removals.
                self._rebuild_until = loop.time() + self.rebuild_grace
            failures = 0
            try:
                changed = self._apply(data, keep_missing=self.rebuilding)
            except Exception as exc:  # a malformed answer: keep the last value
                self._outage.failed(exc, self._describe_kept())
                await asyncio.sleep(retry.next())
                continue
            self._outage.recovered()
            retry.reset()
            self.index = next_index(self.index, reply.index)
            self._ready.set()
            if changed is not None:
                self._notify(changed)

    async def _query(self) -> Reply:
        params = [*self._params(), *((("stale", "1"),) if self._stale else ())]
        timeout = REQUEST_TIMEOUT
        if self.index > 0:  # never block on index 0: the first answer must come at once
            wait = self.wait
            rebuild_left = self._rebuild_until - asyncio.get_running_loop().time()
            if rebuild_left > 0:  # answer again when the grace ends, to drop what stayed missing
                wait = min(wait, max(rebuild_left, MIN_WAIT))
            params += [("index", str(self.index)), ("wait", duration(wait))]
            # Consul adds up to wait/16 of jitter; the margin covers that and the network.
            timeout = wait + wait / 16 + REQUEST_TIMEOUT
        self.queries += 1
        return (await call(self._client, "GET", self._path(), params=params, timeout=timeout)).raise_for_status()

    def _notify(self, value: T) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(value)
        except Exception as exc:  # a consumer's bug must not stop the watch
            self._log.warning(f"on_change of watch {self._what} failed: {describe(exc)}")
