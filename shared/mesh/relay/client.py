"""The client side of the relay: the connection from a client, relaying one request at a
time to an instance and its response back (the third layer; see relay.exchange).

ClientSide is the asyncio Protocol the listener serves with, and the request loop:
- a request head is found with bytes.find, validated by httptools (llhttp, C), read for
  its framing (relay.http1) and forwarded with the few header lines we add spliced in
  (relay.headers), never rebuilt;
- the route is the router's answer for its method and target; a request is safe to send
  twice (`retry_safe`) with an idempotent method, or with an Idempotency-Key to a
  service that honours it;
- the next pipelined request waits in `buf` until the current exchange has ended;
- a request head must be whole within `header_timeout` of the connection's accept, or
  of its first bytes on a kept-alive connection (nginx's client_header_timeout; the
  wait between requests is the idle timeout's): else 408 and close. No timer per
  request: the listener's deadline sweep checks `head_deadline`, set off the hot path
  (a head that comes whole in one read only clears it).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import httptools

from shared.mesh.relay.forwarding import Forwarding
from shared.mesh.relay.headers import new_id, rewrite_request
from shared.mesh.relay.http1 import CHUNKED, IDEMPOTENCY_KEY, LENGTH, MAX_HEAD, NONE, framing

if TYPE_CHECKING:
    from shared.mesh.authorize import Decision

IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))


class ClientSide(Forwarding):
    """A connection from a client; relays one request at a time to an instance."""

    __slots__ = ()

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.relay.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""  # a Unix socket's peer has no address
        inbound = self.relay.inbound
        if inbound is not None:  # mTLS: the handshake is done; may this client's service call?
            self.decision = inbound.admit(transport, self._admitted)
            if self.decision is None:  # being asked: read nothing until the answer
                self.pause_reading()

    def _admitted(self, decision: Decision) -> None:
        self.decision = decision
        self._resume_reading()

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

    def head_timed_out(self) -> None:
        """No whole request head by `head_deadline` (Relay's sweep): 408 and close when
        part of one came; a quiet close when nothing did (a pre-connection, an unused
        pooled one: nothing was asked, so nothing is answered)."""
        self.head_deadline = 0.0
        if self.busy or self.lingering or self.tunnel is not None or self.closed:
            return
        if not self.buf.strip(b"\r\n"):
            self.close()
            return
        timeout = self.relay.settings.header_timeout
        self.started = time.perf_counter() - timeout  # the access log's duration: about the wait
        self.request_id = new_id()
        self._reply(408, f"no complete request head within {timeout:g}s", close=True)

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
            elif not self.head_deadline:  # its first bytes, on a kept-alive connection
                self.head_deadline = self.relay.loop.time() + self.relay.settings.header_timeout
            return
        self.head_deadline = 0.0
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
        decision = self.decision
        if decision is not None and not decision.allowed:  # checked per request: intentions change
            self.buf = b""
            self._reply(403, f"{decision.caller} may not call {self.relay.inbound.authorizer.target}", close=True)
            return
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
