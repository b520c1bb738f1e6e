"""The fast HTTP/1.1 forwarding path, shared by the sidecar and the gateway.

Design, for CPU per request rather than convenience:
- bytes are relayed at the transport level (asyncio Protocols, no per-request task);
- a request head is found with bytes.find, validated by httptools (llhttp, C), and
  forwarded with the few header lines we add spliced in, never rebuilt;
- bodies are streamed as they arrive, framed by Content-Length counting or by the
  parser for chunked bodies, with flow control in both directions (no full buffering);
- responses are relayed as received; only the status line and framing are looked at;
- connections to instances are kept alive and pooled per instance, and go through a
  Unix socket to an instance on this host that offers one (shared.mesh.local) and, from a
  sidecar, to an app that listens on one.

Around that: picking an instance (shared.mesh.balancing), retries on another instance when
a connection fails (any method: nothing was sent) or, for idempotent methods and requests
carrying an Idempotency-Key to a service that honours it, when the instance answers
502/503 or drops the connection before answering; connect and request
timeouts; errors in the shared JSON shape; X-Request-Id and traceparent propagation;
WebSocket (Upgrade) tunnelling; draining.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import httptools

from shared.mesh import local
from shared.mesh.balancing import Backend, Balancer
from shared.kit.errors import error_response
from shared.mesh.telemetry import AccessLog, RelayMetrics

MAX_HEAD = 64 * 1024  # larger request heads get 431
REPLAY_LIMIT = 64 * 1024  # requests up to this size can be replayed on another instance
PENDING_LIMIT = 256 * 1024  # body bytes held while connecting before we stop reading
# How long a connection closed after an early answer (e.g. a 413 before the whole body
# came) keeps discarding the rest of the request body; see ClientSide._linger.
LINGER_SECONDS = 2.0
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
# Characters a client-supplied X-Request-Id may use (it ends up in logs and headers).
_REQUEST_ID_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"
_HEX = b"0123456789abcdef"
_HOP_BY_HOP = (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
               b"proxy-authorization", b"proxy-authenticate")
_HOP_RE = re.compile(rb"\r\n(" + b"|".join(_HOP_BY_HOP) + rb"):")

_NONE, _LENGTH, _CHUNKED, _EOF = 0, 1, 2, 3
DEADLINE_SWEEP = 0.1  # request timeouts are enforced to within this many seconds
SOCKET_RETRY = 5.0  # after a failed connect through an instance's Unix socket, TCP for this long


@dataclass
class Route:
    """Where a request goes: a balancer over the instances of one service."""

    name: str
    balancer: Balancer
    connect_timeout: float = 2.0
    request_timeout: float = 30.0
    retries: int = 2
    # The service honours Idempotency-Key (shared.mesh.discovery.honours_idempotency_key):
    # a request carrying one may be resent like an idempotent one.
    idempotency_key: bool = False


@dataclass
class RelaySettings:
    listener: str  # name in logs and metrics: "inbound", "upstream", "gateway"
    request_id: bool = True  # add X-Request-Id when absent
    traceparent: bool = True  # start a W3C trace when the request carries none
    forwarded: bool = False  # add X-Forwarded-For/Proto/Host, drop hop-by-hop headers
    echo_request_id: bool = False  # return X-Request-Id on responses that lack it
    max_body: int | None = None  # 413 above this many bytes
    idle_timeout: float = 75.0  # close client keep-alive connections idle this long
    max_idle_per_backend: int = 64


class Relay:
    """One listening relay: its settings, how to route, what to record, open connections."""

    def __init__(self, settings: RelaySettings, router: Callable[[bytes, bytes], Route | None],
                 metrics: RelayMetrics, access_log: AccessLog | None = None) -> None:
        self.settings = settings
        self.router = router
        self.metrics = metrics
        self.access_log = access_log
        self.connections: set[ClientSide] = set()
        self.draining = False
        self.loop = asyncio.get_running_loop()
        self._idle_check = self.loop.call_later(settings.idle_timeout / 2, self._close_idle_clients)
        # One sweep for every request deadline instead of a timer per request (a timer
        # costs more than the rest of the bookkeeping of a small request).
        self._deadline_check = self.loop.call_later(DEADLINE_SWEEP, self._expire_deadlines)

    def protocol(self) -> ClientSide:
        return ClientSide(self)

    @property
    def inflight(self) -> int:
        return sum(1 for c in self.connections if c.busy)

    def start_draining(self) -> None:
        """Serve what arrives, but close each client connection after its current response."""
        self.draining = True
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
                conn._timed_out()
        self._deadline_check = self.loop.call_later(DEADLINE_SWEEP, self._expire_deadlines)

    def _close_idle_clients(self) -> None:
        now = self.loop.time()
        limit = self.settings.idle_timeout
        for conn in list(self.connections):
            if not conn.busy and conn.tunnel is None and now - conn.last_active > limit:
                conn.close()
        self._idle_check = self.loop.call_later(limit / 2, self._close_idle_clients)


# Header lookups in a lower-cased head, by needle (b"\r\n<name>:"), built once here rather
# than per request. Presence is tested with find, not `in`: in Python 3.11 `bytes in bytes`
# first tries the needle as an integer, building and discarding a TypeError every time.
_CONNECTION = b"\r\nconnection:"
_TRANSFER_ENCODING = b"\r\ntransfer-encoding:"
_CONTENT_LENGTH = b"\r\ncontent-length:"
_X_REQUEST_ID = b"\r\nx-request-id:"
_TRACEPARENT = b"\r\ntraceparent:"
_IDEMPOTENCY_KEY = b"\r\nidempotency-key:"
_X_FORWARDED_FOR = b"\r\nx-forwarded-for:"
_X_FORWARDED_PROTO = b"\r\nx-forwarded-proto:"
_X_FORWARDED_HOST = b"\r\nx-forwarded-host:"
_HOST = b"\r\nhost:"


def _header(lower: bytes, head: bytes, needle: bytes) -> bytes | None:
    """Value of the header found by `needle` (one of the above) in a raw head, or None."""
    i = lower.find(needle)
    if i < 0:
        return None
    start = i + len(needle)
    return head[start:head.find(b"\r\n", start)].strip()


def _new_id() -> str:
    # 32 lower-case hex digits; to_bytes().hex() is twice as fast as f"{n:032x}".
    return random.getrandbits(128).to_bytes(16, "big").hex()


class ClientSide(asyncio.Protocol):
    """A connection from a client; relays one request at a time to an instance."""

    __slots__ = ("attempts", "backend", "body_mode", "body_seen", "buf", "busy", "closed", "connecting",
                 "deadline", "eof", "fresh_only", "head_out", "is_head", "keep_alive", "last_active",
                 "lingering", "method", "parser", "paused_upstream", "peer", "pending", "pending_size",
                 "reading_paused", "relay", "remaining", "replay", "replay_size", "req_done",
                 "request_id", "response_started", "retry_safe", "route", "sent_any", "spare_parser", "started",
                 "status", "target", "transport", "tried", "tunnel", "upgrade", "upstream")

    def __init__(self, relay: Relay) -> None:
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
        self._reset()

    def _reset(self) -> None:
        self.method = b""
        self.retry_safe = False
        self.target = b""
        self.request_id = ""
        self.keep_alive = True
        self.head_out = b""
        self.body_mode = _NONE
        self.remaining = 0
        self.parser = None
        self.req_done = False
        self.replay: list[bytes] | None = None
        self.replay_size = 0
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.route: Route | None = None
        self.backend: Backend | None = None
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
                    self._pause_reading()
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
            up = self.upstream
            if up is not None:
                up.client = None
                up.close()
            if self.backend is not None:
                self.backend.inflight -= 1
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
        if parser is None or not self._parse(parser, head):
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
        self.method, self.target = parts[0], parts[1]
        self.is_head = self.method == b"HEAD"
        lower = head.lower()
        connection = _header(lower, lower, _CONNECTION)
        if parts[2] == b"HTTP/1.1":
            self.keep_alive = connection is None or b"close" not in connection
        else:
            self.keep_alive = connection is not None and b"keep-alive" in connection
        settings = self.relay.settings

        # Framing of the request body.
        te = _header(lower, lower, _TRANSFER_ENCODING)
        if te is not None and b"chunked" in te:
            self.body_mode = _CHUNKED
            self.parser = parser
            self.req_done = False
        else:
            length = _header(lower, head, _CONTENT_LENGTH)
            if length:
                try:
                    self.remaining = int(length)
                except ValueError:
                    self._reply(400, "invalid Content-Length", close=True)
                    return
                if settings.max_body is not None and self.remaining > settings.max_body:
                    self._reply(413, f"request body over the limit of {settings.max_body} bytes", close=True)
                    return
                self.body_mode = _LENGTH if self.remaining else _NONE
            self.req_done = self.body_mode == _NONE

        # Headers we add: request id, trace context, forwarding.
        extra = b""
        rid = _header(lower, head, _X_REQUEST_ID)
        if rid and len(rid) <= 128 and not rid.translate(None, _REQUEST_ID_CHARS):
            self.request_id = rid.decode()
        else:
            self.request_id = _new_id()
            if rid is not None:  # unusable value (too long, odd bytes): replace it
                head = _drop_headers(head, (b"x-request-id",))
                lower = head.lower()
            if settings.request_id:
                extra += b"X-Request-Id: " + self.request_id.encode() + b"\r\n"
        if settings.traceparent and lower.find(_TRACEPARENT) < 0:
            trace_id = self.request_id.encode()
            if len(trace_id) != 32 or trace_id.translate(None, _HEX) or not trace_id.strip(b"0"):
                trace_id = _new_id().encode()
            extra += b"traceparent: 00-%s-%016x-01\r\n" % (trace_id, random.getrandbits(64))
        if settings.forwarded:
            head, extra = _forwarding(head, lower, extra, self.peer, self.upgrade)
        if extra:
            line_end = head.find(b"\r\n") + 2
            head = head[:line_end] + extra + head[line_end:]
        self.head_out = head

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
        self.retry_safe = self.method in IDEMPOTENT or (route.idempotency_key and lower.find(_IDEMPOTENCY_KEY) >= 0)
        self.replay = [head]
        self.replay_size = len(head)
        if rest:
            self._request_body(rest)
            if self.closed or not self.busy:
                return
        self._dispatch()

    def _request_body(self, data: bytes) -> None:
        mode = self.body_mode
        extra = b""
        if mode == _LENGTH:
            if len(data) >= self.remaining:
                data, extra = data[:self.remaining], data[self.remaining:]
                self.remaining = 0
                self.req_done = True
            else:
                self.remaining -= len(data)
        elif mode == _CHUNKED:
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
                    self._pause_reading()
        if extra:
            self.buf += extra

    def _abort_request(self, status: int, message: str) -> None:
        if self.upstream is not None:
            self.upstream.client = None
            self.upstream.close()
            self.upstream = None
        if self.response_started:
            self.close()
            return
        if self.backend is not None:
            self.backend.inflight -= 1
            self.backend = None
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
        self.backend = backend
        backend.inflight += 1
        idle = backend.idle
        while idle and not self.fresh_only:
            up = idle.pop()
            if up.usable:
                self._attach(up, reused=True)
                return
        self.connecting = self.relay.loop.create_task(self._connect(backend))

    async def _connect(self, backend: Backend) -> None:
        route = self.route
        try:
            up = await asyncio.wait_for(self._open(backend), route.connect_timeout)
        except asyncio.CancelledError:
            raise
        except (OSError, asyncio.TimeoutError) as exc:
            self.connecting = None
            kind = "connect_timeout" if isinstance(exc, asyncio.TimeoutError) else "connect_refused"
            self._attempt_failed(kind, retry_any_method=True)
            return
        self.connecting = None
        if self.closed or not self.busy:
            up.release()
            return
        if not up.usable:  # closed by the instance before we wrote anything
            self._attempt_failed("connect_refused", retry_any_method=True)
            return
        self._attach(up, reused=False)

    async def _open(self, backend: Backend) -> UpstreamSide:
        """A new connection to `backend`: through its Unix socket when it is on this host."""
        relay = self.relay
        address = backend.socket
        if address is not None and time.monotonic() >= backend.socket_retry_at:
            try:
                return (await local.connect(lambda: UpstreamSide(relay, backend), address))[1]
            except OSError:
                # Unreachable (its process just died or is restarting, its backlog is full,
                # or another network namespace after all): TCP meanwhile, the socket again
                # a little later.
                backend.socket_retry_at = time.monotonic() + SOCKET_RETRY
        up = (await relay.loop.create_connection(lambda: UpstreamSide(relay, backend), backend.host,
                                                 backend.port))[1]
        up.stand_in = address is not None  # see UpstreamSide.release
        return up

    def _attach(self, up: UpstreamSide, reused: bool) -> None:
        self.upstream = up
        up.client = self
        up.reused = reused
        up.begin(self.is_head)
        if self.sent_any:  # a retry after bytes went out: send everything again
            up.transport.write(b"".join(self.replay))
        else:
            up.transport.write(self.head_out + b"".join(self.pending) if self.pending else self.head_out)
            self.sent_any = True
        self.pending = []
        self.pending_size = 0
        if self.reading_paused and not self.req_done:
            self._resume_reading()
        self.deadline = self.relay.loop.time() + self.route.request_timeout

    def _attempt_failed(self, kind: str, retry_any_method: bool) -> None:
        """An attempt produced no response: try another instance if allowed, else answer."""
        route = self.route
        backend = self.backend
        self.deadline = 0.0
        # A pooled keep-alive connection closed by the instance just as we reused it is
        # the connection's failure, not the instance's: one retry on a fresh connection
        # to the same instance (a single-instance route has nowhere else to go).
        stale = kind == "reset" and not self.fresh_only
        if backend is not None:
            backend.inflight -= 1
            if not stale:
                route.balancer.failed(backend)
                self.tried += (backend,)
            self.backend = None
        self.upstream = None
        self.relay.metrics.upstream_error(route.name, kind)
        if self.closed:
            return
        if stale and self.retry_safe and self.replay is not None:
            self.fresh_only = True
            self.relay.metrics.retry(route.name)
            self._dispatch()
            return
        # Replayable: nothing went out yet, or everything that did is still in hand.
        can_replay = not self.sent_any or self.replay is not None
        if (self.attempts < route.retries and can_replay and len(route.balancer.backends) > len(self.tried)
                and (retry_any_method or self.retry_safe)):
            self.attempts += 1
            self.relay.metrics.retry(route.name)
            self._dispatch()
            return
        if kind == "connect_timeout":
            self._reply(504, f"{route.name} did not accept a connection in time", close=not self.req_done)
        elif kind == "timeout":
            self._reply(504, f"{route.name} did not answer within {route.request_timeout:g}s", close=True)
        else:
            self._reply(502, f"{route.name} could not be reached ({kind})", close=not self.req_done)

    def _timed_out(self) -> None:
        self.deadline = 0.0
        up = self.upstream
        if up is not None:
            up.client = None
            up.close()
        if self.response_started:
            self.close()
            return
        self.relay.metrics.upstream_error(self.route.name, "timeout")
        if self.backend is not None:
            self.backend.inflight -= 1
            self.route.balancer.failed(self.backend)
            self.backend = None
        self.upstream = None
        self._reply(504, f"{self.route.name} did not answer within {self.route.request_timeout:g}s", close=True)

    # -- responses (called by UpstreamSide) ------------------------------------------

    def can_retry_status(self) -> bool:
        return (self.retry_safe and self.replay is not None and self.req_done
                and self.attempts < self.route.retries and len(self.route.balancer.backends) > len(self.tried) + 1)

    def response_complete(self, up_reusable: bool) -> None:
        self.deadline = 0.0
        up = self.upstream
        backend = self.backend
        route = self.route
        backend.inflight -= 1
        if self.status in (502, 503, 504):
            route.balancer.failed(backend)
        else:
            route.balancer.succeeded(backend)
        self._record(self.status)
        if up is not None:
            up.client = None
            if up_reusable and self.req_done:
                up.release()
            else:
                up.close()
        keep = self.keep_alive and self.req_done and not self.relay.draining
        self._finish_exchange(keep)

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
            backend = self.backend
            log.record(self.relay.settings.listener, self.method.decode("latin-1"),
                       self.target.decode("latin-1"), status, seconds,
                       backend.address if backend is not None else "", self.request_id, self.attempts)

    def _reply(self, status: int, message: str, close: bool) -> None:
        """Answer with the shared error shape ourselves."""
        if self.closed:
            return
        self.status = status
        self._record(status)
        self.transport.write(error_response(status, message, self.request_id or _new_id(), close=close))
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

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()


class UpstreamSide(asyncio.Protocol):
    """A keep-alive connection to one instance, relaying one response at a time."""

    __slots__ = ("backend", "buf", "client", "closed", "done", "head_done", "is_head", "keep_alive", "mode",
                 "parser", "reading_paused", "relay", "remaining", "reused", "stand_in", "transport", "tunnelled")

    def __init__(self, relay: Relay, backend: Backend) -> None:
        self.relay = relay
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.client: ClientSide | None = None
        self.reused = False
        self.closed = False
        self.buf = b""
        self.head_done = False
        self.mode = _NONE
        self.remaining = 0
        self.parser = None
        self.done = False
        self.keep_alive = True
        self.is_head = False
        self.tunnelled = False
        self.reading_paused = False
        # TCP standing in for the instance's Unix socket, which had failed: not kept in the
        # pool once the socket may be tried again, or pooled TCP would carry on for good.
        self.stand_in = False

    @property
    def usable(self) -> bool:
        return not self.closed and not self.transport.is_closing()

    def begin(self, is_head: bool) -> None:
        self.buf = b""
        self.head_done = False
        self.done = False
        self.is_head = is_head

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def release(self) -> None:
        """Back into the instance's pool of idle connections (or closed if not wanted)."""
        # The last write of a response can fill the client's buffer and pause us; a
        # pooled connection must read, or the next response on it is never seen.
        self.resume_reading()
        backend = self.backend
        if (self.closed or backend.removed or self.relay.draining
                or len(backend.idle) >= self.relay.settings.max_idle_per_backend
                or (self.stand_in and time.monotonic() >= backend.socket_retry_at)):
            self.close()
        else:
            backend.idle.append(self)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client._pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None and not self.client.req_done:
            self.client._resume_reading()

    def on_message_complete(self) -> None:  # httptools, chunked responses
        self.done = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        client = self.client
        if client is None:
            try:
                self.backend.idle.remove(self)
            except ValueError:
                pass
            return
        self.client = None
        if self.tunnelled:
            client.tunnel = None
            client.close()
        elif not self.head_done:
            # Nothing came back. Connection failures are safe to retry for idempotent
            # methods (the instance may have processed the request before dying).
            client._attempt_failed("reset" if self.reused else "closed", retry_any_method=False)
        elif self.mode == _EOF:
            client.keep_alive = False  # the client, too, can only see the end as a close
            client.response_complete(False)  # the body ended with the connection
        else:
            client.close()  # cut in the middle of a response: the client must see it

    def eof_received(self) -> bool:
        return False

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            self.close()  # bytes on an idle connection: not a state we can trust
            return
        if self.tunnelled:
            client.transport.write(data)
            return
        if not self.head_done:
            buf = self.buf + data if self.buf else data
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        self._bad_response(client, "response head too large")
                    else:
                        self.buf = buf
                    return
                if not buf.startswith(b"HTTP/1."):
                    self._bad_response(client, "not an HTTP/1.x response")
                    return
                try:
                    status = int(buf[9:12])
                except ValueError:
                    self._bad_response(client, "malformed status line")
                    return
                if 100 <= status < 200 and status != 101:  # interim (100 Continue): pass it on
                    client.transport.write(buf[:end + 4])
                    buf = buf[end + 4:]
                    if not buf:
                        self.buf = b""
                        return
                    continue
                break
            self.buf = b""
            head, rest = buf[:end + 4], buf[end + 4:]
            if status == 101 and client.upgrade:
                self._start_tunnel(client, status, buf)
                return
            if status in (502, 503) and client.can_retry_status():
                self.client = None
                self.close()
                client._attempt_failed(f"status_{status}", retry_any_method=False)
                return
            # The instance is one of ours: read the status line and framing headers
            # directly; the parser is only needed to follow a chunked body.
            lower = head.lower()
            connection = _header(lower, lower, _CONNECTION)
            if head.startswith(b"HTTP/1.1"):
                self.keep_alive = connection is None or b"close" not in connection
            else:
                self.keep_alive = connection is not None and b"keep-alive" in connection
            if self.is_head or status in (204, 304):
                self.mode = _NONE
            elif (te := _header(lower, lower, _TRANSFER_ENCODING)) is not None and b"chunked" in te:
                parser = httptools.HttpResponseParser(self)
                try:
                    parser.feed_data(head)
                except httptools.HttpParserError:
                    self._bad_response(client, "malformed response head")
                    return
                self.mode = _CHUNKED
                self.parser = parser
                self.done = False
            else:
                length = _header(lower, head, _CONTENT_LENGTH)
                if length is not None:
                    try:
                        self.remaining = int(length)
                    except ValueError:
                        self._bad_response(client, "invalid Content-Length in response")
                        return
                    self.mode = _LENGTH if self.remaining else _NONE
                else:
                    self.mode = _EOF
                    self.keep_alive = False
            if client.relay.settings.echo_request_id and lower.find(_X_REQUEST_ID) < 0:
                line_end = head.find(b"\r\n") + 2
                head = head[:line_end] + b"X-Request-Id: " + client.request_id.encode() + b"\r\n" + head[line_end:]
            client.status = status
            client.response_started = True
            self.head_done = True
            if self.mode == _LENGTH and len(rest) <= self.remaining:
                self.remaining -= len(rest)
                if self.remaining:  # more body to come: bound the wait for it
                    client.deadline = client.relay.loop.time() + client.route.request_timeout
                client.transport.write(head + rest if rest else head)  # the common case: one write
                if self.remaining == 0:
                    client.response_complete(self.keep_alive)
                return
            client.deadline = client.relay.loop.time() + client.route.request_timeout
            client.transport.write(head)
            if self.mode == _NONE:
                client.response_complete(self.keep_alive and not rest)
                return
            data = rest
            if not data:
                return
        # body: an instance that stops sending mid-body is cut off after request_timeout
        client.deadline = client.relay.loop.time() + client.route.request_timeout
        mode = self.mode
        if mode == _LENGTH:
            if len(data) >= self.remaining:
                extra = len(data) > self.remaining
                client.transport.write(data[:self.remaining] if extra else data)
                self.remaining = 0
                client.response_complete(self.keep_alive and not extra)
            else:
                self.remaining -= len(data)
                client.transport.write(data)
        elif mode == _CHUNKED:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                client.transport.write(data)
                client.close()
                return
            client.transport.write(data)
            if self.done:
                client.response_complete(self.keep_alive)
        else:
            client.transport.write(data)

    def _bad_response(self, client: ClientSide, message: str) -> None:
        self.client = None
        self.close()
        client.response_started = False
        client._attempt_failed("bad_response", retry_any_method=False)

    def _start_tunnel(self, client: ClientSide, status: int, data: bytes) -> None:
        client.deadline = 0.0
        client.status = status
        client.response_started = True
        self.tunnelled = True
        self.head_done = True
        client.tunnel = self
        client._record(status)
        client.busy = False
        client.backend.inflight -= 1
        client.transport.write(data)
        if client.buf:  # bytes the client sent right after its upgrade request
            self.transport.write(client.buf)
            client.buf = b""
        if client.reading_paused:
            client._resume_reading()


def _drop_headers(head: bytes, names: tuple[bytes, ...]) -> bytes:
    lines = head.split(b"\r\n")
    kept = [lines[0]] + [
        line for line in lines[1:]
        if not line or line.split(b":", 1)[0].strip().lower() not in names
    ]
    return b"\r\n".join(kept)


def _forwarding(head: bytes, lower: bytes, extra: bytes, peer: str, upgrade: bool) -> tuple[bytes, bytes]:
    """X-Forwarded-* for the instance; hop-by-hop headers are the proxy's, not the app's."""
    # One C-level scan finds out whether any hop-by-hop header is there (rarely).
    hop = tuple(dict.fromkeys(m.group(1) for m in _HOP_RE.finditer(lower))) if _HOP_RE.search(lower) else ()
    if upgrade:  # a WebSocket handshake needs its Connection/Upgrade headers end to end
        hop = tuple(h for h in hop if h not in (b"connection", b"upgrade"))
    xff = _header(lower, head, _X_FORWARDED_FOR)
    host = _header(lower, head, _HOST) or b""
    drop = hop + ((b"x-forwarded-for",) if xff is not None else ())
    if drop:
        head = _drop_headers(head, drop)
    chain = (xff + b", " if xff else b"") + peer.encode()
    extra += b"X-Forwarded-For: " + chain + b"\r\n"
    if lower.find(_X_FORWARDED_PROTO) < 0:
        extra += b"X-Forwarded-Proto: http\r\n"
    if lower.find(_X_FORWARDED_HOST) < 0 and host:
        extra += b"X-Forwarded-Host: " + host + b"\r\n"
    return head, extra
