"""One sidecar beside one app instance.

  start:  inbound listener (public port) -> app on 127.0.0.1; one local listener per
          upstream, resolved through Consul; admin listener (/metrics, /ready, /status);
          once the app answers its health path, register in Consul (anti-entropy keeps
          the registration there).
  run:    if the app stops answering (or the supervisor signals SIGUSR1: "your app
          died"), force the Consul check critical at once instead of waiting for the
          next check interval.
  stop:   on SIGTERM deregister first, keep serving for the drain period so every
          watcher sees the change, then finish in-flight requests and exit.

Listening, registering and the way down are the gateway's too (shared.mesh.endpoint);
the app probe and SIGUSR1 are the sidecar's own.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time

import aiohttp
from aiohttp import web

from shared.mesh import local
from shared.mesh.authorize import Authorizer
from shared.mesh.balancing import Balancer
from shared.mesh.discovery import Endpoint, ServiceWatch, route_to
from shared.mesh.endpoint import MeshEndpoint
from shared.mesh.identity import Identity
from shared.mesh.meta import InstanceMeta
from shared.mesh.mtls import Inbound, Outbound
from shared.mesh.relay import Relay, RelaySettings, Route
from shared.mesh.telemetry import AccessLog, RelayMetrics
from sidecar.settings import SidecarSettings

log = logging.getLogger("meshvisor.sidecar")

APP_PROBE_INTERVAL = 1.0


class Sidecar:
    def __init__(self, settings: SidecarSettings) -> None:
        self.s = settings
        self.metrics = RelayMetrics("sidecar")
        self.access_log = AccessLog(settings.service, settings.instance) if settings.access_log else None
        self.watches: dict[str, ServiceWatch] = {}
        self.balancers: dict[str, Balancer] = {}
        self.metrics.balancers = self.balancers.values  # ejections by upstream
        self.app_healthy = False
        self._last_probe = (-math.inf, False)  # (time.monotonic(), healthy) of the last probe of the app
        self.unix_socket = ""  # the announced name, once listening on it (shared.mesh.local)
        self._stop = asyncio.Event()
        # With mTLS: this instance's Connect identity, who may call it, how it calls others.
        self.identity: Identity | None = None
        self.inbound: Inbound | None = None
        self.outbound: Outbound | None = None

    def _meta(self) -> dict[str, str]:
        s = self.s
        return InstanceMeta(
            instance=s.index, version=s.version, health=s.health, route=s.route, openapi=s.openapi,
            idempotency_key=s.idempotency_key, unix_socket=self.unix_socket,
            host_id=local.host_id() if self.unix_socket else "",
            metrics_port=self.admin_port, app_metrics_port=s.app_port if s.app_metrics.startswith("/") else 0,
            app_metrics_path=s.app_metrics if s.app_metrics not in ("/metrics", "") else "",
        ).to_meta()

    # -- start ---------------------------------------------------------------------

    async def run(self) -> None:
        s = self.s
        # Listeners, registration and the way down: shared with the gateway.
        self.endpoint = MeshEndpoint(s.consul_address, s.consul_token, drain_seconds=s.drain_seconds, log=log,
                                     access_log=self.access_log)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self._app_died)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        self.endpoint.at_close(self._session.close)
        async with self.endpoint:
            await self._start_admin()
            if s.mtls:
                await self._start_identity()
            await self._start_inbound()
            # Announced once listening, with the socket if one is.
            self.endpoint.announce(
                service_id=s.service_id,
                name=s.service,
                address=s.host,
                port=s.port,
                meta=self._meta(),
                # With mTLS the public port takes no plain HTTP: the check goes through
                # the admin listener (see _start_admin).
                check_url=(f"http://127.0.0.1:{self.admin_port}/health" if s.mtls
                           else f"http://{s.host}:{s.port}{s.health}"),
                connect_native=s.mtls,
                check_interval=s.check_interval,
                check_timeout=s.check_timeout,
                deregister_after=s.deregister_after,
            )
            await self._start_upstreams()
            log.info("listening", extra={"fields": {
                "public": f"{s.host}:{s.port}", "unix_socket": self.unix_socket or None,
                "app": f"127.0.0.1:{s.app_port}", "app_socket": s.app_socket or None,
                "upstreams": s.upstreams, "admin": s.admin_port}})
            await self.endpoint.serve_until(self._stop, first=self._register_when_app_ready())

    async def _start_admin(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/status", self._status)
        # Consul's check, which cannot present a certificate (1.8 HTTP checks), comes in
        # here: loopback only (the agent is on this host), and it reaches the app's health
        # path and nothing else.
        app.router.add_get("/health", self._health)
        self._admin = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._admin.setup()
        self.endpoint.at_close(self._admin.cleanup)
        site = web.TCPSite(self._admin, "127.0.0.1", self.s.admin_port)
        await site.start()
        self.admin_port = site._server.sockets[0].getsockname()[1]

    async def _start_identity(self) -> None:
        """The leaf of this service and the CA roots (followed from now on), and the
        intentions' answers for whoever calls: before any listener opens."""
        consul = self.endpoint.consul
        self.identity = Identity(consul, self.s.service, log=log)
        self.endpoint.at_close(self.identity.stop)
        await self.identity.start()
        authorizer = Authorizer(consul, self.s.service, log=log)
        self.endpoint.at_close(authorizer.stop)
        await authorizer.start()
        self.inbound, self.outbound = Inbound(self.identity, authorizer), Outbound(self.identity)
        log.info("Connect identity in hand", extra={"fields": {"uri": self.identity.uri}})

    async def _start_inbound(self) -> None:
        app = Balancer(self.s.service, eject_after=1_000_000)  # one target: never eject it
        app.update([("app", "127.0.0.1", self.s.app_port, {})])
        app.backends[0].socket = self.s.app_socket or None  # relayed through it; APP_PORT if it fails
        # retries=1: once more on a fresh connection when a pooled one turns out stale,
        # which a keyed POST survives too when this app honours the key.
        route = Route("inbound", app, connect_timeout=self.s.connect_timeout,
                      request_timeout=self.s.request_timeout, retries=1, idempotency_key=self.s.idempotency_key)
        relay = Relay(RelaySettings("inbound", header_timeout=self.s.header_timeout), lambda method, target: route,
                      self.metrics, self.access_log, inbound=self.inbound)
        tls = self.inbound.context if self.inbound is not None else None
        await self.endpoint.listen(relay, self.s.host, self.s.port, reuse_port=self.s.reuse_port, ssl=tls)
        if self.s.unix_socket and local.host_id():
            name = local.socket_name(self.s.service_id, self.s.port)
            try:
                await self.endpoint.listen_local(relay, name, ssl=tls)
                self.unix_socket = name
            except OSError as exc:  # e.g. taken: the TCP port serves everyone alike
                log.warning("cannot listen on the Unix socket; TCP only", extra={"fields": {
                    "socket": name, "error": str(exc)}})

    async def _start_upstreams(self) -> None:
        for name, port in self.s.upstreams.items():
            balancer = Balancer(name)
            self.balancers[name] = balancer

            route = Route(name, balancer, connect_timeout=self.s.connect_timeout,
                          request_timeout=self.s.request_timeout, retries=self.s.retries, tls=self.outbound)

            def update(endpoints: tuple[Endpoint, ...], balancer=balancer, route=route) -> None:
                route_to(route, endpoints)
                log.info("upstream instances changed", extra={"fields": {
                    "upstream": balancer.name, "instances": [f"{e.address}:{e.port}" for e in endpoints]}})

            watch = ServiceWatch(self.endpoint.consul, name, on_change=update, log=log, connect=self.s.mtls)
            self.watches[name] = watch
            self.endpoint.at_close(watch.stop)
            await watch.start()
            relay = Relay(RelaySettings("upstream", header_timeout=self.s.header_timeout),
                          lambda method, target, route=route: route, self.metrics, self.access_log)
            await self.endpoint.listen(relay, "127.0.0.1", port)

    async def _register_when_app_ready(self) -> None:
        waited = time.monotonic()
        said = False
        while not await self._probe_app():
            if not said and time.monotonic() - waited > 5:
                log.warning("app is not answering its health path yet; registration waits")
                said = True
            await asyncio.sleep(0.2)
        self.app_healthy = True
        try:
            await self.endpoint.register()
        except Exception as exc:  # the agent is away or refused: its anti-entropy task keeps trying
            log.warning("could not register in Consul yet", extra={"fields": {"error": str(exc)}})
        else:
            log.info("registered in Consul", extra={"fields": {"service_id": self.s.service_id}})
        self.endpoint.spawn(self._watch_app())

    async def _probe_app(self) -> bool:
        try:
            async with self._session.get(f"http://127.0.0.1:{self.s.app_port}{self.s.health}") as resp:
                healthy = 200 <= resp.status < 300
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            healthy = False
        self._last_probe = (time.monotonic(), healthy)
        return healthy

    # -- run -----------------------------------------------------------------------

    async def _watch_app(self) -> None:
        """Tell Consul at once when the app stops answering; its own check confirms recovery."""
        while True:
            await asyncio.sleep(APP_PROBE_INTERVAL)
            healthy = await self._probe_app()
            if self.app_healthy and not healthy:
                log.warning("app stopped answering its health path: check forced critical")
                await self._mark_critical()
            elif healthy and not self.app_healthy:
                log.info("app answers again")
            self.app_healthy = healthy

    def _app_died(self) -> None:
        self._last_probe = (-math.inf, False)  # Consul's next check must not hear an older "passing"
        if self.app_healthy:
            log.warning("supervisor reports the app died: check forced critical")
        self.app_healthy = False
        asyncio.get_running_loop().create_task(self._mark_critical())

    async def _mark_critical(self) -> None:
        if self.endpoint.registration is None:  # not announced yet: nothing to take out
            return
        try:
            await self.endpoint.registration.mark_critical()
        except Exception as exc:  # the agent may be down; its own check will do it
            log.warning("could not force the check critical", extra={"fields": {"error": str(exc)}})

    # -- admin ---------------------------------------------------------------------

    def problems(self) -> list[str]:
        """What keeps this sidecar from working as it should (for supervisor status)."""
        found = []
        if self.identity is not None and self.identity.problem:
            found.append(f"identity: {self.identity.problem} (the last good certificate is kept)")
        if self.inbound is not None and self.inbound.authorizer.problem:
            found.append(self.inbound.authorizer.problem)
        return found

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def _health(self, request: web.Request) -> web.Response:
        # Consul's check (every 2 s) takes the answer of our own probe (every second) when it
        # is that fresh: the app is asked once a second, not one and a half times, which is
        # most of what an idle sidecar does.
        probed_at, healthy = self._last_probe
        if time.monotonic() - probed_at > APP_PROBE_INTERVAL:
            healthy = await self._probe_app()
        return web.json_response({"app": "passing" if healthy else "critical"}, status=200 if healthy else 503)

    async def _ready(self, request: web.Request) -> web.Response:
        ready = self.endpoint.registered and self.app_healthy and await self.endpoint.registration.wait_passing(0)
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response({
            "service_id": self.s.service_id,
            "registered": self.endpoint.registered,
            "unix_socket": self.unix_socket or None,
            "app_healthy": self.app_healthy,
            "identity": self.identity.uri if self.identity is not None else None,
            "problems": self.problems(),
            "inflight": sum(r.inflight for r in self.endpoint.relays),
            "upstreams": {
                name: [{"address": b.address, "inflight": b.inflight, "ejected": b.ejected_until > time.monotonic()}
                       for b in balancer.backends]
                for name, balancer in self.balancers.items()
            },
        })
