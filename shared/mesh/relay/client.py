"""The client side of the relay: one connection from a client, relaying one request at a
time to an instance and its response back.

Design, for CPU per request (this is the hot class):
- an asyncio Protocol, no task per request: bytes are handled as they arrive;
- a request head is found with bytes.find, validated by httptools (llhttp, C), and
  forwarded with the few header lines we add spliced in (relay.headers), never rebuilt;
- the body is streamed as it arrives, framed by Content-Length counting or by the
  parser for a chunked body, and kept (up to REPLAY_LIMIT) so that it can be sent again
  on a retry; while connecting, up to PENDING_LIMIT of it waits before reading stops;
- the instance side (relay.upstream.UpstreamSide) reports through the methods under
  "the instance's report" (its `Client` interface), and nothing else.

Invariants:
- `busy` from a request head to the end of its exchange; the next pipelined request
  waits in `buf` meanwhile;
- the instance an attempt holds is a Lease (shared.mesh.balancing), settled exactly
  once: succeeded or failed by the response's outcome, released when the client goes,
  the request is abandoned, the connection rather than the instance failed, or the
  request became a tunnel. Nothing else touches an instance's counts;
- `deadline` bounds the wait for the instance (its response head, then each piece of
  its body); 0 while the client is the slow side. Relay sweeps the deadlines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

import httptools

from shared.kit.errors import error_response
from shared.mesh.balancing import Backend, Lease
from shared.mesh.relay.headers import new_id, rewrite_request
from shared.mesh.relay.http1 import CHUNKED, IDEMPOTENCY_KEY, LENGTH, MAX_HEAD, NONE, X_REQUEST_ID, framing
from shared.mesh.relay.pool import Pool
from shared.mesh.relay.retry import RETRY, RETRY_FRESH, failure_answer, next_step, stale_connection
from shared.mesh.relay.settings import RelaySettings, Route
from shared.mesh.relay.upstream import UpstreamSide
from shared.mesh.telemetry import AccessLog, RelayMetrics

REPLAY_LIMIT = 64 * 1024  # requests up to this size can be replayed on another instance
PENDING_LIMIT = 256 * 1024  # body bytes held while connecting before we stop reading
# How long a connection closed after an early answer (e.g. a 413 before the whole body
# came) keeps discarding the rest of the request body; see ClientSide._linger.
LINGER_SECONDS = 2.0
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))


class Host(Protocol):
    """What a client connection uses of its relay (relay.listener.Relay)."""

    settings: RelaySettings
    router: Callable[[bytes, bytes], Route | None]
    metrics: RelayMetrics
    access_log: AccessLog | None
    connections: set[ClientSide]
    draining: bool
    loop: asyncio.AbstractEventLoop
    pool: Pool


class ClientSide(asyncio.Protocol):
    """A connection from a client; relays one request at a time to an instance."""

    __slots__ = ("attempts", "body_mode", "body_seen", "buf", "busy", "closed", "connecting",
                 "deadline", "eof", "fresh_only", "head_out", "is_head", "keep_alive", "last_active", "lease", "lease_holder",
                 "lingering", "method", "parser", "paused_upstream", "peer", "pending", "pending_size",
                 "reading_paused", "relay", "remaining", "replay", "replay_size", "req_done",
                 "request_id", "response_started", "retry_safe", "route", "sent_any", "spare_parser", "started",
                 "status", "target", "transport", "tried", "tunnel", "upgrade", "upstream")

    def __init__(self, relay: Host) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False
        self.closed = False
        self.last_active = relay.loop.time()
        self.tunnel: UpstreamSide | None = None
        self.peer = ""
        self.reading_paused = False
        self.paused_upstream: UpstreamSide | None = None
        self.eof = False
        self.lingering = False
        self.spare_parser = None  # see _next_request
        self.lease_holder = Lease()  # taken for each attempt as `lease` (see Lease)
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

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.relay.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""  # a Unix socket's peer has no address

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.transport.write(data)
            return
        self.last_active = self.relay.loop.time()
        if self.busy:
            if self.req_done:  # the next pipelined request: keep it until this one is done
                self.buf += data
                if len(self.buf) > MAX_HEAD:
                    self.pause_reading()
                return
            self._request_body(data)
            return
        if self.lingering:  # the rest of a body we answered early: discard
            return
        self.buf = self.buf + data if self.buf else data
        self._next_request()

    def eof_received(self) -> bool:
        # A client half-closing after its request still wants the response.
        self.eof = True
        return self.busy and self.req_done and not self.lingering

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay.connections.discard(self)
        self.spare_parser = None  # it refers back to us: freed now rather than by the cyclic GC
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
            return
        if self.busy:
            if self.connecting is not None:
                self.connecting.cancel()
            self.deadline = 0.0
            if self.upstream is not None:
                self.upstream.abandon()
            if self.lease is not None:
                self.lease.released()
            self._record(499)  # nginx's "client closed the request"
            self.busy = False

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

    # httptools callback (chunked request bodies only)
    def on_message_complete(self) -> None:
        self.req_done = True

    # -- requests ------------------------------------------------------------------

    def _parse(self, parser: httptools.HttpRequestParser, head: bytes) -> bool:
        """Feeds a whole request head to `parser`; False when llhttp refuses it."""
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            self.upgrade = True
        except httptools.HttpParserError:
            return False
        return True

    def _next_request(self) -> None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0 or end + 4 > MAX_HEAD:
            if len(buf) > MAX_HEAD:
                self._reply(431, "request head too large", close=True)
            return
        head = buf[:end + 4]
        rest = buf[end + 4:]
        self.buf = b""
        if head.startswith(b"\r\n"):  # tolerated stray CRLF between requests
            head = head.lstrip(b"\r\n")
            if not head:
                self.buf = rest
                if rest:
                    self._next_request()
                return
        self.busy = True
        self.started = time.perf_counter()
        parser = self.spare_parser
        self.spare_parser = None
        if parser is None:
            parser = httptools.HttpRequestParser(self)
        try:  # written out rather than a call to _parse: this runs once per request
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            self.upgrade = True
        except httptools.HttpParserError:
            # A kept parser may hold the connection closed where the relay does not (it
            # reads one Connection header; llhttp the last, and Proxy-Connection too):
            # a fresh parser has the last word on whether the head is malformed.
            parser = httptools.HttpRequestParser(self)
            if not self._parse(parser, head):
                self._reply(400, "malformed HTTP request", close=True)
                return
        # A parser that has seen a whole message (a head without a body: on_message_complete
        # set req_done) on a connection it considers open is ready for the next request of
        # the connection: kept for it rather than built anew per request.
        if self.req_done and not self.upgrade and parser.should_keep_alive():
            self.spare_parser = parser
        line_end = head.find(b"\r\n")
        parts = head[:line_end].split(b" ")
        if len(parts) != 3:
            self._reply(400, "malformed request line", close=True)
            return
        self.method, self.target, version = parts
        self.is_head = self.method == b"HEAD"
        lower = head.lower()
        try:
            self.keep_alive, mode, self.remaining = framing(head, lower, version == b"HTTP/1.1", False)
        except ValueError:
            self._reply(400, "invalid Content-Length", close=True)
            return
        settings = self.relay.settings
        if mode == CHUNKED:
            self.body_mode = CHUNKED
            self.parser = parser
            self.req_done = False
        else:  # a request without a length has no body (EOF framing is for responses)
            if settings.max_body is not None and self.remaining > settings.max_body:
                self._reply(413, f"request body over the limit of {settings.max_body} bytes", close=True)
                return
            self.body_mode = LENGTH if mode == LENGTH else NONE
            self.req_done = self.body_mode == NONE

        self.head_out, self.request_id = rewrite_request(head, lower, settings, self.peer, self.upgrade)
        route = self.relay.router(self.method, self.target)
        if route is None:
            self.buf = rest
            self._reply(404, f"no route for {self.target.partition(b'?')[0].decode('latin-1')}",
                        close=not self.req_done)
            return
        self.route = route
        # Safe to send again after an instance failed mid-request: an idempotent method,
        # or a client's Idempotency-Key to a service that declares it answers a repeated
        # key with the first outcome instead of acting twice.
        self.retry_safe = self.method in IDEMPOTENT or (route.idempotency_key and lower.find(IDEMPOTENCY_KEY) >= 0)
        self.replay = [self.head_out]
        self.replay_size = len(self.head_out)
        if rest:
            self._request_body(rest)
            if self.closed or not self.busy:
                return
        self._dispatch()

    def _request_body(self, data: bytes) -> None:
        mode = self.body_mode
        extra = b""
        if mode == LENGTH:
            if len(data) >= self.remaining:
                data, extra = data[:self.remaining], data[self.remaining:]
                self.remaining = 0
                self.req_done = True
            else:
                self.remaining -= len(data)
        elif mode == CHUNKED:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self._abort_request(400, "malformed chunked body")
                return
            limit = self.relay.settings.max_body
            self.body_seen += len(data)
            if limit is not None and self.body_seen > limit + 64:
                self._abort_request(413, f"request body over the limit of {limit} bytes")
                return
        else:  # bytes after a request that has no body: the next request
            self.buf += data
            return
        if data:
            if self.replay is not None:
                if self.replay_size + len(data) <= REPLAY_LIMIT:
                    self.replay.append(data)
                    self.replay_size += len(data)
                else:
                    self.replay = None  # too big to keep: this request will not be retried
            up = self.upstream
            if up is not None:
                up.transport.write(data)
            else:
                self.pending.append(data)
                self.pending_size += len(data)
                if self.pending_size > PENDING_LIMIT:
                    self.pause_reading()
        if extra:
            self.buf += extra

    def _abort_request(self, status: int, message: str) -> None:
        if self.upstream is not None:
            self.upstream.abandon()
            self.upstream = None
        if self.response_started:
            self.close()
            return
        if self.lease is not None:
            self.lease.released()
            self.lease = None
        self._reply(status, message, close=True)

    # -- choosing and reaching an instance -------------------------------------------

    def _dispatch(self) -> None:
        route = self.route
        backend = route.balancer.pick(self.tried)
        if backend is None:
            if not route.balancer.backends:
                self._reply(503, f"no healthy instance of {route.name}", close=not self.req_done)
            else:
                self._reply(502, f"no instance of {route.name} could be reached", close=not self.req_done)
            return
        self.lease = self.lease_holder.take(route.balancer, backend)
        up = None if self.fresh_only else Pool.take(backend)
        if up is not None:
            self._attach(up, reused=True)
        else:
            self.connecting = self.relay.loop.create_task(self._connect(backend))

    async def _connect(self, backend: Backend) -> None:
        pool = self.relay.pool
        try:
            up = await asyncio.wait_for(pool.open(backend), self.route.connect_timeout)
        except asyncio.CancelledError:
            raise
        except (OSError, asyncio.TimeoutError) as exc:
            self.connecting = None
            kind = "connect_timeout" if isinstance(exc, asyncio.TimeoutError) else "connect_refused"
            self.attempt_failed(kind, True)
            return
        self.connecting = None
        if self.closed or not self.busy:
            pool.put_back(up)
            return
        if not up.usable:  # closed by the instance before we wrote anything
            self.attempt_failed("connect_refused", True)
            return
        self._attach(up, reused=False)

    def _attach(self, up: UpstreamSide, reused: bool) -> None:
        self.upstream = up
        up.begin(self, reused, self.is_head, self.upgrade)
        if self.sent_any:  # a retry after bytes went out: send everything again
            up.transport.write(b"".join(self.replay))
        else:
            up.transport.write(self.head_out + b"".join(self.pending) if self.pending else self.head_out)
            self.sent_any = True
        if self.pending:
            self.pending = []
            self.pending_size = 0
        if self.reading_paused and not self.req_done:
            self._resume_reading()
        self.deadline = self.relay.loop.time() + self.route.request_timeout

    def timed_out(self) -> None:
        """The deadline passed (Relay's sweep)."""
        self.deadline = 0.0
        up = self.upstream
        if up is not None:
            up.abandon()
        if self.response_started:
            self.close()
            return
        self.relay.metrics.upstream_error(self.route.name, "timeout")
        if self.lease is not None:
            self.lease.failed()
            self.lease = None
        self.upstream = None
        status, message, _ = failure_answer("timeout", self.route)
        self._reply(status, message, close=True)

    # -- the instance's report (relay.upstream.Client) ----------------------------------

    def attempt_failed(self, kind: str, any_method: bool) -> None:
        """An attempt produced no response: try again if relay.retry says so, else answer."""
        route = self.route
        lease = self.lease
        self.deadline = 0.0
        stale = stale_connection(kind, self.fresh_only)
        if lease is not None:
            if stale:
                lease.released()
            else:
                lease.failed()
                self.tried += (lease.backend,)
            self.lease = None
        self.upstream = None
        self.relay.metrics.upstream_error(route.name, kind)
        if self.closed:
            return
        step = next_step(stale=stale, any_method=any_method, retry_safe=self.retry_safe, sent_any=self.sent_any,
                         replay_kept=self.replay is not None, attempts=self.attempts, retries=route.retries,
                         untried=len(route.balancer.backends) - len(self.tried))
        if step == RETRY_FRESH:
            self.fresh_only = True
        elif step == RETRY:
            self.attempts += 1
        else:
            status, message, close = failure_answer(kind, route)
            self._reply(status, message, close=close or not self.req_done)
            return
        self.relay.metrics.retry(route.name)
        self._dispatch()

    def can_retry_status(self) -> bool:
        route = self.route
        return self.req_done and next_step(
            stale=False, any_method=False, retry_safe=self.retry_safe, sent_any=True,
            replay_kept=self.replay is not None, attempts=self.attempts, retries=route.retries,
            untried=len(route.balancer.backends) - len(self.tried) - 1) == RETRY  # - 1: this instance

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
