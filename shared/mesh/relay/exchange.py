"""A client connection's state, and how each exchange on it ends: the instance's response
relayed as it comes, or our own answer in the shared error shape, then recorded, then the
connection kept for the next request, closed, or closed lingering.

The client side of the relay is one object per client connection, ClientSide, built in
three layers, each in its own module and each using only those below it:
- Exchange (here): the connection's state and the end of an exchange. Its public
  methods are what an instance connection reports (relay.upstream.Client);
- Forwarding (relay.forwarding): getting a request to an instance: the pick and its
  Lease, the pooled or new connection, the body as it streams, retries, timeouts;
- ClientSide (relay.client): the asyncio Protocol the listener serves with, and the
  request loop: read a head, forward it, finish, the next one.
One object rather than parts that call each other: this is the hot path, and a call or
an object per request costs (about 0.5k instructions a call, 1.5k an object, of the
sidecar's 91k per request; bench/relay.py under cachegrind). The layers cost nothing.

Invariants:
- `busy` from a request head to the end of its exchange; the next pipelined request
  waits in `buf` meanwhile; `_reset` forgets the exchange when it ends;
- the instance an attempt holds is `lease` (shared.mesh.balancing.Lease), settled
  exactly once: succeeded or failed by the response's status, released when the client
  goes, the request is abandoned, the connection rather than the instance failed, or
  the request became a tunnel. Nothing else touches an instance's counts;
- `deadline` bounds the wait for the instance (its response head, then each piece of its
  body); 0 while the client is the slow side. `head_deadline` bounds the wait for the
  client's next request head: set at accept and when a head's first bytes come on a
  kept-alive connection, 0 once it is whole, so it is never set while `busy` (an idle
  kept-alive connection is the idle sweep's). The listener sweeps both in one pass.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from shared.kit.errors import error_response
from shared.mesh.balancing import Backend, Lease
from shared.mesh.relay.headers import new_id
from shared.mesh.relay.http1 import NONE, X_REQUEST_ID
from shared.mesh.relay.pool import Pool
from shared.mesh.relay.settings import RelaySettings, Route
from shared.mesh.relay.upstream import UpstreamSide
from shared.mesh.telemetry import AccessLog, RelayMetrics

if TYPE_CHECKING:
    from shared.mesh.authorize import Decision
    from shared.mesh.mtls import Inbound

# How long a connection closed after an early answer (e.g. a 413 before the whole body
# came) keeps discarding the rest of the request body; see Exchange._linger.
LINGER_SECONDS = 2.0


class Host(Protocol):
    """What a client connection uses of its relay (relay.listener.Relay)."""

    settings: RelaySettings
    router: Callable[[bytes, bytes], Route | None]
    metrics: RelayMetrics
    access_log: AccessLog | None
    connections: set[asyncio.Protocol]
    draining: bool
    loop: asyncio.AbstractEventLoop
    pool: Pool
    inbound: Inbound | None


class Exchange(asyncio.Protocol):
    """A client connection's state and the end of each exchange (see the module's doc)."""

    __slots__ = ("attempts", "body_mode", "body_seen", "buf", "busy", "closed", "connecting", "deadline", "decision", "eof",
                 "fresh_only", "head_deadline", "head_out", "is_head", "keep_alive", "last_active", "lease",
                 "lease_holder", "lingering", "method", "parser", "paused_upstream", "peer", "pending", "pending_size",
                 "reading_paused", "relay", "remaining", "replay", "replay_size", "req_done", "request_id",
                 "response_started", "retry_safe", "route", "sent_any", "spare_parser", "started", "status",
                 "target", "transport", "tried", "tunnel", "upgrade", "upstream")

    def __init__(self, relay: Host) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False
        self.closed = False
        self.last_active = relay.loop.time()
        # Accepted now: the first request head is due within header_timeout (see _next_request).
        self.head_deadline = self.last_active + relay.settings.header_timeout
        self.tunnel: UpstreamSide | None = None
        self.peer = ""
        self.reading_paused = False
        self.paused_upstream: UpstreamSide | None = None
        self.eof = False
        self.lingering = False
        self.spare_parser = None  # see _next_request
        self.lease_holder = Lease()  # taken for each attempt as `lease` (see Lease)
        # With an mTLS listener: whether the client's service may call (shared.mesh.authorize:
        # updated in place when intentions change); None otherwise, or while it is asked.
        self.decision: Decision | None = None
        self._reset()

    def _reset(self) -> None:
        self.method = b""
        self.retry_safe = False
        self.target = b""
        self.request_id = ""
        self.keep_alive = True
        self.head_out = b""
        self.body_mode = NONE
        self.remaining = 0
        self.parser = None
        self.req_done = False
        self.replay: list[bytes] | None = None
        self.replay_size = 0
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.route: Route | None = None
        self.lease: Lease | None = None
        self.tried: tuple[Backend, ...] = ()
        self.attempts = 0
        self.started = 0.0
        self.status = 0
        self.upstream: UpstreamSide | None = None
        self.response_started = False
        # Loop time by which the response head, or the next piece of its body, must
        # arrive (request_timeout); 0: none, e.g. while the client is the slow side.
        self.deadline = 0.0
        self.is_head = False
        self.upgrade = False
        self.body_seen = 0
        self.sent_any = False
        self.fresh_only = False  # after a stale pooled connection: connect anew
        self.connecting: asyncio.Task | None = None

    def _next_request(self) -> None:
        """Start on the request waiting in `buf`, if it is all there (ClientSide)."""
        raise NotImplementedError

    # -- the instance's report (relay.upstream.Client) ----------------------------------

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def response_head(self, status: int, head: bytes, lower: bytes, body: bytes, more: bool) -> None:
        self.status = status
        self.response_started = True
        if self.relay.settings.echo_request_id and lower.find(X_REQUEST_ID) < 0:
            line_end = head.find(b"\r\n") + 2
            head = head[:line_end] + b"X-Request-Id: " + self.request_id.encode() + b"\r\n" + head[line_end:]
        if more:  # body to come: bound the wait for it
            self.deadline = self.relay.loop.time() + self.route.request_timeout
        self.transport.write(head + body if body else head)

    def response_body(self, data: bytes) -> None:
        # an instance that stops sending mid-body is cut off after request_timeout
        self.deadline = self.relay.loop.time() + self.route.request_timeout
        self.transport.write(data)

    def response_done(self, reusable: bool) -> None:
        self.deadline = 0.0
        if self.status in (502, 503, 504):
            self.lease.failed()
        else:
            self.lease.succeeded()
        self._record(self.status)
        up = self.upstream
        if up is not None:
            up.client = None
            if reusable and self.req_done:
                self.relay.pool.put_back(up)
            else:
                up.close()
        self._finish_exchange(self.keep_alive and self.req_done and not self.relay.draining)

    def response_ended_by_close(self) -> None:
        self.keep_alive = False  # the client, too, can only see the end as a close
        self.response_done(False)

    def response_cut(self) -> None:
        self.close()

    def tunnel_opened(self, up: UpstreamSide, status: int, head: bytes) -> None:
        self.deadline = 0.0
        self.status = status
        self.response_started = True
        self.tunnel = up
        self._record(status)
        self.busy = False
        self.lease.released()
        self.transport.write(head)
        if self.buf:  # bytes the client sent right after its upgrade request
            up.transport.write(self.buf)
            self.buf = b""
        if self.reading_paused:
            self._resume_reading()

    def tunnel_closed(self) -> None:
        self.tunnel = None
        self.close()

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_request(self) -> None:
        if not self.req_done:
            self._resume_reading()

    # -- back-pressure from the client (asyncio.Protocol) -------------------------------

    def pause_writing(self) -> None:
        # The client reads slower than the instance sends: stop reading the instance.
        up = self.upstream if self.tunnel is None else self.tunnel
        if up is not None:
            up.pause_reading()
            self.paused_upstream = up
            self.deadline = 0.0  # the wait is the client's doing, not the instance's

    def resume_writing(self) -> None:
        # Resume the connection we paused, even if its response has completed since.
        up = self.paused_upstream
        self.paused_upstream = None
        if up is not None:
            up.resume_reading()
            if self.busy and self.response_started and self.tunnel is None and self.route is not None:
                self.deadline = self.relay.loop.time() + self.route.request_timeout

    # -- the end of an exchange ----------------------------------------------------------

    def _finish_exchange(self, keep: bool) -> None:
        unread = not self.req_done  # answered before the request body was all in
        if self.connecting is not None:  # answered while still connecting (e.g. 413)
            self.connecting.cancel()
        self.busy = False
        self._reset()
        if not keep:
            if unread:
                self._linger()
            else:
                self.close()
            return
        if self.reading_paused:
            self._resume_reading()
        if self.buf:
            self._next_request()
        if self.eof and not self.busy:
            self.close()

    def _record(self, status: int) -> None:
        route_name = self.route.name if self.route is not None else "-"
        seconds = time.perf_counter() - self.started
        self.relay.metrics.observe(route_name, status, seconds)
        log = self.relay.access_log
        if log is not None:
            lease = self.lease
            log.record(self.relay.settings.listener, self.method.decode("latin-1"),
                       self.target.decode("latin-1"), status, seconds,
                       lease.backend.address if lease is not None else "", self.request_id, self.attempts)

    def _reply(self, status: int, message: str, close: bool) -> None:
        """Answer with the shared error shape ourselves."""
        if self.closed:
            return
        self.status = status
        self._record(status)
        self.transport.write(error_response(status, message, self.request_id or new_id(), close=close))
        self._finish_exchange(keep=not close and self.keep_alive and not self.relay.draining)

    def _linger(self) -> None:
        """Close after answering while the client is still sending its request body.

        Closing at once would leave its bytes unread, and the kernel answers those with a
        reset that can destroy the answer before the client has read it (a proxy in front
        then reports 502 instead of, say, a 413). So: half-close (the client reads the
        answer, then EOF), discard what still arrives, close on the client's EOF or after
        LINGER_SECONDS, as nginx's lingering close does.
        """
        transport = self.transport
        if transport is None or self.closed or self.lingering:
            return
        try:
            transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self.close()
            return
        self.lingering = True
        self.buf = b""
        self._resume_reading()
        self.relay.loop.call_later(LINGER_SECONDS, self.close)

    def _resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
