"""The gateway's route table, from Consul alone.

A CatalogWatch follows the set of services; for each one a ServiceWatch follows its
passing instances. A service whose instances carry `route` in their Meta is exposed
under that prefix; the longest matching prefix wins. A service whose instances all went
critical keeps its prefix (answering 503: nothing healthy) until it leaves the catalog.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

import consul.aio

from shared.mesh.balancing import Balancer
from shared.mesh.discovery import CatalogWatch, Endpoint, ServiceWatch, route_to
from shared.mesh.meta import InstanceMeta
from shared.mesh.relay import Route

log = logging.getLogger("meshvisor.gateway.routes")


def match(table: list[tuple[bytes, Route]], target: bytes) -> Route | None:
    """The route of the first prefix (longest first) that `target` starts with on a whole
    path segment: /api/v1/auth matches /api/v1/auth, /api/v1/auth/x and /api/v1/auth?q,
    not /api/v1/authx."""
    for prefix, route in table:
        if target.startswith(prefix):
            rest = target[len(prefix):len(prefix) + 1]
            # == rather than `rest in b"/?"`: in Python 3.11 `bytes in bytes` builds and
            # discards a TypeError first (see shared.mesh.relay.http1), and this runs per request.
            if not rest or rest == b"/" or rest == b"?":
                return route
    return None


class RouteTable:
    def __init__(self, client: consul.aio.Consul, make_route: Callable[[str, Balancer], Route],
                 on_change: Callable[[], None] | None = None) -> None:
        self.client = client
        self.make_route = make_route
        self.on_change = on_change
        self.catalog = CatalogWatch(client, on_change=self._services_changed, log=log)
        self.watches: dict[str, ServiceWatch] = {}
        self.routes: dict[str, Route] = {}  # service -> its route
        self.prefixes: dict[str, str] = {}  # service -> last known prefix
        self.endpoints: dict[str, tuple[Endpoint, ...]] = {}
        # (prefix bytes, route), longest prefix first: what the hot path walks.
        self.table: list[tuple[bytes, Route]] = []
        self._tasks: set[asyncio.Task] = set()

    async def start(self, timeout: float = 10.0) -> None:
        await self.catalog.start()
        await self.catalog.wait_ready(timeout)

    async def stop(self) -> None:
        await self.catalog.stop()
        for watch in list(self.watches.values()):
            await watch.stop()
        for task in self._tasks:
            task.cancel()

    def match(self, target: bytes) -> Route | None:
        return match(self.table, target)

    def routed(self) -> set[str]:
        """Names of the services the table serves now."""
        return {route.name for _, route in self.table}

    def summary(self) -> dict[str, dict]:
        """{prefix: {"service", "instances"}} for /health."""
        return {
            (prefix.decode() or "/"): {"service": route.name, "instances": len(route.balancer.backends)}
            for prefix, route in sorted(self.table)
        }

    # -- following Consul ------------------------------------------------------------

    def _services_changed(self, services: dict[str, list[str]]) -> None:
        for name in services:
            if name not in self.watches and name != "consul":
                watch = ServiceWatch(self.client, name, log=log,
                                     on_change=lambda eps, name=name: self._instances_changed(name, eps))
                self.watches[name] = watch
                self._spawn(watch.start())
        for name in [n for n in self.watches if n not in services]:
            watch = self.watches.pop(name)
            self._spawn(watch.stop())
            self.endpoints.pop(name, None)
            self.prefixes.pop(name, None)
            route = self.routes.pop(name, None)
            if route is not None:
                route.balancer.update(())
        self._rebuild()

    def _instances_changed(self, name: str, endpoints: tuple[Endpoint, ...]) -> None:
        if name not in self.watches:  # a last update from a watch of a service that left
            return
        self.endpoints[name] = endpoints
        routes = Counter(route for e in endpoints if (route := InstanceMeta.from_meta(e.meta).route))
        if routes:
            prefix = routes.most_common(1)[0][0]
            if len(routes) > 1:
                log.warning("instances of %s disagree on their route: %s; using %s", name, dict(routes), prefix)
            self.prefixes[name] = prefix
        route = self.routes.get(name)
        if route is None:
            route = self.routes[name] = self.make_route(name, Balancer(name))
        route_to(route, endpoints)
        self._rebuild()

    def _rebuild(self) -> None:
        claimed: dict[str, str] = {}
        table = []
        for name in sorted(self.prefixes):
            prefix = self.prefixes[name]
            if name not in self.watches or name not in self.routes:
                continue
            if prefix in claimed:
                log.warning("route %s of %s is already served by %s; ignored", prefix, name, claimed[prefix])
                continue
            claimed[prefix] = name
            # "/" is stored as b"": it then matches every path through the same test.
            table.append((prefix.rstrip("/").encode(), self.routes[name]))
        table.sort(key=lambda item: len(item[0]), reverse=True)
        changed = [(p, r.name) for p, r in table] != [(p, r.name) for p, r in self.table]
        self.table = table
        if changed:
            log.info("routes: %s", {p.decode(): r.name for p, r in table})
            if self.on_change is not None:
                self.on_change()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
