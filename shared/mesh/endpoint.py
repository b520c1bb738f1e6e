"""The lifecycle of one mesh endpoint, the same for the gateway and every sidecar.

  start:  listen (relays on TCP; a sidecar's inbound relay on its Unix socket too), then
          register in Consul and keep the registration true (anti-entropy,
          shared.mesh.registration) until asked to stop.
  stop:   deregister first and keep serving for `drain_seconds`, so that every watcher
          (gateways, other sidecars) sees the instance leave before its listeners close;
          then stop accepting, give the requests in flight up to 10 s, close the relays,
          close what the process opened beside them (its watches, its admin listener:
          last opened, first closed), flush the access log and close the Consul client.

Used as `async with MeshEndpoint(...) as endpoint:`, which stops it however the block
ends (a bind error included). What belongs to one process stays there: the sidecar
waits for its app before registering and forces the check critical when the app dies;
the gateway serves its own endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from ssl import SSLContext
from typing import Any

import uvloop

from shared.kit import log as logsetup
from shared.kit.startup import exit_cleanly_if_it_cannot_listen
from shared.mesh import local
from shared.mesh.consul import make_client
from shared.mesh.envstruct import InstanceSettings, SettingsError
from shared.mesh.registration import Registration
from shared.mesh.relay import Relay
from shared.mesh.telemetry import AccessLog

# Once the listeners are closed, how long requests in flight may take to finish.
FINISH_IN_FLIGHT = 10.0


class MeshEndpoint:
    """Listeners, relays, the Consul registration and background tasks of one process."""

    def __init__(self, consul_address: str, consul_token: str, *, drain_seconds: float, log: logging.Logger,
                 access_log: AccessLog | None = None) -> None:
        self.consul = make_client(consul_address, consul_token)  # needs the running loop
        self.drain_seconds = drain_seconds
        self.log = log
        self.access_log = access_log
        self.servers: list[asyncio.AbstractServer] = []
        self.relays: list[Relay] = []
        self.registration: Registration | None = None  # once announce()d
        self._tasks: list[asyncio.Task] = []
        self._closing = contextlib.AsyncExitStack()

    async def __aenter__(self) -> MeshEndpoint:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    @property
    def registered(self) -> bool:
        """The agent last confirmed it holds this instance."""
        return self.registration is not None and self.registration.registered

    # -- start ---------------------------------------------------------------------------

    async def listen(self, relay: Relay, host: str, port: int, *, reuse_port: bool = False,
                     backlog: int = 1024, ssl: SSLContext | None = None) -> asyncio.AbstractServer:
        """Serve `relay` on host:port (TLS with `ssl`). OSError if the port cannot be had."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(relay.protocol, host, port, reuse_port=reuse_port or None,
                                          backlog=backlog, ssl=ssl)
        if relay not in self.relays:  # one relay may serve several addresses
            self.relays.append(relay)
        self.servers.append(server)
        return server

    async def listen_local(self, relay: Relay, name: str, ssl: SSLContext | None = None) -> None:
        """Also serve `relay` (listening already) on the abstract Unix socket `name`
        (shared.mesh.local), TLS with `ssl`. OSError if the name is taken."""
        self.servers.append(await local.listen(relay.protocol, name, ssl))

    def announce(self, **registration: Any) -> Registration:
        """What register() will register: Registration's arguments but the client and log."""
        self.registration = Registration(self.consul, log=self.log, **registration)
        return self.registration

    async def register(self) -> None:
        """Register passing, and keep it so until shutdown (anti-entropy). Raises if the
        agent cannot be reached or refuses; the anti-entropy task keeps trying then."""
        assert self.registration is not None, "announce() first"
        try:
            await self.registration.register("passing")
        finally:
            self.spawn(self.registration.run_anti_entropy())

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run `coro` in the background until shutdown, which cancels it first."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        return task

    def at_close(self, close: Callable[[], Awaitable[Any]]) -> None:
        """Await `close()` at shutdown once the relays are closed (last added, first run)."""
        self._closing.push_async_callback(close)

    async def serve_until(self, stop: asyncio.Event, first: Awaitable[Any] | None = None) -> None:
        """Serve until `stop` is set. `first` (the sidecar's wait for its app, then its
        registration) runs meanwhile; a stop that comes before it ends cancels it."""
        stopped = asyncio.ensure_future(stop.wait())
        started = None if first is None else asyncio.ensure_future(first)
        try:
            if started is not None:
                await asyncio.wait({started, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if started.done():
                    started.result()  # its error, if it failed
                else:
                    started.cancel()
                    await asyncio.wait({started})
            await stopped
        finally:
            for future in (stopped, started):
                if future is not None:
                    future.cancel()

    # -- stop ----------------------------------------------------------------------------

    async def shutdown(self) -> None:
        started = time.monotonic()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.registered:
            await self.registration.deregister()
            self.log.info("deregistered; draining", extra={"fields": {"drain_seconds": self.drain_seconds}})
            # Watchers (gateways, other sidecars) need a moment to see the deregistration;
            # until then requests still arrive and are served.
            await asyncio.sleep(self.drain_seconds)
        for server in self.servers:
            server.close()
        for relay in self.relays:
            relay.start_draining()
        idle = await asyncio.gather(*(relay.wait_idle(FINISH_IN_FLIGHT) for relay in self.relays))
        for relay in self.relays:
            relay.close()
        await self._closing.aclose()
        if self.access_log is not None:
            self.access_log.flush()
        await self.consul.close()
        self.log.info("stopped", extra={"fields": {"seconds": round(time.monotonic() - started, 2),
                                                   "cut_requests": not all(idle)}})


def name_the_process(title: str) -> None:
    """What `ps` and `top` show for this process, e.g. "sidecar web.1": without it
    every sidecar is "python -m sidecar", and a forked one the fork server's command line.
    Written over the command line's own memory only (SPT_NOENV): /proc/PID/environ stays
    readable, and a title longer than the command line is cut."""
    os.environ.setdefault("SPT_NOENV", "1")
    import setproctitle

    setproctitle.setproctitle(title)


def run_process(settings_class: type[InstanceSettings], run: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
    """The entry point of a mesh process (`python -m sidecar`, `python -m services.gateway`):
    its settings from the environment (a bad one: one line naming the variable, exit 2),
    its JSON logging, `run(settings)` on uvloop (a port it cannot have: one line, exit 3)."""
    try:
        settings = settings_class.from_env()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    logsetup.setup(settings_class.component, settings.service, settings.instance)
    name_the_process(f"{settings_class.component} {settings.instance}")
    with exit_cleanly_if_it_cannot_listen():
        uvloop.run(run(settings))
