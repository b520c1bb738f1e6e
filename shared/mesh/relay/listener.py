"""One listening relay: its client connections and their lifecycle.

Relay is what the sidecar's and the gateway's listeners are built on
(`loop.create_server(relay.protocol, ...)`): it holds the settings, the router, what to
record, the pool of connections to instances, and the open client connections, which it
sweeps for idle keep-alive clients and for passed request deadlines, and drains.

One sweep (every DEADLINE_SWEEP seconds) enforces every request deadline, and every
request head's (header_timeout: 408 to a client that dribbles its head), instead of a
timer per request: a timer costs more than the rest of the bookkeeping of a small request.

With mTLS (shared.mesh.mtls), `inbound` judges who may send requests to this listener
(a sidecar's public one: listen with `ssl=inbound.context`); a Route's `tls` makes the
connections to its instances mTLS.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared.mesh.relay.client import ClientSide
from shared.mesh.relay.pool import Pool
from shared.mesh.relay.settings import RelaySettings, Route
from shared.mesh.telemetry import AccessLog, RelayMetrics

if TYPE_CHECKING:
    from shared.mesh.mtls import Inbound

DEADLINE_SWEEP = 0.1  # request timeouts are enforced to within this many seconds


class Relay:
    """One listening relay: its settings, how to route, what to record, open connections."""

    def __init__(self, settings: RelaySettings, router: Callable[[bytes, bytes], Route | None],
                 metrics: RelayMetrics, access_log: AccessLog | None = None, *,
                 inbound: Inbound | None = None) -> None:
        self.settings = settings
        self.inbound = inbound
        self.router = router
        self.metrics = metrics
        self.access_log = access_log
        self.connections: set[ClientSide] = set()
        self.draining = False
        self.loop = asyncio.get_running_loop()
        self.pool = Pool(self.loop, settings.max_idle_per_backend)
        self._idle_check = self.loop.call_later(settings.idle_timeout / 2, self._close_idle_clients)
        self._deadline_check = self.loop.call_later(DEADLINE_SWEEP, self._expire_deadlines)

    def protocol(self) -> ClientSide:
        return ClientSide(self)

    @property
    def inflight(self) -> int:
        return sum(1 for c in self.connections if c.busy)

    def start_draining(self) -> None:
        """Serve what arrives, but close each client connection after its current response."""
        self.draining = True
        self.pool.keeping = False  # and each instance connection after its response
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()

    async def wait_idle(self, timeout: float) -> bool:
        deadline = self.loop.time() + timeout
        while self.inflight and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        return self.inflight == 0

    def close(self) -> None:
        self._idle_check.cancel()
        self._deadline_check.cancel()
        for conn in list(self.connections):
            conn.close()

    def _expire_deadlines(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            if conn.deadline and conn.deadline <= now:
                conn.timed_out()
            elif conn.head_deadline and conn.head_deadline <= now:
                conn.head_timed_out()
        self._deadline_check = self.loop.call_later(DEADLINE_SWEEP, self._expire_deadlines)

    def _close_idle_clients(self) -> None:
        now = self.loop.time()
        limit = self.settings.idle_timeout
        for conn in list(self.connections):
            if not conn.busy and conn.tunnel is None and now - conn.last_active > limit:
                conn.close()
        self._idle_check = self.loop.call_later(limit / 2, self._close_idle_clients)
