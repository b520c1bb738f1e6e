"""The instance side of the relay: one keep-alive connection to an instance, relaying one
response at a time to the client side that sent the request, or a WebSocket tunnel.

Design: a response is relayed as received. Only its status line and framing are read
(the instance is one of ours: no parser for the head); httptools follows a chunked body
to find its end. Everything the client must see goes through the `Client` interface
below, never through the client side's attributes, so the two sides can change apart.

Invariants:
- `client` is the client side this connection relays for, None while it is idle in the
  pool (bytes arriving then are not a state we can trust: the connection is closed);
- whatever ends an exchange detaches the client first (`client = None`), so that a late
  callback (a close, a last read) cannot reach a client that has moved on;
- a connection hands each exchange back exactly once: response_done,
  response_ended_by_close, response_cut, attempt_failed (nothing usable came back) or
  tunnel_opened (from then on it is a tunnel until either side closes).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import httptools

from shared.mesh.balancing import Backend
from shared.mesh.relay.http1 import CHUNKED, EOF, LENGTH, MAX_HEAD, NONE, framing


class Client(Protocol):
    """What an instance connection asks of the client side (ClientSide: relay.exchange, relay.forwarding)."""

    def write(self, data: bytes) -> None:
        """Bytes for the client as they are: an interim (1xx) head, tunnelled data."""

    def can_retry_status(self) -> bool:
        """Whether a 502/503 answer would be retried on another instance rather than relayed."""

    def attempt_failed(self, kind: str, any_method: bool) -> None:
        """No response came back (`kind` for the metrics); retried or answered by the client side."""

    def response_head(self, status: int, head: bytes, lower: bytes, body: bytes, more: bool) -> None:
        """The response's head and the first of its body; `more`: body still to come."""

    def response_body(self, data: bytes) -> None:
        """More of the response body."""

    def response_done(self, reusable: bool) -> None:
        """The whole response went to the client; `reusable`: this connection may serve another."""

    def response_ended_by_close(self) -> None:
        """The body ran to the end of the connection (no framing): done, and the client closes too."""

    def response_cut(self) -> None:
        """The response broke off mid-way: the client's connection closes so it can tell."""

    def tunnel_opened(self, up: UpstreamSide, status: int, head: bytes) -> None:
        """The instance accepted an upgrade: bytes flow both ways untouched from now on."""

    def tunnel_closed(self) -> None:
        """The instance closed the tunnel."""

    def pause_reading(self) -> None:
        """The instance reads slower than the client sends: stop reading the client."""

    def resume_request(self) -> None:
        """The instance reads again: resume reading the client if its request is not all in."""


class UpstreamSide(asyncio.Protocol):
    """A keep-alive connection to one instance, relaying one response at a time."""

    __slots__ = ("backend", "buf", "client", "closed", "done", "head_done", "is_head", "keep_alive", "mode",
                 "parser", "reading_paused", "remaining", "reused", "stand_in", "transport", "tunnelled", "upgrade")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reading_paused = False
        self.tunnelled = False
        # TCP standing in for the instance's Unix socket, which had failed (see relay.pool).
        self.stand_in = False
        # The framing of the response being relayed, as its head says (see data_received).
        self.keep_alive, self.mode, self.remaining, self.parser = True, NONE, 0, None
        self.begin(None, reused=False, is_head=False, upgrade=False)

    @property
    def usable(self) -> bool:
        return not self.closed and not self.transport.is_closing()

    def begin(self, client: Client | None, reused: bool, is_head: bool, upgrade: bool) -> None:
        """Relay the response to the request `client` is about to send (a HEAD, an upgrade)."""
        self.client = client
        self.reused = reused
        self.buf = b""
        self.head_done = False
        self.done = False
        self.is_head = is_head
        self.upgrade = upgrade

    def abandon(self) -> None:
        """The client side gives up on this exchange: no more callbacks, and closed."""
        self.client = None
        self.close()

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_request()

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
            client.tunnel_closed()
        elif not self.head_done:
            # Nothing came back. Connection failures are safe to retry for idempotent
            # methods (the instance may have processed the request before dying).
            client.attempt_failed("reset" if self.reused else "closed", False)
        elif self.mode == EOF:
            client.response_ended_by_close()
        else:
            client.response_cut()  # cut in the middle of a response: the client must see it

    def eof_received(self) -> bool:
        return False

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            self.close()  # bytes on an idle connection: not a state we can trust
            return
        if self.tunnelled:
            client.write(data)
            return
        if not self.head_done:
            buf = self.buf + data if self.buf else data
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        self._bad_response(client)  # response head too large
                    else:
                        self.buf = buf
                    return
                if not buf.startswith(b"HTTP/1."):
                    self._bad_response(client)  # not an HTTP/1.x response
                    return
                try:
                    status = int(buf[9:12])
                except ValueError:
                    self._bad_response(client)  # malformed status line
                    return
                if 100 <= status < 200 and status != 101:  # interim (100 Continue): pass it on
                    client.write(buf[:end + 4])
                    buf = buf[end + 4:]
                    if not buf:
                        self.buf = b""
                        return
                    continue
                break
            self.buf = b""
            if status == 101 and self.upgrade:
                self.tunnelled = True
                self.head_done = True
                client.tunnel_opened(self, status, buf)
                return
            if status in (502, 503) and client.can_retry_status():
                self.abandon()
                client.attempt_failed(f"status_{status}", False)
                return
            head, data = buf[:end + 4], buf[end + 4:]
            lower = head.lower()
            try:
                self.keep_alive, mode, self.remaining = framing(
                    head, lower, head.startswith(b"HTTP/1.1"), self.is_head or status in (204, 304))
            except ValueError:
                self._bad_response(client)  # invalid Content-Length
                return
            if mode == CHUNKED:
                parser = httptools.HttpResponseParser(self)
                try:
                    parser.feed_data(head)
                except httptools.HttpParserError:
                    self._bad_response(client)  # malformed response head
                    return
                self.parser = parser
                self.done = False
            elif mode == EOF:
                self.keep_alive = False  # the end of the body is the end of the connection
            self.mode = mode
            self.head_done = True
            if mode == LENGTH and len(data) <= self.remaining:  # the common case: one write
                self.remaining -= len(data)
                client.response_head(status, head, lower, data, self.remaining != 0)
                if self.remaining == 0:
                    client.response_done(self.keep_alive)
                return
            client.response_head(status, head, lower, b"", True)
            if mode == NONE:
                client.response_done(self.keep_alive and not data)
                return
            if not data:
                return
        # body: the client side bounds the wait for each piece (request_timeout)
        mode = self.mode
        if mode == LENGTH:
            if len(data) >= self.remaining:
                extra = len(data) > self.remaining
                client.response_body(data[:self.remaining] if extra else data)
                self.remaining = 0
                client.response_done(self.keep_alive and not extra)
            else:
                self.remaining -= len(data)
                client.response_body(data)
        elif mode == CHUNKED:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                client.response_body(data)
                client.response_cut()
                return
            client.response_body(data)
            if self.done:
                client.response_done(self.keep_alive)
        else:
            client.response_body(data)

    def _bad_response(self, client: Client) -> None:
        self.abandon()
        client.attempt_failed("bad_response", False)
