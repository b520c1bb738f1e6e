"""Connections to instances: kept alive and pooled per instance, and opened through an
instance's Unix socket when it is on this host, with TCP standing in while that fails.

The idle connections of an instance are its Backend.idle list (shared.mesh.balancing),
so they go when discovery drops the instance; a Pool is one relay's policy over them:
how many to keep, none while the relay drains, and how a new one is opened.

Invariants:
- a connection in Backend.idle has no client and reads (a paused one would never see
  the close, or the next response, on it); it leaves the list when it closes
  (UpstreamSide.connection_lost) or is taken;
- after a failed connect through an instance's Unix socket (its process just died or
  is restarting, its backlog is full, or it is in another network namespace after all),
  TCP is used for SOCKET_RETRY seconds, then the socket again. A TCP connection made
  meanwhile (a stand-in) is not pooled once the socket may be tried again, or pooled
  TCP would carry on for good.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from shared.mesh import local
from shared.mesh.balancing import Backend
from shared.mesh.relay.retry import OUT_OF_DESCRIPTORS
from shared.mesh.relay.upstream import UpstreamSide

if TYPE_CHECKING:
    from shared.mesh.mtls import Outbound

SOCKET_RETRY = 5.0  # after a failed connect through an instance's Unix socket, TCP for this long


class Pool:
    """One relay's connections to instances: taken idle, opened anew, put back after use."""

    __slots__ = ("keeping", "loop", "max_idle")

    def __init__(self, loop: asyncio.AbstractEventLoop, max_idle: int) -> None:
        self.loop = loop
        self.max_idle = max_idle  # per instance
        self.keeping = True  # False once the relay drains: connections close after use

    @staticmethod
    def take(backend: Backend) -> UpstreamSide | None:
        """An idle connection to `backend` that is still open, or None."""
        idle = backend.idle
        while idle:
            up = idle.pop()
            if up.usable:
                return up
        return None

    async def open(self, backend: Backend, service: str, tls: Outbound | None = None) -> UpstreamSide:
        """A new connection to `backend`, an instance of `service`: through its Unix socket
        when it is on this host. With `tls` (mTLS, shared.mesh.mtls: each new connection
        presents our leaf), an OSError too if the server does not prove to be `service`."""
        context = tls.context() if tls is not None else None
        address = backend.socket
        up = None
        if address is not None and time.monotonic() >= backend.socket_retry_at:
            try:
                up = (await local.connect(lambda: UpstreamSide(backend), address, context))[1]
            except OSError as exc:
                if exc.errno in OUT_OF_DESCRIPTORS:  # ours, not the socket's: TCP would fail too
                    raise
                backend.socket_retry_at = time.monotonic() + SOCKET_RETRY
        if up is None:
            up = (await self.loop.create_connection(lambda: UpstreamSide(backend), backend.host, backend.port,
                                                    ssl=context, server_hostname="" if tls is not None else None))[1]
            up.stand_in = address is not None
        if tls is not None and not tls.serves(up.transport, service):
            up.close()
            raise ConnectionRefusedError(f"{backend.address} did not prove to be an instance of {service}")
        return up

    def put_back(self, up: UpstreamSide) -> None:
        """Into its instance's idle connections, or closed if not wanted."""
        # The last write of a response can fill the client's buffer and pause it; a
        # pooled connection must read, or the next response on it is never seen.
        up.resume_reading()
        backend = up.backend
        if (up.closed or backend.removed or not self.keeping or len(backend.idle) >= self.max_idle
                or (up.stand_in and time.monotonic() >= backend.socket_retry_at)):
            up.close()
        else:
            backend.idle.append(up)
