"""The API gateway: the single entry point for HTTP clients.

Requests under a routed prefix go through the shared relay to a passing instance of the
service (its sidecar), with retries, timeouts, ejection, X-Forwarded-*, request ids and
WebSocket pass-through. The gateway's own endpoints (/health, /metrics, /api-docs) are
served by a small aiohttp app on a private port that the relay routes to like any
instance, so the hot path has a single shape.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import swagger_ui_bundle
from aiohttp import web

from services.gateway.openapi import OpenApiMerger
from services.gateway.routes import RouteTable, match
from services.gateway.settings import GatewaySettings
from shared.kit.app import SERVER_LIMITS
from shared.mesh.balancing import Balancer
from shared.mesh.endpoint import MeshEndpoint
from shared.mesh.identity import Identity
from shared.mesh.meta import InstanceMeta
from shared.mesh.mtls import Outbound
from shared.mesh.relay import Relay, RelaySettings, Route
from shared.mesh.telemetry import AccessLog, RelayMetrics
from shared.kit.web import errors, request_context

log = logging.getLogger("meshvisor.gateway")

OWN_PREFIXES = (b"/health", b"/metrics", b"/api-docs")
SWAGGER_DIR = Path(swagger_ui_bundle.swagger_ui_path)
SWAGGER_INDEX = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>meshvisor API</title>
  <link rel="stylesheet" type="text/css" href="swagger-ui.css">
  <link rel="icon" type="image/png" href="favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="swagger-ui-bundle.js" charset="UTF-8"></script>
  <script src="swagger-ui-standalone-preset.js" charset="UTF-8"></script>
  <script src="swagger-initializer.js" charset="UTF-8"></script>
</body>
</html>
"""
SWAGGER_INITIALIZER = """window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/api-docs/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    layout: "StandaloneLayout"
  });
};
"""


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.s = settings
        self.metrics = RelayMetrics("gateway")
        self.access_log = AccessLog(settings.service, settings.instance) if settings.access_log else None
        self._stop = asyncio.Event()

    def _route(self, name: str, balancer: Balancer, tls: Outbound | None = None) -> Route:
        return Route(name, balancer, connect_timeout=self.s.connect_timeout,
                     request_timeout=self.s.request_timeout, retries=self.s.retries, tls=tls)

    def _service_route(self, name: str, balancer: Balancer) -> Route:
        """The route to a service's instances: mTLS when the mesh has it."""
        return self._route(name, balancer, self.outbound)

    def route_for(self, method: bytes, target: bytes) -> Route | None:
        # The gateway's own paths first: no service may take /health or /api-docs. One
        # C-level startswith over all their prefixes spares every other request the walk.
        if target.startswith(OWN_PREFIXES):
            own = match(self.own_table, target)
            if own is not None:
                return own
        return self.table.match(target)

    async def run(self) -> None:
        s = self.s
        # Listeners, registration and the way down: shared with the sidecars.
        endpoint = MeshEndpoint(s.consul_address, s.consul_token, drain_seconds=s.drain_seconds, log=log,
                                access_log=self.access_log)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        async with endpoint:
            self.outbound = None
            if s.mtls:  # the gateway's own Connect identity, presented to every sidecar
                identity = Identity(endpoint.consul, s.service, log=log)
                endpoint.at_close(identity.stop)
                await identity.start()
                self.outbound = Outbound(identity)
            self.openapi = None
            self.table = RouteTable(endpoint.consul, self._service_route,
                                    on_change=lambda: self.openapi and self.openapi.invalidate(), connect=s.mtls)
            self.openapi = OpenApiMerger(self.table, tls=self.outbound)
            self.metrics.balancers = lambda: (route.balancer for route in self.table.routes.values())
            own = await self._start_own_app()
            endpoint.at_close(self._own_runner.cleanup)
            own_route = self._route("gateway", Balancer("gateway", eject_after=1_000_000))
            own_route.balancer.update([("own", "127.0.0.1", own, {})])
            self.own_table = [(prefix, own_route) for prefix in OWN_PREFIXES]
            endpoint.at_close(self.table.stop)
            await self.table.start()
            relay = Relay(
                RelaySettings("gateway", forwarded=True, echo_request_id=True, max_body=s.max_body,
                              header_timeout=s.header_timeout),
                self.route_for, self.metrics, self.access_log,
            )
            await endpoint.listen(relay, s.host, s.port, reuse_port=s.reuse_port, backlog=2048)
            registered = s.host if s.host != "0.0.0.0" else "127.0.0.1"
            if s.advertise and s.advertise != registered and s.host != "0.0.0.0":
                await endpoint.listen(relay, s.advertise, s.port, reuse_port=s.reuse_port, backlog=2048)
                registered = s.advertise
            log.info("gateway listening on %s:%s (own endpoints on 127.0.0.1:%s)",
                     ", ".join(dict.fromkeys((s.host, registered))), s.port, own)
            if s.register:
                endpoint.announce(
                    service_id=s.service_id, name=s.service, address=registered,
                    port=s.port, meta=InstanceMeta(instance=s.index, role="gateway", metrics_port=own).to_meta(),
                    check_url=f"http://127.0.0.1:{own}/health",
                )
                await endpoint.register()
            await endpoint.serve_until(self._stop)

    # -- the gateway's own endpoints -----------------------------------------------------

    async def _start_own_app(self) -> int:
        # The shared middlewares: its 404/405 and errors in the error shape, request ids.
        app = web.Application(middlewares=[request_context, errors])
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api-docs", self._docs_redirect)
        app.router.add_get("/api-docs/", self._docs_index)
        app.router.add_get("/api-docs/openapi.json", self._openapi)
        app.router.add_get("/api-docs/swagger-initializer.js", self._initializer)
        app.router.add_static("/api-docs/", SWAGGER_DIR, show_index=False, follow_symlinks=False)
        self._own_runner = web.AppRunner(app, access_log=None, handle_signals=False, **SERVER_LIMITS)
        await self._own_runner.setup()
        site = web.TCPSite(self._own_runner, "127.0.0.1", self.s.admin_port)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({
            "status": 200,
            "message": "API Gateway is running",
            "timestamp": int(time.time() * 1000),
            "instance": self.s.instance,
            "routes": self.table.summary(),
        })

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def _docs_redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/api-docs/")

    async def _docs_index(self, request: web.Request) -> web.Response:
        return web.Response(text=SWAGGER_INDEX, content_type="text/html")

    async def _initializer(self, request: web.Request) -> web.Response:
        return web.Response(text=SWAGGER_INITIALIZER, content_type="application/javascript")

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(await self.openapi.document())
