"""Getting a request to an instance: the second layer of the client side (see
relay.exchange for the three).

- An attempt picks an instance (shared.mesh.balancing) and holds it through the
  connection's Lease; it reuses an idle connection to it from the pool or opens one
  (relay.pool: through its Unix socket when it is on this host).
- The request head goes out as soon as the connection is there; the body follows as it
  arrives, framed by Content-Length counting or by the parser for a chunked body. While
  connecting, up to PENDING_LIMIT of it waits before reading from the client stops.
- Up to REPLAY_LIMIT of the request is kept so that it can be sent again: whether an
  attempt that failed is retried, on a fresh connection or another instance, is
  relay.retry's decision; what the client is told when it is not, too. Each failed
  attempt of a request that is retried is one line of the access log (an `attempt`
  line: shared.mesh.telemetry), so `supervisor trace` shows every attempt.
- A request whose response does not start (or stops coming) within the route's
  request_timeout is answered 504 (Relay sweeps the deadlines and calls timed_out).
- A connection that cannot be opened because this process is out of file descriptors
  (EMFILE/ENFILE) is our failure, not the instance's: no retry, no mark against the
  instance, 503 to the client (relay.retry).
"""

from __future__ import annotations

import asyncio
import time

import httptools

from shared.mesh.balancing import Backend, Lease
from shared.mesh.relay.exchange import Exchange
from shared.mesh.relay.http1 import CHUNKED, LENGTH
from shared.mesh.relay.pool import Pool
from shared.mesh.relay.retry import (ANSWER, OUT_OF_DESCRIPTORS, RETRY, RETRY_FRESH, failure_answer, next_step,
                                     stale_connection)
from shared.mesh.relay.upstream import UpstreamSide

REPLAY_LIMIT = 64 * 1024  # requests up to this size can be replayed on another instance
PENDING_LIMIT = 256 * 1024  # body bytes held while connecting before we stop reading


class Forwarding(Exchange):
    """The attempts to get a client's request to an instance (see the module's doc)."""

    # The number and start (perf_counter) of the attempt under way once a request was
    # retried (`attempts` or `fresh_only` set): only then are they read, so a request
    # answered at the first attempt never touches them (see _record_attempt).
    __slots__ = ("attempt_number", "attempt_began")

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
            route = self.route
            up = await asyncio.wait_for(pool.open(backend, route.name, route.tls), route.connect_timeout)
        except asyncio.CancelledError:
            raise
        except (OSError, asyncio.TimeoutError) as exc:
            self.connecting = None
            if isinstance(exc, asyncio.TimeoutError):
                kind = "connect_timeout"
            else:
                kind = "descriptors" if exc.errno in OUT_OF_DESCRIPTORS else "connect_refused"
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
        if self.attempts or self.fresh_only:  # the last of a retried request's attempts
            self._record_attempt("timeout", self.lease, True)
        if self.lease is not None:
            self.lease.failed()
            self.lease = None
        self.upstream = None
        status, message, _ = failure_answer("timeout", self.route)
        self._reply(status, message, close=True)

    # -- the instance's report of a failed attempt (relay.upstream.Client) ------------------

    def attempt_failed(self, kind: str, any_method: bool) -> None:
        """An attempt produced no response: try again if relay.retry says so, else answer."""
        route = self.route
        lease = self.lease
        self.deadline = 0.0
        stale = stale_connection(kind, self.fresh_only)
        retried = self.attempts > 0 or self.fresh_only  # before this failure
        if lease is not None:
            if stale or kind == "descriptors":  # not the instance's failure
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
                         untried=len(route.balancer.backends) - len(self.tried), local=kind == "descriptors")
        if step != ANSWER or retried:
            self._record_attempt(kind, lease, retried)
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

    def _record_attempt(self, kind: str, lease: Lease | None, retried: bool) -> None:
        """One access line for a failed attempt of a request that is retried, or was
        (`retried`): `supervisor trace` shows every attempt. Never reached by a request
        answered at its first attempt."""
        now = time.perf_counter()
        number, began = (self.attempt_number + 1, self.attempt_began) if retried else (1, self.started)
        self.attempt_number, self.attempt_began = number, now
        log = self.relay.access_log
        if log is not None:
            log.attempt(self.relay.settings.listener, self.method.decode("latin-1"), self.target.decode("latin-1"),
                        int(kind[7:]) if kind.startswith("status_") else 0, now - began,
                        lease.backend.address if lease is not None else "", self.request_id, number, kind)

    def can_retry_status(self) -> bool:
        route = self.route
        return self.req_done and next_step(
            stale=False, any_method=False, retry_safe=self.retry_safe, sent_any=True,
            replay_kept=self.replay is not None, attempts=self.attempts, retries=route.retries,
            untried=len(route.balancer.backends) - len(self.tried) - 1) == RETRY  # - 1: this instance
